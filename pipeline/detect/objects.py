"""Object-level second stage of the learned detector: accept or reject each change object.

The per-pixel model (:mod:`pipeline.detect.learned`) scores every pixel; its candidate objects
(8-connected regions above a candidate threshold, at least the minimum area) are described by
per-object features (:func:`object_features`: area and extent in metres, shape, the pixel score
inside and in a ring around the object, mean pixel change features inside vs the ring,
vegetation before / after) and a small LightGBM model (``learned_<set>_objects.{txt,json}`` next
to the pixel model, same folder rules, i.e. ``$TUBAN_MODEL_DIR`` for fold models) keeps the
objects whose probability reaches the decision threshold of the image's resolution class.
Without that file there is no object stage.

Made by ``bench/train_detector.py`` (seeded; ``python bench/train_detector.py --sets rgb``
writes both models): trained only on *out-of-fold* objects, i.e. objects that a fold's pixel
model formed on cases it never saw. An object is positive when at least
:data:`POSITIVE_COVER` of its labelled pixels are labelled change; samples are weighted by
labelled pixels (what pixel F1 counts), each dataset carrying the same total weight. The shipped
object model learns from the case-split out-of-fold objects of every case; a fold's object model
(``--folds``) only from the out-of-fold objects of the *other* folds' cases.

Every feature is in metres or unitless, never the pixel size itself, so one model serves
0.5 m aerial and 30 m Landsat imagery.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import features as F

#: an object is a positive training sample when this share of its labelled pixels is change
POSITIVE_COVER = 0.5
#: ring around an object for context features: this many metres, clamped in pixels
RING_M = 6.0
RING_PX = (1, 12)
#: pixel-feature means inside each object (and inside minus ring for ``RING_DIFF``)
INSIDE = ("tol_r1", "tol_r1_rel", "d_bright_r1", "d_chroma_r1", "angle_r1", "corr_r1",
          "decorr_r1_rel", "dstd_r1", "dgrad_r1", "dgrad_abs_r2", "std_a_r1", "grad_a",
          "bright_a", "bright_b", "exg_a", "exg_b", "d_exg_r1", "mag_rel")
RING_DIFF = ("tol_r1", "d_bright_r1", "d_chroma_r1", "dgrad_abs_r2", "bright_a", "bright_b",
             "exg_b", "corr_r1")
#: vegetation likelihood from (stretched) excess green, as in ``learned.spectral_evidence``
EXG_VEG_MID, EXG_VEG_WIDTH = 0.17, 0.04


def feature_names() -> list[str]:
    """Names of the object features, in :func:`object_features` column order."""
    return (["log_area_m2", "log_length_m", "elong", "box_fill", "compact",
             "m_mean", "m_max", "m_std", "m_core", "m_ring", "m_ring_max",
             "veg_a", "veg_b", "ring_valid", "scene_frac", "scene_density_km2", "m_mean_rel",
             "log_area_rel"]
            + [f"in_{n}" for n in INSIDE] + [f"dring_{n}" for n in RING_DIFF])


def label_objects(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of ``mask`` (the same connectivity as ``learned.decide_raw``)."""
    lab, n = ndi.label(mask, np.ones((3, 3), bool))
    return lab, int(n)


def ring_labels(lab: np.ndarray, valid: np.ndarray, res_m: float) -> np.ndarray:
    """Each background pixel within the ring width of an object gets its nearest object's label
    (valid pixels only; 0 elsewhere)."""
    w = int(np.clip(round(RING_M / res_m), *RING_PX))
    if not lab.any():
        return np.zeros_like(lab)
    dist, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
    ring = lab[iy, ix]
    ring[(dist > w) | (lab > 0) | ~valid] = 0
    return ring


def object_features(lab: np.ndarray, n: int, raw: np.ndarray, threshold_raw: float,
                    names: list[str] | tuple[str, ...], stack: np.ndarray, valid: np.ndarray,
                    res_m: float) -> np.ndarray:
    """Feature matrix ``(n, len(feature_names()))`` float32 of objects ``1..n`` of ``lab``.

    Args:
        lab: int labels (0 = background), e.g. from :func:`label_objects`.
        raw: the pixel model's raw score map; ``threshold_raw`` its decision threshold (scores
            enter as the margin ``logit(raw) - logit(threshold_raw)``).
        names, stack: the pixel feature names and stack (:func:`features.compute`).
        valid: bool mask of valid pixels; res_m: pixel size in metres.
    """
    k = len(feature_names())
    if n == 0:
        return np.zeros((0, k), np.float32)
    lab = np.where(valid, lab, 0)
    flat = lab.ravel()
    ring = ring_labels(lab, valid, res_m).ravel()
    # only the pixels of an object or of its ring count: they are selected once (objects
    # cover a small part of a block; bincounts over whole blocks took 2.9 s of a 37 s learned
    # run on 4000²). Sums per label come out bit for bit as over the whole block.
    o_px = np.flatnonzero(flat)
    o_lab = flat[o_px]
    r_px = np.flatnonzero(ring)
    r_lab = ring[r_px]

    def on_obj(x: np.ndarray) -> np.ndarray:
        return x.ravel()[o_px]

    def on_ring(x: np.ndarray) -> np.ndarray:
        return x.ravel()[r_px]

    def sums(v: np.ndarray, labels: np.ndarray = o_lab) -> np.ndarray:
        return np.bincount(labels, weights=np.asarray(v, np.float64),
                           minlength=n + 1)[1:n + 1]

    def count(labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels, minlength=n + 1)[1:n + 1].astype(np.float64)

    def peak(v: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = np.full(n + 1, -np.inf)
        np.maximum.at(out, labels, v)
        return out[1:]

    n_px = count(o_lab)
    area = np.maximum(n_px, 1.0)
    ring_n = count(r_lab)
    ring_d = np.maximum(ring_n, 1.0)

    def mean(v: np.ndarray) -> np.ndarray:
        return sums(v) / area

    def ring_mean(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        return np.where(ring_n > 0, sums(v, r_lab) / ring_d, fallback)

    # shape: second moments (elongation, box fill, length) and pixel-edge perimeter
    yy, xx = (v.astype(np.float64) for v in np.divmod(o_px, lab.shape[1]))
    my, mx = mean(yy), mean(xx)
    vyy = np.maximum(mean(yy * yy) - my * my, 0.0) + 1 / 12
    vxx = np.maximum(mean(xx * xx) - mx * mx, 0.0) + 1 / 12
    vxy = mean(xx * yy) - mx * my
    tr, det = vyy + vxx, np.maximum(vyy * vxx - vxy * vxy, 1e-12)
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-6)
    elong = np.sqrt(l1 / l2)
    # a w x h rectangle has variances w²/12 and h²/12: length w, box fill 1
    fill = area / (12 * np.sqrt(l1 * l2))
    length_m = np.sqrt(12 * l1) * res_m
    pad = np.pad(lab, 1)
    perim = np.zeros(n, np.float64)
    for sl in ((slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1)),
               (slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None))):
        edge = (lab > 0) & (pad[sl] != lab)
        perim += np.bincount(lab[edge], minlength=n + 1)[1:n + 1]
    compact = 4 * math.pi * area / np.maximum(perim, 1.0) ** 2

    t = F.logit(threshold_raw)
    margin = (F.logit(on_obj(raw)) - t).astype(np.float64)
    margin_ring = (F.logit(on_ring(raw)) - t).astype(np.float64)
    m_mean = mean(margin)
    m_std = np.sqrt(np.maximum(mean(margin * margin) - m_mean ** 2, 0.0))
    m_max = np.where(n_px > 0, peak(margin, o_lab), 0.0)  # 0 for an empty label, as ndi's
    m_core = mean(margin > 0)
    m_ring = ring_mean(margin_ring, m_mean)
    m_ring_max = np.where(ring_n > 0, peak(margin_ring, r_lab), m_mean)

    pos = {nm: i for i, nm in enumerate(names)}

    def feat(nm: str, px: np.ndarray) -> np.ndarray:
        """Pixel feature ``nm`` at the flat pixels ``px`` (0 when the stack lacks it)."""
        return stack[pos[nm]].ravel()[px] if nm in pos else np.zeros(px.size, np.float32)

    def obj_feat(nm: str) -> np.ndarray:
        return feat(nm, o_px)

    def veg(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(x - EXG_VEG_MID) / EXG_VEG_WIDTH))

    inside = {nm: mean(obj_feat(nm)) for nm in INSIDE}
    cols = [np.log10(area * res_m * res_m), np.log10(length_m), elong, fill, compact,
            m_mean, m_max, m_std, m_core, m_ring, m_ring_max,
            mean(veg(obj_feat("exg_a"))), mean(veg(obj_feat("exg_b"))), ring_n / area]
    # scene context: how much of the valid area the candidates cover, how many there are per
    # km², and how an object's score and size compare with the block's other candidates
    n_valid = max(float(valid.sum()), 1.0)
    log_area = np.log10(area * res_m * res_m)
    cols += [np.full(n, area.sum() / n_valid), np.full(n, n / (n_valid * res_m * res_m / 1e6)),
             m_mean - np.median(m_mean), log_area - np.median(log_area)]
    cols += [inside[nm] for nm in INSIDE]
    for nm in RING_DIFF:
        m_in = inside[nm] if nm in inside else mean(obj_feat(nm))
        cols.append(m_in - ring_mean(feat(nm, r_px), m_in))
    return F.zero_nonfinite(np.stack(cols, 1).astype(np.float32))


def object_truth(lab: np.ndarray, n: int, label: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """Per object: labelled change pixels, labelled no-change pixels, positive flag
    (change share of labelled pixels ``>= POSITIVE_COVER``). ``label``: 0/1, 255 = ignore."""
    flat = lab.ravel()
    ch = np.bincount(flat, weights=(label.ravel() == 1), minlength=n + 1)[1:n + 1]
    no = np.bincount(flat, weights=(label.ravel() == 0), minlength=n + 1)[1:n + 1]
    pos = ch >= POSITIVE_COVER * np.maximum(ch + no, 1e-9)
    return ch, no, pos & (ch + no > 0)


@dataclass(frozen=True)
class ObjectModel:
    """A loaded object model: booster, feature names, candidate shift and decision threshold."""

    booster: Any
    features: tuple[str, ...]
    #: candidates are formed at ``logit(t_pixel) - candidate_shift`` (0: the pixel decision)
    candidate_shift: float
    #: accept an object when the model's probability is at least this
    threshold: float
    meta: dict = field(repr=False)
    #: acceptance threshold per resolution class, finest first: ``(max_res_m, t)``; pixel sizes
    #: outside every class take ``threshold``
    thresholds: tuple[tuple[float, float], ...] = ()

    def threshold_for(self, res_m: float) -> float:
        """Acceptance threshold for imagery of ``res_m`` metres."""
        return next((t for m, t in self.thresholds if res_m <= m), self.threshold)

    def candidate_threshold(self, threshold_raw: float) -> float:
        """Raw-score threshold forming the candidate objects."""
        z = float(F.logit(threshold_raw)) - self.candidate_shift
        return 1.0 / (1.0 + math.exp(-z))

    def predict(self, x: np.ndarray, threads: int = 2) -> np.ndarray:
        """Probability that each object (row of :func:`object_features`) is a change."""
        if len(x) == 0:
            return np.zeros(0, np.float32)
        return np.asarray(self.booster.predict(x, num_threads=threads), np.float32)


def object_model_paths(kind: str, model_dir: Path) -> tuple[Path, Path]:
    """Object model text file and JSON sidecar of a feature set in ``model_dir``."""
    return (model_dir / f"learned_{kind}_objects.txt",
            model_dir / f"learned_{kind}_objects.json")


def load_object_model(kind: str, model_dir: Path) -> ObjectModel | None:
    """The object model of a feature set in ``model_dir``, or None when absent."""
    return _load(kind, Path(model_dir))


@lru_cache(maxsize=8)
def _load(kind: str, model_dir: Path) -> ObjectModel | None:
    txt, js = object_model_paths(kind, model_dir)
    if not (txt.exists() and js.exists()):
        return None
    from .gbm import lgb

    meta = json.loads(js.read_text())
    if tuple(meta["features"]) != tuple(feature_names()):
        raise ValueError(f"feature mismatch between code and object model {txt}: retrain")
    booster = lgb.Booster(model_file=str(txt))
    by_res = sorted((float(m), float(t))
                    for m, t in meta.get("threshold_by_max_res_m", {}).items())
    return ObjectModel(booster, tuple(meta["features"]), float(meta["candidate_shift"]),
                       float(meta["threshold"]), meta, tuple(by_res))


def filter_objects(model: ObjectModel, candidates: np.ndarray, raw: np.ndarray,
                   threshold_raw: float, names: list[str] | tuple[str, ...], stack: np.ndarray,
                   valid: np.ndarray, res_m: float, threads: int = 2) -> np.ndarray:
    """The candidate objects the object model accepts (bool mask)."""
    lab, n = label_objects(candidates)
    if n == 0:
        return candidates & False
    x = object_features(lab, n, raw, threshold_raw, names, stack, valid, res_m)
    keep = np.concatenate([[False], model.predict(x, threads) >= model.threshold_for(res_m)])
    return keep[lab]
