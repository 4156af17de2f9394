"""Learned change detector: gradient boosting on multi-scale per-pixel features.

The model files live in :mod:`pipeline.models` (LightGBM text models plus a JSON sidecar with
the feature list, calibration and held-out figures); ``bench/train_detector.py`` makes them.
The weights derive from LEVIR-CD and OSCD, which are licensed for research use only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import features as F

MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
#: smallest change object kept by :func:`decide`, in m² (at least ``MIN_OBJECT_PX`` pixels)
MIN_OBJECT_M2 = 20.0
MIN_OBJECT_PX = 3
#: object context (metres, capped in pixels) kept around a block for the classifier
CONTEXT_M = 48.0
MAX_CONTEXT_PX = 64
#: vegetation likelihood: logistic midpoints/widths on NDVI and chromatic excess green (same
#: constants as the spectral detector, so ``veg_*`` means the same whichever detector ran)
NDVI_VEG_MID, NDVI_VEG_WIDTH = 0.45, 0.07
EXG_VEG_MID, EXG_VEG_WIDTH = 0.17, 0.04


@dataclass(frozen=True)
class Model:
    """A loaded model: booster, feature names and calibration."""

    booster: Any
    features: tuple[str, ...]
    #: decision threshold on the raw score per resolution class, finest first: (max_res_m, t)
    thresholds: tuple[tuple[float, float], ...]
    slope: float
    meta: dict = field(repr=False)

    def threshold_raw(self, res_m: float) -> float:
        """Raw-score decision threshold for imagery of ``res_m``."""
        return next((t for m, t in self.thresholds if res_m <= m), self.thresholds[-1][1])

    def calibrate(self, raw: np.ndarray, res_m: float) -> np.ndarray:
        """Map raw scores to probabilities with 0.5 at the decision threshold."""
        return calibrate(raw, self.threshold_raw(res_m), self.slope)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def calibrate(raw: np.ndarray, threshold_raw: float, slope: float) -> np.ndarray:
    """``sigmoid(slope * (logit(raw) - logit(threshold_raw)))`` as float32."""
    z = slope * (_logit(raw) - _logit(threshold_raw))
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def model_paths(kind: str, model_dir: Path = MODEL_DIR) -> tuple[Path, Path]:
    """Model text file and JSON sidecar for a feature set."""
    return model_dir / f"learned_{kind}.txt", model_dir / f"learned_{kind}.json"


def _kind_for(roles: tuple[str, ...], model_dir: Path) -> str | None:
    try:
        kind = F.feature_set(roles)
    except ValueError:
        return None
    for k in ((kind, "rgb") if kind == "ms" else ("rgb",)):
        if all(p.exists() for p in model_paths(k, model_dir)):
            return k
    return None


def has_model(roles: Sequence[str], res_m: float | None = None,
              model_dir: Path = MODEL_DIR) -> bool:
    """True when a model for these band roles ships (red, green and blue are needed).

    ``res_m`` is accepted for the registry; the models span 0.5–30 m pixels.
    """
    return _kind_for(tuple(roles), model_dir) is not None


@lru_cache(maxsize=4)
def load_model(kind: str, model_dir: Path = MODEL_DIR) -> Model:
    """Load (once) the LightGBM model of a feature set."""
    import lightgbm as lgb

    txt, js = model_paths(kind, model_dir)
    meta = json.loads(js.read_text())
    booster = lgb.Booster(model_file=str(txt))
    cal = meta["calibration"]
    ts = sorted((float(m), float(t)) for m, t in cal["threshold_raw_by_max_res_m"].items())
    return Model(booster, tuple(meta["features"]), tuple(ts), float(cal["slope"]), meta)


def predict_stride(res_m: float) -> int:
    """Pixel stride of the model evaluation: features are smooth over ~3 m, so sub-metre
    imagery is scored on every second pixel and filled in (4x faster, same decisions)."""
    return 2 if res_m < 1.0 else 1


def predict_map(booster: Any, stack: np.ndarray, valid: np.ndarray, res_m: float,
                threads: int = 2) -> np.ndarray:
    """Raw model score per pixel (0 where not valid), smoothed by :func:`smooth_score`."""
    h, w = valid.shape
    k = predict_stride(res_m)
    sub_valid = valid[::k, ::k]
    sub = np.zeros(sub_valid.shape, np.float32)
    if sub_valid.any():
        x = np.ascontiguousarray(stack[:, ::k, ::k][:, sub_valid].T)
        sub[sub_valid] = booster.predict(x, num_threads=threads)
    raw = np.repeat(np.repeat(sub, k, 0), k, 1)[:h, :w] if k > 1 else sub
    sub_mask = np.repeat(np.repeat(sub_valid, k, 0), k, 1)[:h, :w] & valid
    return smooth_score(raw, sub_mask, res_m) * valid


def smooth_score(score: np.ndarray, valid: np.ndarray, res_m: float) -> np.ndarray:
    """Mean of the score over valid pixels in a ``(2r+1)²`` window, r = max(1, 1 m / res_m)."""
    r = max(1, int(round(1.0 / res_m)))
    v = valid.astype(np.float32)
    num = ndi.uniform_filter(np.where(valid, score, 0.0).astype(np.float32), 2 * r + 1)
    den = ndi.uniform_filter(v, 2 * r + 1)
    return np.where(valid, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)


def decide_raw(score: np.ndarray, valid: np.ndarray, res_m: float, threshold: float) -> np.ndarray:
    """Suggested binary decision: threshold, fill pinholes, drop objects below the minimum area."""
    out = (score >= threshold) & valid
    min_px = max(MIN_OBJECT_PX, int(round(MIN_OBJECT_M2 / (res_m * res_m))))
    lab, n = ndi.label(out, np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        out = keep[lab]
    return out


def decide(change: np.ndarray, valid: np.ndarray, res_m: float) -> np.ndarray:
    """Suggested object-level clean-up of :class:`LearnedDetector`'s ``change`` at 0.5."""
    return decide_raw(change, valid, res_m, 0.5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def spectral_evidence(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                      roles: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-date ``bright`` (mean of visible bands), ``ndvi`` and ``exg`` (NaN without the
    bands) and ``veg`` (vegetation likelihood 0..1: from NDVI with nir, else from ExG)."""
    idx = {r: i for i, r in enumerate(roles)}
    vis = [idx[r] for r in ("red", "green", "blue") if r in idx] or list(range(len(roles)))
    nan = np.full(valid.shape, np.nan, np.float32)
    out: dict[str, np.ndarray] = {}
    for tag, img in (("before", before), ("after", after)):
        img = np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, None)
        out[f"bright_{tag}"] = img[vis].mean(0)
        nd = F.ndvi(img[idx["red"]], img[idx["nir"]]) if {"red", "nir"} <= idx.keys() else nan
        eg = (F.exg(img[idx["red"]], img[idx["green"]], img[idx["blue"]])
              if {"red", "green", "blue"} <= idx.keys() else nan)
        veg = (_sigmoid((nd - NDVI_VEG_MID) / NDVI_VEG_WIDTH) if nd is not nan
               else _sigmoid((np.nan_to_num(eg) - EXG_VEG_MID) / EXG_VEG_WIDTH))
        out[f"ndvi_{tag}"], out[f"exg_{tag}"], out[f"veg_{tag}"] = nd, eg, veg
    return {k: v.astype(np.float32) for k, v in out.items()}


class LearnedDetector:
    """Per-pixel gradient-boosting change detector (see ``pipeline/models/*.json``).

    Args:
        roles, res_m: band roles and pixel size, when known at construction (sets ``halo``).
        stretch: optional whole-image ``(before, after)`` 2–98 % stretch parameters from
            :func:`pipeline.detect.features.stretch_params` (roles order); default: per block.
        threads: LightGBM prediction threads.
        model_dir: where the models are.
    """

    def __init__(self, roles: Sequence[str] | None = None, res_m: float | None = None, *,
                 stretch: tuple[np.ndarray, np.ndarray] | None = None, threads: int = 2,
                 model_dir: Path = MODEL_DIR) -> None:
        r = 0.1 if res_m is None else float(res_m)
        #: context pixels each side: the feature neighbourhoods plus object context for classify
        self.halo = max(F.halo_px(r), min(MAX_CONTEXT_PX, math.ceil(CONTEXT_M / r)))
        if roles is not None and not has_model(roles, res_m, model_dir):
            raise FileNotFoundError(f"no learned model for band roles {tuple(roles)} in "
                                    f"{model_dir}; use the spectral detector")
        self.stretch = stretch
        self.threads = threads
        self.model_dir = model_dir

    def __call__(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        roles = tuple(roles)
        kind = _kind_for(roles, self.model_dir)
        if kind is None:
            raise FileNotFoundError(f"no learned model for band roles {roles} in "
                                    f"{self.model_dir}; use the spectral detector")
        model = load_model(kind, self.model_dir)
        names, stack = F.compute(before, after, valid, roles, res_m, kind=kind,
                                 stretch=self.stretch)
        if tuple(names) != model.features:
            raise ValueError(f"feature mismatch between code and model {kind}: retrain")
        h, w = valid.shape
        change = np.zeros((h, w), np.float32)
        if valid.any():
            raw = predict_map(model.booster, stack, valid, res_m, self.threads)
            change = np.where(valid, model.calibrate(raw, res_m), 0.0)
        evidence = spectral_evidence(before, after, valid, roles)
        return {"change": change.astype(np.float32), **evidence}
