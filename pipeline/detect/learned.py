"""Learned change detector: gradient boosting on multi-scale per-pixel features.

The model files live in :mod:`pipeline.models` (LightGBM text models plus a JSON sidecar with
the feature list, calibration and held-out figures); ``bench/train_detector.py`` makes them.
An optional object stage (:mod:`pipeline.detect.objects`) accepts or rejects each decided object
when its model file ``learned_<set>_objects.{txt,json}`` is in the same model folder.
The weights derive from LEVIR-CD and OSCD, which are licensed for research use only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import cnn as C
from . import features as F
from . import objects as O

#: the shipped models
MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
#: environment variable naming another model folder (e.g. a held-out fold's models in
#: ``bench/accuracy.py``); unset or empty: :data:`MODEL_DIR`
MODEL_DIR_ENV = "TUBAN_MODEL_DIR"
#: smallest change object kept by :func:`decide`, in m², and at least ``MIN_OBJECT_PX`` pixels:
#: the 3×3 footprint of the score's smoothing at 1 m and coarser (:func:`smooth_score`), below
#: which an object is one pixel's response (binding above 1.5 m: 36 m² at 2 m, 900 m² at 10 m).
#: The objects it drops at 10 m were mostly false: held out (case split, retrained), OSCD-RGB
#: precision 0.500 -> 0.527 and F1 0.479 -> 0.488; Landsat F1 0.753 -> 0.748
MIN_OBJECT_M2 = 20.0
MIN_OBJECT_PX = 9
#: ``change`` on pixels of objects the model decides are changed (at least; the calibrated
#: probability where higher) and elsewhere (at most): above / below the classifier's hysteresis
#: seed and growth levels (``pipeline.classify.P_SEED`` 0.8, ``P_GROW`` 0.4), so that
#: ``tuban compare`` reports exactly the decided objects (held-out figures are measured on them)
P_DECIDED, P_UNDECIDED = 0.85, 0.35
#: object context (metres, capped in pixels) kept around a block for the classifier
CONTEXT_M = 48.0
MAX_CONTEXT_PX = 64
#: context each side (the network's working pixels) for its output to match a whole-image run
NET_CONTEXT_PX = 24
#: finest pixel size the models learned from (LEVIR-CD). Finer imagery (aerial, drone) is
#: averaged down to about it by an integer factor (:func:`work_factor`) and the decisions
#: brought back by nearest neighbour: the features' neighbourhoods are clamped in pixels and the
#: network starts at 0.25 m, so LEVIR resampled to 0.125 m scored F1 0.223 as it was (held
#: out, case split), 0.718 on cells (0.710 at its own 0.5 m)
WORK_RES_M = 0.5
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


def calibrate(raw: np.ndarray, threshold_raw: float, slope: float) -> np.ndarray:
    """``sigmoid(slope * (logit(raw) - logit(threshold_raw)))`` as float32."""
    z = slope * (F.logit(raw) - F.logit(threshold_raw))
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def resolve_model_dir(override: Path | str | None = None) -> Path:
    """The model folder: ``override``, else ``$TUBAN_MODEL_DIR``, else :data:`MODEL_DIR`."""
    if override is not None:
        return Path(override)
    env = os.environ.get(MODEL_DIR_ENV, "").strip()
    return Path(env) if env else MODEL_DIR


def model_paths(kind: str, model_dir: Path | None = None) -> tuple[Path, Path]:
    """Model text file and JSON sidecar of a feature set (in :func:`resolve_model_dir`)."""
    d = resolve_model_dir(model_dir)
    return d / f"learned_{kind}.txt", d / f"learned_{kind}.json"



def default_threads() -> int:
    """Threads for LightGBM and the network: ``OMP_NUM_THREADS`` where set (1 on tuban's block
    workers, whose pool is the parallelism: two workers of two threads each on two cores were
    1.13x slower on a 4000² RGB pair), else 2."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return 2


#: Imagery up to this pixel size (aerial, GF-2, Jilin-1, GF-1/GF-6 at 2 m, PlanetScope): the
#: RGB model (NIR ignored) and its network decide, and inside forest, farmland and ecological
#: land the spectral detector's change joins theirs (``open_ground``,
#: :class:`pipeline.detect.registry._WithEvidence`), from NDVI with a NIR band, else from
#: excess green: there tomb clearings and soil on farmland are the finding too, which the RGB
#: model, trained on buildings, passes over. Measured in bench/RESULTS.md (Real imagery): on
#: the sample scene averaged to 1-4 m, with and without NIR, it finds 7-10 of 10 tomb
#: clearings and 5 of 5 occupations (0-4 and 0-4 without); on LEVIR held out, with the whole
#: case declared farmland, F1 0.568 (P 0.480, R 0.697) against 0.420 with the pixel model's
#: own decision there and 0.181 with the spectral detector's alone. The bound is the models'
#: fine regime's (their threshold class and the network end at 4.5 m); coarser imagery
#: (Sentinel-2) gets the RGB model alone. The spectral detector
#: no longer decides on its own by default: through ``tuban compare`` on the real cases
#: (bench/accuracy.py, spectral run) it scores below the textbook reference on every dataset
#: (macro F1 0.229 vs 0.374; LEVIR 0.152, OSCD with its NIR band 0.136), where the RGB model
#: scores 0.660 held out.
OPEN_GROUND_MAX_RES_M = 4.5


def _res_range(kind: str, model_dir: Path) -> tuple[float, float]:
    """Pixel sizes (m) a model is meant for: its JSON ``res_range_m``, default any."""
    try:
        meta = json.loads(model_paths(kind, model_dir)[1].read_text())
        lo, hi = meta.get("res_range_m", (0.0, math.inf))
        return float(lo), float(hi)
    except (OSError, ValueError, TypeError):
        return 0.0, math.inf


def _kind_for(roles: tuple[str, ...], model_dir: Path | None, res_m: float | None = None,
              exact: bool = False) -> str | None:
    """Model feature set for these bands and pixel size, or None: RGB+NIR imagery takes the
    RGB+NIR model when one ships, else the RGB model (its NIR ignored). ``exact``
    (``method: auto``): only a model trained for this pixel size (its ``res_range_m``).
    """
    model_dir = resolve_model_dir(model_dir)
    try:
        kind = F.feature_set(roles)
    except ValueError:
        return None
    order: tuple[str, ...] = ("rgb",) if kind == "rgb" else ("ms", "rgb")
    for k in order:
        if not all(p.exists() for p in model_paths(k, model_dir)):
            continue
        if exact and res_m is not None:
            lo, hi = _res_range(k, model_dir)
            if not lo <= res_m <= hi:
                continue
        return k
    return None


def has_model(roles: Sequence[str], res_m: float | None = None,
              model_dir: Path | None = None, exact: bool = False) -> bool:
    """True when a model for these band roles ships (red, green and blue are needed).

    ``exact`` (what ``method: auto`` uses): only a model made for exactly this feature set and
    pixel size counts (see :func:`_kind_for`).
    """
    return _kind_for(tuple(roles), model_dir, res_m, exact) is not None


def load_model(kind: str, model_dir: Path | None = None) -> Model:
    """Load (once per folder) the LightGBM model of a feature set."""
    return _load_model(kind, resolve_model_dir(model_dir))


@lru_cache(maxsize=8)
def _load_model(kind: str, model_dir: Path) -> Model:
    from .gbm import lgb

    txt, js = model_paths(kind, model_dir)
    meta = json.loads(js.read_text())
    booster = lgb.Booster(model_file=str(txt))
    cal = meta["calibration"]
    ts = sorted((float(m), float(t)) for m, t in cal["threshold_raw_by_max_res_m"].items())
    return Model(booster, tuple(meta["features"]), tuple(ts), float(cal["slope"]), meta)


#: LightGBM prediction early stop: a pixel whose margin already exceeds 5 (p < 0.007 or
#: > 0.993) after a multiple of 10 trees skips the rest. 1.6x faster on real scenes (most pixels
#: are clearly unchanged); on OSCD-RGB Hong Kong 13 of 375 300 pixels change side at 0.85.
PRED_EARLY_STOP: dict[str, Any] = {"pred_early_stop": True, "pred_early_stop_freq": 10,
                                   "pred_early_stop_margin": 5.0}


#: pixels per LightGBM call: the row-major copy of the features it needs is this many rows
#: (about 50 MB), not the whole block's (a 1300² block held 340 MB more at its peak)
PRED_CHUNK_PX = 1 << 18


def work_factor(res_m: float | None) -> int:
    """Integer factor that brings imagery finer than :data:`WORK_RES_M` to about it (1: as is)."""
    return 1 if res_m is None or res_m >= WORK_RES_M else C.factor(res_m, WORK_RES_M)


def down_masked(x: np.ndarray, valid: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bands, h, w)`` averaged over ``f``×``f`` cells from their valid pixels only, and the
    cells at least half valid (edges padded by reflection, as :func:`.cnn.downsample`)."""
    w = C.downsample(valid.astype(np.float32), f)
    s = C.downsample(np.where(valid, np.nan_to_num(x.astype(np.float32)), 0.0), f)
    return (s / np.maximum(w, 1e-6)).astype(np.float32), w >= 0.5


def up_nearest(x: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Each cell of ``x`` repeated ``f``×``f`` times, cut to ``shape``."""
    return np.repeat(np.repeat(x, f, -2), f, -1)[..., : shape[0], : shape[1]]


def to_cells(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
             f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both dates on ``f``×``f`` cells (:func:`down_masked`) and the cells at least half valid."""
    b, v = down_masked(before, valid, f)
    return b, down_masked(after, valid, f)[0], v


def from_cells(layers: Mapping[str, np.ndarray], f: int,
               valid: np.ndarray) -> dict[str, np.ndarray]:
    """Layers computed on ``f``×``f`` cells back on the pixels (:func:`up_nearest`); the
    decisions (``change``, ``change_any``) 0 where a pixel is not valid."""
    out = {}
    for k, x in layers.items():
        up = up_nearest(x, f, valid.shape)
        out[k] = (np.where(valid, up, 0.0).astype(np.float32)
                  if k in ("change", "change_any") else up)
    return out


def predict_stride(res_m: float) -> int:
    """Pixel stride of the model evaluation: where the fine neighbourhood spans 3 px or more a
    side (up to 1.2 m), imagery is scored on every second pixel and filled in, 4x fewer model
    calls. LEVIR at 1 m, held out: F1 0.678 against 0.681 pixel by pixel; 4000² at 1 m with
    the RGB model: 27 -> 21 s."""
    return 2 if F.scales_for(res_m).r1 >= 3 else 1


def predict_map(booster: Any, stack: np.ndarray, valid: np.ndarray, res_m: float,
                threads: int = 2) -> np.ndarray:
    """Raw model score per pixel (0 where not valid), smoothed by :func:`smooth_score`."""
    h, w = valid.shape
    k = predict_stride(res_m)
    sub_valid = valid[::k, ::k]
    sub = np.zeros(sub_valid.shape, np.float32)
    rows, cols = np.nonzero(sub_valid)
    for s in range(0, rows.size, PRED_CHUNK_PX):  # row-major copies of a bounded size
        r, c = rows[s:s + PRED_CHUNK_PX], cols[s:s + PRED_CHUNK_PX]
        x = np.ascontiguousarray(stack[:, r * k, c * k].T)
        sub[r, c] = booster.predict(x, num_threads=threads, **PRED_EARLY_STOP)
    raw = up_nearest(sub, k, (h, w)) if k > 1 else sub
    sub_mask = up_nearest(sub_valid, k, (h, w)) & valid
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
    """The decided objects in :class:`LearnedDetector`'s ``change`` (``>= 0.5``)."""
    return decide_raw(change, valid, res_m, 0.5)


def _as_change(decided: np.ndarray, p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The ``change`` layer: the model's decision is final. Decided objects become seeds of
    the classifier's hysteresis (>= P_DECIDED) and nothing else grows into them."""
    out = np.where(decided, np.maximum(p, P_DECIDED), np.minimum(p, P_UNDECIDED))
    return np.where(valid, out, 0.0).astype(np.float32)


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
        medians: optional scene medians of the ``*_rel`` features' bases
            (:func:`pipeline.detect.features.scene_medians`, from :meth:`median_samples` of
            sample windows); default: per block.
        threads: LightGBM and network threads; default :func:`default_threads`.
        model_dir: where the models are (default: :func:`resolve_model_dir`, i.e.
            ``$TUBAN_MODEL_DIR`` or the shipped :data:`MODEL_DIR`).
        exact: use only a model trained for this pixel size; what ``method: auto`` asks for.
        objects: apply the object stage (:mod:`pipeline.detect.objects`) when its model file
            ``learned_<set>_objects.*`` is in the model folder; False: pixel decision only.
        network: on RGB imagery within the range of a network in the model folder
            (:mod:`pipeline.detect.cnn`, ``cnn_<name>.onnx``), add its vote to the pixel
            model's margin and decide on the sum; the decision without it (object stage
            included) is returned too, as ``change_any``.

    Imagery finer than :data:`WORK_RES_M` is detected on cells of :attr:`work_factor` pixels a
    side; blocks should start at multiples of :attr:`block_multiple` pixels.
    """

    def __init__(self, roles: Sequence[str] | None = None, res_m: float | None = None, *,
                 stretch: tuple[np.ndarray, np.ndarray] | None = None,
                 medians: Mapping[str, float] | None = None, threads: int | None = None,
                 model_dir: Path | None = None, exact: bool = False,
                 objects: bool = True, network: bool = True) -> None:
        model_dir = resolve_model_dir(model_dir)
        threads = threads or default_threads()
        #: imagery finer than :data:`WORK_RES_M` is detected on cells of this many pixels
        self.work_factor = work_factor(res_m)
        r = (0.1 if res_m is None else float(res_m)) * self.work_factor
        #: context pixels each side: the feature neighbourhoods plus object context for classify
        halo = max(F.halo_px(r), min(MAX_CONTEXT_PX, math.ceil(CONTEXT_M / r)))
        net = C.net_for(model_dir, r, threads) if network else None
        #: blocks that start at multiples of this many pixels average the same cells and pool
        #: on the same lattice as a whole-image pass (see :func:`pipeline.batch.detect_pair`)
        self.block_multiple = self.work_factor
        if net is not None:  # and the network's, in its working pixels
            halo = max(halo, NET_CONTEXT_PX * C.factor(r, net.coarsest_m()))
            self.block_multiple *= net.multiple * math.lcm(
                *(C.factor(r, net.work_res_m * s) for s in net.scales))
        self.halo = halo * self.work_factor
        if roles is not None and not has_model(roles, res_m, model_dir, exact):
            raise FileNotFoundError(f"no learned model for band roles {tuple(roles)} in "
                                    f"{model_dir}; use the spectral detector")
        self.stretch = stretch
        self.medians = dict(medians) if medians else None
        self.threads = threads
        self.model_dir = model_dir
        self.exact = exact
        self.objects = objects
        self.network = network

    def model_files(self, roles: Sequence[str], res_m: float) -> list[Path]:
        """The model files this detector uses on imagery with these bands and pixel size."""
        kind = _kind_for(tuple(roles), self.model_dir, res_m, self.exact)
        if kind is None:
            return []
        files = [model_paths(kind, self.model_dir)[0]]
        obj = O.object_model_paths(kind, self.model_dir)[0]
        if self.objects and obj.exists():
            files.append(obj)
        net = (C.net_for(self.model_dir, res_m * work_factor(res_m), self.threads)
               if self.network else None)
        if kind == "rgb" and net is not None and net.path is not None:
            files.append(net.path)
        return files

    def _kind(self, roles: tuple[str, ...], res_m: float) -> str:
        kind = _kind_for(roles, self.model_dir, res_m, self.exact)
        if kind is None:
            raise FileNotFoundError(f"no learned model for band roles {roles} in "
                                    f"{self.model_dir}; use the spectral detector")
        return kind

    def median_samples(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                       roles: tuple[str, ...], res_m: float, keep: np.ndarray | None = None,
                       threads: int = 1) -> dict[str, np.ndarray]:
        """One sample window's share of the scene medians (see ``medians``), at the pixels
        ``keep`` when given (on up to ``threads`` threads)."""
        roles = tuple(roles)
        f = work_factor(res_m)
        if f > 1:
            if keep is not None:  # the cells holding a kept pixel
                keep = C.downsample(keep.astype(np.float32), f) > 0
            before, after, valid = to_cells(before, after, valid, f)
        return F.median_samples(before, after, valid, roles, res_m * f,
                                kind=self._kind(roles, res_m), stretch=self.stretch, keep=keep,
                                threads=threads)

    def __call__(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        roles = tuple(roles)
        f = work_factor(res_m)
        if f == 1:
            return self._detect(before, after, valid, roles, res_m)
        # on f×f cells; the spectral evidence (vegetation, brightness) stays per pixel
        cells = to_cells(before, after, valid, f)
        out = from_cells(self._detect(*cells, roles, res_m * f, evidence=False), f, valid)
        return {**out, **spectral_evidence(before, after, valid, roles)}

    def evidence(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        """What ``__call__`` returns but the decision: the spectral evidence, per pixel at any
        work factor; no model runs (a replay of stored decisions, ``tuban classify``)."""
        return spectral_evidence(before, after, valid, tuple(roles))

    def _detect(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                roles: tuple[str, ...], res_m: float, evidence: bool = True,
                ) -> dict[str, np.ndarray]:
        kind = self._kind(roles, res_m)
        model = load_model(kind, self.model_dir)
        names, stack = F.compute(before, after, valid, roles, res_m, kind=kind,
                                 stretch=self.stretch, medians=self.medians)
        if tuple(names) != model.features:
            raise ValueError(f"feature mismatch between code and model {kind}: retrain")
        h, w = valid.shape
        change = np.zeros((h, w), np.float32)
        extra: dict[str, np.ndarray] = {}
        if valid.any():
            raw = predict_map(model.booster, stack, valid, res_m, self.threads)
            p = model.calibrate(raw, res_m)
            t = model.threshold_raw(res_m)
            obj = O.load_object_model(kind, self.model_dir) if self.objects else None
            if obj is None:
                decided = decide_raw(raw, valid, res_m, t)
            else:  # object stage: candidates, each accepted or rejected as a whole
                cand = decide_raw(raw, valid, res_m, obj.candidate_threshold(t))
                decided = O.filter_objects(obj, cand, raw, t, names, stack, valid, res_m,
                                           self.threads)
            change = _as_change(decided, p, valid)
            del stack  # the features (4 bytes each per pixel) are not needed past here
            net = (C.net_for(self.model_dir, res_m, self.threads)
                   if self.network and kind == "rgb" else None)
            if net is not None:
                # shape and context from the network, added to the pixel model's margin; the
                # pixel model's own decision stays as change_any, which classify reads inside
                # forest, farmland and ecological land (registry._WithEvidence replaces it by
                # the final decision joined by the spectral detector's, up to 4.5 m)
                rgb = [roles.index(r) for r in F.RGB]
                st = None if self.stretch is None else (self.stretch[0][rgb],
                                                        self.stretch[1][rgb])
                z = (F.logit(raw) - F.logit(t)
                     + net.vote(before[rgb], after[rgb], valid, res_m, st))
                extra["change_any"] = change
                change = _as_change(decide_raw(z, valid, res_m, 0.0), _sigmoid(z), valid)
        ev = spectral_evidence(before, after, valid, roles) if evidence else {}
        return {"change": change.astype(np.float32), **extra, **ev}

