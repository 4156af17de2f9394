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

from . import features as F

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
#: the exact score is computed only where a cheap upper bound of ``change`` reaches this
#: (far below classify's grow threshold, 0.4); elsewhere ``change`` and ``score`` are that
#: bound and ``shape_score`` / ``ratio_spread`` are NaN (not evaluated: no change there).
#: Evaluated in tiles of SPARSE_TILE px, all tiles of a block in one stacked pass.
SPARSE_CUT = 0.1
SPARSE_TILE = 32
#: above this share of the block (windows with margins), the exact score is one whole pass
DENSE_SHARE = 1.0
#: object context (metres) that the classifier needs around a block, capped in pixels
CONTEXT_M = 48.0
MAX_CONTEXT_PX = 64
#: layers every call returns (chroma_* only with red, green and blue); ``exg_*`` and ``veg_*``
#: are NaN where change is impossible (upper bound of ``change`` below :data:`SPARSE_CUT`):
#: only changed objects read them
EVIDENCE_KEYS: tuple[str, ...] = (
    "change", "score", "shape_score", "ratio_spread", "ndvi_before", "ndvi_after",
    "bright_before", "bright_after", "exg_before", "exg_after", "veg_before", "veg_after",
    "chroma_blue_after", "chroma_green_after", "chroma_red_after")
#: the per-date states among them, which :meth:`SpectralDetector.evidence` gives alone
STATE_KEYS: tuple[str, ...] = EVIDENCE_KEYS[4:]
_EPS = 1e-6
_VISIBLE = ("blue", "green", "red")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32:
        return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
    y = np.multiply(x, np.float32(0.5))  # the same float32 operations, in place
    np.tanh(y, out=y)
    y += np.float32(1.0)
    y *= np.float32(0.5)
    return y


def _tolerance_px(res_m: float) -> int:
    """Radius of the tolerance window: 2 px for sub-2 m imagery, 1 px otherwise."""
    return 2 if res_m < 2.0 else 1


def _smooth_sigma_px(res_m: float) -> float:
    return float(np.clip(1.0 / res_m, 0.5, 1.5))


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian (``truncate=3``, ``mode="nearest"``) of a float32 array."""
    return ndi.gaussian_filter(x, sigma, mode="nearest", truncate=3.0, output=np.float32,
                               axes=(-2, -1))


class _Smoother:
    """Normalised convolution over valid pixels, with the weight image computed once per mask.

    ``all_valid`` skips the masking and the division (the weights are 1 up to rounding).
    """

    def __init__(self, valid: np.ndarray, sigma: float, all_valid: bool | None = None) -> None:
        self.valid, self.sigma = valid, sigma
        self.all_valid = bool(valid.all()) if all_valid is None else all_valid
        self.den: np.ndarray | None = None
        if not self.all_valid:
            self.den = np.maximum(_gauss(valid.astype(np.float32), sigma), np.float32(1e-3))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.all_valid:
            return _gauss(x.astype(np.float32, copy=False), self.sigma)
        num = _gauss(np.where(self.valid, x, np.float32(0.0)).astype(np.float32, copy=False),
                     self.sigma)
        num /= self.den
        num[~self.valid] = 0.0
        return num


def _smooth(x: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over valid pixels only (normalised convolution), 0 elsewhere."""
    return _Smoother(valid, sigma)(x)


def _ratio_spread(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                  sigma: float, smoother: _Smoother | None = None) -> np.ndarray:
    """Spread (max - min over bands) of the log after/before ratio of locally smoothed bands.

    Near 0 when every band scaled alike (illumination, cloud shadow); a change of material
    changes bands unequally. ``RATIO_EPS`` keeps the log finite and tame in the dark.
    """
    sm = smoother or _Smoother(valid, sigma)
    eps = np.float32(RATIO_EPS)
    lo = hi = None
    for b, a in zip(before, after, strict=True):
        sa = sm(np.maximum(a, np.float32(0.0)))
        sb = sm(np.maximum(b, np.float32(0.0)))
        sa += eps
        sb += eps
        sa /= sb
        lr = np.log(sa, out=sa)
        if lo is None:
            lo, hi = lr, lr.copy()
        else:
            np.minimum(lo, lr, out=lo)
            np.maximum(hi, lr, out=hi)
    assert lo is not None and hi is not None
    hi -= lo
    if not sm.all_valid:
        hi[~valid] = 0.0
    return hi


def _illumination_weight(spread: np.ndarray, bright_b: np.ndarray, bright_a: np.ndarray,
                         n_bands: int) -> np.ndarray:
    """0..1 weight of the magnitude term: ~0 where all bands scaled alike (illumination).

    Kept at 1 where brightness fell by more than ``ILLUM_MAX_DARKEN`` or rose by more than
    ``ILLUM_MAX_BRIGHTEN`` (a new white roof on concrete is a flat 2x brightening; cloud and
    terrain shadows darken by up to ~3x), and with fewer than two bands.
    """
    if n_bands < 2:
        return np.ones_like(spread)
    w = np.clip(spread / np.float32(ILLUM_SPREAD), 0.0, 1.0).astype(np.float32, copy=False)
    eps = np.float32(RATIO_EPS)
    lr = np.log((bright_a + eps) / (bright_b + eps))
    w[(lr < -math.log(ILLUM_MAX_DARKEN)) | (lr > math.log(ILLUM_MAX_BRIGHTEN))] = 1.0
    return w


def _shift_reduce(x: np.ndarray, r: int, op: np.ufunc) -> np.ndarray:
    """``op``-filter (np.minimum / np.maximum) over a (2r+1)² window, ``mode="nearest"``.

    Separable, by shifted views: beyond the edge ``nearest`` repeats the edge pixel, which is
    inside the window anyway, so clipping the window to the array gives the same result.
    """
    out = x.copy()
    for axis in (x.ndim - 2, x.ndim - 1):  # the last two axes (a stack of windows: 3-D)
        src = out.copy()
        n = src.shape[axis]
        for k in range(1, min(r, n - 1) + 1):
            a = [slice(None)] * x.ndim
            b = [slice(None)] * x.ndim
            a[axis], b[axis] = slice(0, n - k), slice(k, n)
            op(out[tuple(a)], src[tuple(b)], out=out[tuple(a)])
            op(out[tuple(b)], src[tuple(a)], out=out[tuple(b)])
    return out


def _range_filter(x: np.ndarray, valid: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Local min and max of ``x`` over valid pixels in a (2r+1)² window (inf where none)."""
    x = x.astype(np.float32, copy=False)
    if valid.all():
        return _shift_reduce(x, r, np.minimum), _shift_reduce(x, r, np.maximum)
    lo = _shift_reduce(np.where(valid, x, np.float32(np.inf)), r, np.minimum)
    hi = _shift_reduce(np.where(valid, x, np.float32(-np.inf)), r, np.maximum)
    return lo, hi


def plain_diff(before: np.ndarray, after: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``|after - before|`` (0 where invalid or not finite): a per-pixel upper bound of
    :func:`ntd`, whose ranges always contain the pixel itself (also in float arithmetic:
    rounding is monotone)."""
    d = np.subtract(after, before, dtype=np.float32)
    np.abs(d, out=d)
    return _zero_invalid(d, valid)


def ntd(before: np.ndarray, after: np.ndarray, valid: np.ndarray, r: int) -> np.ndarray:
    """Neighbourhood-tolerant absolute difference of one layer (0 inside the other's range)."""
    before = before.astype(np.float32, copy=False)
    after = after.astype(np.float32, copy=False)
    blo, bhi = _range_filter(before, valid, r)
    # d = max(blo - after, after - bhi, alo - before, before - ahi, 0), computed in place
    blo -= after
    np.subtract(after, bhi, out=bhi)
    np.maximum(blo, bhi, out=blo)
    alo, ahi = _range_filter(after, valid, r)
    alo -= before
    np.subtract(before, ahi, out=ahi)
    np.maximum(alo, ahi, out=alo)
    np.maximum(blo, alo, out=blo)
    np.maximum(blo, np.float32(0.0), out=blo)
    return _zero_invalid(blo, valid)


def _zero_invalid(d: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``d`` with 0 where it is not finite or not ``valid`` (in place)."""
    with np.errstate(invalid="ignore"):
        fin = np.isfinite(d)
    all_valid = valid.all()
    if fin.all() and all_valid:
        return d
    bad = ~fin
    if not all_valid:
        bad |= ~valid
    d[bad] = 0.0
    return d


_ntd = ntd


def _scatter(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """A float32 array shaped like ``where``: ``values`` at its True pixels, NaN elsewhere."""
    out = np.full(where.shape, np.nan, np.float32)
    out[where] = values
    return out


def _active_tiles(mask: np.ndarray, tile: int) -> list[tuple[int, int]]:
    """Top-left corners of the ``tile``-px tiles holding a True of ``mask``."""
    h, w = mask.shape
    th, tw = -(-h // tile), -(-w // tile)
    pad = np.zeros((th * tile, tw * tile), bool)
    pad[:h, :w] = mask
    ii, jj = np.nonzero(pad.reshape(th, tile, tw, tile).any(axis=(1, 3)))
    return [(int(i) * tile, int(j) * tile) for i, j in zip(ii, jj, strict=True)]


def _stack(x: np.ndarray, tiles: list[tuple[int, int]], tile: int, m: int) -> np.ndarray:
    """Windows ``tile + 2m`` px square around each tile of ``x`` (``(h, w)`` or
    ``(bands, h, w)``), edge-padded beyond ``x``: shape ``(n, hw, hw)`` / ``(bands, n, hw, hw)``.
    """
    h, w = x.shape[-2:]
    side = tile + 2 * m
    out = np.empty((*x.shape[:-2], len(tiles), side, side), x.dtype)
    for k, (r0, c0) in enumerate(tiles):
        R0, C0 = r0 - m, c0 - m
        a0, b0 = max(0, R0), max(0, C0)
        a1, b1 = min(h, R0 + side), min(w, C0 + side)
        win = x[..., a0:a1, b0:b1]
        if (a0, b0, a1, b1) != (R0, C0, R0 + side, C0 + side):
            pads = [(0, 0)] * (x.ndim - 2) + [(a0 - R0, R0 + side - a1),
                                               (b0 - C0, C0 + side - b1)]
            win = np.pad(win, pads, mode="edge")
        out[..., k, :, :] = win
    return out


def _index(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised difference (a - b) / (a + b), 0 where the sum vanishes."""
    s = a + b
    ok = np.abs(s) > _EPS
    s[~ok] = 1.0
    out = np.subtract(a, b)
    out /= s
    out[~ok] = 0.0
    return out


def _features(img: np.ndarray, roles: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-date spectral evidence the score uses: brightness, NDVI, chromaticities, and the
    chromatic excess green where there is no NIR (see :func:`_exg_at` and :func:`_veg`)."""
    zero = np.float32(0.0)
    band = {r: np.maximum(img[i], zero, dtype=np.float32) for i, r in enumerate(roles)}
    vis = [band[r] for r in _VISIBLE if r in band]
    if len(vis) == 3:  # what np.mean does, without stacking a copy
        bright = vis[0] + vis[1]
        bright += vis[2]
        bright /= np.float32(3)
    else:
        bright = np.mean(vis or list(band.values()), axis=0).astype(np.float32)
    out: dict[str, np.ndarray] = {"bright": bright}
    nir = "nir" in band and "red" in band
    if {"red", "green", "blue"} <= band.keys():
        s = band["red"] + band["green"] + band["blue"]
        den = np.maximum(s, np.float32(0.03), out=s)
        if not nir:
            exg = 2 * band["green"] - band["red"] - band["blue"]
            exg /= den
            out["exg"] = exg
        for r in _VISIBLE:
            out[f"chroma_{r}"] = np.divide(band[r], den)
    elif not nir:
        out["exg"] = np.full(bright.shape, np.nan, np.float32)
    if nir:
        out["_nir_red"] = band["nir"] + band["red"]  # for the score's NDVI noise floor
        out["ndvi"] = _index(band["nir"], band["red"]).astype(np.float32, copy=False)
    else:
        out["ndvi"] = np.full(bright.shape, np.nan, np.float32)
    return out


def _exg_at(img: np.ndarray, roles: tuple[str, ...], where: np.ndarray) -> np.ndarray:
    """:func:`features.exg` of the ``where`` pixels (NaN without red, green and blue)."""
    if not set(_VISIBLE) <= set(roles):
        return np.full(int(where.sum()), np.nan, np.float32)
    return F.exg(*(img[roles.index(k)][where] for k in ("red", "green", "blue")))


def _veg(ndvi: np.ndarray, exg: np.ndarray, nir: bool) -> np.ndarray:
    """Vegetation likelihood 0..1: logistic on NDVI, or on chromatic excess green."""
    if nir:
        x = ndvi - np.float32(NDVI_VEG_MID)
        x /= np.float32(NDVI_VEG_WIDTH)
        return _sigmoid(x)
    exg = np.nan_to_num(exg, nan=0.0)
    return _sigmoid((exg - EXG_VEG_MID) / EXG_VEG_WIDTH)


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
              roles: tuple[str, ...], res_m: float, smoother: _Smoother | None = None, *,
              features: tuple[dict, dict] | None = None, upper: bool = False,
              ) -> tuple[np.ndarray, dict, dict]:
        """Raw change score in noise units (unsmoothed) and the per-date features.

        ``upper``: a per-pixel upper bound of the score instead, from plain differences
        (:func:`plain_diff`) and without the illumination weight (at most 1); much cheaper.
        """
        r = _tolerance_px(res_m)
        k = np.float32(self.noise_scale)
        sm = smoother or _Smoother(valid, _smooth_sigma_px(res_m))
        fb, fa = features or (_features(before, roles), _features(after, roles))
        fb = dict(fb)

        def ntd(b: np.ndarray, a: np.ndarray, valid: np.ndarray, r: int) -> np.ndarray:
            return plain_diff(b, a, valid) if upper else _ntd(b, a, valid, r)
        z2 = np.zeros(valid.shape, np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for i in range(before.shape[0]):
                b, a = before[i], after[i]
                sigma = np.maximum(a, b)
                np.maximum(sigma, np.float32(0.0), out=sigma)
                sigma *= np.float32(NOISE_REL)
                sigma += np.float32(NOISE_ABS)
                sigma *= k
                d = ntd(b, a, valid, r)
                d /= sigma
                d *= d
                z2 += d
            z2 /= np.float32(before.shape[0])
            magnitude = np.sqrt(z2, out=z2)
            # shape terms (blind to a common scale of all bands, i.e. to illumination); ratios
            # are unreliable in the dark, so their floors widen with the darker date's
            # noise-to-signal
            shape = np.zeros(valid.shape, np.float32)
            dark = np.maximum(np.minimum(fb["bright"], fa["bright"]), np.float32(0.005))
            if {"nir", "red"} <= set(roles):
                nr = np.minimum(fb["_nir_red"], fa["_nir_red"])
                sig = np.maximum(nr, np.float32(0.005), out=nr)
                np.divide(np.float32(0.006), sig, out=sig)
                sig += np.float32(NOISE_INDEX)
                sig *= k
                np.maximum(shape, ntd(fb["ndvi"], fa["ndvi"], valid, r) / sig, out=shape)
            elif set(_VISIBLE) <= set(roles):
                sig = k * (np.float32(NOISE_INDEX) + np.float32(0.0015) / dark)
                np.maximum(shape, ntd(fb["exg"], fa["exg"], valid, r) / sig, out=shape)
            chroma = [c for c in fb if c.startswith("chroma_")]
            if chroma:
                cz = ntd(fb[chroma[0]], fa[chroma[0]], valid, r)
                for c in chroma[1:]:
                    np.maximum(cz, ntd(fb[c], fa[c], valid, r), out=cz)
                sig = np.divide(np.float32(0.001), dark)
                sig += np.float32(NOISE_CHROMA)
                sig *= k
                cz /= sig
                np.maximum(shape, cz, out=shape)
            if upper:
                spread = None
            else:
                spread = _ratio_spread(before, after, valid, sm.sigma, sm)
                magnitude *= _illumination_weight(spread, fb["bright"], fa["bright"],
                                                  before.shape[0])
            s = np.maximum(shape, magnitude, out=magnitude)
        if not sm.all_valid:
            s[~valid] = 0.0
            shape[~valid] = 0.0
        fb["shape"] = shape
        fb["spread"] = spread
        return s, fb, fa

    def _change(self, score: np.ndarray, sm: _Smoother) -> np.ndarray:
        change = _sigmoid((score - np.float32(self.threshold)) / np.float32(WIDTH))
        if not sm.all_valid:
            change[~sm.valid] = 0.0
        return change

    def __call__(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        """Change evidence for one block (see :mod:`pipeline.detect.base`)."""
        roles = tuple(roles)
        before, after, valid = _observed(before, after, valid, roles)
        sigma = _smooth_sigma_px(res_m)
        sm = _Smoother(valid, sigma)
        fb, fa = _features(before, roles), _features(after, roles)
        # 1. a cheap per-pixel upper bound of the smoothed score (plain differences instead of
        # neighbourhood-tolerant ones, no illumination weight; smoothing has positive weights)
        ub, _, _ = self.score(before, after, valid, roles, res_m, sm, features=(fb, fa),
                              upper=True)
        score = sm(ub)
        del ub
        change = self._change(score, sm)
        # 2. the exact score only where the bound could reach SPARSE_CUT, on windows of tiles
        # with a margin covering every neighbourhood (tolerance + two Gaussians), so each pixel
        # gets exactly the value a whole-array pass would give it
        need = change >= np.float32(SPARSE_CUT)
        shape_score = np.full(valid.shape, np.nan, np.float32)
        spread = np.full(valid.shape, np.nan, np.float32)
        tiles = _active_tiles(need, SPARSE_TILE)
        m = _tolerance_px(res_m) + 2 * int(3.0 * sigma + 0.5) + 1
        if len(tiles) * (SPARSE_TILE + 2 * m) ** 2 > DENSE_SHARE * valid.size:
            # change possible nearly everywhere: the windows with their margins would cost
            # more than one pass over the whole block, which gives the same values
            s_all, f_all, _ = self.score(before, after, valid, roles, res_m, sm)
            s_all = sm(s_all)
            for dst, src in ((score, s_all), (change, self._change(s_all, sm)),
                             (shape_score, sm(f_all["shape"])), (spread, f_all["spread"])):
                dst[need] = src[need]
            del s_all, f_all
        elif tiles:
            # all active tiles at once, as one stack of edge-padded windows (bands, n, h, w);
            # padding by repeating the edge is what mode="nearest" does at the block edge
            b_st = _stack(before, tiles, SPARSE_TILE, m)
            a_st = _stack(after, tiles, SPARSE_TILE, m)
            v_st = _stack(valid, tiles, SPARSE_TILE, m)
            sm_st = _Smoother(v_st, sigma, all_valid=sm.all_valid)
            s_st, f_st, _ = self.score(b_st, a_st, v_st, roles, res_m, sm_st)
            del b_st, a_st
            s_st = sm_st(s_st)
            layers = ((score, s_st), (change, self._change(s_st, sm_st)),
                      (shape_score, sm_st(f_st["shape"])), (spread, f_st["spread"]))
            h, w = valid.shape
            for k, (r0, c0) in enumerate(tiles):
                r1, c1 = min(h, r0 + SPARSE_TILE), min(w, c0 + SPARSE_TILE)
                sel = need[r0:r1, c0:c1]
                for dst, src in layers:
                    dst[r0:r1, c0:c1][sel] = src[k, m:m + r1 - r0, m:m + c1 - c0][sel]
        out: dict[str, np.ndarray] = {"change": change, "score": score,
                                      "shape_score": shape_score, "ratio_spread": spread}
        # what only the classifier and the patch records read, on changed objects: computed
        # where change is possible (``need``), NaN elsewhere
        return {**out, **_states(before, after, roles, fb, fa, need)}

    def evidence(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        """The per-date states of :meth:`__call__` (``ndvi_*``, ``bright_*``, ``exg_*``,
        ``veg_*``, ``chroma_*_after``) on every pixel, without the change score: the layers
        another detector's decisions are classified with (about a fifth of the cost)."""
        roles = tuple(roles)
        before, after, _ = _observed(before, after, valid, roles)
        return _states(before, after, roles, _features(before, roles),
                       _features(after, roles), None)


def _observed(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
              roles: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both dates as float32, 0 outside ``valid`` (which drops non-finite pixels too)."""
    if before.shape != after.shape or before.shape[0] != len(roles):
        raise ValueError(f"before {before.shape} / after {after.shape} do not match "
                         f"{len(roles)} band roles {roles}")
    valid = valid.astype(bool) & np.isfinite(before).all(0) & np.isfinite(after).all(0)
    zero = np.float32(0.0)
    before = np.where(valid, before, zero).astype(np.float32, copy=False)
    after = np.where(valid, after, zero).astype(np.float32, copy=False)
    return before, after, valid


def _states(before: np.ndarray, after: np.ndarray, roles: tuple[str, ...], fb: dict,
            fa: dict, need: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-date NDVI, brightness, chromatic ExG and vegetation, and the after date's
    chromaticities, from :func:`_features`; ExG and vegetation only where ``need`` (NaN
    elsewhere), on every pixel when it is None."""
    out: dict[str, np.ndarray] = {}
    nir = {"nir", "red"} <= set(roles)
    if need is None:
        need = np.ones(before.shape[1:], bool)
    for tag, img, f in (("before", before, fb), ("after", after, fa)):
        out[f"ndvi_{tag}"] = f["ndvi"]
        out[f"bright_{tag}"] = f["bright"]
        exg = f["exg"][need] if "exg" in f else _exg_at(img, roles, need)
        out[f"exg_{tag}"] = _scatter(exg, need)
        out[f"veg_{tag}"] = _scatter(_veg(f["ndvi"][need], exg, nir), need)
    for name in (c for c in fa if c.startswith("chroma_")):
        out[f"{name}_after"] = fa[name].astype(np.float32, copy=False)
    return out
