"""Learned change detector: features, model file, synthetic and real pairs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.detect import features as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
needs_lgb = pytest.mark.skipif(importlib.util.find_spec("lightgbm") is None,
                               reason="lightgbm not installed")


def _scene(shape: tuple[int, int], bands: int, seed: int = 0) -> np.ndarray:
    """Textured reflectance-like scene: smooth fields plus fine texture, 0.05..0.5."""
    rng = np.random.default_rng(seed)
    base = ndi.gaussian_filter(rng.random((bands, *shape)), (0, 6, 6))
    base = (base - base.min()) / (np.ptp(base) + 1e-9)
    img = 0.08 + 0.3 * base + 0.02 * rng.standard_normal((bands, *shape))
    return np.clip(img, 0.01, 1.0).astype(np.float32)


@pytest.mark.parametrize("roles", [("red", "green", "blue"), ("blue", "green", "red", "nir")])
def test_features_finite_and_shaped(roles: tuple[str, ...]) -> None:
    a = _scene((64, 80), len(roles), 1)
    b = _scene((64, 80), len(roles), 2)
    valid = np.ones((64, 80), bool)
    valid[:5] = False
    a[:, :5] = np.nan  # invalid pixels may hold anything
    names, stack = F.compute(a, b, valid, roles, 10.0)
    assert stack.shape == (len(names), 64, 80)
    assert stack.dtype == np.float32
    assert np.isfinite(stack).all()
    assert len(set(names)) == len(names)
    assert ("d_ndvi_r1" in names) == ("nir" in roles)


def test_scene_medians_make_a_block_equal_the_whole_image() -> None:
    """With the scene's stretch and medians, a block's features away from its edges are
    exactly the whole image's; with its own medians the ``*_rel`` features differ."""
    roles = ("red", "green", "blue")
    a, b = _scene((160, 160), 3, 1), _scene((160, 160), 3, 2)
    b[:, 20:60, 20:60] += 0.3  # a change in one corner: the block medians differ from the scene's
    valid = np.ones((160, 160), bool)
    res = 1.0
    stretch = (F.stretch_params(a, valid), F.stretch_params(b, valid))
    windows = [(slice(r, r + 64), slice(c, c + 64)) for r in (0, 48, 96) for c in (0, 48, 96)]
    samples = [F.median_samples(a[:, r, c], b[:, r, c], valid[r, c], roles, res, stretch=stretch)
               for r, c in windows]
    m = F.halo_px(res)
    assert all(len(s["mag"]) == (64 - 2 * m) ** 2 for s in samples)  # window edges left out
    medians = F.scene_medians(samples)
    assert sorted(medians) == sorted(F.REL_BASES)
    names, whole = F.compute(a, b, valid, roles, res, stretch=stretch, medians=medians)
    blk = (slice(0, 80), slice(0, 80))
    _, own = F.compute(a[:, blk[0], blk[1]], b[:, blk[0], blk[1]], valid[blk], roles, res,
                       stretch=stretch)
    _, scene = F.compute(a[:, blk[0], blk[1]], b[:, blk[0], blk[1]], valid[blk], roles, res,
                         stretch=stretch, medians=medians)
    core = (slice(None), slice(0, 80 - m), slice(0, 80 - m))
    np.testing.assert_allclose(scene[core], whole[:, :80, :80][core], rtol=1e-5, atol=1e-6)
    rel = [i for i, n in enumerate(names) if n.endswith("_rel")]
    assert not np.allclose(own[rel][core], whole[rel][:, :80, :80][core])
    assert F.scene_medians(samples[:1], min_pixels=10**6) == {}  # too few: each block its own


@pytest.mark.parametrize("roles", [("red", "green", "blue"), ("blue", "green", "red", "nir")])
@pytest.mark.parametrize("scene_stretch", [False, True])
def test_median_samples_are_the_features_own_values(roles: tuple[str, ...],
                                                    scene_stretch: bool) -> None:
    """The scene medians' samples are what :func:`F.compute` gives those layers, to the bit
    (``decorr_r1`` = 1 - ``corr_r1``), though computed without the other features, on one
    thread or several."""
    a, b = _scene((96, 112), len(roles), 3), _scene((96, 112), len(roles), 4)
    b[:, 30:60, 40:80] += 0.25
    valid = np.ones((96, 112), bool)
    valid[:9, :20] = False
    a[:, 50:53, 7:9] = np.nan  # invalid pixels may hold anything
    keep = np.zeros_like(valid)
    keep[::2, ::2] = True
    stretch = (F.stretch_params(a, valid), F.stretch_params(b, valid)) if scene_stretch else None
    names, stack = F.compute(a, b, valid, roles, 2.0, stretch=stretch)
    for k, threads in ((keep, 1), (None, 1), (keep, 3)):
        got = F.median_samples(a, b, valid, roles, 2.0, stretch=stretch, keep=k,
                               threads=threads)
        if k is None:
            m = F.halo_px(2.0)
            k = np.zeros_like(valid)
            k[m:-m, m:-m] = True
        assert list(got) == list(F.REL_BASES)
        for name in F.REL_BASES:
            layer = (1 - stack[names.index("corr_r1")] if name == "decorr_r1"
                     else stack[names.index(name)])
            np.testing.assert_array_equal(got[name], layer[valid & k], err_msg=name)


def test_features_need_rgb() -> None:
    with pytest.raises(ValueError, match="red, green and blue"):
        F.feature_set(("nir", "swir1"))


def test_scales_tied_to_metres() -> None:
    fine, coarse = F.scales_for(0.5), F.scales_for(10.0)
    assert fine.r1 > coarse.r1 and fine.r2 > coarse.r2
    assert F.halo_px(0.5) > fine.r2


@needs_lgb
def test_model_file_loads() -> None:
    from pipeline.detect.learned import has_model, load_model, model_paths

    assert has_model(("red", "green", "blue"))
    assert not has_model(("nir", "swir1"))
    model = load_model("rgb")
    txt, js = model_paths("rgb")
    assert txt.stat().st_size < 2_000_000
    meta = json.loads(js.read_text())
    assert "research" in meta["lineage"] and meta["held_out"] and meta["held_out_cases"]
    # held-out figures for every dataset under both protocols, thresholds never self-chosen
    for proto in ("held_out", "held_out_cases"):
        assert {"landsat", "levir", "oscd", "oscd-rgb", "macro"} <= set(meta[proto])
        assert all("other" in r["threshold_from"] for d, r in meta[proto].items()
                   if d != "macro")
    lo, hi = meta["res_range_m"]
    assert lo <= 0.5 and hi >= 30.0
    z = np.zeros((3, 8, 8), np.float32)
    names, _ = F.compute(z, z, np.ones((8, 8), bool), ("red", "green", "blue"), 1.0)
    assert tuple(names) == model.features


@needs_lgb
def test_planted_change_found_and_brightness_ignored() -> None:
    from pipeline.detect.learned import LearnedDetector, decide

    roles, res = ("red", "green", "blue"), 0.5
    before = _scene((160, 160), 3, 3)
    after = before + 0.01 * np.random.default_rng(4).standard_normal(before.shape)
    after = after.astype(np.float32)
    after[:, 60:100, 50:100] = np.array([0.55, 0.5, 0.45], np.float32)[:, None, None]  # new roof
    valid = np.ones((160, 160), bool)
    # the pixel model alone: the building network (tests/test_cnn.py) judges roofs by shape
    det = LearnedDetector(roles, res, network=False)
    out = det(before, after, valid, roles, res)
    assert set(out) >= {"change", "ndvi_before", "ndvi_after", "bright_before",
                        "bright_after", "veg_before", "veg_after"}
    assert all(v.shape == valid.shape and v.dtype == np.float32 for v in out.values())
    assert np.isnan(out["ndvi_before"]).all()
    hit = decide(out["change"], valid, res)
    inside = np.zeros_like(valid)
    inside[60:100, 50:100] = True
    assert hit[inside].mean() > 0.6
    assert hit[~ndi.binary_dilation(inside, iterations=8)].mean() < 0.05
    # a global brightness/contrast change is not change
    brighter = (1.25 * before + 0.03).astype(np.float32)
    out2 = det(before, brighter, valid, roles, res)
    assert decide(out2["change"], valid, res).mean() < 0.02


def test_zero_nonfinite_is_nan_to_num_in_place() -> None:
    x = _scene((50, 40), 3)
    x[1, 2, 3], x[0, 0, 0], x[2, 9, 9] = np.nan, np.inf, -np.inf
    want = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    assert F.zero_nonfinite(x) is x
    assert np.array_equal(x, want)
    big = np.full((4, 4), 3e38, np.float32)  # finite, but its sum overflows to inf
    assert np.array_equal(F.zero_nonfinite(big.copy()), big)


def test_model_scored_on_every_second_pixel_up_to_1_2_m() -> None:
    from pipeline.detect.learned import predict_stride

    assert [predict_stride(r) for r in (0.3, 0.5, 0.8, 1.0, 1.1, 1.2, 2.0, 10.0)] == [
        2, 2, 2, 2, 2, 1, 1, 1]


def test_work_factor_brings_fine_imagery_to_half_a_metre() -> None:
    from pipeline.detect.learned import down_masked, up_nearest, work_factor

    assert [work_factor(r) for r in (None, 10.0, 0.5, 0.3, 0.125, 0.075)] == [1, 1, 1, 2, 4, 7]
    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    valid = np.ones((4, 6), bool)
    valid[0, 0] = False  # an invalid pixel does not count in its cell's mean
    x[:, 0, 0] = 1e6
    m, v = down_masked(x, valid, 2)
    assert m.shape == (2, 2, 3) and v.all()
    assert m[0, 0, 0] == pytest.approx((1 + 6 + 7) / 3)
    assert m[1, 1, 2] == x[1, 2:, 4:].mean()
    assert up_nearest(m, 2, (3, 5)).shape == (2, 3, 5)


@needs_lgb
def test_finer_imagery_is_detected_on_cells_of_the_trained_size() -> None:
    """An image at 0.125 m that is the 0.5 m one repeated 4×4 gets the 0.5 m decisions, repeated
    (the features and network were made for 0.5 m and coarser; at 0.125 m as is, LEVIR lost
    three quarters of its F1)."""
    from pipeline.detect.learned import LearnedDetector, up_nearest

    roles = ("red", "green", "blue")
    before = _scene((96, 96), 3, 5)
    after = before.copy()
    after[:, 30:50, 40:70] = np.array([0.55, 0.5, 0.45], np.float32)[:, None, None]
    valid = np.ones((96, 96), bool)
    coarse = LearnedDetector(roles, 0.5)(before, after, valid, roles, 0.5)
    fine_det = LearnedDetector(roles, 0.125)
    assert fine_det.work_factor == 4 and fine_det.halo % 4 == 0
    b4, a4, v4 = (up_nearest(x, 4, (384, 384)) for x in (before, after, valid))
    fine = fine_det(b4, a4, v4, roles, 0.125)
    assert coarse["change"].max() >= 0.5  # the roof is found at 0.5 m
    for key in ("change", "change_any"):
        np.testing.assert_allclose(fine[key], up_nearest(coarse[key], 4, (384, 384)),
                                   atol=1e-5)
    np.testing.assert_allclose(fine["bright_after"], up_nearest(coarse["bright_after"], 4,
                                                                (384, 384)), atol=1e-6)


@needs_lgb
@pytest.mark.skipif(not (SHARED / "data" / "cases").exists(), reason="../shared absent")
def test_real_levir_crop_beats_reference() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from accuracy import counts, load_case, reference_detect, scores

    from pipeline.detect.learned import LearnedDetector, decide

    case = load_case(SHARED / "data" / "cases" / "levir" / "test_2_0000_0512")
    det = LearnedDetector(case.roles, case.res_m)
    out = det(case.before, case.after, case.valid, case.roles, case.res_m)
    f1 = scores(counts(decide(out["change"], case.valid, case.res_m), case.label))["f1"]
    ref = scores(counts(reference_detect(case.before, case.after, case.valid),
                        case.label))["f1"]
    assert f1 > ref


@needs_lgb
def test_model_dir_env_selects_models(tmp_path, monkeypatch) -> None:
    """``TUBAN_MODEL_DIR`` (held-out fold models in bench/accuracy.py) is honoured at call time."""
    import shutil

    from pipeline.detect import learned

    txt, js = learned.model_paths("rgb")
    assert learned.resolve_model_dir() == learned.MODEL_DIR
    shutil.copy(txt, tmp_path / txt.name)
    meta = json.loads(js.read_text())
    meta["calibration"]["threshold_raw_by_max_res_m"] = {"1000000000.0": 0.123}
    (tmp_path / js.name).write_text(json.dumps(meta))
    monkeypatch.setenv(learned.MODEL_DIR_ENV, str(tmp_path))
    assert learned.resolve_model_dir() == tmp_path
    assert learned.model_paths("rgb")[0] == tmp_path / txt.name
    assert learned.load_model("rgb").threshold_raw(0.5) == pytest.approx(0.123)
    assert learned.LearnedDetector(("red", "green", "blue"), 0.5).model_dir == tmp_path
    monkeypatch.delenv(learned.MODEL_DIR_ENV)
    assert learned.load_model("rgb").threshold_raw(30.0) != pytest.approx(0.123)


@needs_lgb
def test_shipped_threshold_classes_end_where_the_sensors_do() -> None:
    """GF-1 and ZY-3 (2-2.1 m, or 2.2 m where a pixel in degrees is measured in metres) take
    LEVIR's threshold: at the 10 m class's, LEVIR averaged to 2.2 m kept a tenth of its
    buildings. Sentinel-2's 20 m bands (20.15 m in degrees) take its 10 m bands' threshold:
    at Landsat's, OSCD averaged to 20.15 m had precision 0.276."""
    from pipeline.detect import learned
    from pipeline.detect.objects import load_object_model

    model = learned.load_model("rgb", learned.MODEL_DIR)
    assert model.threshold_raw(2.2) == model.threshold_raw(2.5) == model.threshold_raw(0.5)
    # PlanetScope (3-4 m) too: at the 10 m class's, LEVIR averaged to 3.3 m found 1 % of its
    # changed pixels
    assert model.threshold_raw(3.3) == model.threshold_raw(4.5) == model.threshold_raw(0.5)
    assert model.threshold_raw(5.0) == model.threshold_raw(10.0) != model.threshold_raw(0.5)
    assert model.threshold_raw(20.15) == model.threshold_raw(25.0) == model.threshold_raw(10.0)
    assert model.threshold_raw(30.0) != model.threshold_raw(10.0)
    objects = load_object_model("rgb", learned.MODEL_DIR)
    assert objects.threshold_for(20.15) == objects.threshold_for(10.0)


@needs_lgb
@pytest.mark.parametrize("lean", [True, False])
def test_lightgbm_import_skips_sklearn_only_in_tubans_own_processes(lean: bool) -> None:
    """``tuban`` and its local workers import LightGBM without scikit-learn (0.55 s each);
    a process that did not ask for it (a notebook) gets the usual import."""
    import subprocess

    pytest.importorskip("sklearn")
    from pipeline.blocks import LEAN_LIGHTGBM_ENV

    code = ("import sys; from pipeline.detect.gbm import lgb; "
            "print('sklearn' in sys.modules, lgb.compat.SKLEARN_INSTALLED); "
            "import sklearn; print(sklearn.__name__)")
    env = {k: v for k, v in os.environ.items() if k != LEAN_LIGHTGBM_ENV}
    if lean:
        env[LEAN_LIGHTGBM_ENV] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split("\n")
    assert out[0] == ("False False" if lean else "True True")
    assert out[1] == "sklearn"  # still importable afterwards
