"""Rule-based spectral change detector: neighbourhood-tolerant differences in noise units.

Works with RGB only and with RGB+NIR(+SWIR), at 0.5 m aerial to 10 m Sentinel-2 pixels. All
statistics are fixed in reflectance space (no per-block histograms, no Otsu), so the result does
not depend on how the scene is cut into blocks and does not collapse where little changed.

Score design (every term is in units of an expected-noise floor, so one threshold fits all):

1. **Neighbourhood-tolerant difference (NTD).** For each band ``x`` the after value is compared
   with the [min, max] range of the before values in a ``(2r+1)²`` window, and vice versa; the
   per-pixel difference is the larger of the two one-sided distances to those ranges. A residual
   shift of up to ``r`` px (and bilinear blends along edges) falls inside the range and scores 0,
   while a new object scores its full contrast over its full extent.
2. **Noise floor.** ``sigma(x) = a + b * x``: an absolute floor ``a`` (sensor noise, residual
   offset after normalisation) plus a relative term ``b`` (residual gain, illumination, BRDF).
3. **Terms.** change-vector magnitude (RMS over bands of NTD/sigma) and two *shape* terms that
   are blind to a common scaling of all bands (illumination, cloud shadow): vegetation index
   change (NTD of NDVI with NIR, of the chromatic excess-green index without) and chromaticity
   (NTD of each visible band's share of visible brightness; a spectral-angle proxy). Ratios
   are noisy in the dark, so the shape floors widen with noise / signal. The magnitude term is
   down-weighted where all bands scaled alike (spread of band log-ratios < ``ILLUM_SPREAD``:
   terrain shading, cloud-shadow penumbrae) unless brightness fell > 3x or rose > 1.6x. The
   score is the largest term; ``shape_score`` and ``ratio_spread`` are returned too.
4. **Scale.** the score is smoothed with a Gaussian of about 1 m (0.5..1.5 px), enough to merge
   speckle without erasing 3 m objects, then mapped to a probability with a logistic whose
   midpoint is the threshold.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

#: absolute and relative reflectance noise floor: sigma(x) = NOISE_ABS + NOISE_REL * x
NOISE_ABS = 0.012
NOISE_REL = 0.08
#: noise floor of normalised-difference indices (NDVI, chromatic ExG) and of chromaticity
NOISE_INDEX = 0.06
NOISE_CHROMA = 0.03
#: default decision threshold on the score (noise units) and the logistic width
THRESHOLD = 3.0
WIDTH = 0.6
#: NDVI / excess-green midpoints and widths of the 0..1 vegetation likelihood
NDVI_VEG_MID, NDVI_VEG_WIDTH = 0.45, 0.07
EXG_VEG_MID, EXG_VEG_WIDTH = 0.17, 0.04
#: reflectance added before taking band ratios (about the sensor noise)
RATIO_EPS = 0.003
#: band log-ratio spread below which a change is illumination-like, and the brightness factors
#: beyond which a flat change counts anyway (see ``_illumination_weight``)
ILLUM_SPREAD = 0.25
ILLUM_MAX_DARKEN, ILLUM_MAX_BRIGHTEN = 3.0, 1.6
#: object context (metres) that the classifier needs around a block, capped in pixels
CONTEXT_M = 48.0
MAX_CONTEXT_PX = 64
#: layers every call returns (chroma_* only with red, green and blue)
EVIDENCE_KEYS: tuple[str, ...] = (
    "change", "score", "shape_score", "ratio_spread", "ndvi_before", "ndvi_after",
    "bright_before", "bright_after", "exg_before", "exg_after", "veg_before", "veg_after",
    "chroma_blue_after", "chroma_green_after", "chroma_red_after")
_EPS = 1e-6
_VISIBLE = ("blue", "green", "red")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _tolerance_px(res_m: float) -> int:
    """Radius of the tolerance window: 2 px for sub-2 m imagery, 1 px otherwise."""
    return 2 if res_m < 2.0 else 1


def _smooth_sigma_px(res_m: float) -> float:
    return float(np.clip(1.0 / res_m, 0.5, 1.5))


def _smooth(x: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over valid pixels only (normalised convolution), 0 elsewhere."""
    num = ndi.gaussian_filter(np.where(valid, x, 0.0), sigma, mode="nearest", truncate=3.0)
    den = ndi.gaussian_filter(valid.astype(np.float32), sigma, mode="nearest", truncate=3.0)
    return np.where(valid, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)


def _ratio_spread(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                  sigma: float) -> np.ndarray:
    """Spread (max - min over bands) of the log after/before ratio of locally smoothed bands.

    Near 0 when every band scaled alike (illumination, cloud shadow); a change of material
    changes bands unequally. ``RATIO_EPS`` keeps the log finite and tame in the dark.
    """
    logs = [np.log((_smooth(a, valid, sigma) + RATIO_EPS) / (_smooth(b, valid, sigma) + RATIO_EPS))
            for b, a in zip(np.clip(before, 0, None), np.clip(after, 0, None), strict=True)]
    spread = np.max(logs, axis=0) - np.min(logs, axis=0)
    return np.where(valid, spread, 0.0).astype(np.float32)


def _illumination_weight(spread: np.ndarray, bright_b: np.ndarray, bright_a: np.ndarray,
                         n_bands: int) -> np.ndarray:
    """0..1 weight of the magnitude term: ~0 where all bands scaled alike (illumination).

    Kept at 1 where brightness fell by more than ``ILLUM_MAX_DARKEN`` or rose by more than
    ``ILLUM_MAX_BRIGHTEN`` (a new white roof on concrete is a flat 2x brightening; cloud and
    terrain shadows darken by up to ~3x), and with fewer than two bands.
    """
    if n_bands < 2:
        return np.ones_like(spread)
    w = np.clip(spread / ILLUM_SPREAD, 0.0, 1.0)
    lr = np.log((bright_a + RATIO_EPS) / (bright_b + RATIO_EPS))
    return np.where((lr < -math.log(ILLUM_MAX_DARKEN)) | (lr > math.log(ILLUM_MAX_BRIGHTEN)),
                    1.0, w).astype(np.float32)


def _range_filter(x: np.ndarray, valid: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Local min and max of ``x`` over valid pixels in a (2r+1)² window (inf where none)."""
    size = 2 * r + 1
    lo = ndi.minimum_filter(np.where(valid, x, np.inf), size=size, mode="nearest")
    hi = ndi.maximum_filter(np.where(valid, x, -np.inf), size=size, mode="nearest")
    return lo, hi


def ntd(before: np.ndarray, after: np.ndarray, valid: np.ndarray, r: int) -> np.ndarray:
    """Neighbourhood-tolerant absolute difference of one layer (0 inside the other's range)."""
    blo, bhi = _range_filter(before, valid, r)
    alo, ahi = _range_filter(after, valid, r)
    d_after = np.maximum(np.maximum(blo - after, after - bhi), 0.0)
    d_before = np.maximum(np.maximum(alo - before, before - ahi), 0.0)
    d = np.maximum(d_after, d_before)
    return np.where(valid & np.isfinite(d), d, 0.0).astype(np.float32)


def _index(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised difference (a - b) / (a + b), 0 where the sum vanishes."""
    s = a + b
    return np.where(np.abs(s) > _EPS, (a - b) / np.where(np.abs(s) > _EPS, s, 1.0), 0.0)


def _features(img: np.ndarray, roles: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-date spectral evidence: brightness, NDVI, chromatic ExG, vegetation likelihood."""
    band = {r: np.clip(img[i].astype(np.float32), 0.0, None) for i, r in enumerate(roles)}
    vis = [band[r] for r in _VISIBLE if r in band]
    bright = np.mean(vis, axis=0) if vis else np.mean(list(band.values()), axis=0)
    out: dict[str, np.ndarray] = {"bright": bright.astype(np.float32)}
    if {"red", "green", "blue"} <= band.keys():
        s = band["red"] + band["green"] + band["blue"]
        exg = (2 * band["green"] - band["red"] - band["blue"]) / np.maximum(s, 0.03)
        out["exg"] = exg.astype(np.float32)
        for r in _VISIBLE:
            out[f"chroma_{r}"] = (band[r] / np.maximum(s, 0.03)).astype(np.float32)
    else:
        out["exg"] = np.full(bright.shape, np.nan, np.float32)
    if "nir" in band and "red" in band:
        ndvi = _index(band["nir"], band["red"]).astype(np.float32)
        out["ndvi"] = ndvi
        out["veg"] = _sigmoid((ndvi - NDVI_VEG_MID) / NDVI_VEG_WIDTH)
    else:
        out["ndvi"] = np.full(bright.shape, np.nan, np.float32)
        exg = np.nan_to_num(out["exg"], nan=0.0)
        out["veg"] = _sigmoid((exg - EXG_VEG_MID) / EXG_VEG_WIDTH)
    return out


class SpectralDetector:
    """Neighbourhood-tolerant, noise-floored spectral change detector (see module docstring).

    Args:
        res_m: pixel size in metres; sets the tolerance radius, smoothing and ``halo``.
        threshold: decision threshold on the score in noise units (default :data:`THRESHOLD`).
        noise_scale: multiplies every noise floor, e.g. from a scene-wide noise estimate.
    """

    def __init__(self, res_m: float = 1.0, *, threshold: float | None = None,
                 noise_scale: float = 1.0) -> None:
        if res_m <= 0:
            raise ValueError(f"res_m must be positive, got {res_m}")
        self.res_m = float(res_m)
        self.threshold = float(threshold) if threshold is not None else THRESHOLD
        self.noise_scale = float(noise_scale)
        own = _tolerance_px(res_m) + math.ceil(3 * _smooth_sigma_px(res_m)) + 1
        #: context pixels each side: the detector's neighbourhood plus object context for classify
        self.halo = max(own, min(MAX_CONTEXT_PX, math.ceil(CONTEXT_M / res_m)))

    def score(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
              roles: tuple[str, ...], res_m: float) -> tuple[np.ndarray, dict, dict]:
        """Raw change score in noise units (unsmoothed) and the per-date features."""
        r = _tolerance_px(res_m)
        k = self.noise_scale
        fb, fa = _features(before, roles), _features(after, roles)
        z2 = np.zeros(valid.shape, np.float32)
        for i in range(before.shape[0]):
            b, a = before[i].astype(np.float32), after[i].astype(np.float32)
            sigma = k * (NOISE_ABS + NOISE_REL * np.clip(np.maximum(a, b), 0.0, None))
            z2 += (ntd(b, a, valid, r) / sigma) ** 2
        magnitude = np.sqrt(z2 / before.shape[0])
        # shape terms (blind to a common scale of all bands, i.e. to illumination); ratios are
        # unreliable in the dark, so their floors widen with the darker date's noise-to-signal
        shape = np.zeros(valid.shape, np.float32)
        dark = np.maximum(np.minimum(fb["bright"], fa["bright"]), 0.005)
        if {"nir", "red"} <= set(roles):
            inir, ired = roles.index("nir"), roles.index("red")
            nr = np.minimum(np.clip(before[inir], 0, None) + np.clip(before[ired], 0, None),
                            np.clip(after[inir], 0, None) + np.clip(after[ired], 0, None))
            sig = k * (NOISE_INDEX + 0.006 / np.maximum(nr, 0.005))
            shape = np.maximum(shape, ntd(fb["ndvi"], fa["ndvi"], valid, r) / sig)
        elif set(_VISIBLE) <= set(roles):
            sig = k * (NOISE_INDEX + 0.0015 / dark)
            shape = np.maximum(shape, ntd(fb["exg"], fa["exg"], valid, r) / sig)
        chroma = [c for c in fb if c.startswith("chroma_")]
        if chroma:
            sig = k * (NOISE_CHROMA + 0.001 / dark)
            cz = np.max([ntd(fb[c], fa[c], valid, r) for c in chroma], axis=0)
            shape = np.maximum(shape, cz / sig)
        spread = _ratio_spread(before, after, valid, _smooth_sigma_px(res_m))
        s = np.maximum(shape, magnitude * _illumination_weight(spread, fb["bright"], fa["bright"],
                                                               before.shape[0]))
        fb["shape"] = np.where(valid, shape, 0.0).astype(np.float32)
        fb["spread"] = spread
        return np.where(valid, s, 0.0).astype(np.float32), fb, fa

    def __call__(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        """Change evidence for one block (see :mod:`pipeline.detect.base`)."""
        roles = tuple(roles)
        if before.shape != after.shape or before.shape[0] != len(roles):
            raise ValueError(f"before {before.shape} / after {after.shape} do not match "
                             f"{len(roles)} band roles {roles}")
        valid = valid.astype(bool) & np.isfinite(before).all(0) & np.isfinite(after).all(0)
        before = np.where(valid, before, 0.0).astype(np.float32)
        after = np.where(valid, after, 0.0).astype(np.float32)
        s, fb, fa = self.score(before, after, valid, roles, res_m)
        s_smooth = _smooth(s, valid, _smooth_sigma_px(res_m))
        change = np.where(valid, _sigmoid((s_smooth - self.threshold) / WIDTH), 0.0)
        out: dict[str, np.ndarray] = {"change": change.astype(np.float32), "score": s_smooth,
                                      "shape_score": _smooth(fb.pop("shape"), valid,
                                                             _smooth_sigma_px(res_m))}
        out["ratio_spread"] = fb.pop("spread")
        for name in ("ndvi", "bright", "exg", "veg"):
            out[f"{name}_before"] = fb[name].astype(np.float32)
            out[f"{name}_after"] = fa[name].astype(np.float32)
        for name in (c for c in fa if c.startswith("chroma_")):
            out[f"{name}_after"] = fa[name].astype(np.float32)
        return out
