"""Detector selection: ``auto`` picks by bands and pixel size, never by case."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from pipeline.detect.registry import describe, get_detector, open_ground_change
from pipeline.detect.spectral import SpectralDetector
from pipeline.errors import ConfigError

needs_lgb = pytest.mark.skipif(importlib.util.find_spec("lightgbm") is None,
                               reason="lightgbm not installed")
RGB = ("red", "green", "blue")
RGBN = ("blue", "green", "red", "nir")


def _is_learned(det: object) -> bool:
    return type(det).__name__ == "_WithEvidence"


def test_unknown_method_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown detection method"):
        get_detector("magic", RGB, 1.0)


@pytest.mark.parametrize("name", ["spectral", "cva"])
def test_spectral_by_name(name: str) -> None:
    assert isinstance(get_detector(name, RGBN, 1.0), SpectralDetector)


def test_auto_without_visible_bands_is_spectral() -> None:
    assert isinstance(get_detector("auto", ("nir", "swir1"), 10.0), SpectralDetector)
    with pytest.raises(ConfigError, match="no model"):
        get_detector("learned", ("nir", "swir1"), 10.0)


@needs_lgb
@pytest.mark.parametrize("res", [0.5, 1.0, 10.0, 30.0])
def test_auto_rgb_is_learned(res: float) -> None:
    assert _is_learned(get_detector("auto", RGB, res))


@needs_lgb
def test_auto_rgb_nir_by_resolution() -> None:
    """Without an RGB+NIR model: RGB+NIR imagery gets the RGB model (NIR ignored) at any pixel
    size; up to 4.5 m (GF-2, Jilin-1, GF-1, PlanetScope) the spectral detector keeps forest,
    farmland and ecological land, as on RGB imagery (on its own it scores below the textbook
    reference on the real cases); Sentinel-2 does not."""
    from pipeline.detect import learned

    if learned._kind_for(RGBN, learned.MODEL_DIR, 1.0, exact=True) == "ms":
        pytest.skip("an RGB+NIR model ships")
    for res in (0.5, 1.0, 2.0, 3.0, 4.5, 5.0, 10.0):
        det = get_detector("auto", RGBN, res)
        assert _is_learned(det), res
        assert det.open_ground == (res <= 4.5), res
    assert _is_learned(get_detector("learned", RGBN, 1.0))


@needs_lgb
def test_learned_output_carries_evidence() -> None:
    det = get_detector("auto", RGB, 10.0)
    rng = np.random.default_rng(0)
    a = (0.1 + 0.3 * rng.random((3, 48, 48))).astype(np.float32)
    out = det(a, a, np.ones((48, 48), bool), RGB, 10.0)
    assert {"change", "veg_before", "veg_after", "chroma_blue_after"} <= set(out)
    # the spectral illumination veto is not handed to classify for a learned detector
    assert not {"shape_score", "ratio_spread"} & set(out)
    assert out["change"].dtype == np.float32 and out["change"].shape == (48, 48)
    assert det.halo >= SpectralDetector(10.0).halo


def test_model_dir_env_without_models_falls_back(tmp_path, monkeypatch) -> None:
    """``TUBAN_MODEL_DIR`` replaces the shipped models: an empty folder means no learned model."""
    monkeypatch.setenv("TUBAN_MODEL_DIR", str(tmp_path))
    assert isinstance(get_detector("auto", RGB, 1.0), SpectralDetector)
    with pytest.raises(ConfigError, match="no model"):
        get_detector("learned", RGB, 1.0)


@needs_lgb
def test_learned_on_fine_imagery_keeps_spectral_change_on_open_ground() -> None:
    for method in ("auto", "learned"):
        for roles in (RGBN, RGB):  # NDVI, or excess green
            det = get_detector(method, roles, 1.0, threshold=4.0)
            assert det.open_ground and det.spectral.threshold == 4.0
            assert describe(det, roles, 1.0)["open_ground"] == {"name": "spectral",
                                                                "threshold": 4.0}
    assert get_detector("learned", RGB, 4.5).open_ground
    assert not get_detector("learned", RGB, 5.0).open_ground
    assert not get_detector("learned", RGBN, 10.0).open_ground  # as "auto" there
    assert isinstance(get_detector("spectral", RGBN, 1.0), SpectralDetector)  # on request


@needs_lgb
def test_learned_takes_the_spectral_states_alone_off_open_ground(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Off open ground the learned detector's colour evidence comes without the spectral
    score (unused there): the spectral detector's full call, which costs five times as much,
    does not run; on open ground it does (its decisions are ``change_any``)."""
    rng = np.random.default_rng(0)
    before = rng.uniform(0.05, 0.3, (4, 64, 64)).astype(np.float32)
    after = before.copy()
    after[:, 20:40, 20:40] = 0.35
    valid = np.ones((64, 64), bool)
    calls: list[str] = []
    full = SpectralDetector.__call__
    monkeypatch.setattr(SpectralDetector, "__call__",
                        lambda self, *a: calls.append("full") or full(self, *a))
    for roles, res, open_ground in ((RGB, 10.0, False), (RGBN, 10.0, False), (RGBN, 1.0, True),
                                    (RGB, 1.0, True)):
        det = get_detector("learned", roles, res)
        calls.clear()
        out = det(before[:len(roles)], after[:len(roles)], valid, roles, res)
        assert calls == (["full"] if open_ground else []), (roles, res)
        assert {"chroma_red_after", "chroma_blue_after", "veg_after"} <= out.keys()
        assert ("change_any" in out) == (open_ground or res < 4.5)
        assert ("shape_score" in out) is False  # never passed on


@needs_lgb
def test_open_ground_keeps_the_learned_decisions_beside_the_spectral_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On open ground ``change_any`` is the learned decision joined by the spectral one: a
    building the RGB model and its network find on farmland stays (the spectral detector alone
    found 13 % of LEVIR's new-building pixels), and so does a clearing only the spectral
    detector finds."""
    rng = np.random.default_rng(0)
    before = rng.uniform(0.05, 0.3, (3, 64, 64)).astype(np.float32)
    valid = np.ones((64, 64), bool)
    det = get_detector("learned", RGB, 1.0)
    learned = np.zeros((64, 64), np.float32)
    learned[5:15, 5:15] = 0.9  # a roof the learned detector decided
    spectral = np.zeros((64, 64), np.float32)
    spectral[40:50, 40:50] = 0.8  # a clearing the spectral detector decided
    monkeypatch.setattr(det, "det", lambda *a: {"change": learned})
    full = SpectralDetector.__call__
    monkeypatch.setattr(SpectralDetector, "__call__",
                        lambda self, *a: {**full(self, *a), "change": spectral})
    out = det(before, before, valid, RGB, 1.0)
    np.testing.assert_array_equal(out["change"], learned)
    np.testing.assert_array_equal(out["change_any"], np.maximum(learned, spectral))


def test_open_ground_change_drops_illumination_only() -> None:
    spectral = {"change": np.full(4, 0.9, np.float32),
                "shape_score": np.array([1.0, 5.0, 1.0, np.nan]),  # NaN: not evaluated
                "ratio_spread": np.array([0.1, 0.1, 0.1, np.nan]),
                "bright_before": np.array([0.2, 0.2, 0.2, 0.2]),
                "bright_after": np.array([0.1, 0.1, 0.05, 0.1])}  # 0.05: darker than 3x
    assert open_ground_change(spectral).tolist() == pytest.approx([0.0, 0.9, 0.9, 0.9])


@needs_lgb
def test_fine_imagery_gets_every_layer_from_cells() -> None:
    """RGB at 0.125 m that is a 0.5 m image repeated 4×4: the learned decision and the spectral
    layers the classifier reads are the 0.5 m ones, repeated (the spectral detector runs on the
    same cells)."""
    from pipeline.detect.learned import up_nearest

    rng = np.random.default_rng(2)
    before = (0.1 + 0.3 * rng.random((3, 64, 64))).astype(np.float32)
    after = before.copy()
    after[:, 20:40, 24:48] = np.array([0.55, 0.5, 0.45], np.float32)[:, None, None]
    valid = np.ones((64, 64), bool)
    coarse = get_detector("auto", RGB, 0.5)(before, after, valid, RGB, 0.5)
    fine_det = get_detector("auto", RGB, 0.125)
    b4, a4, v4 = (up_nearest(x, 4, (256, 256)) for x in (before, after, valid))
    fine = fine_det(b4, a4, v4, RGB, 0.125)
    assert set(fine) == set(coarse) >= {"change", "change_any", "veg_after", "chroma_red_after"}
    for key in coarse:
        np.testing.assert_allclose(fine[key], up_nearest(coarse[key], 4, (256, 256)),
                                   atol=1e-5, err_msg=key)
