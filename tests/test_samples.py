"""Tests of the sample-scene generator ``sample_tiles/make_samples.py`` and its committed output."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio import features
from skimage.registration import phase_cross_correlation

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_tiles"
PERIODS = ("2024-03", "2024-06")
RULE_COLUMNS = {
    "forest": set(),
    "farmland": set(),
    "ecological_redline": set(),
    "permits": {"permit_no", "holder"},
    "cemeteries": {"name"},
    "street_offices": {"code", "name"},
}
MIN_COUNTS = {"illegal_construction": 5, "forest_grave": 8, "land_occupation": 4}


def _load_module():
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_samples"] = mod
    spec.loader.exec_module(mod)
    return mod


ms = _load_module()


@pytest.fixture(scope="module")
def small_scene():
    return ms.make_scene(seed=7, size=384)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, small_scene):
    out = tmp_path_factory.mktemp("small")
    ms.write_scene(small_scene, out)
    return out


@pytest.fixture(scope="module")
def full_scene():
    return ms.make_scene()


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _rules(root: Path) -> dict[str, gpd.GeoDataFrame]:
    return {name: gpd.read_file(root / "rules" / f"{name}.geojson") for name in RULE_COLUMNS}


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_arrays(small_scene):
    again = ms.make_scene(seed=7, size=384)
    for name, arr in small_scene.images.items():
        np.testing.assert_array_equal(arr, again.images[name])
    np.testing.assert_array_equal(small_scene.label, again.label)
    assert small_scene.violations.geometry.equals(again.violations.geometry)


def test_different_seed_differs(small_scene):
    other = ms.make_scene(seed=8, size=384)
    assert not np.array_equal(small_scene.images["2024-06"], other.images["2024-06"])
    assert not np.array_equal(small_scene.label, other.label)


def test_bad_arguments():
    with pytest.raises(ValueError, match="periods"):
        ms.make_scene(size=256, periods=4)
    with pytest.raises(ValueError, match="size"):
        ms.make_scene(size=64)


# --------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("which", ["small", "committed"])
def test_image_contract(which, small_dir):
    root = small_dir if which == "small" else SAMPLES
    dates = {"2024-03": "2024:03:15 10:30:00", "2024-06": "2024:06:20 10:30:00"}
    for period in PERIODS:
        tifs = sorted((root / period).glob("*.tif"))
        assert [p.name for p in tifs] == ["scene.tif"], "exactly one GeoTIFF per period"
        assert not list((root / period).glob("*.aux.xml"))
        with rasterio.open(tifs[0]) as src:
            assert src.crs.to_epsg() == 4547
            assert src.count == 4
            assert src.dtypes == ("uint16",) * 4
            assert src.descriptions == ("blue", "green", "red", "nir")
            assert src.nodata == 0
            assert src.res == (1.0, 1.0)
            assert (src.transform.c, src.transform.f) == (602000.0, 2546000.0)
            assert src.tags()["TIFFTAG_DATETIME"] == dates[period]
            assert src.profile["compress"] == "deflate" and src.profile["tiled"]


def test_small_scene_contract(small_dir):
    _check_vectors(small_dir, size=384, full=False)


def test_committed_contract():
    with rasterio.open(SAMPLES / "2024-03" / "scene.tif") as src:
        assert (src.width, src.height) == (1024, 1024)
    _check_vectors(SAMPLES, size=1024, full=True)
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 20e6


def _check_vectors(root: Path, size: int, full: bool) -> None:
    rules = _rules(root)
    for name, gdf in rules.items():
        assert gdf.crs.to_epsg() == 4547, name
        assert RULE_COLUMNS[name] <= set(gdf.columns), name
        assert len(gdf) and gdf.is_valid.all(), name
    offices = rules["street_offices"]
    assert 2 <= len(offices) <= 3
    assert offices["code"].str.fullmatch(r"\d{9}").all()
    assert offices.union_all().area == pytest.approx(size * size, rel=1e-6)

    vio = gpd.read_file(root / "truth" / "violations.geojson")
    dis = gpd.read_file(root / "truth" / "distractors.geojson")
    assert vio.crs.to_epsg() == 4547 and dis.crs.to_epsg() == 4547
    assert vio["truth_id"].is_unique
    scene_box = rules["street_offices"].union_all()
    assert vio.within(scene_box.buffer(1e-3)).all()
    assert dis.within(scene_box.buffer(1e-3)).all()
    counts = vio["category"].value_counts().to_dict()
    for cat, n in MIN_COUNTS.items():
        assert counts.get(cat, 0) >= n, (cat, counts)

    tol = 0.05  # m², rounding of coordinates to 1 mm
    permits = rules["permits"].union_all()
    cemeteries = rules["cemeteries"].union_all()
    forest = rules["forest"].union_all()
    farm = rules["farmland"].union_all()
    redline = rules["ecological_redline"].union_all()
    assert (vio.intersection(permits).area < tol).all()
    assert (vio.intersection(cemeteries).area < tol).all()
    cat = vio["category"]
    graves = vio[cat == "forest_grave"]
    assert (graves.difference(forest).area < tol).all()
    occ = vio[cat == "land_occupation"]
    assert (occ.difference(farm.union(redline)).area < tol).all()
    builds = vio[cat == "illegal_construction"]
    assert (builds.intersection(forest.union(farm)).area < tol).all()

    kinds = dis["kind"].value_counts().to_dict()
    for kind, n in {"permit": 2, "cemetery": 1, "harvest": 2, "cloud": 1, "shadow": 1,
                    "nodata": 1}.items():
        assert kinds.get(kind, 0) >= n, (kind, kinds)
    assert (dis[dis.kind == "permit"].difference(permits).area < tol).all()
    tombs = dis[dis.kind == "cemetery"]
    assert (tombs.difference(cemeteries).area < tol).all()
    assert (tombs.difference(forest).area < tol).all()
    # harvested fields are whole farmland parcels
    for geom in dis[dis.kind == "harvest"].geometry:
        assert rules["farmland"].geometry.apply(lambda f, g=geom: f.equals_exact(g, 1e-3)).any()
    # cloud, its shadow and the nodata wedge never cover a planted violation
    cover = dis[dis.kind.isin(["cloud", "shadow", "nodata"])].union_all()
    assert (vio.intersection(cover).area < tol).all()

    with rasterio.open(root / "truth" / "label.tif") as src:
        label = src.read(1)
        assert src.crs.to_epsg() == 4547 and label.dtype == np.uint8
        expected = features.rasterize([(g, 1) for g in vio.geometry], out_shape=label.shape,
                                      transform=src.transform, dtype="uint8")
    assert set(np.unique(label)) == {0, 1}
    assert (label != expected).mean() < 1e-3

    if full:  # sizes in m² / m of the default scene
        assert builds.area.between(60, 600).all(), builds.area.tolist()
        assert occ.area.between(300, 3000).all(), occ.area.tolist()
        assert (occ.area < 0.6 * 8000).all()
        b = graves.bounds
        across = np.maximum(b.maxx - b.minx, b.maxy - b.miny)
        assert across.between(3, 15).all(), across.tolist()
        # several graves lie 10-30 m from a neighbour; some are isolated (> 30 m)
        cent = np.column_stack([graves.centroid.x, graves.centroid.y])
        d = np.hypot(*(cent[:, None] - cent[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        nearest = d.min(axis=1)
        assert ((nearest >= 10) & (nearest <= 30)).sum() >= 4
        assert (nearest > 30).sum() >= 2


def test_three_periods(tmp_path):
    assert ms.main(["--out", str(tmp_path), "--size", "256", "--seed", "3", "--periods", "3"]) == 0
    with rasterio.open(tmp_path / "2024-09" / "scene.tif") as src:
        assert src.tags()["TIFFTAG_DATETIME"] == "2024:09:18 10:30:00"
        p3 = src.read().astype(float)
    p2 = _read(tmp_path / "2024-06" / "scene.tif").astype(float)
    dis = gpd.read_file(tmp_path / "truth" / "distractors.geojson")
    with rasterio.open(tmp_path / "truth" / "label.tif") as src:
        tr = src.transform
    harvest = features.rasterize([(g, 1) for g in dis[dis.kind == "harvest"].geometry.buffer(-3)],
                                 out_shape=p3.shape[1:], transform=tr, dtype="uint8") > 0

    def ndvi(a):
        return (a[3] - a[2]) / (a[3] + a[2] + 1e-6)

    assert ndvi(p3)[harvest].mean() > ndvi(p2)[harvest].mean() + 0.3
    vio = gpd.read_file(tmp_path / "truth" / "violations.geojson")
    graves = features.rasterize([(g, 1) for g in vio[vio.category == "forest_grave"].geometry],
                                out_shape=p3.shape[1:], transform=tr, dtype="uint8") > 0
    assert ndvi(p3)[graves].mean() < 0.5  # violations persist


# --------------------------------------------------------------------------- no drift


def test_committed_files_match_generator(full_scene, tmp_path):
    for name, arr in full_scene.images.items():
        np.testing.assert_array_equal(_read(SAMPLES / name / "scene.tif"), arr, err_msg=name)
    np.testing.assert_array_equal(_read(SAMPLES / "truth" / "label.tif")[0], full_scene.label)
    ms.write_scene(full_scene, tmp_path)
    texts = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in (".geojson",
                                                                                   ".json")]
    assert len(texts) == 9
    for rel in texts:
        assert (SAMPLES / rel).read_text("utf-8") == (tmp_path / rel).read_text("utf-8"), rel


# --------------------------------------------------------------------------- realism


@pytest.fixture(scope="module")
def committed():
    imgs = {p: _read(SAMPLES / p / "scene.tif").astype(np.float64) / 10000 for p in PERIODS}
    params = json.loads((SAMPLES / "truth" / "scene.json").read_text("utf-8"))
    with rasterio.open(SAMPLES / "truth" / "label.tif") as src:
        transform = src.transform
    return imgs, params, transform


def test_forest_ndvi(committed):
    imgs, _, transform = committed
    rules = _rules(SAMPLES)
    forest = rules["forest"].union_all().difference(rules["cemeteries"].union_all().buffer(5))
    mask = features.rasterize([(forest.buffer(-3), 1)], out_shape=(1024, 1024),
                              transform=transform, dtype="uint8") > 0
    a = imgs["2024-03"]
    ndvi = (a[3] - a[2]) / (a[3] + a[2])
    assert np.median(ndvi[mask]) > 0.7
    assert (ndvi[mask] > 0.6).mean() > 0.95


def test_period2_radiometric_shift(committed):
    imgs, params, _ = committed
    r0, r1, c0, c1 = params["unchanged_window_rowcol"]
    a, b = imgs["2024-03"][:, r0:r1, c0:c1], imgs["2024-06"][:, r0:r1, c0:c1]
    gain = np.asarray(params["radiometry_p2"]["gain"])
    offset = np.asarray(params["radiometry_p2"]["offset_reflectance"])
    ratio = b.mean(axis=(1, 2)) / a.mean(axis=(1, 2))
    expected = gain + offset / a.mean(axis=(1, 2))
    np.testing.assert_allclose(ratio, expected, rtol=0.02)
    assert ratio[:3].min() > 1.08  # visibly brighter in the visible bands


def test_planted_shift_recovered(committed):
    imgs, params, _ = committed
    r0, r1, c0, c1 = params["unchanged_window_rowcol"]
    a, b = imgs["2024-03"][2, r0:r1, c0:c1], imgs["2024-06"][2, r0:r1, c0:c1]
    shift, _, _ = phase_cross_correlation(a, b, upsample_factor=20)
    # phase_cross_correlation gives the (row, col) shift that registers b onto a
    dx, dy = params["shift_px"]["dx"], params["shift_px"]["dy"]
    assert (dx, dy) == tuple(ms.SHIFT_PX)
    assert 1.0 <= np.hypot(dx, dy) <= 2.0 + 1e-9 and dx % 1 and dy % 1
    np.testing.assert_allclose(shift, (-dy, -dx), atol=0.2)


def test_cloud_and_nodata_present(committed):
    imgs, _, transform = committed
    dis = gpd.read_file(SAMPLES / "truth" / "distractors.geojson")

    def mask(kind, shrink):
        geoms = dis[dis.kind == kind].geometry.buffer(-shrink)
        return features.rasterize([(g, 1) for g in geoms if not g.is_empty],
                                  out_shape=(1024, 1024), transform=transform, dtype="uint8") > 0

    b = imgs["2024-06"]
    assert (b[:, mask("nodata", 0.5)] == 0).all()
    assert (imgs["2024-03"] > 0).all()
    core = mask("cloud", 12)
    assert core.any() and b[:, core].min() > 0.40
    shadow_core = mask("shadow", 12) & ~mask("cloud", 0)
    ratio = b[3, shadow_core].mean() / imgs["2024-03"][3, shadow_core].mean()
    assert 0.25 < ratio < 0.6
