"""ingest: discovery, band roles, dates, scaling, validation errors, windowed reads, layers."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from pipeline.config import PeriodConfig, config_from_dict
from pipeline.errors import (
    BandRoleError,
    ConfigError,
    InputError,
    MissingCRSError,
    MissingFileError,
    NoOverlapError,
    NotRasterError,
)
from pipeline.grid import Grid
from pipeline.ingest import (
    file_checksum,
    load_admin,
    load_layer,
    load_rules,
    open_image,
    open_period,
    read_block,
    read_overview,
    working_grid,
)
from pipeline.sensors import resolve_preset

LON0, LAT0 = 115.0, 23.0
RGB = ("red", "green", "blue")


def field(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """A smooth analytic scene (0.2..0.8) defined on the ground, independent of any grid."""
    x = (lon - LON0) * 102_500.0
    y = (lat - LAT0) * 110_700.0
    return (0.5 + 0.15 * np.sin(x / 23.0) * np.cos(y / 17.0) + 0.15 * np.sin((x + y) / 41.0))


def analytic_tile(make_raster, name: str, crs: str, center_lonlat: tuple[float, float],
                  shape: tuple[int, int], res: float, nodata: float | None = None) -> Path:
    """A 3-band float32 tile sampling :func:`field` at its pixel centres."""
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    inv = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    cx, cy = fwd.transform(*center_lonlat)
    h, w = shape
    t = Affine(res, 0, cx - w / 2 * res, 0, -res, cy + h / 2 * res)
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = t @ (cols, rows)
    lon, lat = inv.transform(xs, ys)
    f = field(np.asarray(lon), np.asarray(lat)).astype("float32")
    return make_raster(name, np.stack([f, f * 0.9, f * 0.8]), crs=crs, transform=t,
                       descriptions=RGB, nodata=nodata)


def grid_truth(grid: Grid, window: Window) -> np.ndarray:
    t = grid.window_transform(window)
    cols, rows = np.meshgrid(np.arange(window.width) + 0.5, np.arange(window.height) + 0.5)
    xs, ys = t @ (cols, rows)
    lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    return field(np.asarray(lon), np.asarray(lat))


def utm50(lon: float = LON0, lat: float = LAT0) -> tuple[float, float]:
    return Transformer.from_crs("EPSG:4326", "EPSG:32650", always_xy=True).transform(lon, lat)


# ----------------------------------------------------------------------------- sensors, roles


def test_presets_resolve_by_alias() -> None:
    assert resolve_preset("gf2").name == "GF-2"
    assert resolve_preset("Sentinel_2").name == "Sentinel-2"
    assert resolve_preset("S2").scale == 1e-4
    l8 = resolve_preset("landsat9")
    assert (l8.scale, l8.offset, l8.bands["red"]) == (2.75e-5, -0.2, 4)
    assert resolve_preset("rgb").bands == {"red": 1, "green": 2, "blue": 3}
    with pytest.raises(BandRoleError, match="GF-2.*Sentinel-2"):
        resolve_preset("SPOT-7")


def test_roles_from_band_descriptions(make_raster) -> None:
    arr = np.full((4, 8, 8), 1200, "uint16")
    p = make_raster("s2.tif", arr, descriptions=["B02", "B03", "B04", "B08"])
    src = open_image(p)
    assert src.roles == ("blue", "green", "red", "nir")
    assert src.band_index == (1, 2, 3, 4)
    assert src.scale == pytest.approx(1e-4)
    p2 = make_raster("nrgb.tif", arr, descriptions=["nir", "red", "green", "blue"])
    assert open_image(p2).band_index == (4, 3, 2, 1)


def test_roles_from_colorinterp_and_preset(make_raster) -> None:
    arr = np.full((3, 8, 8), 90, "uint8")
    p = make_raster("bgr.tif", arr, colorinterp=[ColorInterp.blue, ColorInterp.green,
                                                 ColorInterp.red])
    src = open_image(p)
    assert dict(zip(src.roles, src.band_index, strict=True)) == {"blue": 1, "green": 2, "red": 3}
    assert src.scale == pytest.approx(1 / 255)
    p4 = make_raster("gf2.tif", np.full((4, 8, 8), 400, "uint16"))
    gf = open_image(p4, sensor="GF-2")
    assert gf.roles == ("blue", "green", "red", "nir") and gf.sensor == "GF-2"
    assert gf.scale == pytest.approx(1 / 1023)  # 10-bit DN


def test_bands_option_overrides_and_checks_range(make_raster) -> None:
    p = make_raster("x.tif", np.full((4, 8, 8), 100, "uint16"))
    src = open_image(p, bands={"red": 3, "green": 2, "blue": 1, "nir": 4})
    assert src.roles == ("blue", "green", "red", "nir")
    with pytest.raises(BandRoleError, match=r"x\.tif.*nir=5 is out of range"):
        open_image(p, bands={"red": 3, "green": 2, "blue": 1, "nir": 5})


def test_unknown_roles_message_names_file_and_fix(make_raster) -> None:
    p = make_raster("plain.tif", np.full((4, 8, 8), 100, "uint16"))
    with pytest.raises(BandRoleError) as e:
        open_image(p)
    msg = str(e.value)
    assert "plain.tif" in msg and "--bands red=3,green=2,blue=1" in msg and "\n" not in msg
    p2 = make_raster("rgbn.tif", np.full((4, 8, 8), 100, "uint16"),
                     descriptions=["red", "green", "nir", ""])
    with pytest.raises(BandRoleError, match=r"rgbn\.tif: cannot tell which band is blue"):
        open_image(p2)
    for n in (1, 2):  # too few bands for any roles: no band option could help
        p3 = make_raster(f"pan{n}.tif", np.full((n, 8, 8), 100, "uint16"))
        with pytest.raises(BandRoleError, match=rf"pan{n}\.tif: has {n} band\(s\), and tuban "
                           "needs red, green and blue"):
            open_image(p3)


def test_scale_by_dtype(make_raster) -> None:
    f01 = make_raster("f.tif", np.full((3, 8, 8), 0.3, "float32"), descriptions=RGB)
    assert open_image(f01).scale == 1.0
    u16 = make_raster("u.tif", np.full((3, 8, 8), 3000, "uint16"), descriptions=RGB)
    assert open_image(u16).scale == pytest.approx(1e-4)
    l8 = make_raster("l8.tif", np.full((7, 8, 8), 10000, "uint16"))
    s = open_image(l8, sensor="Landsat-8")
    assert (s.scale, s.offset) == (2.75e-5, -0.2)


# ---------------------------------------------------------------------------------- dates


def test_date_from_tags_and_file_name(make_raster) -> None:
    arr = np.full((3, 8, 8), 90, "uint8")
    a = make_raster("a.tif", arr, descriptions=RGB,
                    tags={"TIFFTAG_DATETIME": "2023:05:17 10:11:12"})
    assert open_image(a).date == dt.date(2023, 5, 17)
    b = make_raster("b.tif", arr, descriptions=RGB,
                    tags={"ACQUISITIONDATETIME": "2022-11-03T02:30:00Z"})
    assert open_image(b).date == dt.date(2022, 11, 3)
    c = make_raster("GF2_PMS1_E115.0_N23.0_20240615_L1A0001.tif", arr, descriptions=RGB)
    assert open_image(c).date == dt.date(2024, 6, 15)
    d = make_raster("scene_2021-09-30.tif", arr, descriptions=RGB)
    assert open_image(d).date == dt.date(2021, 9, 30)
    e = make_raster("nodate_123456789.tif", arr, descriptions=RGB)
    assert open_image(e).date is None
    cfg = PeriodConfig(name="p", images=[str(c)], date=dt.date(2020, 1, 2))
    assert open_period(cfg, Path("/")).date == dt.date(2020, 1, 2)


# ------------------------------------------------------------------------------- validation


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"nope\.tif: no such file"):
        open_image(tmp_path / "nope.tif")
    cfg = PeriodConfig(name="p", images=["gone/*.tif"])
    with pytest.raises(MissingFileError, match=r"gone/\*\.tif: pattern matches no file"):
        open_period(cfg, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="empty: folder holds no"):
        open_period(PeriodConfig(name="p", images=["empty"]), tmp_path)


def test_not_a_raster(tmp_path: Path) -> None:
    p = tmp_path / "notes.tif"
    p.write_text("hello")
    with pytest.raises(NotRasterError, match=r"notes\.tif: not a raster GDAL can read"):
        open_image(p)


def test_no_crs(make_raster) -> None:
    p = make_raster("nocrs.tif", np.full((3, 8, 8), 9, "uint8"), crs=None, descriptions=RGB)
    with pytest.raises(MissingCRSError, match=r"nocrs\.tif: no coordinate reference system"):
        open_image(p)


def test_tiles_with_different_band_counts(make_raster, tmp_path: Path) -> None:
    make_raster("p/a.tif", np.full((3, 8, 8), 9, "uint8"), descriptions=RGB)
    make_raster("p/b.tif", np.full((4, 8, 8), 9, "uint8"))
    with pytest.raises(BandRoleError, match=r"b\.tif: has 4 bands but .*a\.tif has 3"):
        open_period(PeriodConfig(name="p", images=["p"]), tmp_path)


def test_open_period_folder_glob_and_union(make_raster, tmp_path: Path) -> None:
    arr = np.full((3, 10, 10), 9, "uint8")
    make_raster("t/b.TIF", arr, descriptions=RGB, origin=(500_010.0, 2_545_000.0))
    make_raster("t/a.tif", arr, descriptions=RGB)
    (tmp_path / "t" / "readme.txt").write_text("x")
    src = open_period(PeriodConfig(name="2024-03", images=["t"], sensor="RGB"), tmp_path)
    assert [p.name for p in src.paths] == ["a.tif", "b.TIF"]
    assert src.bounds == pytest.approx((500_000, 2_544_990, 500_020, 2_545_000))
    assert src.res == pytest.approx(1.0) and src.crs.to_epsg() == 32650
    g = open_period(PeriodConfig(name="x", images=["t/*.tif", "t/a.tif"]), tmp_path)
    assert [p.name for p in g.paths] == ["a.tif"]


# ---------------------------------------------------------------------------------- grid


def test_working_grid_is_snapped_intersection(make_raster) -> None:
    arr = np.full((3, 100, 100), 9, "uint8")
    a = open_image(make_raster("a.tif", arr, descriptions=RGB, origin=(500_000.3, 2_545_000.0)))
    b = open_image(make_raster("b.tif", arr, descriptions=RGB, origin=(500_040.0, 2_544_970.0)))
    g = working_grid([a, b], crs="EPSG:32650", resolution=2.0)
    assert g.bounds == (500_040.0, 2_544_900.0, 500_102.0, 2_544_970.0)
    assert g.shape == (35, 31)
    g2 = working_grid([a, b], crs="EPSG:32650", resolution=2.0,
                      bounds=(500_050, 2_544_920, 500_060, 2_544_930))
    assert g2.shape == (5, 5)


def test_no_overlap_names_both_files(make_raster) -> None:
    arr = np.full((3, 10, 10), 9, "uint8")
    a = open_image(make_raster("left.tif", arr, descriptions=RGB))
    b = open_image(make_raster("right.tif", arr, descriptions=RGB, origin=(600_000.0, 2_545_000)))
    with pytest.raises(NoOverlapError, match=r"left\.tif and .*right\.tif do not overlap; check"):
        working_grid([a, b], crs="EPSG:4547", resolution=1.0)


# ---------------------------------------------------------------------------------- reads


def test_reprojection_from_utm_onto_cgcs2000_lines_up(make_raster) -> None:
    p = analytic_tile(make_raster, "utm.tif", "EPSG:32650", (LON0, LAT0), (160, 160), 1.0)
    src = open_image(p)
    grid = working_grid([src], crs="EPSG:4547", resolution=1.0)
    win = Window(20, 20, grid.width - 40, grid.height - 40)
    arr, valid = read_block(src, grid, win)
    assert valid.all() and np.isfinite(arr).all()
    truth = grid_truth(grid, win)
    err = np.abs(arr[src.roles.index("red")] - truth)
    assert err.mean() < 0.01 and err.max() < 0.05  # field amplitude 0.3, features ≥ 17 px
    # reading with a wrong 1-pixel offset is clearly worse: the comparison is sensitive
    bad, _ = read_block(src, grid, win, shift_px=(1.0, 0.0))
    assert np.abs(bad[src.roles.index("red")] - truth).mean() > 3 * err.mean()


def test_mosaic_of_tiles_in_two_crs_covers_window(make_raster, tmp_path: Path) -> None:
    # west tile in UTM 50N, east tile in lon/lat, overlapping by ~10 m
    analytic_tile(make_raster, "m/a_utm.tif", "EPSG:32650", (LON0 - 0.0006, LAT0), (100, 140), 1.0)
    analytic_tile(make_raster, "m/b_geo.tif", "EPSG:4326", (LON0 + 0.0006, LAT0), (90, 140),
                  1e-5)
    src = open_period(PeriodConfig(name="m", images=["m"]), tmp_path)
    assert src.tiles[0].crs != src.tiles[1].crs
    x, y = utm50()
    grid = Grid.from_bounds((x - 100, y - 30, x + 100, y + 30), 1.0, "EPSG:32650")
    arr, valid = read_block(src, grid, Window(0, 0, grid.width, grid.height))
    assert valid.all() and np.isfinite(arr).all()
    full = Window(0, 0, grid.width, grid.height)
    err = np.abs(arr[src.roles.index("red")] - grid_truth(grid, full))
    assert err.mean() < 0.01 and err.max() < 0.06


@pytest.mark.parametrize("resampling", ["bilinear", "cubic", "nearest"])
def test_warp_without_invalid_pixels_equals_the_nodata_aware_warp(make_raster, tmp_path: Path,
                                                                 resampling: str) -> None:
    # a tile without invalid pixels is warped by GDAL's kernels without per-pixel validity; one
    # zero pixel in a copy sends that copy through the NaN-nodata warp: away from that pixel
    # both give the same values to the bit, and the same footprint
    p = analytic_tile(make_raster, "geo/a.tif", "EPSG:4326", (LON0, LAT0), (120, 130), 1e-5)
    with rasterio.open(p) as ds:
        arr, profile = ds.read(), ds.profile
    arr[:, 5, 5] = 0.0
    q = tmp_path / "geo2" / "a.tif"
    q.parent.mkdir()
    with rasterio.open(q, "w", **profile) as dst:
        dst.write(arr)
        dst.descriptions = RGB
    x, y = utm50()
    grid = Grid.from_bounds((x - 70, y - 70, x + 70, y + 70), 1.0, "EPSG:32650")
    win = Window(0, 0, grid.width, grid.height)
    fast, v_fast = read_block(open_image(p), grid, win, resampling=resampling)
    slow, v_slow = read_block(open_image(q), grid, win, resampling=resampling)
    assert 0.5 < v_fast.mean() < 1.0  # the tile's footprint: the window reaches past it
    far = np.ones(v_fast.shape, bool)
    far[:20, :20] = False  # around the zero pixel (the tile's north-west corner)
    assert np.array_equal(v_fast[far], v_slow[far])
    assert np.array_equal(fast[:, far], slow[:, far], equal_nan=True)
    assert not v_slow[:20, :20].all() or resampling == "nearest"


def test_nodata_edge_is_invalid_and_does_not_bleed(make_raster) -> None:
    arr = np.full((3, 40, 40), 5000, "uint16")
    arr[:, :, :12] = 65535  # nodata strip on the west
    arr[:, 30:, :] = 0  # all-zero fill at the bottom, no nodata declared for it
    src = open_image(make_raster("nd.tif", arr, descriptions=RGB, nodata=65535))
    assert src.nodata == 65535
    grid = Grid.from_bounds(src.bounds, 1.0, src.crs)
    out, valid = read_block(src, grid, Window(0, 0, 40, 40), shift_px=(0.5, 0.5))
    assert not valid[:, :11].any() and valid[:29, 12:39].all()
    assert not valid[30:].any()
    assert np.allclose(out[:, valid], 0.5)  # 5000 * 1e-4; no 6.5535 or 0 bleeding in
    assert np.isnan(out[:, ~valid]).all()


def test_shift_px_translates_the_sampling(make_raster) -> None:
    p = analytic_tile(make_raster, "s.tif", "EPSG:32650", (LON0, LAT0), (80, 80), 1.0)
    src = open_image(p)
    grid = Grid.from_bounds(src.bounds, 1.0, src.crs)
    win = Window(10, 10, 50, 50)
    moved, _ = read_block(src, grid, win, shift_px=(2.0, 3.0))
    direct, _ = read_block(src, grid, Window(12, 13, 50, 50))
    assert np.allclose(moved, direct, atol=1e-5)


def test_read_block_reads_only_the_window(make_raster, monkeypatch) -> None:
    big = np.full((3, 1500, 1500), 100, "uint8")
    src = open_image(make_raster("big.tif", big, descriptions=RGB))
    grid = Grid.from_bounds(src.bounds, 1.0, src.crs)
    seen: list[tuple[int, int]] = []
    real = rasterio.io.DatasetReader.read

    def spy(self, *args, **kw):  # type: ignore[no-untyped-def]
        w = kw.get("window")
        seen.append((int(w.height), int(w.width)) if w is not None else self.shape)
        return real(self, *args, **kw)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    read_block(src, grid, Window(700, 700, 64, 64))
    assert seen and max(max(s) for s in seen) <= 64 + 2 * 8


def test_read_overview_is_decimated(make_raster) -> None:
    p = analytic_tile(make_raster, "o.tif", "EPSG:32650", (LON0, LAT0), (300, 200), 1.0)
    src = open_image(p)
    grid = Grid.from_bounds(src.bounds, 1.0, src.crs)
    arr, valid, og = read_overview(src, grid, max_size=64)
    assert max(og.shape) <= 64 and arr.shape[1:] == og.shape and og.res == 5.0
    assert valid[1:-1, 1:-1].all() and np.isfinite(arr[:, valid]).all()
    assert abs(float(np.nanmean(arr[0])) - float(np.nanmean(read_block(
        src, grid, Window(0, 0, 200, 300))[0][0]))) < 0.01


# --------------------------------------------------------------------------------- vectors


def _geojson(path: Path, features: list[dict], crs: str | None = None) -> Path:
    fc: dict = {"type": "FeatureCollection", "features": features}
    if crs:
        fc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(fc))
    return path


def _square(x0: float, y0: float, d: float, props: dict | None = None) -> dict:
    ring = [[x0, y0], [x0 + d, y0], [x0 + d, y0 + d], [x0, y0 + d], [x0, y0]]
    return {"type": "Feature", "properties": props or {},
            "geometry": {"type": "Polygon", "coordinates": [ring]}}


def test_load_layer_reprojects_filters_and_repairs(tmp_path: Path) -> None:
    bowtie = {"type": "Feature", "properties": {"k": 1}, "geometry": {"type": "Polygon",
              "coordinates": [[[LON0, LAT0], [LON0 + 1e-3, LAT0 + 1e-3], [LON0 + 1e-3, LAT0],
                               [LON0, LAT0 + 1e-3], [LON0, LAT0]]]}}
    far = _square(LON0 + 1.0, LAT0, 1e-3, {"k": 2})
    p = _geojson(tmp_path / "forest.geojson", [bowtie, far])
    x, y = utm50()
    gdf = load_layer(p, "EPSG:32650", bounds=(x - 500, y - 500, x + 500, y + 500))
    assert len(gdf) == 1 and gdf.crs.to_epsg() == 32650
    assert gdf.geometry.is_valid.all() and gdf.geometry.area.iloc[0] > 1000
    assert shapely.get_type_id(gdf.geometry.values)[0] in (3, 6)  # (Multi)Polygon


def test_load_layer_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"gone\.gpkg: no such file"):
        load_layer(tmp_path / "gone.gpkg", "EPSG:4547")
    bad = tmp_path / "junk.geojson"
    bad.write_text("this is not json")
    with pytest.raises(InputError, match=r"junk\.geojson: not a vector file GDAL can read"):
        load_layer(bad, "EPSG:4547")
    shp = tmp_path / "nocrs.shp"
    gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.box(0, 0, 1, 1)]).to_file(shp)
    with pytest.raises(MissingCRSError, match=r"nocrs\.shp: vector layer has no CRS"):
        load_layer(shp, "EPSG:4547")


def _cfg(tmp_path: Path, **extra) -> object:
    data = {"name": "t", "crs": "EPSG:32650", "resolution": 1.0,
            "periods": [{"name": "a", "images": ["a.tif"]}, {"name": "b", "images": ["b.tif"]}],
            **extra}
    return config_from_dict(data, tmp_path / "c.yaml", tmp_path)


def test_load_rules_and_admin(tmp_path: Path) -> None:
    _geojson(tmp_path / "forest.geojson", [_square(LON0, LAT0, 1e-3)])
    _geojson(tmp_path / "streets.geojson", [_square(LON0, LAT0, 2e-3, {"code": 4401,
                                                                        "name": "东湖街道"})])
    x, y = utm50()
    grid = Grid.from_bounds((x - 300, y - 300, x + 300, y + 300), 1.0, "EPSG:32650")
    cfg = _cfg(tmp_path, rules={"forest": {"path": "forest.geojson"}},
               admin={"path": "streets.geojson"})
    rules = load_rules(cfg, grid)
    assert set(rules) == {"forest"} and len(rules["forest"]) == 1
    admin = load_admin(cfg, grid)
    assert list(admin.columns) == ["admin_code", "admin_name", "geometry"]
    assert admin.iloc[0].admin_code == "4401" and admin.iloc[0].admin_name == "东湖街道"
    bad = _cfg(tmp_path, admin={"path": "streets.geojson", "name_field": "NAME_ZH"})
    with pytest.raises(ConfigError, match="'NAME_ZH' is not a field.*available: code, name"):
        load_admin(bad, grid)
    assert load_admin(_cfg(tmp_path), grid).empty


def test_file_checksum(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    data = np.random.default_rng(0).bytes(3_000_000)
    p.write_bytes(data)
    assert file_checksum(p) == hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------- real data


def test_real_joplin_tiles_in_two_crs(shared_data: Path) -> None:
    pre = open_image(shared_data / "joplin" / "pre")
    post = open_image(shared_data / "joplin" / "post")
    assert len(pre.paths) == 4 and len(post.paths) == 6 and pre.roles == ("blue", "green", "red")
    assert pre.crs.to_epsg() == 26915 and post.crs.to_epsg() == 4326
    grid = working_grid([pre, post], crs="EPSG:32615", resolution=1.0)
    win = Window(grid.width // 2 - 128, grid.height // 2 - 128, 256, 256)
    for src in (pre, post):
        arr, valid = read_block(src, grid, win)
        assert valid.mean() > 0.9 and np.isfinite(arr[:, valid]).all()


def test_real_oscd_after_on_another_grid(shared_data: Path) -> None:
    case = shared_data / "cases" / "oscd" / "saclay_w"
    before = open_image(case / "before.tif", sensor="Sentinel-2")
    after = open_image(case / "after.tif")  # roles from band descriptions
    assert after.roles == before.roles == ("blue", "green", "red", "nir")
    assert 9 < before.res < 11
    grid = working_grid([before, after], crs="EPSG:32631", resolution=10.0)
    a, va, _ = read_overview(before, grid)
    b, vb, _ = read_overview(after, grid)
    v = va & vb
    assert v.mean() > 0.9
    assert 0.0 < float(np.median(a[2, v])) < 0.5
    assert np.corrcoef(a[2, v], b[2, v])[0, 1] > 0.5


# ------------------------------------------------------------------- per-band product files

S2_PREFIX = "T50QKM_20240315T030541"


def _s2_bands(n: int = 16) -> dict[str, np.ndarray]:
    """Constant DN per band: 10 m bands n², 20 m (n/2)², 60 m (n/6)²; SCL at 20 m."""
    ten = {b: np.full((n, n), v, "uint16") for b, v in
           (("B02", 500), ("B03", 700), ("B04", 900), ("B08", 3000))}
    twenty = {b: np.full((n // 2, n // 2), v, "uint16") for b, v in
              (("B05", 1500), ("B8A", 3100), ("B11", 2000), ("B12", 1200))}
    return {**ten, **twenty, "B01": np.full((max(1, n // 6), max(1, n // 6)), 400, "uint16")}


def test_sentinel2_per_band_folder_is_recognised_and_resampled(make_band_files,
                                                                tmp_path: Path) -> None:
    make_band_files("s2", S2_PREFIX, _s2_bands())
    (tmp_path / "s2" / "notes.txt").write_text("x")
    src = open_period(PeriodConfig(name="p", images=["s2"]), tmp_path)
    assert src.roles == ("blue", "green", "red", "nir", "swir1", "swir2")
    assert (src.sensor, src.date, src.res) == ("Sentinel-2", dt.date(2024, 3, 15), 10.0)
    assert (src.scale, src.offset) == (1e-4, 0.0)
    assert [p.name.split("_")[-1] for p in src.paths] == [
        "B02.tif", "B03.tif", "B04.tif", "B08.tif", "B11.tif", "B12.tif"]
    tile = src.tiles[0]
    assert tile.shape == (16, 16) and [p.name[-7:-4] for p, _ in tile.bands][-1] == "B12"
    grid = Grid.from_bounds(src.bounds, 10.0, src.crs)
    arr, valid = read_block(src, grid, Window(0, 0, 16, 16))
    assert arr.shape == (6, 16, 16) and valid.all()
    assert np.allclose(arr[:, 0, 0], [0.05, 0.07, 0.09, 0.30, 0.20, 0.12], atol=1e-6)
    assert np.allclose(arr[4], 0.2)  # the 20 m band fills the 10 m grid
    # bands: selects roles (the indices of a per-band product are its files)
    red = open_period(PeriodConfig(name="p", images=["s2"], bands={
        "blue": 1, "green": 1, "red": 1, "rededge4": 1}), tmp_path)
    assert red.roles == ("blue", "green", "red", "rededge4")


def test_sentinel2_l2a_names_baseline_offset_and_finest_copy(make_band_files,
                                                            tmp_path: Path) -> None:
    b = _s2_bands()
    prefix = "T50QKM_20240315T030541"
    make_band_files("safe/R10m", prefix, {f"{k}_10m": b[k] for k in ("B02", "B03", "B04")},
                    ext="jp2")
    make_band_files("safe/R10m", prefix, {"B02_60m": b["B01"]}, ext="jp2")
    cfg = PeriodConfig(name="p", images=["safe/*/*.jp2"])
    src = open_period(cfg, tmp_path)
    assert src.roles == ("blue", "green", "red") and src.tiles[0].bands[0][0].name.endswith(
        "B02_10m.jp2")
    make_band_files("n05", "S2B_MSIL2A_20240315T030541_N0510_R075_T50QKM",
                    {k: b[k] for k in ("B02", "B03", "B04")})
    assert open_period(PeriodConfig(name="p", images=["n05"]), tmp_path).offset == -0.1


def test_scl_mask_folds_into_valid(make_band_files, tmp_path: Path) -> None:
    bands = _s2_bands()
    scl = np.full((8, 8), 4, "uint8")  # vegetation
    scl[0, 0], scl[1, 1], scl[2, 2], scl[3, 3], scl[4, 4] = 9, 3, 10, 0, 11  # cloud, shadow,
    make_band_files("s2", S2_PREFIX, {**bands, "SCL_20m": scl})  # cirrus, no data, snow
    src = open_period(PeriodConfig(name="p", images=["s2"]), tmp_path)
    assert src.tiles[0].qa[0][1] == "scl" and src.paths[-1].name.endswith("SCL_20m.tif")
    grid = Grid.from_bounds(src.bounds, 10.0, src.crs)
    _, valid = read_block(src, grid, Window(0, 0, 16, 16), resampling="nearest")
    expect = ~np.isin(np.kron(scl, np.ones((2, 2), int)), [0, 1, 3, 8, 9, 10])
    assert (valid == expect).all() and (~valid).sum() == 16
    off = open_period(PeriodConfig(name="p", images=["s2"], qa=False), tmp_path)
    assert off.tiles[0].qa == () and read_block(off, grid, Window(0, 0, 16, 16))[1].all()


def test_landsat_per_band_files_roles_scale_and_qa_pixel(make_band_files,
                                                         tmp_path: Path) -> None:
    n = 8
    dn = {f"SR_B{i}": np.full((n, n), 10000 + 1000 * i, "uint16") for i in range(1, 8)}
    qa = np.full((n, n), 1 << 6, "uint16")  # clear
    qa[0, :] = 1 << 3  # cloud
    qa[1, :] = 1 << 4  # cloud shadow
    qa[2, :] = 1 << 7  # water: kept
    make_band_files("l8", "LC09_L2SP_122044_20230510_20230520_02_T1",
                    {**dn, "QA_PIXEL": qa, "ST_B10": np.ones((n, n), "uint16")}, res=30.0,
                    origin=(499_980.0, 2_545_020.0))
    src = open_period(PeriodConfig(name="p", images=["l8"]), tmp_path)
    assert src.roles == ("blue", "green", "red", "nir", "swir1", "swir2")
    assert (src.sensor, src.scale, src.offset, src.res) == ("Landsat-9", 2.75e-5, -0.2, 30.0)
    assert src.tiles[0].bands[2][0].name.endswith("SR_B4.tif")
    assert src.date == dt.date(2023, 5, 10)
    grid = Grid.from_bounds(src.bounds, 30.0, src.crs)
    arr, valid = read_block(src, grid, Window(0, 0, n, n))
    assert not valid[:2].any() and valid[2:].all()
    assert np.allclose(arr[2, 2:], 14000 * 2.75e-5 - 0.2)  # red = SR_B4
    # TM / ETM+: band numbers mean other roles; Collection-2 L1 scaling
    make_band_files("l5", "LT05_L1TP_122044_19990510_20200907_02_T1",
                    {f"B{i}": np.full((n, n), 40 + i, "uint16") for i in (1, 2, 3, 4, 5, 7)},
                    res=30.0, origin=(499_980.0, 2_545_020.0))
    tm = open_period(PeriodConfig(name="p", images=["l5"]), tmp_path)
    assert tm.sensor == "Landsat-5" and (tm.scale, tm.offset) == (2e-5, -0.1)
    assert dict(zip(tm.roles, [p.name[-6:] for p, _ in tm.tiles[0].bands], strict=True))[
        "blue"] == "B1.tif"


def test_two_per_band_tiles_are_mosaicked(make_band_files, tmp_path: Path) -> None:
    b = {k: v for k, v in _s2_bands().items() if k in ("B02", "B03", "B04")}
    make_band_files("m", "T50QKM_20240315", b)
    make_band_files("m", "T50QLM_20240315", {k: v + 100 for k, v in b.items()},
                    origin=(500_120.0, 2_545_000.0))
    src = open_period(PeriodConfig(name="p", images=["m"]), tmp_path)
    assert len(src.tiles) == 2 and src.bounds[2] - src.bounds[0] == pytest.approx(280.0)
    grid = Grid.from_bounds(src.bounds, 10.0, src.crs)
    arr, valid = read_block(src, grid, Window(0, 0, 28, 16))
    assert valid.all()
    assert np.allclose(arr[2, :, :16], 0.09) and np.allclose(arr[2, :, 16:], 0.1)


def test_old_sentinel2_granule_names_date_from_the_orbit() -> None:
    from pipeline.sensors import s2_sensing_date

    name = "S2A_OPER_MSI_L1C_TL_SGS__20160315T201048_A003809_T31UDP_B02.tif"
    assert s2_sensing_date(name) == dt.date(2016, 3, 15)  # OSCD saclay_w date 1
    assert s2_sensing_date("S2A_OPER_MSI_L1C_TL_EPA__20160514T023519_A000720_T31TEJ_B02.tif"
                           ) == dt.date(2015, 8, 12)  # processed 2016, sensed 2015
    assert s2_sensing_date("T31UDQ_20170829T105019_B02.tif") is None


def test_per_band_errors_are_one_line(make_band_files, make_raster, tmp_path: Path) -> None:
    for i in range(3):
        make_raster(f"plain/band{i}.tif", np.full((8, 8), 100, "uint16"))
    with pytest.raises(BandRoleError) as e:
        open_period(PeriodConfig(name="p", images=["plain"]), tmp_path)
    assert "plain: holds 3 single-band files" in str(e.value) and "*_B04.tif" in str(e.value)
    assert "\n" not in str(e.value)
    make_band_files("nored", S2_PREFIX, {k: v for k, v in _s2_bands().items()
                                         if k in ("B02", "B03")})
    with pytest.raises(BandRoleError, match=r"nored: tile T50QKM.* has no red band"):
        open_period(PeriodConfig(name="p", images=["nored"]), tmp_path)


# ------------------------------------------------------------------------ presets and dtypes


@pytest.mark.parametrize("name", ["GF-1", "GF-2", "Jilin-1", "ZY-3", "Sentinel-2", "Landsat-8",
                                  "Landsat-7", "RGB"])
def test_every_preset_fixes_roles_scale_and_resolution(name: str, make_raster) -> None:
    p = resolve_preset(name)
    assert {"red", "green", "blue"} <= set(p.bands) and p.res_m > 0
    assert p.scale is not None or p.bit_depth is not None
    assert sorted(p.bands.values()) == list(range(1, len(p.bands) + 1))
    n = max(p.bands.values())
    u8 = open_image(make_raster("u8.tif", np.full((n, 8, 8), 120, "uint8")), sensor=name)
    assert u8.scale == pytest.approx(1 / 255) and u8.roles[:3] == ("blue", "green", "red")
    f32 = open_image(make_raster("f.tif", np.full((n, 8, 8), 0.3, "float32")), sensor=name)
    assert (f32.scale, f32.offset) == (1.0, 0.0)
    dn = 12_000 if name.startswith("Landsat") else 900  # Landsat SR: DN 7273 is reflectance 0
    u16 = open_image(make_raster("u16.tif", np.full((n, 8, 8), dn, "uint16")), sensor=name)
    grid = Grid.from_bounds(u16.bounds, 1.0, u16.crs)
    arr, valid = read_block(u16, grid, Window(0, 0, 8, 8))
    assert valid.all() and 0.0 < float(arr[u16.roles.index("red"), 0, 0]) < 1.0


def test_preset_nominal_resolutions() -> None:
    res = {n: resolve_preset(n).res_m for n in ("GF-1", "GF-2", "ZY-3", "Sentinel-2",
                                                "Landsat-8", "Landsat-5")}
    assert res == {"GF-1": 8.0, "GF-2": 3.2, "ZY-3": 5.8, "Sentinel-2": 10.0,
                   "Landsat-8": 30.0, "Landsat-5": 30.0}
    assert resolve_preset("GF-2").bit_depth == 10 and resolve_preset("Jilin-1").bit_depth == 12


def test_16bit_rgb_aerial_is_scaled_by_its_bit_depth(make_raster) -> None:
    arr = np.repeat(np.linspace(0, 4000, 64).reshape(1, 8, 8), 3, axis=0).astype("uint16")
    src = open_image(make_raster("aerial12.tif", arr), sensor="RGB")
    assert src.scale == pytest.approx(1 / 4095)
    s2f = open_image(make_raster("s2f.tif", np.full((4, 8, 8), 2500.0, "float32")),
                     sensor="Sentinel-2")
    assert s2f.scale == 1e-4  # float DN, not reflectance: the preset's factor


def _fresh_handle_in_child(path: Path, inherited_id: int, conn) -> None:  # forked child
    from pipeline.ingest import reader

    conn.send(id(reader._dataset(path)) != inherited_id)
    conn.close()


def test_forked_process_opens_its_own_handle(make_raster) -> None:
    """A handle inherited across fork shares the parent's file offset (corrupt tiles when
    both read): a forked process (a notebook's multiprocessing pool) must open its own."""
    import multiprocessing as mp

    from pipeline.ingest import reader

    path = Path(make_raster("fork.tif", np.full((3, 8, 8), 9, "uint16"),
                            descriptions=["red", "green", "blue"]))
    parent = reader._dataset(path)
    assert reader._dataset(path) is parent  # kept within a process
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_fresh_handle_in_child, args=(path, id(parent), send))
    child.start()
    assert recv.recv() is True
    child.join(10)
    assert child.exitcode == 0 and not parent.closed
