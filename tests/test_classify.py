"""Tests for rule rasterisation and object-based classification (synthetic scenes in code)."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from rasterio.windows import Window
from scipy import ndimage as ndi
from shapely.geometry import box

from pipeline.classify import PARCEL_KEY, classify_block, rasterize_rules
from pipeline.config import DetectionConfig, _default_categories
from pipeline.detect.spectral import SpectralDetector
from pipeline.grid import Grid, norm_crs
from pipeline.types import CATEGORY_CODES, NOT_OBSERVED

ROLES = ("blue", "green", "red", "nir")
SPEC = {
    "forest": (0.03, 0.06, 0.04, 0.35), "crop": (0.04, 0.08, 0.05, 0.40),
    "grass": (0.045, 0.075, 0.06, 0.28), "stubble": (0.08, 0.10, 0.12, 0.22),
    "soil": (0.12, 0.15, 0.20, 0.26), "laterite": (0.11, 0.13, 0.21, 0.27),
    "hard": (0.20, 0.21, 0.22, 0.25), "roof": (0.22, 0.18, 0.10, 0.16),
    "tomb": (0.38, 0.39, 0.40, 0.42),
    "water": (0.05, 0.06, 0.04, 0.02), "turbid": (0.05, 0.10, 0.14, 0.08),
}
N = 128
# rule layers in pixel space (rows, cols): forest left, farmland top right (2 parcels)
FOREST = (slice(0, N), slice(0, 64))
PARCELS = [(slice(0, 60), slice(64, 96)), (slice(0, 60), slice(96, N))]
CEMETERY = (slice(90, 122), slice(8, 44))
PERMIT = (slice(92, 122), slice(92, 124))
CATS = _default_categories()
CFG = DetectionConfig()


def paint(img: np.ndarray, where: tuple[slice, slice], kind: str) -> None:
    img[(slice(None), *where)] = np.asarray(SPEC[kind], np.float32)[:, None, None]


def base_scene() -> np.ndarray:
    rng = np.random.default_rng(7)
    img = np.zeros((4, N, N), np.float32)
    paint(img, (slice(None), slice(None)), "grass")
    paint(img, FOREST, "forest")
    for p in PARCELS:
        paint(img, p, "crop")
    tex = 1.0 + 0.06 * ndi.gaussian_filter(rng.normal(size=(N, N)), 1.0) / 0.28
    return (img * tex[None]).astype(np.float32)


def masks() -> dict[str, np.ndarray]:
    def m(*wheres: tuple[slice, slice]) -> np.ndarray:
        out = np.zeros((N, N), bool)
        for w in wheres:
            out[w] = True
        return out

    parcel = np.zeros((N, N), np.int32)
    for i, p in enumerate(PARCELS):
        parcel[p] = i + 1
    return {"forest": m(FOREST), "farmland": parcel > 0, PARCEL_KEY: parcel,
            "permits": m(PERMIT), "cemeteries": m(CEMETERY)}


def noisy(img: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (img + rng.normal(size=img.shape) * (0.003 + 0.012 * img)).astype(np.float32)


def classify(before: np.ndarray, after: np.ndarray, roles: tuple[str, ...] = ROLES,
             valid: np.ndarray | None = None, rules: dict[str, np.ndarray] | None = None):
    before, after = noisy(before, 1), noisy(after, 2)
    valid = np.ones(before.shape[1:], bool) if valid is None else valid
    ev = SpectralDetector(1.0)(before, after, valid, roles, 1.0)
    return classify_block(ev, masks() if rules is None else rules, valid, res_m=1.0, cfg=CFG,
                          categories=CATS)


def codes_in(cat: np.ndarray, where: tuple[slice, slice]) -> set[int]:
    """Codes inside ``where`` shrunk by 1 px (object outlines may be a pixel off)."""
    inner = tuple(slice(w.start + 1, w.stop - 1) for w in where)
    return set(np.unique(cat[inner]).tolist())


def test_grave_in_forest() -> None:
    before = base_scene()
    after = before.copy()
    where = (slice(20, 29), slice(20, 29))
    paint(after, where, "laterite")
    paint(after, (slice(23, 26), slice(23, 26)), "tomb")
    res = classify(before, after)
    assert res.category.dtype == np.uint8 and res.confidence.dtype == np.float32
    assert codes_in(res.category, where) == {CATEGORY_CODES["forest_grave"]}
    assert res.confidence[24, 24] > 0.7
    assert (res.category > 0).sum() < 1.5 * 81


def test_grave_in_cemetery_is_excluded() -> None:
    before = base_scene()
    after = before.copy()
    paint(after, (slice(100, 108), slice(20, 28)), "laterite")
    res = classify(before, after)
    assert (res.category == 0).all()
    assert res.excluded["cemetery"] == 1


def test_whole_parcel_harvest_is_seasonal() -> None:
    before = base_scene()
    after = before.copy()
    paint(after, PARCELS[0], "stubble")
    res = classify(before, after)
    assert (res.category == 0).all()
    assert res.excluded["seasonal"] >= 1


def test_whole_parcel_harvest_rgb_is_seasonal() -> None:
    before = base_scene()
    after = before.copy()
    paint(after, PARCELS[1], "stubble")
    res = classify(before[[2, 1, 0]], after[[2, 1, 0]], roles=("red", "green", "blue"))
    assert (res.category == 0).all()


@pytest.mark.parametrize("kind", ["hard", "soil"])
def test_farmland_occupation(kind: str) -> None:
    before = base_scene()
    after = before.copy()
    where = (slice(10, 35), slice(100, 122))
    paint(after, where, kind)
    res = classify(before, after)
    assert codes_in(res.category, (slice(12, 33), slice(102, 120))) == {
        CATEGORY_CODES["land_occupation"]}
    assert (res.category[60:, :] == 0).all()


def test_new_roof_outside_and_inside_permit() -> None:
    before = base_scene()
    after = before.copy()
    outside, inside = (slice(70, 82), slice(70, 86)), (slice(100, 112), slice(100, 114))
    paint(after, outside, "roof")
    paint(after, inside, "roof")
    res = classify(before, after)
    assert codes_in(res.category, outside) == {CATEGORY_CODES["illegal_construction"]}
    assert (res.category[PERMIT] == 0).all()
    assert res.excluded["permit"] == 1


def test_rgb_only() -> None:
    before = base_scene()
    after = before.copy()
    grave, roof = (slice(20, 29), slice(20, 29)), (slice(70, 82), slice(70, 86))
    paint(after, grave, "laterite")
    paint(after, roof, "hard")
    rgb = [2, 1, 0]
    res = classify(before[rgb], after[rgb], roles=("red", "green", "blue"))
    assert codes_in(res.category, grave) == {CATEGORY_CODES["forest_grave"]}
    assert codes_in(res.category, roof) == {CATEGORY_CODES["illegal_construction"]}


def test_invalid_is_not_observed() -> None:
    before = base_scene()
    after = before.copy()
    valid = np.ones((N, N), bool)
    valid[:, -10:] = False
    after[:, :, -10:] = 0.9  # cloud
    res = classify(before, after, valid=valid)
    assert (res.category[:, -10:] == NOT_OBSERVED).all()
    assert (res.category[:, :-10] == 0).all()


def test_block_independence() -> None:
    before = base_scene()
    after = before.copy()
    paint(after, (slice(58, 67), slice(20, 29)), "laterite")  # across the seam
    paint(after, (slice(60, 70), slice(70, 82)), "roof")
    paint(after, (slice(10, 35), slice(100, 122)), "hard")
    before, after = noisy(before, 1), noisy(after, 2)
    det = SpectralDetector(1.0)
    valid = np.ones((N, N), bool)
    rules = masks()

    def run(rows: slice) -> np.ndarray:
        ev = det(before[:, rows], after[:, rows], valid[rows], ROLES, 1.0)
        sub = {k: v[rows] for k, v in rules.items()}
        return classify_block(ev, sub, valid[rows], res_m=1.0, cfg=CFG, categories=CATS).category

    whole = run(slice(0, N))
    h, halo = 64, det.halo
    top, bot = run(slice(0, h + halo)), run(slice(h - halo, N))
    np.testing.assert_array_equal(np.vstack([top[:h], bot[halo:]]), whole)
    assert {1, 2, 3} <= set(np.unique(whole).tolist())


def test_rasterize_rules() -> None:
    grid = Grid((20, 30), Affine(2.0, 0, 1000.0, 0, -2.0, 2040.0), norm_crs("EPSG:4547"))
    farms = gpd.GeoDataFrame(geometry=[box(1000, 2000, 1020, 2040), box(1020, 2000, 1040, 2040)],
                             crs="EPSG:4547")
    empty = gpd.GeoDataFrame(geometry=[], crs="EPSG:4547")
    out = rasterize_rules({"farmland": farms, "permits": empty}, grid)
    assert out["farmland"].dtype == bool and out["farmland"][:, :20].all()
    assert not out["farmland"][:, 20:].any()
    assert set(np.unique(out[PARCEL_KEY]).tolist()) == {0, 1, 2}
    assert not out["permits"].any()
    sub = grid.subgrid(Window(5, 0, 10, 10))
    np.testing.assert_array_equal(rasterize_rules({"farmland": farms}, sub)["farmland"],
                                  out["farmland"][0:10, 5:15])


def test_hysteresis_matches_skimage_and_keeps_only_seeded_regions() -> None:
    from skimage.filters import apply_hysteresis_threshold

    from pipeline.classify import hysteresis

    rng = np.random.default_rng(3)
    p = ndi.gaussian_filter(rng.random((200, 300)), 2).astype(np.float32)
    p = (p - p.min()) / (p.max() - p.min())
    got = hysteresis(p, 0.55, 0.7)
    assert got.any() and not got.all()
    np.testing.assert_array_equal(got, apply_hysteresis_threshold(p, 0.55, 0.7))
    # a region above `low` without a seed is dropped; diagonal contact does not connect
    q = np.zeros((6, 6), np.float32)
    q[1, 1], q[2, 2], q[4, 4] = 0.9, 0.5, 0.5
    q[4, 3] = 0.5
    assert hysteresis(q, 0.4, 0.8).nonzero() == (np.array([1]), np.array([1]))


def test_object_interior_and_first_pixel_match_whole_array_operations() -> None:
    from skimage.measure import label

    from pipeline.classify import _Objects

    rng = np.random.default_rng(5)
    m = ndi.gaussian_filter(rng.random((120, 90)), 2) > 0.5
    m[0, :] = True  # objects touching the array edge
    lab, n = label(m, connectivity=2, return_num=True)
    objs = _Objects(lab, n)
    core = ndi.binary_erosion(lab > 0, structure=np.ones((3, 3), bool))
    np.testing.assert_array_equal(objs.interior(), core.ravel()[objs.idx])
    assert 0 < objs.interior().sum() < objs.idx.size
    for i in range(1, n + 1):
        r, c = np.argwhere(lab == i)[0]  # argwhere is in raster order
        assert tuple(objs.first()[i]) == (r, c)


def test_building_veto_holds_outside_open_ground_only() -> None:
    """A detector with a building network reports cleared or hardened ground only in
    ``change_any``: classify keeps it inside farmland (违法占地) and drops it elsewhere."""
    before = base_scene()
    after = before.copy()
    on_farm, on_grass = (slice(10, 35), slice(100, 122)), (slice(66, 88), slice(70, 90))
    paint(after, on_farm, "hard")
    paint(after, on_grass, "hard")
    valid = np.ones((N, N), bool)
    ev = SpectralDetector(1.0)(noisy(before, 1), noisy(after, 2), valid, ROLES, 1.0)
    # what the building network did: every change vetoed (not a building), the pixel
    # model's own decision kept aside
    vetoed = {**ev, "change_any": ev["change"], "change": np.minimum(ev["change"], 0.35)}
    res = classify_block(vetoed, masks(), valid, res_m=1.0, cfg=CFG, categories=CATS)
    assert codes_in(res.category, (slice(12, 33), slice(102, 120))) == {
        CATEGORY_CODES["land_occupation"]}
    assert (res.category[on_grass] == 0).all()
    # without the layer split both stay; without farmland neither does
    plain = classify_block(ev, masks(), valid, res_m=1.0, cfg=CFG, categories=CATS)
    assert (plain.category[on_grass] > 0).mean() > 0.8
    no_farm = {k: v for k, v in masks().items() if k not in ("farmland", PARCEL_KEY)}
    res2 = classify_block(vetoed, no_farm, valid, res_m=1.0, cfg=CFG, categories=CATS)
    assert (res2.category[on_farm] == 0).all()


POND = (slice(64, 90), slice(66, 90))  # open ground, clear of the permit


def _with(extra: dict[str, tuple[slice, slice]]) -> dict[str, np.ndarray]:
    out = masks()
    for role, where in extra.items():
        m = np.zeros((N, N), bool)
        m[where] = True
        out[role] = m
    return out


def test_mapped_water_turning_turbid_is_no_finding() -> None:
    """Silt colours a pond red-brown: excluded on the water layer; off it, the same change
    passes for a red-tiled roof (the false alarm the layer prevents)."""
    before = base_scene()
    paint(before, POND, "water")
    after = before.copy()
    paint(after, POND, "turbid")
    res = classify(before, after, rules=_with({"water": POND}))
    assert (res.category == 0).all()
    assert res.excluded["water"] == 1
    res = classify(before, after)
    assert CATEGORY_CODES["illegal_construction"] in codes_in(res.category, POND)


def test_filled_pond_is_occupation_unless_rgb_only() -> None:
    before = base_scene()
    paint(before, POND, "water")
    after = before.copy()
    filled = (slice(66, 86), slice(68, 88))
    paint(after, filled, "soil")
    res = classify(before, after, rules=_with({"water": POND}))
    assert codes_in(res.category, filled) == {CATEGORY_CODES["land_occupation"]}
    rgb = [2, 1, 0]  # without NIR a brown water surface and soil look alike: for review only
    res = classify(before[rgb], after[rgb], roles=("red", "green", "blue"),
                   rules=_with({"water": POND}))
    assert codes_in(res.category, filled) == {CATEGORY_CODES["other_change"]}


def test_occupation_on_construction_land_is_excluded_but_buildings_are_not() -> None:
    """Farmland approved for construction: hardened ground there is no occupation; a new
    roof on construction land outside any permit is still illegal construction."""
    before = base_scene()
    after = before.copy()
    field = (slice(10, 35), slice(100, 122))
    roof = (slice(70, 82), slice(70, 86))
    paint(after, field, "hard")
    paint(after, roof, "roof")
    res = classify(before, after, rules=_with({"construction_land": (slice(0, 90),
                                                                     slice(64, N))}))
    assert (res.category[field] == 0).all()
    assert res.excluded["construction_land"] == 1
    assert codes_in(res.category, roof) == {CATEGORY_CODES["illegal_construction"]}


def test_a_new_roof_is_judged_without_its_cast_shadow() -> None:
    """A learned detector's object takes in the new building's cast shadow (the shadow
    changed too). The surface is judged on the lit pixels: shadowed grass is still green and
    would lift the object's vegetation past the bare-ground limit."""
    before = base_scene()
    after = before.copy()
    roof, shadow = (slice(70, 86), slice(72, 88)), (slice(70, 86), slice(62, 72))
    paint(after, roof, "roof")
    after[(slice(None), *shadow)] *= 0.3  # grass in the roof's shadow: darker, as green
    valid = np.ones((N, N), bool)
    ev = SpectralDetector(1.0)(noisy(before, 1), noisy(after, 2), valid, ROLES, 1.0)
    blob = np.zeros((N, N), bool)
    blob[70:86, 62:88] = True  # what the learned detector decided: roof and shadow as one
    learned = {**ev, "change": np.where(blob, 0.95, 0.0).astype(np.float32)}
    learned.pop("shape_score"), learned.pop("ratio_spread")  # not passed for a learned one
    res = classify_block(learned, masks(), valid, res_m=1.0, cfg=CFG, categories=CATS)
    assert codes_in(res.category, (slice(70, 86), slice(62, 88))) == {
        CATEGORY_CODES["illegal_construction"]}
