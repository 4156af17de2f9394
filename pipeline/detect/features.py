"""Per-pixel, multi-scale change features for the learned detector (pure numpy/scipy).

Every feature is local: a pixel's value depends only on the pixels within :func:`halo_px` of it,
plus scene statistics: the per-image 2–98 % stretch and the medians that the ``*_rel`` features
divide by. Both default to the block's own valid pixels; passed in as ``stretch`` and
``medians`` (measured on sample windows of the scene, :func:`median_samples` and
:func:`scene_medians`), every block of a scene gets exactly the values of one whole-image pass.

Neighbourhood sizes are tied to metres (``res_m``) and clamped to a pixel range, so one model
serves 0.5 m aerial imagery and 30 m Landsat alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: Bands every feature set needs.
RGB: tuple[str, str, str] = ("red", "green", "blue")
#: Extra bands used by the multispectral feature set when present.
MS_EXTRA: tuple[str, ...] = ("nir",)

_EPS = 1e-6
#: what the ``*_rel`` features divide by a scene median of (``decorr_r1`` is 1 - ``corr_r1``)
REL_BASES: tuple[str, ...] = ("mag", "tol_r1", "d_chroma_r1", "angle_r1", "dgrad_abs_r2",
                              "decorr_r1")


@dataclass(frozen=True)
class Scales:
    """Window radii in pixels for the two neighbourhood scales."""

    r1: int
    r2: int


def scales_for(res_m: float) -> Scales:
    """Radii (px) of the fine (~3 m) and coarse (~12 m) neighbourhoods at ``res_m``."""
    r1 = int(np.clip(round(3.0 / res_m), 1, 6))
    r2 = int(np.clip(round(12.0 / res_m), 2, 24))
    return Scales(r1, max(r2, r1 + 1))


def halo_px(res_m: float) -> int:
    """Context pixels each side a block needs so that its core features are exact."""
    return scales_for(res_m).r2 + 2


def feature_set(roles: tuple[str, ...]) -> str:
    """``"ms"`` when the bands allow the multispectral features, else ``"rgb"``."""
    if not set(RGB) <= set(roles):
        raise ValueError(f"learned features need red, green and blue bands; got roles {roles}")
    return "ms" if set(MS_EXTRA) <= set(roles) else "rgb"


def stretch_params(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-band 2 and 98 % percentiles over ``valid`` pixels: ``(bands, 2)`` float32."""
    out = np.zeros((img.shape[0], 2), np.float32)
    if valid.sum() < 16:
        out[:, 1] = 1.0
        return out
    sample = img[:, valid]
    if sample.shape[1] > 200_000:  # a strided subsample is plenty for two percentiles
        sample = sample[:, :: sample.shape[1] // 200_000]
    out[:] = np.percentile(sample, [2.0, 98.0], axis=1).T
    return out


def _stretch(img: np.ndarray, params: np.ndarray) -> np.ndarray:
    lo, hi = params[:, 0, None, None], params[:, 1, None, None]
    return np.clip((img - lo) / np.maximum(hi - lo, _EPS), -0.5, 1.5).astype(np.float32)


def _median(x: np.ndarray, valid: np.ndarray) -> float:
    v = x[valid]
    if v.size > 100_000:
        v = v[:: v.size // 100_000]
    return float(np.median(v)) if v.size else 1.0


def zero_nonfinite(x: np.ndarray) -> np.ndarray:
    """``x`` with NaN and ±inf set to 0, in place (``np.nan_to_num`` with every replacement 0,
    whose three passes took 3.8 s of a 37 s learned run on 4000²). A finite sum proves every
    value finite, so the usual all-finite array costs one summing pass."""
    with np.errstate(over="ignore"):  # a sum that overflows just takes the full pass
        finite = np.isfinite(x.sum())
    if not finite:
        x[~np.isfinite(x)] = 0.0
    return x


def _mean(x: np.ndarray, r: int) -> np.ndarray:
    return ndi.uniform_filter(x, size=2 * r + 1, mode="reflect")


def _local_corr(a: np.ndarray, b: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """Local Pearson correlation of ``a`` and ``b`` and their local std, window ``2r+1``."""
    ma, mb = _mean(a, r), _mean(b, r)
    va = np.maximum(_mean(a * a, r) - ma * ma, 0.0)
    vb = np.maximum(_mean(b * b, r) - mb * mb, 0.0)
    cov = _mean(a * b, r) - ma * mb
    sa, sb = np.sqrt(va), np.sqrt(vb)
    corr = cov / (sa * sb + 1e-4)
    return np.clip(corr, -1.0, 1.0), sa, sb


def _tolerant_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Min over a 3×3 neighbourhood shift of the change-vector norm, symmetric in the dates.

    Differences that vanish under a one-pixel shift (misregistration edges) are suppressed.
    The minima are taken on squared norms and rooted once (the root is monotonic and correctly
    rounded, so the result is the same to the bit).
    """
    h, w = a.shape[1:]
    pa = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
    pb = np.pad(b, ((0, 0), (1, 1), (1, 1)), mode="edge")
    best_ab = np.full((h, w), np.inf, np.float32)
    best_ba = np.full((h, w), np.inf, np.float32)
    for dy in range(3):
        for dx in range(3):
            sb = pb[:, dy:dy + h, dx:dx + w]
            sa = pa[:, dy:dy + h, dx:dx + w]
            np.minimum(best_ab, ((a - sb) ** 2).sum(0), out=best_ab)
            np.minimum(best_ba, ((b - sa) ** 2).sum(0), out=best_ba)
    return np.sqrt(np.maximum(best_ab, best_ba))


def _grad(x: np.ndarray) -> np.ndarray:
    return np.hypot(ndi.sobel(x, 0), ndi.sobel(x, 1)) / 8.0


def logit(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), with ``p`` clipped to [1e-6, 1 - 1e-6]."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def exg(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chromatic excess green, (2g - r - b) / (r + g + b), on positive reflectances."""
    r, g, b = (np.maximum(v, 0.0) for v in (r, g, b))
    return (2 * g - r - b) / np.maximum(r + g + b, 0.03)


def ndvi(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """NDVI on reflectances; 0 where both are ~0."""
    red, nir = np.maximum(red, 0.0), np.maximum(nir, 0.0)
    return (nir - red) / (nir + red + 0.01)


def _prepared(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
              roles: tuple[str, ...], kind: str | None,
              stretch: tuple[np.ndarray, np.ndarray] | None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bands :func:`compute` uses, raw (finite) and stretched, invalid pixels at 0.5."""
    kind = kind or feature_set(roles)
    idx = {r: i for i, r in enumerate(roles)}
    use = list(RGB) + (list(MS_EXTRA) if kind == "ms" else [])
    sel = [idx[r] for r in use]
    raw_a = zero_nonfinite(before[sel].astype(np.float32))
    raw_b = zero_nonfinite(after[sel].astype(np.float32))
    if stretch is None:
        pa, pb = stretch_params(raw_a, valid), stretch_params(raw_b, valid)
    else:
        pa, pb = stretch[0][sel], stretch[1][sel]
    a, b = _stretch(raw_a, pa), _stretch(raw_b, pb)
    # invalid pixels: copy the other date so they carry no change into neighbourhoods
    inv = ~valid
    a[:, inv] = 0.5
    b[:, inv] = 0.5
    return raw_a, raw_b, a, b


def _chroma_change(raw_a: np.ndarray, raw_b: np.ndarray, r: int) -> np.ndarray:
    """Local mean of the chromaticity change, on the raw reflectances (illumination-blind)."""
    ca = raw_a[:3] / (raw_a[:3].sum(0) + _EPS)
    cb = raw_b[:3] / (raw_b[:3].sum(0) + _EPS)
    return _mean(np.sqrt(((cb - ca) ** 2).sum(0)), r)


def _angle(rgb_a: np.ndarray, rgb_b: np.ndarray, r: int) -> np.ndarray:
    """Local mean of the spectral angle between the dates."""
    dot = (rgb_a * rgb_b).sum(0) + 0.01
    na = np.sqrt((rgb_a ** 2).sum(0) + 0.01)
    nb = np.sqrt((rgb_b ** 2).sum(0) + 0.01)
    return _mean(np.arccos(np.clip(dot / (na * nb), -1.0, 1.0)), r)


def compute(before: np.ndarray, after: np.ndarray, valid: np.ndarray, roles: tuple[str, ...],
            res_m: float, *, kind: str | None = None,
            stretch: tuple[np.ndarray, np.ndarray] | None = None,
            medians: Mapping[str, float] | None = None,
            ) -> tuple[list[str], np.ndarray]:
    """Feature stack for an aligned pair.

    Args:
        before, after: float32 ``(bands, h, w)`` reflectance-like arrays, bands in ``roles`` order.
        valid: bool ``(h, w)``; statistics use valid pixels only.
        roles: band roles; red, green and blue are required.
        res_m: pixel size in metres.
        kind: ``"rgb"`` or ``"ms"``; default from the roles (:func:`feature_set`).
        stretch: optional ``(before_params, after_params)`` from :func:`stretch_params` over the
            whole image, in ``roles`` order; default: this block's own statistics.
        medians: optional scene medians of :data:`REL_BASES` (:func:`scene_medians`); a
            missing one is this block's own.

    Returns:
        Feature names and a float32 ``(n_features, h, w)`` stack (finite everywhere).
    """
    kind = kind or feature_set(roles)
    raw_a, raw_b, a, b = _prepared(before, after, valid, roles, kind, stretch)
    sc = scales_for(res_m)
    f: dict[str, np.ndarray] = {}

    def med(name: str, x: np.ndarray) -> float:
        return float(medians[name]) if medians and name in medians else _median(x, valid)

    rgb_a, rgb_b = a[:3], b[:3]
    d = rgb_b - rgb_a
    for k, name in enumerate(RGB):
        f[f"d_{name}"] = d[k]
        f[f"d_{name}_r1"] = _mean(d[k], sc.r1)
    mag = np.sqrt((d ** 2).sum(0))
    f["mag"] = mag
    f["mag_r1"] = _mean(mag, sc.r1)
    f["mag_r2"] = _mean(mag, sc.r2)
    f["cv_r1"] = np.sqrt(sum(f[f"d_{n}_r1"] ** 2 for n in RGB))
    f["mag_rel"] = f["mag_r1"] / (med("mag", mag) + 0.02)
    tol = _tolerant_diff(rgb_a, rgb_b)
    f["tol"] = tol
    f["tol_r1"] = _mean(tol, sc.r1)
    f["tol_r2"] = _mean(tol, sc.r2)

    bright_a, bright_b = rgb_a.mean(0), rgb_b.mean(0)
    f["bright_a"], f["bright_b"] = bright_a, bright_b
    f["d_bright_r1"] = _mean(bright_b - bright_a, sc.r1)
    for tag, r in (("r1", sc.r1), ("r2", sc.r2)):
        corr, sa, sb = _local_corr(bright_a, bright_b, r)
        f[f"corr_{tag}"] = corr
        f[f"std_a_{tag}"] = sa
        f[f"dstd_{tag}"] = sb - sa
    ga, gb = _grad(bright_a), _grad(bright_b)
    f["grad_a"] = _mean(ga, sc.r1)
    f["dgrad_r1"] = _mean(gb - ga, sc.r1)
    f["dgrad_abs_r2"] = _mean(np.abs(gb - ga), sc.r2)

    exg_a = exg(*np.clip(rgb_a, 0, None))
    exg_b = exg(*np.clip(rgb_b, 0, None))
    f["exg_a"] = _mean(exg_a, sc.r1)
    f["exg_b"] = _mean(exg_b, sc.r1)
    f["d_exg_r1"] = f["exg_b"] - f["exg_a"]
    # chromaticity change and spectral angle on the raw reflectances: illumination-invariant
    f["d_chroma_r1"] = _chroma_change(raw_a, raw_b, sc.r1)
    f["angle_r1"] = _angle(rgb_a, rgb_b, sc.r1)

    # scene-relative versions: how unusual a pixel's change is within this block (robust to the
    # overall radiometric difference of a sensor or season; changes rarely cover half a scene)
    for n in ("tol_r1", "d_chroma_r1", "angle_r1", "dgrad_abs_r2"):
        f[f"{n}_rel"] = f[n] / (med(n, f[n]) + 1e-3)
    f["decorr_r1_rel"] = (1 - f["corr_r1"]) / (med("decorr_r1", 1 - f["corr_r1"]) + 1e-2)

    if kind == "ms":
        nd_a = ndvi(raw_a[0], raw_a[3])
        nd_b = ndvi(raw_b[0], raw_b[3])
        f["ndvi_a"] = _mean(nd_a, sc.r1)
        f["d_ndvi_r1"] = _mean(nd_b - nd_a, sc.r1)
        f["d_nir_r1"] = _mean(b[3] - a[3], sc.r1)
        f["mag4_r1"] = _mean(np.sqrt(((b - a) ** 2).sum(0)), sc.r1)

    # the stack is filled feature by feature, each freed once copied, after the inputs and
    # intermediates are: np.stack(...).astype held the features three times over (a 1300²
    # RGB block peaked at 924 MB, now 588 MB)
    del raw_a, raw_b, a, b, rgb_a, rgb_b, ga, gb, exg_a, exg_b
    names = list(f)
    stack = np.empty((len(names), *valid.shape), np.float32)
    for i, n in enumerate(names):
        stack[i] = f.pop(n)
        zero_nonfinite(stack[i])
    return names, stack


def median_samples(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                   roles: tuple[str, ...], res_m: float, *, kind: str | None = None,
                   stretch: tuple[np.ndarray, np.ndarray] | None = None,
                   keep: np.ndarray | None = None, threads: int = 1) -> dict[str, np.ndarray]:
    """Values of :data:`REL_BASES` at the valid pixels of one sample window of a scene: where
    ``keep``, else away from the window's edges by :func:`halo_px` (there the neighbourhoods
    are the scene's). Pool many windows' samples with :func:`scene_medians`.

    The values :func:`compute` gives those layers, to the bit, without the other features
    (about half its time on a 1024² RGB scene); the layers on up to ``threads`` threads
    (numpy and scipy's filters release the GIL: 1.8x on two)."""
    raw_a, raw_b, a, b = _prepared(before, after, valid, roles, kind, stretch)
    sc = scales_for(res_m)
    rgb_a, rgb_b = a[:3], b[:3]
    bright_a, bright_b = rgb_a.mean(0), rgb_b.mean(0)
    layers = {
        "mag": lambda: np.sqrt(((rgb_b - rgb_a) ** 2).sum(0)),
        "tol_r1": lambda: _mean(_tolerant_diff(rgb_a, rgb_b), sc.r1),
        "d_chroma_r1": lambda: _chroma_change(raw_a, raw_b, sc.r1),
        "angle_r1": lambda: _angle(rgb_a, rgb_b, sc.r1),
        "dgrad_abs_r2": lambda: _mean(np.abs(_grad(bright_b) - _grad(bright_a)), sc.r2),
        "decorr_r1": lambda: 1 - zero_nonfinite(_local_corr(bright_a, bright_b, sc.r1)[0]),
    }
    if keep is None:
        m = halo_px(res_m)
        keep = np.zeros_like(valid)
        keep[m:-m, m:-m] = True
    inner = valid & keep

    def sample(name: str) -> np.ndarray:
        return zero_nonfinite(layers[name]())[inner]

    if threads <= 1:
        return {name: sample(name) for name in REL_BASES}
    with ThreadPoolExecutor(min(threads, len(REL_BASES))) as pool:
        return dict(zip(REL_BASES, pool.map(sample, REL_BASES), strict=True))


def scene_medians(samples: Sequence[Mapping[str, np.ndarray]],
                  min_pixels: int = 1_000) -> dict[str, float]:
    """Median of each of :data:`REL_BASES` over the pooled :func:`median_samples` of a
    scene's windows; {} with fewer than ``min_pixels`` (each block then uses its own)."""
    if not samples or sum(len(s["mag"]) for s in samples) < min_pixels:
        return {}
    return {n: float(np.median(np.concatenate([s[n] for s in samples]))) for n in REL_BASES}
