"""Batch runs over three periods: the persistence rule (pipeline.persistence wired in run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
import yaml

from pipeline import jobs, stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def three_periods(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scene3")
    subprocess.run([sys.executable, str(ROOT / "sample_tiles" / "make_samples.py"), "--out",
                    str(out), "--size", "512", "--periods", "3"], check=True, timeout=300)
    return out


def _config(scene: Path, tmp: Path, periods: list[str], persist: int) -> Path:
    """No farmland layer: the seasonal-parcel rule cannot help, only persistence can."""
    data = {
        "name": "three", "crs": "EPSG:4547", "resolution": 1.0, "block_size": 256,
        "periods": [{"name": p, "images": [str(scene / p)], "sensor": "GF-2",
                     "bands": {"blue": 1, "green": 2, "red": 3, "nir": 4}} for p in periods],
        "rules": {r: {"path": str(scene / "rules" / f"{r}.geojson")}
                  for r in ("forest", "permits", "cemeteries")},
        # synthetic imagery: the spectral detector, as configs/sample.yaml says why
        "detection": {"persist_periods": persist, "method": "spectral"},
        "output": {"dir": str(tmp / "runs"), "evidence": False},
        "register": None,
    }
    path = tmp / f"cfg-{len(periods)}-{persist}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _hits(patches: gpd.GeoDataFrame, truth: gpd.GeoDataFrame) -> int:
    if patches.empty:
        return 0
    _, idx = patches.sindex.query(truth.geometry.values, predicate="intersects")
    return len(set(idx.tolist()))


def test_persistence_removes_seasonal_keeps_violations(three_periods: Path,
                                                        tmp_path: Path) -> None:
    scene = three_periods
    periods = ["2024-03", "2024-06", "2024-09"]
    two = jobs.run(_config(scene, tmp_path, periods[:2], 1), run_id="two")
    three = jobs.run(_config(scene, tmp_path, periods, 2), run_id="three")
    p2 = gpd.read_file(two / "patches.gpkg")
    p3 = gpd.read_file(three / "patches.gpkg")
    distractors = gpd.read_file(scene / "truth" / "distractors.geojson").to_crs(p2.crs)
    harvest = distractors[distractors["kind"] == "harvest"]
    violations = gpd.read_file(scene / "truth" / "violations.geojson").to_crs(p2.crs)
    # a two-period run reports the harvested fields (nothing tells it they are seasonal) ...
    assert _hits(p2, harvest) >= 1
    # ... the three-period run with persist_periods=2 reports the same pair without them
    assert _hits(p3, harvest) == 0
    # and the planted violations the two-period run found are still reported
    found2 = [v.truth_id for v in violations.itertuples() if p2.intersects(v.geometry).any()]
    found3 = [v.truth_id for v in violations.itertuples() if p3.intersects(v.geometry).any()]
    assert len(found2) >= 0.8 * len(violations)
    assert found3 == found2
    assert set(p3["after_date"]) == {"2024-06-20"}  # the reported pair is 03 -> 06
    # a stage rerun of the three-period run replays both compared pairs: 03->06 and 03->09
    stored = sorted(p.name for p in (three / "work").glob("scores-*.tif"))
    assert stored == ["scores-0-1.tif", "scores-0-2.tif"]
    stages.rerun_from(three, "classify")
    again = gpd.read_file(three / "patches.gpkg")
    assert sorted(again["patch_id"]) == sorted(p3["patch_id"])
    assert _hits(again, harvest) == 0
