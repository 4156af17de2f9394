"""stac: periods given as STAC Item / ItemCollection / Catalog JSON with local assets."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pystac
import pytest
from rasterio.windows import Window

from pipeline.config import PeriodConfig
from pipeline.errors import BandRoleError, InputError
from pipeline.grid import Grid
from pipeline.ingest import open_image, open_period, read_block
from pipeline.stac import read_bandsets

ORIGIN = (500_000.0, 2_545_000.0)
BBOX = [115.0, 23.0, 115.01, 23.01]


def asset(href: str, common: str | None = None, **extra: object) -> dict:
    a: dict = {"href": href, "type": "image/tiff; application=geotiff", "roles": ["data"]}
    if common:
        a["eo:bands"] = [{"name": common, "common_name": common}]
    return {**a, **extra}


def item(iid: str, when: str, assets: dict, **props: object) -> dict:
    return {"type": "Feature", "stac_version": "1.0.0", "id": iid, "bbox": BBOX,
            "geometry": {"type": "Polygon", "coordinates": [[[115.0, 23.0], [115.01, 23.0],
                                                             [115.01, 23.01], [115.0, 23.0]]]},
            "properties": {"datetime": when, **props}, "links": [], "assets": assets,
            "stac_extensions": []}


@pytest.fixture
def s2_items(make_raster, tmp_path: Path) -> Path:
    """Two items (west and east tile) with per-band assets, an SCL asset and a thumbnail."""
    feats = []
    for n, (iid, x0, when) in enumerate((("west", ORIGIN[0], "2024-06-20T03:05:00Z"),
                                         ("east", ORIGIN[0] + 160, "2024-06-21T03:05:00Z"))):
        assets = {}
        for key, common, dn in (("B02", "blue", 500), ("B03", "green", 700),
                                ("B04", "red", 900 + n), ("B08", "nir", 3000)):
            make_raster(f"data/{iid}/{key}.tif", np.full((16, 16), dn, "uint16"), res=10.0,
                        origin=(x0, ORIGIN[1]))
            assets[key] = asset(f"data/{iid}/{key}.tif", common, **{
                "raster:bands": [{"scale": 0.0001, "offset": -0.1}]})
        scl = np.full((8, 8), 4, "uint8")
        scl[0, 0] = 9
        make_raster(f"data/{iid}/SCL.tif", scl, res=20.0, origin=(x0, ORIGIN[1]))
        assets["SCL"] = asset(f"data/{iid}/SCL.tif")
        assets["thumbnail"] = {"href": f"data/{iid}/thumb.png", "type": "image/png",
                               "roles": ["thumbnail"]}
        feats.append(item(iid, when, assets, platform="sentinel-2a"))
    p = tmp_path / "items.json"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return p


def test_item_collection_roles_dates_scale_and_relative_hrefs(s2_items: Path) -> None:
    src = open_image(s2_items)
    assert src.roles == ("blue", "green", "red", "nir") and len(src.tiles) == 2
    assert (src.sensor, src.date, src.scale, src.offset) == ("Sentinel-2", dt.date(2024, 6, 20),
                                                             1e-4, -0.1)
    assert all(p.is_absolute() and p.exists() for p in src.paths)
    assert src.tiles[0].qa[0][1] == "scl" and src.bounds[2] - src.bounds[0] == pytest.approx(320)
    grid = Grid.from_bounds(src.bounds, 10.0, src.crs)
    arr, valid = read_block(src, grid, Window(0, 0, 32, 16), resampling="nearest")
    assert not valid[:2, :2].any() and not valid[:2, 16:18].any()  # SCL cloud in each tile
    assert valid.sum() == 32 * 16 - 8
    assert np.allclose(arr[2, 4, :16], 900e-4 - 0.1) and np.allclose(arr[2, 4, 16:], 901e-4 - 0.1)


def test_key_names_single_item_and_catalog(make_raster, tmp_path: Path) -> None:
    assets = {}
    for key, dn in (("red", 900), ("green", 700), ("blue", 500), ("nir08", 3000)):
        make_raster(f"l8/{key}.tif", np.full((8, 8), 12000 + dn, "uint16"), res=30.0)
        assets[key] = asset(f"{key}.tif")  # no eo:bands: roles from the keys
    it = item("LC09_x", "2023-05-10T02:00:00Z", assets, platform="landsat-9")
    (tmp_path / "l8" / "item.json").write_text(json.dumps(it))
    src = open_image(tmp_path / "l8" / "item.json")  # hrefs relative to the item's folder
    assert src.roles == ("blue", "green", "red", "nir")
    assert (src.sensor, src.scale, src.offset) == ("Landsat-8", 2.75e-5, -0.2)  # preset
    # a catalog written by pystac, items in sub-folders, assets given by absolute path
    cat = pystac.Catalog("cat", "test")
    pit = pystac.Item.from_dict(it)
    for a in pit.assets.values():
        a.href = str(tmp_path / "l8" / Path(a.href).name)
    cat.add_item(pit)
    cat.normalize_and_save(str(tmp_path / "cat"), pystac.CatalogType.SELF_CONTAINED)
    csrc = open_period(PeriodConfig(name="p", images=["cat/catalog.json"]), tmp_path)
    assert csrc.date == dt.date(2023, 5, 10) and csrc.roles == src.roles


def test_stac_errors_are_one_line(make_raster, tmp_path: Path) -> None:
    bad = tmp_path / "noassets.json"
    bad.write_text(json.dumps(item("x1", "2024-01-01T00:00:00Z", {
        "meta": {"href": "meta.xml", "type": "application/xml", "roles": ["metadata"]}})))
    with pytest.raises(InputError, match=r"noassets\.json: STAC item 'x1' has no raster asset "
                                         r"with a known band role; give"):
        read_bandsets(bad)
    remote = tmp_path / "remote.json"
    remote.write_text(json.dumps(item("x2", "2024-01-01T00:00:00Z", {
        "red": asset("https://example.com/red.tif", "red")})))
    with pytest.raises(InputError, match=r"remote\.json: asset https://example\.com/red\.tif .*"
                                         r"is remote; download"):
        open_image(remote)
    junk = tmp_path / "junk.json"
    junk.write_text('{"type": "Topology"}')
    with pytest.raises(InputError, match=r"junk\.json: JSON is not a STAC"):
        open_image(junk)
    make_raster("rg/red.tif", np.full((8, 8), 9, "uint16"))
    rg = tmp_path / "rg" / "items.json"
    rg.write_text(json.dumps({"type": "FeatureCollection", "features": [item(
        "x3", "2024-01-01T00:00:00Z", {"red": asset("red.tif", "red")})]}))
    with pytest.raises(BandRoleError, match=r"items\.json: tile x3 has no green/blue band"):
        open_image(rg)


def test_compare_on_two_item_collections(make_raster, tmp_path: Path) -> None:
    """``tuban compare a.json b.json``: a planted square of new roof is found."""
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    rng = np.random.default_rng(0)
    base = {k: (rng.normal(v, 40, (96, 96))).clip(1, None).astype("uint16")
            for k, v in (("blue", 600), ("green", 800), ("red", 700), ("nir", 3000))}
    paths = {}
    for when in ("a", "b"):
        assets = {}
        for k, arr in base.items():
            arr = arr.copy()
            if when == "b":
                arr[40:60, 40:60] = 3500  # bright, flat, unvegetated: a new roof
            make_raster(f"{when}/{k}.tif", arr, res=2.0)
            assets[k] = asset(f"{when}/{k}.tif", k)
        paths[when] = tmp_path / f"items_{when}.json"
        paths[when].write_text(json.dumps({"type": "FeatureCollection", "features": [
            item(f"scene_{when}", f"2024-0{3 if when == 'a' else 6}-01T00:00:00Z",
                 assets)]}))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compare", str(paths["a"]), str(paths["b"]), "-o", str(out),
                                   "--workers", "1"])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert man["periods"]["before"]["date"] == "2024-03-01"
    fc = json.loads((out / "patches.geojson").read_text(encoding="utf-8"))
    assert fc["features"], "the planted change must come out"
