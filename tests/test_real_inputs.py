"""Real imagery in its delivered form (skipped when ../shared/data is absent).

OSCD: the raw per-band Sentinel-2 folders (13 bands at 10/20/60 m, EPSG:4326; saclay_w's second
date on another grid). Joplin: RGB tiles, before in EPSG:26915 and after in EPSG:4326.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.windows import Window

from pipeline import jobs
from pipeline.ingest import open_image, read_block, read_overview, working_grid

CITIES = ("brasilia", "lasvegas", "montpellier", "norcia", "saclay_w")


@pytest.mark.parametrize("city", CITIES)
def test_oscd_raw_folders_open_without_configuration(shared_data: Path, city: str) -> None:
    dates = dict(line.split(": ") for line in
                 (shared_data / "oscd" / city / "dates.txt").read_text().split("\n") if line)
    for n in (1, 2):
        src = open_image(shared_data / "oscd" / city / f"imgs_{n}")
        assert src.roles == ("blue", "green", "red", "nir", "swir1", "swir2")
        assert (src.sensor, src.res, src.scale) == ("Sentinel-2", 10.0, 1e-4)
        assert src.date.strftime("%Y%m%d") == dates[f"date_{n}"]  # old names: from the orbit
        assert len(src.tiles) == 1 and src.paths[2].name.endswith("_B04.tif")


def test_oscd_per_band_equals_stacked_case_and_second_grid_lines_up(shared_data: Path) -> None:
    raw1 = open_image(shared_data / "oscd" / "saclay_w" / "imgs_1")
    raw2 = open_image(shared_data / "oscd" / "saclay_w" / "imgs_2")
    assert raw1.tiles[0].shape == (639, 688) and raw2.tiles[0].shape == (631, 679)
    case = open_image(shared_data / "cases" / "oscd" / "saclay_w" / "before.tif")
    grid = working_grid([raw1, raw2], crs="EPSG:32631", resolution=10.0)
    win = Window(100, 100, 256, 256)
    a, va = read_block(raw1, grid, win)
    c, vc = read_block(case, grid, win)
    v = va & vc
    assert v.mean() > 0.95
    for role in ("blue", "green", "red", "nir"):  # the same pixels through both routes
        x, y = a[raw1.roles.index(role)][v], c[case.roles.index(role)][v]
        assert np.abs(x - y).mean() < 0.01
    swir = a[raw1.roles.index("swir1")][va]  # 20 m band on the 10 m grid
    assert np.isfinite(swir).all() and 0.02 < float(np.median(swir)) < 0.5
    o1, v1, _ = read_overview(raw1, grid)
    o2, v2, _ = read_overview(raw2, grid)
    vv = v1 & v2
    assert vv.mean() > 0.9 and np.corrcoef(o1[2][vv], o2[2][vv])[0, 1] > 0.5


def test_compare_on_raw_oscd_folders(shared_data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"  # a 3 km window keeps the test short; same code path as the CLI
    cfg.write_text(yaml.safe_dump({
        "name": "oscd", "crs": "EPSG:32631", "resolution": 10.0,
        "bounds": [437_500.0, 5_392_000.0, 440_500.0, 5_395_000.0],
        "periods": [{"name": "a", "images": ["x"]}, {"name": "b", "images": ["y"]}],
        "output": {"evidence": False, "report": False}}))
    d = shared_data / "oscd" / "saclay_w"
    out = jobs.compare(d / "imgs_1", d / "imgs_2", tmp_path / "out", config=cfg, workers=1)
    man = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert man["grid"]["shape"] == [300, 300]
    assert man["periods"]["before"]["date"] == "2016-03-15"
    assert sum(1 for i in man["inputs"] if i["role"] == "image:before") == 6
    fc = json.loads((out / "patches.geojson").read_text(encoding="utf-8"))
    for f in fc["features"]:
        assert 2.1 < f["properties"]["centroid_lon"] < 2.25
        assert 48.6 < f["properties"]["centroid_lat"] < 48.8


def test_compare_on_joplin_tile_folders(shared_data: Path, tmp_path: Path) -> None:
    pre, post = shared_data / "joplin" / "pre", shared_data / "joplin" / "post"
    out = jobs.compare(pre, post, tmp_path / "out", workers=2)
    man = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert man["grid"]["crs"] == "EPSG:26915" and man["not_observed_fraction"] < 0.05
    fc = json.loads((out / "patches.geojson").read_text(encoding="utf-8"))
    assert fc["features"]
    lon = [f["properties"]["centroid_lon"] for f in fc["features"]]
    lat = [f["properties"]["centroid_lat"] for f in fc["features"]]
    assert all(-94.52 < x < -94.47 for x in lon) and all(37.05 < y < 37.09 for y in lat)
    with rasterio.open(out / "change.tif") as ds:
        ch = ds.read(1)
    assert ((ch > 0) & (ch < 255)).mean() > 0.005


def test_joplin_tornado_swath_is_reported(shared_data: Path, tmp_path: Path) -> None:
    """Any change (the building network off, from a compare config that holds only that):
    most of this area lies in the swath. With the network, which learned new and vanished
    buildings, the debris field is not reported (it is no violation of the three kinds)."""
    cfg = tmp_path / "any-change.yaml"
    cfg.write_text("detection: {building_network: false}\n")
    got = {}
    for name, config in (("any", cfg), ("buildings", None)):
        out = jobs.compare(shared_data / "joplin" / "pre", shared_data / "joplin" / "post",
                           tmp_path / name, workers=2, config=config)
        with rasterio.open(out / "change.tif") as ds:
            ch = ds.read(1)
        got[name] = ((ch > 0) & (ch < 255)).mean()
    assert got["any"] > 0.15
    assert got["buildings"] < 0.5 * got["any"]


def test_levir_buildings_on_declared_farmland_are_found(shared_data: Path,
                                                        tmp_path: Path) -> None:
    """A LEVIR crop as it is (``tuban compare``) and declared farmland (``tuban run`` with a
    farmland layer over it, the bench's ``farmland`` protocol): inside farmland the spectral
    detector's change (vegetation lost, soil gained) joins the RGB model's and its network's,
    so new buildings there are still found. With the spectral detector's change alone there,
    13 % of LEVIR's new-building pixels were."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from accuracy import counts, load_case, run_compare, run_zoned, scores

    d = shared_data / "cases" / "levir" / "test_2_0000_0512"
    case = load_case(d)
    recall = {name: scores(counts(pred, case.label))["recall"] for name, pred in (
        ("as_is", run_compare(d, tmp_path / "as_is")),
        ("farmland", run_zoned(d, tmp_path / "farmland", case)))}
    assert recall["as_is"] > 0.6, recall
    assert recall["farmland"] >= 0.9 * recall["as_is"], recall
