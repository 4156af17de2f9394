from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_its_files_exist(path: Path) -> None:
    cfg = load_config(path)
    assert len(cfg.periods) >= 2
    for p in cfg.periods:
        for img in p.images:
            assert cfg.path(img).exists(), img
    for layer in cfg.rules.values():
        assert cfg.path(layer.path).exists(), layer.path
    assert cfg.base_dir == ROOT


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


BASE = """name: t
crs: EPSG:4547
resolution: 1
periods:
  - {name: a, images: [a.tif]}
  - {name: b, images: [b.tif]}
"""


def test_unknown_key_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'detection.treshold'"):
        load_config(_write(tmp_path, BASE + "detection: {treshold: 3}\n"))


def test_unknown_top_key_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'blocksize'"):
        load_config(_write(tmp_path, BASE + "blocksize: 3\n"))


def test_mistyped_value_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bad value for 'resolution'"):
        load_config(_write(tmp_path, BASE.replace("resolution: 1", "resolution: fine")))


def test_missing_key_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'crs'"):
        load_config(_write(tmp_path, BASE.replace("crs: EPSG:4547\n", "")))


def test_bad_band_role_and_category(tmp_path: Path) -> None:
    bad = BASE.replace("{name: a, images: [a.tif]}", "{name: a, images: [a.tif], bands: {rde: 1}}")
    with pytest.raises(ConfigError, match=r"periods.0.bands.rde"):
        load_config(_write(tmp_path, bad))
    with pytest.raises(ConfigError, match=r"unknown category 'graves'"):
        load_config(_write(tmp_path, BASE + "categories: {graves: {min_area_m2: 3}}\n"))


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        load_config(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_categories_merge_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE + "categories: {forest_grave: {min_area_m2: 9}}\n"))
    assert cfg.categories["forest_grave"].min_area_m2 == 9
    assert cfg.categories["illegal_construction"].min_area_m2 == 20
    assert cfg.register_path == "runs/register.gpkg"
