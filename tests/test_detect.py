"""Tests for the spectral detector and the detector registry (synthetic arrays built in code)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.detect.registry import get_detector
from pipeline.detect.spectral import EVIDENCE_KEYS, STATE_KEYS, SpectralDetector
from pipeline.errors import ConfigError

ROLES = ("blue", "green", "red", "nir")
RGB = ("red", "green", "blue")
FOREST = np.array([0.03, 0.06, 0.04, 0.35], np.float32)
SOIL = np.array([0.12, 0.15, 0.20, 0.26], np.float32)
ROOF = np.array([0.25, 0.26, 0.27, 0.29], np.float32)


def textured(shape: tuple[int, int] = (96, 96), seed: int = 0) -> np.ndarray:
    """Forest-like texture with hillshade, a road and a building: sharp edges everywhere."""
    rng = np.random.default_rng(seed)
    tex = ndi.gaussian_filter(rng.normal(size=shape), 1.5)
    tex = 1.0 + 0.25 * tex / tex.std()
    shade = np.linspace(0.7, 1.2, shape[1])[None, :]
    img = FOREST[:, None, None] * tex[None] * shade[None]
    img[:, 40:44, :] = np.array([0.08, 0.09, 0.10, 0.12])[:, None, None]  # asphalt road
    img[:, 10:22, 60:75] = ROOF[:, None, None]  # existing building
    return img.astype(np.float32)


def noisy(img: np.ndarray, seed: int, sd: float = 0.004) -> np.ndarray:
    return (img + np.random.default_rng(seed).normal(0, sd, img.shape)).astype(np.float32)


def run(before: np.ndarray, after: np.ndarray, roles: tuple[str, ...] = ROLES,
        res_m: float = 1.0, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    if valid is None:
        valid = np.ones(before.shape[1:], bool)
    return SpectralDetector(res_m)(before, after, valid, roles, res_m)


def test_planted_square_found_background_untouched() -> None:
    before = textured()
    after = before.copy()
    after[:, 60:68, 20:28] = SOIL[:, None, None]
    out = run(noisy(before, 1), noisy(after, 2))
    change = out["change"]
    assert change.dtype == np.float32 and change.shape == before.shape[1:]
    assert change[61:67, 21:27].min() > 0.9
    bg = np.ones(change.shape, bool)
    bg[55:73, 15:33] = False
    assert (change[bg] > 0.5).mean() < 0.001
    assert out["ndvi_before"][63, 23] > 0.7 and out["ndvi_after"][63, 23] < 0.2
    assert out["veg_before"][63, 23] > 0.9 and out["veg_after"][63, 23] < 0.1


def test_small_tomb_clearing_survives() -> None:
    before = textured()
    after = before.copy()
    after[:, 70:73, 30:33] = SOIL[:, None, None]  # 3 m clearing at 1 m
    out = run(noisy(before, 1), noisy(after, 2))
    assert out["change"][71, 31] > 0.8


@pytest.mark.parametrize(("gain", "offset"), [(1.03, 0.0), (0.97, 0.005), (1.0, -0.006)])
def test_global_gain_offset_is_no_change(gain: float, offset: float) -> None:
    before = textured()
    out = run(noisy(before, 1), noisy(before * gain + offset, 2))
    assert (out["change"] > 0.5).mean() < 0.001


@pytest.mark.parametrize(("dy", "dx"), [(1, 0), (0, 1), (1, -1), (0.5, 0.5)])
def test_one_pixel_shift_is_no_change(dy: float, dx: float) -> None:
    before = textured()
    after = ndi.shift(before, (0, dy, dx), order=1, mode="nearest")
    out = run(noisy(before, 1), noisy(after, 2))
    assert (out["change"][2:-2, 2:-2] > 0.5).mean() < 0.001


def test_rgb_only_and_invalid() -> None:
    before = textured()[[2, 1, 0]]  # red, green, blue
    after = before.copy()
    after[:, 60:68, 20:28] = SOIL[[2, 1, 0], None, None]
    valid = np.ones(before.shape[1:], bool)
    valid[:, :8] = False
    out = run(noisy(before, 1), noisy(after, 2), roles=RGB, valid=valid)
    assert out["change"][62:66, 22:26].min() > 0.8
    assert (out["change"][:, :8] == 0).all()
    assert np.isnan(out["ndvi_after"]).all()
    assert out["veg_before"][63, 23] > 0.8 and out["veg_after"][63, 23] < 0.2
    bg = np.ones(valid.shape, bool)
    bg[55:73, 15:33] = False
    assert (out["change"][bg] > 0.5).mean() < 0.001


def test_sentinel2_scale() -> None:
    before = textured((64, 64))
    after = before.copy()
    after[:, 30:32, 30:32] = ROOF[:, None, None]  # 20 m building at 10 m
    out = run(noisy(before, 1), noisy(after, 2), res_m=10.0)
    assert out["change"][30:32, 30:32].min() > 0.9
    assert (out["change"] > 0.5).sum() < 12


def test_block_independence() -> None:
    before = textured()
    after = before.copy()
    after[:, 44:52, 20:28] = SOIL[:, None, None]
    before, after = noisy(before, 1), noisy(after, 2)
    det = SpectralDetector(1.0)
    valid = np.ones(before.shape[1:], bool)
    whole = det(before, after, valid, ROLES, 1.0)["change"]
    h, halo = 48, det.halo
    top = det(before[:, :h + halo], after[:, :h + halo], valid[:h + halo], ROLES, 1.0)["change"]
    bot = det(before[:, h - halo:], after[:, h - halo:], valid[h - halo:], ROLES, 1.0)["change"]
    np.testing.assert_array_equal(np.vstack([top[:h], bot[halo:]]), whole)


def test_dense_change_whole_pass_equals_the_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where change is possible almost everywhere the exact score is one pass over the block
    instead of windows with margins: the same values either way."""
    from pipeline.detect import spectral

    before = noisy(textured((128, 128)), 1)
    after = before.copy()
    for r in range(4, 124, 12):  # many small changes all over the block
        for c in range(4, 124, 12):
            after[:, r:r + 5, c:c + 5] = SOIL[:, None, None]
    after = noisy(after, 2)
    valid = np.ones((128, 128), bool)
    tiles = spectral._active_tiles(np.ones((128, 128), bool), spectral.SPARSE_TILE)
    assert len(tiles) * 50 ** 2 > 128 * 128  # at 1 m the windows are 32 + 2 x 9 px a side
    got = SpectralDetector(1.0)(before, after, valid, ROLES, 1.0)  # one whole pass
    monkeypatch.setattr(spectral, "DENSE_SHARE", 1e9)  # windows however dense
    other = SpectralDetector(1.0)(before, after, valid, ROLES, 1.0)
    assert got["change"].max() > 0.5
    for k in ("change", "score", "shape_score", "ratio_spread"):
        np.testing.assert_array_equal(got[k], other[k])


def test_registry() -> None:
    assert isinstance(get_detector("spectral", ROLES, 1.0), SpectralDetector)
    det = get_detector("auto", RGB, 0.5)
    assert callable(det) and det.halo > 0
    with pytest.raises(ConfigError, match="unknown detection method"):
        get_detector("otsu", ROLES, 1.0)


def test_registry_falls_back_without_learned_model(monkeypatch: pytest.MonkeyPatch) -> None:
    learned = pytest.importorskip("pipeline.detect.learned")
    monkeypatch.setattr(learned, "has_model", lambda *a, **k: False)
    assert isinstance(get_detector("auto", ROLES, 1.0), SpectralDetector)
    with pytest.raises(ConfigError, match="no model"):
        get_detector("learned", ROLES, 1.0)


@pytest.mark.parametrize("roles", [ROLES, ("blue", "green", "red")])
def test_states_alone_are_the_full_calls(roles: tuple[str, ...]) -> None:
    """``evidence`` gives the states ``__call__`` does, without the score: the same values
    (ExG and vegetation on every pixel, where the full call has them only where change is
    possible), NaN pixels left out of ``valid`` as there."""
    before = textured()[[ROLES.index(r) for r in roles]]
    after = before.copy()
    after[:, 50:70, 10:30] = SOIL[[ROLES.index(r) for r in roles], None, None]  # a clearing
    after[:, 0, 0] = np.nan
    valid = np.ones(before.shape[1:], bool)
    valid[90:, :] = False
    det = SpectralDetector(1.0)
    full = det(before, after, valid, roles, 1.0)
    states = det.evidence(before, after, valid, roles, 1.0)
    assert set(states) == {k for k in STATE_KEYS if k in full}
    assert ("chroma_red_after" in states) and "score" not in states
    for k, v in states.items():
        assert v.dtype == np.float32 and v.shape == valid.shape, k
        have = np.isfinite(full[k])
        np.testing.assert_array_equal(v[have], full[k][have], err_msg=k)
        if k.startswith(("exg_", "veg_")):
            assert have[55:65, 15:25].all(), k  # the clearing: change possible, evaluated
            assert np.isfinite(v).all() and not have.all(), k  # everywhere, not only there
        else:
            np.testing.assert_array_equal(np.isfinite(v), have, err_msg=k)


def test_evidence_layers() -> None:
    before = textured()
    out = run(noisy(before, 1), noisy(before, 2))
    assert set(EVIDENCE_KEYS) <= out.keys()
    assert all(v.dtype == np.float32 and v.shape == before.shape[1:] for v in out.values())
    det = get_detector("spectral", ROLES, 1.0)
    assert set(EVIDENCE_KEYS) <= det(before, before, np.ones(before.shape[1:], bool), ROLES,
                                     1.0).keys()
