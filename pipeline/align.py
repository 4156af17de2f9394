"""Align: co-registration shift, relative radiometric normalisation, cloud/shadow mask.

Pure array functions (``estimate_shift``, ``estimate_radiometry``, ``apply_radiometry``,
``cloud_shadow_mask``) plus two small orchestrators that do sampled reads through
:mod:`pipeline.ingest` (``fit_alignment``) and per-block reads (``read_aligned_block``).

Sign convention of a shift ``(dx, dy)``, in working-grid pixels: the moving (after) image's
content lies ``dx`` pixels to the right (east) and ``dy`` pixels down (south) of where the
reference (before) image has it. ``read_block(after, ..., shift_px=(dx, dy))`` samples the
after image at (col + dx, row + dy), which lines it up with the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rasterio.windows import Window
from scipy import ndimage as ndi
from scipy.special import chdtri
from skimage.registration import phase_cross_correlation

from .grid import Grid
from .ingest import ImageSource, read_block
from .types import Resampling

VISIBLE = ("blue", "green", "red")


# ---------------------------------------------------------------------------- registration


def _feature(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Normalised gradient magnitude of the band mean, zero outside valid data, tapered."""
    x = img.astype("float32")
    if x.ndim == 3:
        x = x.mean(axis=0)  # NaN where any band is NaN: handled as invalid below
    ok = valid & np.isfinite(x)
    x = np.where(ok, x, np.median(x[ok]) if ok.any() else 0.0)
    x = ndi.gaussian_filter(x, 1.0)
    g = np.hypot(ndi.sobel(x, 0), ndi.sobel(x, 1))
    bad = ndi.binary_dilation(~ok, iterations=3)
    gv = g[~bad]
    if gv.size < 16 or gv.std() == 0:
        return np.zeros_like(g)
    g = (g - gv.mean()) / gv.std()
    g[bad] = 0.0
    h, w = g.shape
    taper = np.outer(_tukey(h), _tukey(w))
    return g * taper


def _tukey(n: int, alpha: float = 0.25) -> np.ndarray:
    if n < 8:
        return np.ones(n)
    t = np.linspace(0.0, 1.0, n)
    w = np.ones(n)
    a = alpha / 2
    lo, hi = t < a, t > 1 - a
    w[lo] = 0.5 * (1 + np.cos(np.pi * (t[lo] / a - 1)))
    w[hi] = 0.5 * (1 + np.cos(np.pi * ((t[hi] - 1) / a + 1)))
    return w


def _shift_with_confidence(ref: np.ndarray, mov: np.ndarray, valid: np.ndarray,
                           max_shift_px: float, min_peak_ratio: float = 2.0,
                           ) -> tuple[float, float, bool]:
    """(dx, dy, confident) by phase correlation on gradient magnitude."""
    for x in (ref, mov):
        valid = valid & (np.isfinite(x).all(axis=0) if x.ndim == 3 else np.isfinite(x))
    a, b = _feature(ref, valid), _feature(mov, valid)
    if valid.mean() < 0.25 or not a.any() or not b.any():
        return 0.0, 0.0, False
    # Integer phase-correlation surface, to judge how distinct the peak is.
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    cross = fa * np.conj(fb)
    surf = np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-12)).real
    pk = np.unravel_index(np.argmax(surf), surf.shape)
    peak = surf[pk]
    rolled = np.roll(surf, (-pk[0], -pk[1]), axis=(0, 1))
    rolled[:3, :3] = rolled[:3, -2:] = rolled[-2:, :3] = rolled[-2:, -2:] = -np.inf
    second = rolled.max()
    ratio = peak / max(second, 1e-12)
    # sub-pixel refinement on the spectra already computed (1/10 px: far below the detector's
    # 1-2 px tolerance)
    shift, _, _ = phase_cross_correlation(fa, fb, space="fourier", upsample_factor=10,
                                          normalization="phase")
    sy, sx = float(shift[0]), float(shift[1])
    # skimage: ``shift`` moves ``mov`` onto ``ref``; our convention is the displacement of mov.
    dx, dy = -sx, -sy
    ok = bool(ratio >= min_peak_ratio and np.hypot(dx, dy) <= max_shift_px)
    return dx, dy, ok


def estimate_shift(ref: np.ndarray, mov: np.ndarray, valid: np.ndarray,
                   max_shift_px: float) -> tuple[float, float]:
    """Sub-pixel shift ``(dx, dy)`` of ``mov`` relative to ``ref``, in pixels of the arrays.

    ``ref``/``mov`` are ``(h, w)`` or ``(bands, h, w)`` (bands are averaged: pass the visible
    bands). The result is what to pass as ``read_block(mov_source, ..., shift_px=(dx, dy))`` so
    the moving image lines up with the reference; ``(0.0, 0.0)`` when the correlation peak is not
    distinct or the shift exceeds ``max_shift_px``.
    """
    dx, dy, ok = _shift_with_confidence(ref, mov, valid, max_shift_px)
    return (dx, dy) if ok else (0.0, 0.0)


# ---------------------------------------------------------------------------- radiometry


def _spread_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``y = g x + o`` matching mean and spread: the reduced-major-axis line, positive.

    Symmetric in noise and in units. An orthogonal (total least squares) line is neither: where
    the dates correlate weakly (Google Earth mosaics of different seasons) it swings to the
    axis of the larger variance, and LEVIR pairs came out at gains 0.2 or 5 and, brightened
    fivefold, passed for cloud.
    """
    sx, sy = float(x.std()), float(y.std())
    g = float(np.clip(sy / sx, 0.2, 5.0)) if sx > 0 else 1.0
    return g, float(y.mean() - g * x.mean())


def rank_shift(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per pixel (columns of ``(bands, n)`` arrays), the largest change over bands of its rank
    from ``x`` to ``y``, from 0 (same rank in every band) to 1 (first to last)."""
    n = x.shape[1]
    rx = np.argsort(np.argsort(x, axis=1, kind="stable"), axis=1, kind="stable")
    ry = np.argsort(np.argsort(y, axis=1, kind="stable"), axis=1, kind="stable")
    return np.abs(rx - ry).max(axis=0) / max(n - 1, 1)


def estimate_radiometry(ref: np.ndarray, mov: np.ndarray, valid: np.ndarray,
                        max_change_frac: float = 0.3, *, max_samples: int = 100_000,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-band ``gain``, ``offset`` with ``mov * gain + offset ≈ ref`` on invariant pixels.

    Least-trimmed-squares style: fit a reduced-major-axis line per band to the pixels whose
    ranks moved least (:func:`rank_shift`), drop the ``max_change_frac`` of pixels with the
    largest multivariate standardised residual, refit until stable; finally keep every pixel
    within the 99 % chi² bound and refit. Recovers the true relation when at most
    ``max_change_frac`` of the valid pixels changed.
    """
    nb = ref.shape[0]
    ok = valid & np.isfinite(ref).all(axis=0) & np.isfinite(mov).all(axis=0)
    idx = np.flatnonzero(ok)
    gain, offset = np.ones(nb, "float32"), np.zeros(nb, "float32")
    if idx.size < 50:
        return gain, offset
    if idx.size > max_samples:
        idx = np.random.default_rng(seed).choice(idx, max_samples, replace=False)
    x = mov.reshape(nb, -1)[:, idx].astype("float64")
    y = ref.reshape(nb, -1)[:, idx].astype("float64")
    q = 1.0 - max_change_frac
    # start from the pixels whose rank within each band moved least between the dates: blind
    # to any monotonic radiometric change, it leaves out what changed before the first fit
    # (a first fit on every pixel could settle on a wrong line: a small scene, 18 % new bright
    # roofs on bimodal land, came out at gain 0.3 for 0.95)
    shift = rank_shift(x, y)
    keep = shift <= np.quantile(shift, q)
    g, o = np.ones(nb), np.zeros(nb)

    def fit(k: np.ndarray) -> None:
        for b in range(nb):
            g[b], o[b] = _spread_fit(x[b, k], y[b, k])

    def dist2() -> np.ndarray:
        r = y - (g[:, None] * x + o[:, None])
        med = np.median(r[:, keep], axis=1)
        s = 1.4826 * np.median(np.abs(r[:, keep] - med[:, None]), axis=1)
        s = np.maximum(s, 1e-6)
        return (((r - med[:, None]) / s[:, None]) ** 2).sum(axis=0)

    fit(keep)
    for _ in range(20):
        d2 = dist2()
        new = d2 <= np.quantile(d2, q)
        if (new == keep).all():
            break
        keep = new
        fit(keep)
    d2 = dist2()
    # Widen to every pixel consistent with no change (the trimmed set at least).
    final = d2 <= max(float(chdtri(nb, 0.01)), float(np.quantile(d2, q)))  # chi² 99 %
    if final.sum() >= 50:
        keep = final
        fit(keep)
    return g.astype("float32"), o.astype("float32")


def apply_radiometry(img: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``img * gain + offset`` per band (``img`` is ``(bands, h, w)``)."""
    return (img * np.asarray(gain, "float32")[:, None, None]
            + np.asarray(offset, "float32")[:, None, None]).astype("float32", copy=False)


# ------------------------------------------------------------------------------ cloud mask


#: a cloud is brighter than the other date by at least this much (visible mean): a white roof
#: of either date is no cloud, and in the RGB renderings it passed for one (OSCD Cupertino)
CLOUD_BRIGHTER = 0.08


def cloud_shadow_mask(img: np.ndarray, roles: tuple[str, ...] | list[str], *,
                      res_m: float | None = None, dilate_px: int = 3,
                      min_cloud_m2: float | None = None, min_shadow_m2: float = 1_000.0,
                      shadow_search_m: float = 1_500.0,
                      other: np.ndarray | None = None) -> np.ndarray:
    """True where ``img`` (reflectance, ``(bands, h, w)``) shows cloud or cloud shadow.

    Conservative: few false alarms on clear land matter more than catching thin cloud.

    - cloud: bright and flat across the visible bands; with NIR also unvegetated (NDVI < 0.1)
      with NIR close to the visible level and visible mean > 0.4; without NIR only near-white
      (> 0.8), very flat blobs. Blobs under ``min_cloud_m2`` (default 0.25 ha with NIR, 1 ha
      without) are dropped: white roofs, the very thing an enforcement run looks for, share a
      cloud's spectrum.
    - shadow: dark in every band including NIR (< 0.2), with NIR ≥ 0.8 × green, so water (dark
      NIR, brighter blue/green) and sunlit dark forest (NIR > 0.2) are not taken; without NIR
      only near-black. A shadow blob must be ≥ ``min_shadow_m2`` and lie within
      ``shadow_search_m`` of a cloud in the same array: terrain shade on forested slopes looks
      the same per pixel, so no cloud in view means no cloud shadow. Given ``other`` (the
      other date on the same grid and bands, radiometrically matched), a shadow must also be
      a temporal darkening: visible mean and NIR below 0.6 × the other date's, which terrain
      shade, persistent in both dates, is not. Likewise a cloud must be a temporal
      brightening, visible mean above the other date's by :data:`CLOUD_BRIGHTER`: a white roof
      present on both dates is not.

    Areas and distances use ``res_m`` (pixel size in metres; default 1 m). Everything kept is
    dilated by ``dilate_px``. NaN pixels are never flagged. Haze is left to the radiometric
    normalisation: per-pixel haze tests (HOT) need the scene's clear line and, on real data,
    flag grey surfaces and path radiance.
    """
    roles = tuple(roles)
    h, w = img.shape[1:]
    if not set(VISIBLE) <= set(roles):
        return np.zeros((h, w), bool)
    res = res_m or 1.0
    has_nir = "nir" in roles
    if min_cloud_m2 is None:
        min_cloud_m2 = 2_500.0 if has_nir else 10_000.0
    with np.errstate(invalid="ignore", divide="ignore"):
        b, g, r = (img[roles.index(k)].astype("float32", copy=False) for k in VISIBLE)
        vis = (b + g + r) / 3
        if not (vis > (0.4 if has_nir else 0.8)).any():
            return np.zeros((h, w), bool)  # no cloud in view, hence no cloud shadow either
        flat = (np.abs(b - vis) + np.abs(g - vis) + np.abs(r - vis)) / (3 * np.maximum(vis, 1e-6))
        darkest = np.maximum(np.maximum(b, g), r)
        if has_nir:
            n = img[roles.index("nir")].astype("float32")
            ndvi = (n - r) / np.maximum(n + r, 1e-6)
            cloud = ((vis > 0.4) & (flat < 0.1) & (b >= 0.9 * r) & (ndvi < 0.1)
                     & (n > 0.7 * vis) & (n < 1.3 * vis))
            shadow = (darkest < 0.07) & (vis < 0.06) & (n < 0.2) & (n >= 0.8 * g)
        else:
            cloud = (vis > 0.8) & (flat < 0.05) & (b >= 0.9 * r)
            shadow = (darkest < 0.04) & (b >= 0.9 * r)
        if other is not None:
            vis_o = other[[roles.index(k) for k in VISIBLE]].mean(axis=0)
            cloud &= vis > vis_o + CLOUD_BRIGHTER
            shadow &= vis < 0.6 * vis_o
            if has_nir:
                shadow &= n < 0.6 * other[roles.index("nir")]
    cloud = _drop_small(cloud, max(4, round(min_cloud_m2 / res ** 2)))
    m = cloud
    if cloud.any():
        shadow = _drop_small(shadow, max(4, round(min_shadow_m2 / res ** 2)))
        if shadow.any():
            m = cloud | _near(shadow, cloud, shadow_search_m / res)
    if dilate_px > 0 and m.any():
        m = ndi.binary_dilation(m, structure=np.ones((3, 3), bool), iterations=dilate_px)
    return m


def _dilate_px(res_m: float, margin_m: float = 10.0) -> int:
    """Dilation for cloud edges: ``margin_m`` (soft cloud rims), at least 3 px, at most 20."""
    return int(min(20, max(3, round(margin_m / res_m))))


def _drop_small(m: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1 or not m.any():
        return m
    lab, n = ndi.label(m)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    big = sizes >= min_px
    big[0] = False
    return big[lab]


def _near(blobs: np.ndarray, target: np.ndarray, max_px: float) -> np.ndarray:
    """The connected parts of ``blobs`` that come within ``max_px`` of ``target``."""
    dist = ndi.distance_transform_edt(~target)
    lab, n = ndi.label(blobs)
    closest = np.asarray(ndi.minimum(dist, lab, np.arange(1, n + 1)))
    keep = np.concatenate([[False], closest <= max_px])
    return keep[lab]


# ---------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class AlignParams:
    """Alignment of ``after`` to ``before`` on the working grid.

    ``shift_px`` (the scene's shift; per window where it varies, :meth:`shift_for`) follows
    the module's sign convention; ``gain``/``offset`` map after's
    reflectance onto before's, per band of ``roles`` (the roles both periods have).
    """

    shift_px: tuple[float, float] = (0.0, 0.0)
    gain: tuple[float, ...] = field(default=())
    offset: tuple[float, ...] = field(default=())
    roles: tuple[str, ...] = ()
    n_shift_windows: int = 0  # windows whose shift estimate was confident
    #: per band of ``roles``, the scene's 2 and 98 % percentiles of ``before`` and of the
    #: normalised ``after`` (from the sample windows): detectors that stretch their input use
    #: these, so that a block's result does not depend on the block. Empty: not estimated.
    stretch_before: tuple[tuple[float, float], ...] = ()
    stretch_after: tuple[tuple[float, float], ...] = ()
    #: the scene's medians of the learned detector's ``*_rel`` feature bases, on the same
    #: windows (set by :func:`pipeline.batch.detect_pair`; empty: each block uses its own)
    feature_medians: tuple[tuple[str, float], ...] = ()
    #: the sample windows' confident shifts, ``(col, row, dx, dy)`` at each window's centre in
    #: grid pixels, kept when the shift varies across the scene (:data:`LOCAL_SHIFT_MIN_PX`):
    #: each read then takes the shift at its own centre (:meth:`shift_for`); empty: one shift
    local_shifts: tuple[tuple[float, float, float, float], ...] = ()

    def shift_for(self, window: Window) -> tuple[float, float]:
        """The after date's shift for ``window``: :attr:`shift_px`, or where the shift varies
        across the scene, the sample windows' shifts weighted by inverse squared distance from
        its centre."""
        if not self.local_shifts:
            return self.shift_px
        pts = np.asarray(self.local_shifts, float)
        c = window.col_off + window.width / 2
        r = window.row_off + window.height / 2
        w = 1.0 / np.maximum((pts[:, 0] - c) ** 2 + (pts[:, 1] - r) ** 2, 1.0)
        dx, dy = (w[:, None] * pts[:, 2:]).sum(0) / w.sum()
        return float(dx), float(dy)


#: a confident window shift this many pixels or more from the scene's (the median) makes the
#: shift vary across the scene: orthorectification or relief errors that differ between the
#: dates, which one shift cannot take out (``bench/robustness.py --perturb warp_after``)
LOCAL_SHIFT_MIN_PX = 1.0


def params_record(params: AlignParams) -> dict[str, Any]:
    """``params`` as plain JSON values (``run.json``'s ``alignment``)."""
    return {"shift_px": [float(v) for v in params.shift_px],
            "gain": np.asarray(params.gain, float).tolist(),
            "offset": np.asarray(params.offset, float).tolist(),
            "roles": list(params.roles),
            "n_shift_windows": int(params.n_shift_windows),
            "stretch_before": [[float(a), float(b)] for a, b in params.stretch_before],
            "stretch_after": [[float(a), float(b)] for a, b in params.stretch_after],
            # what the learned detector's *_rel features divide by, scene-wide
            "feature_medians": {k: float(v) for k, v in params.feature_medians},
            "local_shifts": [[float(v) for v in p] for p in params.local_shifts]}


def params_from_record(rec: Mapping[str, Any]) -> AlignParams:
    """The inverse of :func:`params_record` (fields a record lacks keep their defaults)."""
    def pairs(key: str) -> tuple[tuple[float, float], ...]:
        return tuple((float(a), float(b)) for a, b in rec.get(key) or ())

    return AlignParams(tuple(float(v) for v in rec["shift_px"]),
                       tuple(float(v) for v in rec["gain"]),
                       tuple(float(v) for v in rec["offset"]), tuple(rec["roles"]),
                       int(rec.get("n_shift_windows", 0)), pairs("stretch_before"),
                       pairs("stretch_after"),
                       tuple(sorted((k, float(v)) for k, v in
                                    (rec.get("feature_medians") or {}).items())),
                       tuple(tuple(float(v) for v in p) for p in rec.get("local_shifts") or ()))


def common_roles(before: ImageSource, after: ImageSource) -> tuple[str, ...]:
    """Band roles both periods have, in ``before``'s order."""
    return tuple(r for r in before.roles if r in after.roles)


def _select(arr: np.ndarray, src: ImageSource, roles: tuple[str, ...]) -> np.ndarray:
    if src.roles == roles:
        return arr
    return arr[[src.roles.index(r) for r in roles]]


#: side of the alignment's sample windows (px); the scene statistics come from the same windows
SAMPLE_WINDOW_PX = 256


def sample_windows(grid: Grid, size: int = 512, n_side: int = 3) -> list[Window]:
    """Up to ``n_side``² windows of ``size`` px spread evenly over the grid."""
    h, w = grid.shape
    sh, sw = min(size, h), min(size, w)
    rows = sorted({int(round((h - sh) * f)) for f in np.linspace(0.1, 0.9, n_side)})
    cols = sorted({int(round((w - sw) * f)) for f in np.linspace(0.1, 0.9, n_side)})
    return [Window(c, r, sw, sh) for r in rows for c in cols]


def _sample_pixels(a: np.ndarray, b: np.ndarray, valid: np.ndarray, n: int, seed: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` valid pixels of both arrays, seeded: ``(bands, 1, k)`` each."""
    idx = np.flatnonzero(valid)
    if idx.size > n:
        idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
    nb = a.shape[0]
    return (a.reshape(nb, -1)[:, idx][:, None, :], b.reshape(nb, -1)[:, idx][:, None, :])


@dataclass(frozen=True)
class _WindowJob:
    """What the first alignment pass needs for any window (picklable, for the workers)."""

    before: ImageSource
    after: ImageSource
    grid: Grid
    roles: tuple[str, ...]
    coregister: bool
    max_shift_px: float
    resampling: Resampling
    windows: tuple[Window, ...]


def _window_pass(job: _WindowJob, k: int) -> tuple[tuple[float, float] | None, tuple]:
    """Sample window ``k``: its confident shift (or None) and both dates' pixels and masks."""
    roles, grid, win = job.roles, job.grid, job.windows[k]
    d = _dilate_px(grid.res)
    a, va = read_block(job.before, grid, win, resampling=job.resampling)
    b, vb = read_block(job.after, grid, win, resampling=job.resampling)
    a, b = _select(a, job.before, roles), _select(b, job.after, roles)
    est = None
    if job.coregister:
        vis = tuple(r for r in roles if r in VISIBLE) or roles
        ia = [roles.index(r) for r in vis]
        v = va & vb & ~cloud_shadow_mask(a, roles, res_m=grid.res, other=b, dilate_px=d)
        v &= ~cloud_shadow_mask(b, roles, res_m=grid.res, other=a, dilate_px=d)
        dx, dy, ok = _shift_with_confidence(a[ia], b[ia], v, job.max_shift_px)
        est = (dx, dy) if ok else None
    return est, (a, va, b, vb)


def fit_alignment(before: ImageSource, after: ImageSource, grid: Grid, *, coregister: bool = True,
                  normalize: bool = True, max_shift_px: float = 8.0,
                  resampling: Resampling = "bilinear", window_px: int = SAMPLE_WINDOW_PX,
                  n_side: int = 3, workers: int | None = 1,
                  scheduler: str | None = None,
                  reads: dict[tuple[int, int, int, int], tuple] | None = None) -> AlignParams:
    """Estimate the after→before shift and the radiometric gain/offset from ≤ ``n_side``²
    full-resolution windows of ``window_px`` spread over the grid (constant time in the
    scene size: nothing else is read).

    The shift is the median over the windows whose phase-correlation peak is confident; when
    one of them is :data:`LOCAL_SHIFT_MIN_PX` or more from it, their shifts are kept too
    (``local_shifts``) and each block is read with the shift at its centre. The
    gain/offset is fitted on a seeded sample of the windows' clear pixels (clouds and shadows
    in either date excluded), with the after windows moved by the estimated shift (each by its
    own where the shift varies) when it is not zero (in memory, bilinear: nothing is read
    twice). The windows are read on ``workers`` local processes (default 1: here) or the Dask
    ``scheduler``; the result does not depend on where. ``reads``, when given, is filled with
    each window's reads by :func:`window_key` (see :func:`read_aligned_block`'s ``raw``).
    """
    from .blocks import map_blocks

    roles = common_roles(before, after)
    if not (coregister or normalize):
        nb = len(roles)
        return AlignParams((0.0, 0.0), (1.0,) * nb, (0.0,) * nb, roles, 0)
    wins = sample_windows(grid, size=window_px, n_side=n_side)
    per_window = max(1_000, 50_000 // max(1, len(wins)))
    d = _dilate_px(grid.res)
    shift = (0.0, 0.0)
    n_ok = 0
    job = _WindowJob(before, after, grid, roles, coregister, max_shift_px, resampling,
                     tuple(wins))
    ks = list(range(len(wins)))  # map_blocks runs them here with one worker or one window
    done = dict(map_blocks(_window_pass, job, ks, workers=workers or 1, scheduler=scheduler))
    passes = [done[k] for k in ks]  # window order: the result never depends on timing
    if reads is not None and resampling == "bilinear":  # what read_aligned_block takes
        reads.update((window_key(w), p[1]) for w, p in zip(wins, passes, strict=True))
    est = [e for e, _ in passes if e is not None]
    local: tuple[tuple[float, float, float, float], ...] = ()
    if est:
        e = np.asarray(est)
        shift = (float(np.median(e[:, 0])), float(np.median(e[:, 1])))
        n_ok = len(est)
        if len(est) > 1 and np.hypot(*(e - shift).T).max() >= LOCAL_SHIFT_MIN_PX:
            local = tuple((w.col_off + w.width / 2, w.row_off + w.height / 2, *p)
                          for w, (p, _) in zip(wins, passes, strict=True) if p is not None)
    nb = len(roles)
    gain, offset = np.ones(nb, "float32"), np.zeros(nb, "float32")
    if normalize and passes:
        refs, movs = [], []
        for k, (own, (a, va, b, vb)) in enumerate(passes):
            sh = own if local and own is not None else shift  # where the shift varies, its own
            if any(sh):  # move after by the shift so the pixels correspond
                b = ndi.shift(b, (0.0, -sh[1], -sh[0]), order=1, mode="constant",
                              cval=np.nan, prefilter=False)
                vb = vb & np.isfinite(b).all(axis=0)
            v = va & vb & ~cloud_shadow_mask(a, roles, res_m=grid.res, other=b, dilate_px=d)
            v &= ~cloud_shadow_mask(b, roles, res_m=grid.res, other=a, dilate_px=d)
            ra, mb = _sample_pixels(a, b, v, per_window, k)
            refs.append(ra)
            movs.append(mb)
        ref, mov = np.concatenate(refs, axis=2), np.concatenate(movs, axis=2)
        gain, offset = estimate_radiometry(ref, mov, np.ones(ref.shape[1:], bool))
    sb = _percentiles([(a, va) for _, (a, va, _, _) in passes])
    sa = _percentiles([(b, vb) for _, (_, _, b, vb) in passes])
    if sa:  # the after image as the blocks see it: normalised (a positive gain keeps order)
        sa = tuple((lo * g + o, hi * g + o) if g > 0 else (lo, hi)
                   for (lo, hi), g, o in zip(sa, gain.tolist(), offset.tolist(), strict=True))
    return AlignParams(shift, tuple(map(float, gain)), tuple(map(float, offset)), roles, n_ok,
                       sb, sa, local_shifts=local)


def _percentiles(windows: list[tuple[np.ndarray, np.ndarray]],
                 q: tuple[float, float] = (2.0, 98.0)) -> tuple[tuple[float, float], ...]:
    """Per band, percentiles ``q`` over the valid pixels of all windows; () when too few."""
    parts = [a[:, v] for a, v in windows if v.any()]
    if not parts:
        return ()
    x = np.concatenate(parts, axis=1)
    if x.shape[1] < 1_000:
        return ()
    if x.shape[1] > 400_000:
        x = x[:, :: x.shape[1] // 400_000]
    p = np.percentile(x, q, axis=1).T
    return tuple((float(lo), float(hi)) for lo, hi in p)


def window_key(window: Window) -> tuple[int, int, int, int]:
    """``(col_off, row_off, width, height)`` of a window, as a dict key."""
    return (int(window.col_off), int(window.row_off), int(window.width), int(window.height))


def read_aligned_block(before: ImageSource, after: ImageSource, grid: Grid, window: Window,
                       params: AlignParams, *, cloud_mask: bool = True,
                       resampling: Resampling = "bilinear", raw: tuple | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both periods on ``window``: ``(before, after, valid)`` in ``params.roles`` band order.

    ``after`` is read with the shift for this window (``params.shift_px``, or where it varies
    across the scene, :meth:`AlignParams.shift_for`) and normalised to ``before``'s radiometry;
    ``valid`` is both valid and, with ``cloud_mask``, free of cloud/shadow/haze in either date.
    ``raw``: this window's reads by :func:`fit_alignment` (bilinear, unshifted), taken instead
    of reading again where the window's shift is zero and ``resampling`` bilinear (the same
    arrays); ignored otherwise.
    """
    roles = params.roles or common_roles(before, after)
    shift = params.shift_for(window)
    if raw is not None and not any(shift) and resampling == "bilinear":
        a, va, b_raw, vb = raw
    else:
        a, va = read_block(before, grid, window, resampling=resampling)
        b, vb = read_block(after, grid, window, resampling=resampling, shift_px=shift)
        a, b_raw = _select(a, before, roles), _select(b, after, roles)
    b = b_raw
    if params.gain:
        gain, offset = np.asarray(params.gain), np.asarray(params.offset)
        b = apply_radiometry(b_raw, gain, offset)
    valid = va & vb
    if cloud_mask:
        d = _dilate_px(grid.res)
        valid &= ~cloud_shadow_mask(a, roles, res_m=grid.res, other=b, dilate_px=d)
        after = cloud_shadow_mask(b, roles, res_m=grid.res, other=a, dilate_px=d)
        if params.gain and after.any():
            # and as acquired (against the before date in its radiometry): a gain of 2 on a
            # flat, hazy after date lifts roofs to cloud level, while per-band gains on 8-bit
            # renderings can make new bare ground as acquired look like cloud; a cloud is
            # one either way
            a_as_b = apply_radiometry(a, 1 / gain, -offset / gain)
            after &= cloud_shadow_mask(b_raw, roles, res_m=grid.res, other=a_as_b,
                                       dilate_px=d)
        valid &= ~after
    return a, b, valid
