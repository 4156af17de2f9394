"""align: sub-pixel registration and its sign, radiometric normalisation, cloud/shadow mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rasterio.windows import Window
from scipy import ndimage as ndi

from pipeline.align import (
    AlignParams,
    apply_radiometry,
    cloud_shadow_mask,
    estimate_radiometry,
    estimate_shift,
    fit_alignment,
    rank_shift,
    read_aligned_block,
)
from pipeline.grid import Grid
from pipeline.ingest import open_image, read_block, read_overview, working_grid

BGRN = ("blue", "green", "red", "nir")


def displaced(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``img``'s content moved ``dx`` px right and ``dy`` px down (cubic spline)."""
    return ndi.shift(img, (dy, dx), order=3, mode="reflect")


@pytest.mark.parametrize("dx,dy", [(1.3, -0.6), (-2.25, 0.4), (0.0, 0.0), (5.7, 3.1)])
def test_estimate_shift_recovers_subpixel_shift(texture, dx: float, dy: float) -> None:
    ref = texture((260, 260), seed=1)
    mov = displaced(ref, dx, dy)
    valid = np.ones(ref.shape, bool)
    est = estimate_shift(ref[20:-20, 20:-20], mov[20:-20, 20:-20], valid[20:-20, 20:-20], 8.0)
    assert est == pytest.approx((dx, dy), abs=0.2)


def test_estimate_shift_multiband_with_invalid_corner(texture) -> None:
    ref = np.stack([texture((256, 256), seed=2) * k for k in (0.8, 1.0, 1.1)])
    mov = np.stack([displaced(b, -1.5, 0.75) for b in ref])
    valid = np.ones((256, 256), bool)
    valid[:60, :60] = False
    ref[:, ~valid] = np.nan
    assert estimate_shift(ref, mov, valid, 8.0) == pytest.approx((-1.5, 0.75), abs=0.2)


def test_estimate_shift_returns_zero_when_unsure_or_too_far(texture) -> None:
    ref = texture((200, 200), seed=3)
    other = texture((200, 200), seed=4)
    valid = np.ones(ref.shape, bool)
    assert estimate_shift(ref, other, valid, 8.0) == (0.0, 0.0)
    assert estimate_shift(ref, displaced(ref, 12.0, 0.0), valid, 8.0) == (0.0, 0.0)


def _scene(texture, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A 4-band reflectance scene (blue, green, red, nir) with texture at all scales."""
    t = [texture(shape, seed=seed + k) for k in range(3)]
    blue = 0.05 + 0.10 * t[0]
    green = 0.07 + 0.12 * (0.6 * t[0] + 0.4 * t[1])
    red = 0.06 + 0.15 * (0.5 * t[0] + 0.5 * t[2])
    nir = 0.15 + 0.25 * t[1]
    return np.stack([blue, green, red, nir]).astype("float32")


def test_shift_sign_end_to_end_with_read_block(make_raster, texture) -> None:
    before = _scene(texture, (700, 700), seed=10)
    dx, dy = 1.6, -0.8
    gain, offset = 1.25, 0.02  # after = before * 1.25 + 0.02 in DN terms (other illumination)
    after = np.stack([displaced(b, dx, dy) for b in before]) * gain + offset
    to_dn = lambda a: np.clip(a * 10_000, 1, 65_535).astype("uint16")  # noqa: E731
    pb = make_raster("before.tif", to_dn(before), descriptions=BGRN)
    pa = make_raster("after.tif", to_dn(after), descriptions=BGRN)
    b_src, a_src = open_image(pb), open_image(pa)
    grid = working_grid([b_src, a_src], crs=b_src.crs, resolution=1.0)

    params = fit_alignment(b_src, a_src, grid)
    assert params.shift_px == pytest.approx((dx, dy), abs=0.2)
    assert params.n_shift_windows >= 4
    assert params.local_shifts == ()  # one shift for the whole scene
    assert params.shift_for(Window(0, 0, 64, 64)) == params.shift_px
    # the windows read on two worker processes give exactly the same estimate
    assert fit_alignment(b_src, a_src, grid, workers=2) == params
    assert np.allclose(params.gain, 1 / gain, atol=0.03)
    assert np.allclose(params.offset, -offset / gain, atol=0.01)

    win = Window(100, 100, 400, 400)
    ref, _ = read_block(b_src, grid, win)
    plain, _ = read_block(a_src, grid, win)
    moved, _ = read_block(a_src, grid, win, shift_px=params.shift_px)
    err_plain = np.abs(ref[2] - (plain[2] - offset) / gain).mean()
    err_moved = np.abs(ref[2] - (moved[2] - offset) / gain).mean()
    assert err_moved < 0.25 * err_plain  # re-read with the shift, the images agree much better

    # the scene's stretch: before's percentiles, and after's as the blocks see it (normalised)
    whole = np.percentile(to_dn(before).reshape(4, -1) / 10_000, [2, 98], axis=1).T
    assert np.allclose(params.stretch_before, whole, rtol=0.05)
    assert np.allclose(params.stretch_after, params.stretch_before, rtol=0.05)

    bb, aa, valid = read_aligned_block(b_src, a_src, grid, win, params)
    assert bb.shape == aa.shape == (4, 400, 400) and valid.all()
    assert np.abs(bb - aa).mean() < 0.25 * np.abs(ref - plain).mean()
    assert np.isfinite(aa[:, valid]).all()


def test_shift_that_varies_across_the_scene_is_followed_block_by_block(make_raster,
                                                                         texture) -> None:
    """The after date displaced 2.5 px left at the west edge and 2.5 px right at the east
    (relief or orthorectification errors that differ between dates): the median shift is
    about 0 and leaves both sides misregistered by 2 px; read with the shift at their centres,
    blocks on either side line up."""
    size = 1536
    before = _scene(texture, (size, size), seed=30)
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = -2.5 + 5.0 * cc / (size - 1)  # content moved dx px right
    after = np.stack([ndi.map_coordinates(b, (rr, cc - dx), order=3, mode="reflect")
                      for b in before])
    to_dn = lambda a: np.clip(a * 10_000, 1, 65_535).astype("uint16")  # noqa: E731
    b_src = open_image(make_raster("before.tif", to_dn(before), descriptions=BGRN))
    a_src = open_image(make_raster("after.tif", to_dn(after), descriptions=BGRN))
    grid = working_grid([b_src, a_src], crs=b_src.crs, resolution=1.0)
    params = fit_alignment(b_src, a_src, grid)
    assert abs(params.shift_px[0]) < 0.5
    assert len(params.local_shifts) >= 6
    west, east = Window(64, 640, 256, 256), Window(size - 320, 640, 256, 256)
    assert params.shift_for(west)[0] < -1.2 and params.shift_for(east)[0] > 1.2
    single = AlignParams(params.shift_px, params.gain, params.offset, params.roles)
    for win, truth in ((west, -2.1), (east, 2.1)):
        bb, aa, valid = read_aligned_block(b_src, a_src, grid, win, params)
        left = estimate_shift(bb[:3], aa[:3], valid, 8.0)
        bb, aa, valid = read_aligned_block(b_src, a_src, grid, win, single)
        one = estimate_shift(bb[:3], aa[:3], valid, 8.0)
        assert abs(one[0] - truth) < 0.6  # one shift: still about 2 px off
        assert abs(left[0]) < 0.6 and abs(left[0]) < abs(one[0]) / 3


def test_radiometry_recovers_gain_offset_with_20pct_changed(texture) -> None:
    rng = np.random.default_rng(99)
    ref = _scene(texture, (200, 200), seed=20)
    g = np.array([1.3, 0.8, 1.1, 0.9])
    o = np.array([0.02, -0.01, 0.03, 0.0])
    mov = (ref - o[:, None, None]) / g[:, None, None] + rng.normal(0, 0.002, ref.shape)
    changed = rng.random((200, 200)) < 0.2
    mov[:, changed] = rng.random((4, int(changed.sum()))) * 0.5
    valid = np.ones((200, 200), bool)
    gain, offset = estimate_radiometry(ref, mov.astype("float32"), valid)
    assert gain == pytest.approx(g, abs=0.03)
    assert offset == pytest.approx(o, abs=0.005)
    fixed = apply_radiometry(mov.astype("float32"), gain, offset)
    assert np.abs(fixed - ref)[:, ~changed].mean() < 0.003


@pytest.mark.parametrize("seed", range(6))
def test_radiometry_recovers_gain_when_new_roofs_cover_a_small_bimodal_scene(seed: int) -> None:
    """15-21 % of a 160² scene of vegetation and soil turned to bright roofs, the rest 5 %
    brighter: the fit starts from the pixels whose ranks moved least (a first fit on every pixel
    settled at gain 0.3-0.49 for seed 5)."""
    from synthetic_cases import synthetic_pair

    before, after, label = synthetic_pair(seed, 0.5)
    assert 0.15 < (label == 1).mean() < 0.21
    gain, offset = estimate_radiometry(before, after, np.ones(label.shape, bool))
    assert gain == pytest.approx([1 / 1.05] * 3, abs=0.01)
    assert offset == pytest.approx([0, 0, 0], abs=0.003)


def test_rank_shift_ignores_monotonic_changes() -> None:
    x = np.random.default_rng(0).random((2, 500))
    y = np.stack([3 * x[0] + 1, np.sqrt(x[1])])  # monotonic per band: no rank moves
    moved = np.flatnonzero((x > 0.5).all(0))[:5]
    y[:, moved] = -1.0  # five pixels of the brighter half, darkest on the after date
    shift = rank_shift(x, y)
    rest = np.delete(shift, moved)
    assert rest.max() <= 5 / 499 and shift[moved].min() > 0.45


def test_radiometry_weakly_correlated_dates_match_spread_not_a_clamp() -> None:
    # dates of different seasons correlate at r ~ 0.3 (LEVIR's Google Earth pairs): a total
    # least squares line swings to the axis of the larger variance (gain 5, the clamp)
    rng = np.random.default_rng(5)
    ref = rng.random((3, 200, 200)).astype("float32")
    mov = (0.2 + 0.8 * (0.3 * ref + 0.7 * rng.random((3, 200, 200)))).astype("float32")
    gain, offset = estimate_radiometry(ref, mov, np.ones((200, 200), bool))
    spread = ref.reshape(3, -1).std(1) / mov.reshape(3, -1).std(1)  # 1.64
    assert gain == pytest.approx(spread, rel=0.15)
    fixed = apply_radiometry(mov, gain, offset)
    assert fixed.mean() == pytest.approx(ref.mean(), abs=0.03)


def test_radiometry_too_few_pixels_is_identity() -> None:
    z = np.zeros((3, 5, 5), "float32")
    gain, offset = estimate_radiometry(z, z, np.zeros((5, 5), bool))
    assert gain.tolist() == [1, 1, 1] and offset.tolist() == [0, 0, 0]


def _land_with_features(texture) -> tuple[np.ndarray, dict[str, tuple[slice, slice]]]:
    img = _scene(texture, (200, 200), seed=30)
    where = {"cloud": (slice(20, 60), slice(20, 60)), "shadow": (slice(70, 95), slice(30, 55)),
             "water": (slice(120, 170), slice(20, 70)), "forest": (slice(120, 170),
                                                                  slice(120, 170)),
             "roof": (slice(20, 24), slice(150, 155))}  # 0.2 ha
    spectra = {"cloud": (0.55, 0.55, 0.56, 0.58), "shadow": (0.035, 0.03, 0.025, 0.05),
               "water": (0.08, 0.06, 0.04, 0.015), "forest": (0.03, 0.05, 0.03, 0.35),
               "roof": (0.6, 0.6, 0.6, 0.6)}
    for k, sl in where.items():
        img[(slice(None), *sl)] = np.asarray(spectra[k], "float32")[:, None, None]
    return img, where


def test_cloud_mask_flags_cloud_and_shadow_not_water_forest_or_roofs(texture) -> None:
    img, where = _land_with_features(texture)
    m = cloud_shadow_mask(img, BGRN, res_m=10.0)
    assert m[where["cloud"]].all() and m[where["shadow"]].all()
    assert not m[where["water"]].any() and not m[where["forest"]].any()
    assert not m[where["roof"]].any()  # small bright roof: not a cloud
    land = np.ones(m.shape, bool)
    for sl in where.values():
        land[sl] = False
    land = ndi.binary_erosion(land, iterations=5)
    assert m[land].mean() < 0.001
    # NIR-less imagery: only near-white and near-black blobs; NaN never flagged
    rgb = img[:3].copy()
    rgb[:, :10, :10] = np.nan
    m3 = cloud_shadow_mask(rgb, BGRN[:3], res_m=10.0)
    assert not m3[where["water"]].any() and not m3[where["forest"]].any() and not m3[:8, :8].any()


def test_shadow_needs_a_cloud_and_a_temporal_darkening(texture) -> None:
    img, where = _land_with_features(texture)
    no_cloud = img.copy()
    no_cloud[(slice(None), *where["cloud"])] = img[:, 100:140, 100:140]
    assert not cloud_shadow_mask(no_cloud, BGRN, res_m=10.0).any()  # terrain-like shade alone
    # the same dark patch in the other date (persistent shade) is not a cloud shadow
    other = img.copy()
    other[(slice(None), *where["cloud"])] = img[:, 100:140, 100:140]  # no cloud there
    m = cloud_shadow_mask(img, BGRN, res_m=10.0, other=other)
    assert m[where["cloud"]].all() and not m[where["shadow"]][5:-5, 5:-5].any()
    # nor is a bright patch present on both dates (a white roof) a cloud
    assert not cloud_shadow_mask(img, BGRN, res_m=10.0, other=img).any()
    clear = _scene(texture, (200, 200), seed=30)
    m2 = cloud_shadow_mask(img, BGRN, res_m=10.0, other=clear)
    assert m2[where["shadow"]].all()


def test_rgb_cloud_must_be_new_in_its_date(texture) -> None:
    # an RGB rendering's white roof of 3 ha (OSCD Cupertino) on both dates is no cloud; on
    # clear ground the day before, the same white blob is one
    clear = _scene(texture, (200, 200), seed=30)[:3]
    roof = clear.copy()
    roof[:, 50:70, 50:65] = 0.9
    assert not cloud_shadow_mask(roof, BGRN[:3], res_m=10.0, other=roof).any()
    assert cloud_shadow_mask(roof, BGRN[:3], res_m=10.0, other=clear)[50:70, 50:65].all()


def test_read_aligned_block_drops_clouds(make_raster, texture) -> None:
    img, where = _land_with_features(texture)
    clear = _scene(texture, (200, 200), seed=30)
    to_dn = lambda a: (a * 10_000).astype("uint16")  # noqa: E731
    pb = make_raster("b.tif", to_dn(clear), descriptions=BGRN, res=10.0)
    pa = make_raster("a.tif", to_dn(img), descriptions=BGRN, res=10.0)
    b_src, a_src = open_image(pb), open_image(pa)
    grid = Grid.from_bounds(b_src.bounds, 10.0, b_src.crs)
    params = AlignParams(roles=BGRN, gain=(1.0,) * 4, offset=(0.0,) * 4)
    _, _, valid = read_aligned_block(b_src, a_src, grid, Window(0, 0, 200, 200), params)
    assert not valid[where["cloud"]].any() and not valid[where["shadow"]].any()
    assert valid[where["water"]].all() and valid[where["forest"]].all()


def test_read_aligned_block_judges_cloud_by_the_after_date_as_acquired(make_raster,
                                                                        texture) -> None:
    # a flat, hazy after date normalised by gain 2 lifts a grey roof (0.45) to 0.9: cloud
    # brightness in the before date's radiometry, not in the image as acquired
    clear = _scene(texture, (200, 200), seed=30)[:3]
    hazy = 0.5 * clear
    hazy[:, 100:130, 100:130] = 0.45
    to_dn = lambda a: (a * 10_000).astype("uint16")  # noqa: E731
    pb = make_raster("b.tif", to_dn(clear), descriptions=BGRN[:3], res=10.0)
    pa = make_raster("a.tif", to_dn(hazy), descriptions=BGRN[:3], res=10.0)
    b_src, a_src = open_image(pb), open_image(pa)
    grid = Grid.from_bounds(b_src.bounds, 10.0, b_src.crs)
    params = AlignParams(roles=BGRN[:3], gain=(2.0,) * 3, offset=(0.0,) * 3)
    _, aa, valid = read_aligned_block(b_src, a_src, grid, Window(0, 0, 200, 200), params)
    assert aa[:, 100:130, 100:130].min() > 0.8 and valid.all()
    white = hazy.copy()
    white[:, 100:130, 100:130] = 0.9  # a real cloud as acquired is still one
    pw = make_raster("w.tif", to_dn(white), descriptions=BGRN[:3], res=10.0)
    _, _, valid = read_aligned_block(b_src, open_image(pw), grid, Window(0, 0, 200, 200),
                                     params)
    assert not valid[100:130, 100:130].any()


def test_read_aligned_block_masks_after_cloud_only_when_cloud_both_ways(make_raster,
                                                                         texture) -> None:
    # new bare ground on an 8-bit rendering: flat and bright as acquired, but the per-band
    # gains (NIR 0.65) show it as ground, NIR well below the visible (Landsat Taizhou: 1.5 km²
    # of labelled change masked as cloud)
    clear = _scene(texture, (200, 200), seed=30)
    ground = clear.copy()
    ground[:, 100:130, 100:130] = np.array([0.45, 0.44, 0.45, 0.42], "float32")[:, None, None]
    to_dn = lambda a: (a * 10_000).astype("uint16")  # noqa: E731
    pb = make_raster("b.tif", to_dn(clear), descriptions=BGRN, res=10.0)
    pa = make_raster("a.tif", to_dn(ground), descriptions=BGRN, res=10.0)
    b_src, a_src = open_image(pb), open_image(pa)
    grid = Grid.from_bounds(b_src.bounds, 10.0, b_src.crs)
    params = AlignParams(roles=BGRN, gain=(1.0, 1.0, 1.0, 0.65), offset=(0.0,) * 4)
    _, _, valid = read_aligned_block(b_src, a_src, grid, Window(0, 0, 200, 200), params)
    assert valid[100:130, 100:130].all()
    cloud = ground.copy()
    cloud[:, 100:130, 100:130] = np.array([0.6, 0.6, 0.6, 0.72], "float32")[:, None, None]
    pc = make_raster("c.tif", to_dn(cloud), descriptions=BGRN, res=10.0)
    _, _, valid = read_aligned_block(b_src, open_image(pc), grid, Window(0, 0, 200, 200),
                                     params)
    assert not valid[100:130, 100:130].any()


# -------------------------------------------------------------------------------- real data


def test_real_oscd_fit_alignment(shared_data: Path) -> None:
    case = shared_data / "cases" / "oscd" / "saclay_w"
    before = open_image(case / "before.tif", sensor="Sentinel-2")
    after = open_image(case / "after.tif", sensor="Sentinel-2")
    grid = working_grid([before, after], crs="EPSG:32631", resolution=10.0)
    p = fit_alignment(before, after, grid)
    assert np.hypot(*p.shift_px) < 2.0  # same Sentinel-2 product family: at most ~1 px
    assert all(0.5 < g < 2.0 for g in p.gain)
    win = Window(100, 100, 256, 256)
    b, a, valid = read_aligned_block(before, after, grid, win, p)
    assert valid.mean() > 0.9 and np.isfinite(a[:, valid]).all()
    # over the scene, normalised after agrees with before better than raw after
    ob, vb, og = read_overview(before, grid)
    oa, va, _ = read_overview(after, grid.shifted(*p.shift_px))
    v = vb & va
    norm = apply_radiometry(oa, np.asarray(p.gain), np.asarray(p.offset))
    raw_err = np.median(np.abs(ob - oa)[:, v], axis=1)
    norm_err = np.median(np.abs(ob - norm)[:, v], axis=1)
    assert (norm_err <= 1.05 * raw_err).all()  # never clearly worse (NIR: seasonal)
    assert norm_err[:3].mean() < 0.8 * raw_err[:3].mean()  # visible: clearly better
