"""Train the learned change detector's models (seeded, reproducible, 2 cores, a few minutes).

    python bench/train_detector.py [--cases DIR] [--out pipeline/models] [--seed 0] [--sets rgb]

For each feature set of ``--sets`` (``rgb``, the default and the shipped one: every case;
``ms``: cases with a NIR band, with RGB-only cases contributing their RGB features and NIR
features missing) it

1. computes the feature stack of every case (:mod:`pipeline.detect.features`) and samples
   labelled pixels, balanced per case (same number of change and no-change pixels) and weighted so
   that each dataset carries the same total weight;
2. runs leave-one-dataset-out: trains on the other datasets, predicts the held-out dataset's full
   images, and keeps the out-of-fold scores;
3. calibrates (Platt scaling on out-of-fold scores, prior-shifted so that 0.5 is the decision
   threshold that maximises macro F1 within each resolution class: up to 4.5 m, 4.5-25 m,
   > 25 m) and reports held-out precision / recall / F1 / IoU / object recall per dataset under two
   protocols (leave-one-dataset-out, and a 3-fold case split with LEVIR crops kept with their
   tiles), where a held-out case's threshold is always chosen on *other* folds' out-of-fold
   scores of its resolution class (:func:`held_out_rows`);
4. trains the final model on every case and writes ``<out>/learned_<set>.txt`` (LightGBM text
   model) and ``learned_<set>.json`` (features, cases, calibration, held-out figures, lineage);
5. (``rgb``, unless ``--no-objects``) trains the object stage (:mod:`pipeline.detect.objects`)
   on *out-of-fold objects* only: each case's decided objects from the fold model that did not
   see it, at that fold model's thresholds (:func:`object_rows`). Per fold, an object model is
   trained on the other folds' objects, its acceptance thresholds chosen (macro F1) by an inner
   cross-validation over those folds (one over all objects, and one per resolution class with
   objects from at least two datasets, :func:`fit_object_model`), and applied to the fold's
   objects (:func:`held_out_objects`, simulated held-out figures printed as ``held-out
   objects``). The shipped object model learns
   from the case-split out-of-fold objects of every case, formed at the shipped thresholds, and
   is written as ``<out>/learned_rgb_objects.{txt,json}`` next to the pixel model.

The shipped models are made by ``python bench/train_detector.py --sets rgb`` (seed 0; the pixel
model is the same with or without the object stage, which only adds its own two files).

With ``--folds DIR`` every fold model of step 2 is saved too, as a loadable model folder
``DIR/<protocol>/<fold>/learned_<set>.{txt,json}`` whose JSON lists its ``test_cases`` and whose
decision thresholds are chosen exactly as in :func:`held_out_rows` (never on its test cases),
with that fold's object model ``learned_rgb_objects.{txt,json}`` (never trained on its test
cases' objects; the other folds' objects come from pixel models that did see them, the same
second-order dependence as the fold's decision thresholds).
``bench/accuracy.py`` runs ``tuban compare`` on each case with the fold model that did not see it
(``TUBAN_MODEL_DIR``): the held-out figures *through the pipeline*.

The ``ms`` (RGB+NIR) set trains too, but is not shipped: held out it scored below the RGB model
(OSCD leave-one-dataset-out F1 0.36 vs 0.49; case split 0.61 vs 0.61-0.63), so RGB+NIR imagery
uses the RGB model (see ``pipeline.detect.learned.OPEN_GROUND_MAX_RES_M``).

The weights derive from LEVIR-CD and OSCD, which are licensed for research use only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accuracy import DEFAULT_CASES, Case, counts, iter_case_dirs, load_case, macro, scores  # noqa: E402

from pipeline.detect import features as F  # noqa: E402
from pipeline.detect import objects as O  # noqa: E402
from pipeline.detect.learned import decide_raw, predict_map  # noqa: E402

PARAMS: dict = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 200,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "num_threads": 2, "verbose": -1, "max_bin": 63,
}
N_ROUNDS = 200
PER_CLASS = 6000
LINEAGE = (
    "Trained on LEVIR-CD (Chen & Shi 2020; Google Earth imagery; academic use only), "
    "OSCD (Daudt et al. 2018; labels research use, Copernicus Sentinel-2 imagery) incl. its "
    "8-bit RGB renderings, and a Landsat ETM+ Taizhou pair (USGS, public domain; labels from "
    "ChenHongruixuan/ChangeDetectionRepository). The weights derive from research-only data: "
    "check the licences before commercial use."
)


def _names(kind: str) -> list[str]:
    roles = ("red", "green", "blue", "nir") if kind == "ms" else ("red", "green", "blue")
    z = np.zeros((len(roles), 8, 8), np.float32)
    return F.compute(z, z, np.ones((8, 8), bool), roles, 10.0, kind=kind)[0]


def case_features(case: Case, kind: str, names: list[str]) -> np.ndarray:
    """Features of a case in ``names`` order; NIR features are NaN for RGB-only cases."""
    has = F.feature_set(case.roles) == "ms"
    got_names, stack = F.compute(case.before, case.after, case.valid, case.roles, case.res_m,
                                 kind="ms" if (kind == "ms" and has) else "rgb")
    out = np.full((len(names), *stack.shape[1:]), np.nan, np.float32)
    pos = {n: i for i, n in enumerate(got_names)}
    for i, n in enumerate(names):
        if n in pos:
            out[i] = stack[pos[n]]
    return out


def sample(case: Case, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices: up to ``PER_CLASS`` change and as many no-change labelled pixels."""
    lab = case.label.ravel()
    ok = case.valid.ravel()
    pos = np.flatnonzero((lab == 1) & ok)
    neg = np.flatnonzero((lab == 0) & ok)
    k = min(PER_CLASS, max(len(pos), 1500))
    out = [rng.choice(neg, min(k, len(neg)), replace=False)]
    if len(pos):
        out.append(rng.choice(pos, min(k, len(pos)), replace=False))
    return np.concatenate(out)


def train(x: np.ndarray, y: np.ndarray, w: np.ndarray, names: list[str],
          seed: int) -> lgb.Booster:
    ds = lgb.Dataset(x, y, weight=w, feature_name=names, free_raw_data=True)
    return lgb.train({**PARAMS, "seed": seed}, ds, N_ROUNDS)


#: pixel sizes (m) each model is offered for by ``method: auto`` (``res_range_m`` in its JSON):
#: the RGB model spans the 0.5-30 m training data; the RGB+NIR model saw NIR only at 10-30 m
RES_RANGE: dict[str, tuple[float, float]] = {"rgb": (0.0, 1e9), "ms": (5.0, 60.0)}
GRID = np.round(np.arange(0.30, 0.96, 0.025), 3)
N_FOLDS = 3
#: resolution classes (upper bound in metres) that get their own decision threshold. The
#: sub-metre class (LEVIR's threshold, and the building network's range) reaches 4.5 m, past
#: PlanetScope's 3-4 m and short of RapidEye's 5 m and the multispectral bands of SPOT 6/7 and
#: GF-1: LEVIR averaged to 2.2 m scored F1 0.168 held out at the 10 m class's threshold, 0.404
#: at LEVIR's (0.594 with the network enlarging it); averaged to 3.3 and 4.4 m, 0-0.12 at the
#: 10 m class's, 0.44-0.57 and 0.26-0.48 per case-split fold at LEVIR's with the network
#: (bench/RESULTS.md). No training imagery lies between 2 and 4.5 m. The 10 m class reaches 25 m,
#: Sentinel-2's 20 m bands with its 10 m ones (Landsat's 30 m beyond): OSCD averaged to 20.15 m
#: scored F1 0.416 (precision 0.276) at the Landsat scene's threshold, 0.517 (0.434) at its own
#: class's. OSCD resampled to 5 m wants its own class's threshold too (it has no detail finer
#: than 10 m). No training imagery lies between 20 and 25 m.
RES_CLASSES: tuple[float, ...] = (4.5, 25.0, 1e9)


def res_class(res_m: float) -> float:
    """Upper bound of the resolution class of ``res_m``."""
    return next(c for c in RES_CLASSES if res_m <= c)


def group_of(case: Case) -> str:
    """Cases cut from the same tile share a group (LEVIR ``test_7`` and ``test_7_0256_0512``)."""
    m = re.match(r"^((?:train|val|test)_\d+)", case.name)
    return f"{case.dataset}/{m.group(1) if m else case.name}"


def lodo_folds(cases: list[Case], eval_sets: set[str]) -> list[tuple[str, list[int]]]:
    """Leave-one-dataset-out: one fold per evaluated dataset."""
    return [(d, [i for i, c in enumerate(cases) if c.dataset == d]) for d in sorted(eval_sets)]


def case_folds(cases: list[Case], eval_sets: set[str],
               seed: int) -> list[tuple[str, list[int]]]:
    """``N_FOLDS`` folds of case groups, each dataset's groups spread over the folds."""
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for d in sorted(eval_sets):
        groups = sorted({group_of(c) for c in cases if c.dataset == d})
        for k, g in enumerate(rng.permutation(groups)):
            fold_of[str(g)] = k % N_FOLDS
    return [(str(k), [i for i, c in enumerate(cases) if fold_of.get(group_of(c)) == k])
            for k in range(N_FOLDS)]


def best_threshold(scored: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]],
                   grid: np.ndarray) -> tuple[float, dict[str, dict[str, float]]]:
    """Raw-score threshold maximising macro F1 over datasets (after the decision clean-up).

    Measured and rejected: macro F0.7 (precision weighted). Through the pipeline it lowered
    held-out F1 (LODO 0.476 -> 0.441) without lifting every dataset's precision to 0.5.
    """
    best, best_rows = float(grid[0]), {}
    best_f = -1.0
    for t in grid:
        rows = _rows(scored, float(t))
        f = macro(rows)["f1"]
        if f > best_f:
            best, best_f, best_rows = float(t), f, rows
    return best, best_rows


def _rows(scored: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]],
          t: float) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, float]] = {}
    for ds, raw, label, valid, res in scored:
        c = counts(decide_raw(raw, valid, res, t), label)
        a = acc.setdefault(ds, {})
        for k, v in c.items():
            a[k] = a.get(k, 0.0) + v
    return {ds: scores(c) for ds, c in acc.items()}


def fold_thresholds(scored: list, fold_of: list[str], fname: str) -> dict[str, float]:
    """Decision threshold per resolution class for fold ``fname``'s model, chosen (macro F1) on
    the out-of-fold scores of the *other* folds of that class (else of all other folds)."""
    rest = [s for s, f in zip(scored, fold_of, strict=True) if f != fname]
    out = {}
    for cls in RES_CLASSES:
        pool = [s for s in rest if res_class(s[4]) == cls] or rest
        out[str(cls)] = best_threshold(pool, GRID)[0]
    return out


def held_out_rows(proto: str, scored: list, fold_of: list[str],
                  eval_sets: set[str]) -> dict[str, dict]:
    """Held-out figures per dataset; no decision threshold is ever chosen on the scored cases.

    The shipped model decides with one threshold per resolution class, so a held-out case's
    threshold is chosen (macro F1) on out-of-fold scores of *other* folds in its resolution
    class (``lodo``: the other datasets of that class, else all other datasets; ``cases``: the
    other case folds of that class, any dataset).
    """
    out: dict[str, dict] = {}
    acc: dict[str, dict[str, float]] = {}
    used: dict[str, list[float]] = {}
    for fname in sorted(set(fold_of)):
        test = [s for s, f in zip(scored, fold_of, strict=True) if f == fname]
        rest = [s for s, f in zip(scored, fold_of, strict=True) if f != fname]
        for cls in sorted({res_class(s[4]) for s in test}):
            part = [s for s in test if res_class(s[4]) == cls]
            pool = [s for s in rest if res_class(s[4]) == cls] or rest
            t = best_threshold(pool, GRID)[0]
            for s in part:
                c = counts(decide_raw(s[1], s[3], s[4], t), s[2])
                a = acc.setdefault(s[0], {})
                for k, v in c.items():
                    a[k] = a.get(k, 0.0) + v
                used.setdefault(s[0], []).append(t)
    src = ("other datasets of the resolution class (else all other datasets)" if proto == "lodo"
           else "other case folds of the resolution class")
    for d in sorted(eval_sets):
        if d in acc:
            out[d] = {**scores(acc[d]), "threshold": float(np.mean(used[d])),
                      "threshold_from": src}
    out["macro"] = macro({k: {m: v for m, v in r.items() if isinstance(v, float)}
                          for k, r in out.items()})
    return out


def platt(raw: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Slope of a weighted 1-D logistic fit on the logit of ``raw``."""
    from sklearn.linear_model import LogisticRegression

    z = np.log(np.clip(raw, 1e-6, 1 - 1e-6) / np.clip(1 - raw, 1e-6, 1)).reshape(-1, 1)
    lr = LogisticRegression(C=10.0).fit(z, y, sample_weight=w)
    return float(lr.coef_[0, 0])


#: object stage (:mod:`pipeline.detect.objects`): LightGBM on per-object features, soft label =
#: share of the object's labelled pixels that are change (cross-entropy), weight = labelled
#: pixels (what pixel F1 counts), each dataset the same total weight
OBJ_PARAMS: dict = {
    "objective": "cross_entropy", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "num_threads": 2, "verbose": -1,
}
OBJ_ROUNDS = 200
#: train (and ship) the object stage by default. Measured through ``bench/accuracy.py``
#: (2026-11-27), macro F1 without -> with: leave-one-dataset-out 0.476 -> 0.477, case split
#: 0.547 -> 0.555 (OSCD 0.588 -> 0.600, OSCD-RGB 0.452 -> 0.470, LEVIR and Landsat unchanged).
#: Rejected alternatives (simulated on out-of-fold objects): a binary ">= 50 % change" label
#: (rejected most true LEVIR objects: macro F1 -0.12 / -0.01), candidates at a lower threshold
#: (logit -0.7: better Landsat, worse OSCD and LEVIR), a component tree over four thresholds,
#: and a logistic model on 6-14 features (unstable across protocols)
OBJECT_STAGE = True
OBJ_GRID = np.round(np.arange(0.02, 0.91, 0.02), 3)
#: a resolution class gets its own object acceptance threshold only with objects from this many
#: datasets (sensors); otherwise the threshold chosen on all objects applies
OBJ_CLASS_MIN_DATASETS = 2
#: candidates are the pixel decision's objects (no lower candidate threshold): the object stage
#: only removes objects
OBJ_CANDIDATE_SHIFT = 0.0


def object_rows(entries: list[tuple[Case, np.ndarray, np.ndarray, float, str]],
                names: list[str]) -> list[dict]:
    """Per case (``(case, feature stack, raw score map, raw threshold, fold)``): the candidate
    objects' features and truth (labelled change / no-change pixels)."""
    rows = []
    for c, st, raw, t, fold in entries:
        tc = 1.0 / (1.0 + np.exp(-(np.log(t / (1 - t)) - OBJ_CANDIDATE_SHIFT)))
        lab, n = O.label_objects(decide_raw(raw, c.valid, c.res_m, float(tc)))
        x = O.object_features(lab, n, raw, t, names, st, c.valid, c.res_m)
        ch, no, _ = O.object_truth(lab, n, c.label)
        rows.append({"ds": c.dataset, "fold": fold, "x": x, "ch": ch, "no": no,
                     "pos": float((c.label == 1).sum()), "cls": res_class(c.res_m)})
    return rows


def _obj_scores(rows: list[dict], accepted: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Pixel precision / recall / F1 per dataset when only the ``accepted`` objects are kept."""
    acc: dict[str, list[float]] = {}
    for r, a in zip(rows, accepted, strict=True):
        z = acc.setdefault(r["ds"], [0.0, 0.0, 0.0])
        z[0] += float(r["ch"][a].sum())
        z[1] += float(r["no"][a].sum())
        z[2] += r["pos"]
    out = {}
    for ds, (tp, fp, pos) in acc.items():
        pr = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / pos if pos else 0.0
        out[ds] = {"precision": pr, "recall": rc, "f1": 2 * pr * rc / (pr + rc) if pr + rc else 0.0}
    return out


def train_objects(rows: list[dict], seed: int) -> lgb.Booster | None:
    """Object model on ``rows`` (soft labels, pixel weights, datasets weighted equally); None
    when they hold no object (nothing to learn: every object is then accepted)."""
    if not any(len(r["x"]) for r in rows):
        return None
    x = np.concatenate([r["x"] for r in rows])
    y = np.concatenate([r["ch"] / np.maximum(r["ch"] + r["no"], 1e-9) for r in rows])
    ds = np.concatenate([np.full(len(r["ch"]), r["ds"], object) for r in rows])
    w = np.maximum(np.concatenate([r["ch"] + r["no"] for r in rows]), 1.0)
    sets = sorted(set(ds))
    for d in sets:
        m = ds == d
        w[m] *= len(w) / (len(sets) * w[m].sum())
    data = lgb.Dataset(x, y, weight=w, feature_name=O.feature_names(), free_raw_data=True)
    return lgb.train({**OBJ_PARAMS, "seed": seed}, data, OBJ_ROUNDS)


def _predict_rows(booster: lgb.Booster | None, rows: list[dict]) -> list[np.ndarray]:
    if booster is None:  # no object model: the pixel decision stands
        return [np.ones(len(r["x"])) for r in rows]
    return [booster.predict(r["x"], num_threads=2) if len(r["x"]) else np.zeros(0)
            for r in rows]


def fit_object_model(rows: list[dict],
                     seed: int) -> tuple[lgb.Booster | None, dict[str, float]]:
    """Object model on ``rows`` and its acceptance thresholds: ``"all"``, the macro-F1-best
    threshold on out-of-fold predictions (inner cross-validation over ``rows``' own folds) of
    every object, and one per resolution class whose objects come from at least
    :data:`OBJ_CLASS_MIN_DATASETS` datasets (chosen on that class's objects only). A threshold
    chosen on one dataset is tuned to that sensor: held out under leave-one-dataset-out, the
    2.5-25 m class chosen on OSCD alone cut OSCD-RGB recall from 0.31 to 0.11 (simulated)."""
    folds = sorted({r["fold"] for r in rows})
    probs: list[np.ndarray] = [np.zeros(0)] * len(rows)
    for g in folds if len(folds) > 1 else []:
        b = train_objects([r for r in rows if r["fold"] != g], seed)
        for i, r in enumerate(rows):
            if r["fold"] == g:
                probs[i] = _predict_rows(b, [r])[0]
    booster = train_objects(rows, seed)
    if len(folds) <= 1:
        probs = _predict_rows(booster, rows)
    out = {"all": _best_object_threshold(rows, probs)}
    for cls in RES_CLASSES:
        part = [i for i, r in enumerate(rows) if r["cls"] == cls]
        if len({rows[i]["ds"] for i in part}) >= OBJ_CLASS_MIN_DATASETS:
            out[str(cls)] = _best_object_threshold([rows[i] for i in part],
                                                   [probs[i] for i in part])
    return booster, out


def _best_object_threshold(rows: list[dict], probs: list[np.ndarray]) -> float:
    best, best_f = float(OBJ_GRID[0]), -1.0
    for t in OBJ_GRID:
        sc = _obj_scores(rows, [p >= t for p in probs])
        f = float(np.mean([v["f1"] for v in sc.values()]))
        if f > best_f + 1e-9:
            best, best_f = float(t), f
    return best


def save_object_model(d: Path, kind: str, booster: lgb.Booster, thresholds: dict[str, float],
                      extra: dict) -> None:
    """Write ``learned_<kind>_objects.{txt,json}`` (loaded by :mod:`pipeline.detect.objects`)."""
    d.mkdir(parents=True, exist_ok=True)
    txt, js = O.object_model_paths(kind, d)
    booster.save_model(str(txt))
    meta = {"name": txt.stem, "model": txt.name, "format": "lightgbm-text",
            "lightgbm": lgb.__version__, "features": O.feature_names(),
            "candidate_shift": OBJ_CANDIDATE_SHIFT, "threshold": thresholds["all"],
            "threshold_by_max_res_m": {k: v for k, v in thresholds.items() if k != "all"},
            "threshold_note": "acceptance threshold of the finest class whose max_res_m >= "
                              "the pixel size, chosen (macro F1 over the datasets of the "
                              "class) on out-of-fold objects of that class; 'threshold' "
                              "(all objects) for pixel sizes outside every class",
            "positive": "soft label: share of the object's labelled pixels that are change",
            "params": {**OBJ_PARAMS, "num_boost_round": OBJ_ROUNDS}, **extra,
            "licence": "weights derived from research-only datasets (LEVIR-CD, OSCD)"}
    js.write_text(json.dumps(meta, indent=1))


def held_out_objects(rows: list[dict], seed: int) -> tuple[dict[str, dict], dict]:
    """Per fold: an object model trained on the *other* folds' out-of-fold objects (its
    threshold by inner cross-validation over those folds), applied to the fold's objects.
    Returns held-out figures per dataset (pixels, simulated from the objects) and the models."""
    models, accepted = {}, [np.zeros(0, bool)] * len(rows)
    for f in sorted({r["fold"] for r in rows}):
        b, ts = fit_object_model([r for r in rows if r["fold"] != f], seed)
        models[f] = (b, ts)
        for i, r in enumerate(rows):
            if r["fold"] == f:
                accepted[i] = _predict_rows(b, [r])[0] >= ts.get(str(r["cls"]), ts["all"])
    sc = _obj_scores(rows, accepted)
    sc["macro"] = {k: float(np.mean([v[k] for v in sc.values()])) for k in ("precision",
                                                                           "recall", "f1")}
    return sc, models


def protocol_objects(kind: str, proto: str, entries: list, names: list[str], seed: int,
                     held_obj: dict[str, dict]) -> dict:
    """Fold object models of a protocol (:func:`held_out_objects`); figures into
    ``held_obj[proto]``."""
    held_obj[proto], models = held_out_objects(object_rows(entries, names), seed)
    for d, r in held_obj[proto].items():
        print(f"[{kind}] {proto} held-out objects {d:<9} P {r['precision']:.3f} "
              f"R {r['recall']:.3f} F1 {r['f1']:.3f}", flush=True)
    return models


def ship_objects(out: Path, kind: str, entries: list | None, names: list[str], seed: int,
                 meta: dict, held_obj: dict[str, dict]) -> None:
    """Train and write the shipped object model (``entries`` None: remove any old one)."""
    for stale in O.object_model_paths(kind, out):
        stale.unlink(missing_ok=True)
    if entries is None:
        return
    b, ts = fit_object_model(object_rows(entries, names), seed)
    if b is None:
        print(f"[{kind}] no candidate objects: no object model", flush=True)
        return
    save_object_model(out, kind, b, ts, {
        "training_cases": meta["training_cases"],
        "trained_on": "case-split out-of-fold objects of every case, at the shipped pixel "
                      "thresholds; threshold by cross-validation over the case folds",
        "held_out": held_obj.get("lodo"), "held_out_cases": held_obj.get("cases"),
        "held_out_protocol": "pixel figures simulated from out-of-fold objects; a fold's "
                             "object model is trained on the other folds' objects only",
        "seed": seed})
    print(f"[{kind}] wrote object model (thresholds {ts})", flush=True)


def run(kind: str, cases: list[Case], out: Path, seed: int, dump: Path | None = None,
        folds_dir: Path | None = None, objects: bool = False) -> dict:
    names = _names(kind)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    use = cases  # for "ms", RGB-only cases contribute with their NIR features missing
    stacks, xs, ys, ws, dss = [], [], [], [], []
    n_per_ds = {}
    for c in use:
        n_per_ds[c.dataset] = n_per_ds.get(c.dataset, 0) + 1
    for c in use:
        st = case_features(c, kind, names)
        idx = sample(c, rng)
        xs.append(st.reshape(len(names), -1)[:, idx].T)
        ys.append((c.label.ravel()[idx] == 1).astype(np.float32))
        ws.append(np.full(len(idx), 1e4 / (len(idx) * n_per_ds[c.dataset]), np.float32))
        dss.append(np.full(len(idx), c.dataset, object))
        stacks.append(st)
    x, y, w, ds = (np.concatenate(v) for v in (xs, ys, ws, dss))
    t_feat = time.perf_counter() - t0
    print(f"[{kind}] {len(names)} features, {len(y)} samples from {len(use)} cases "
          f"({t_feat:.0f}s)", flush=True)

    eval_sets = {d for d in n_per_ds if kind == "rgb" or d in ("oscd", "landsat")}
    case_ids = np.concatenate([np.full(len(v), i) for i, v in enumerate(ys)])
    protocols = {"lodo": lodo_folds(use, eval_sets), "cases": case_folds(use, eval_sets, seed)}
    held: dict[str, dict] = {}
    held_obj: dict[str, dict] = {}
    thresholds: dict[str, float] = {}
    slope = 1.0
    for proto, folds in protocols.items():
        scored, oof, fold_of, scored_idx = [], [], [], []
        fold_models: dict[str, tuple[lgb.Booster, list[int]]] = {}
        for fname, test in folds:
            m = ~np.isin(case_ids, test)
            booster = train(x[m], y[m], w[m], names, seed)
            fold_models[fname] = (booster, test)
            for i in test:
                c, st = use[i], stacks[i]
                raw = predict_map(booster, st, c.valid, c.res_m)
                scored.append((c.dataset, raw, c.label, c.valid, c.res_m))
                fold_of.append(fname)
                scored_idx.append(i)
            oof.append((booster.predict(x[~m], num_threads=2), y[~m], w[~m]))
            print(f"[{kind}] {proto} fold {fname} done ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
        if dump is not None:
            np.savez_compressed(dump / f"oof_{kind}_{proto}.npz", **{
                f"{i}|{d}|{res}": np.stack([raw, label.astype(float), valid.astype(float)])
                for i, (d, raw, label, valid, res) in enumerate(scored)})
        fth = {f: fold_thresholds(scored, fold_of, f) for f in fold_models}
        # out-of-fold objects: each case's candidates from the fold model that did not see
        # it, at that fold model's threshold; fold f's object model never sees fold f
        obj_models = protocol_objects(
            kind, proto, [(use[i], stacks[i], s[1], fth[f][str(res_class(s[4]))], f)
                          for i, s, f in zip(scored_idx, scored, fold_of, strict=True)],
            names, seed, held_obj) if objects else {}
        if folds_dir is not None:
            for i, (fname, (booster, test)) in enumerate(fold_models.items()):
                other = [o for j, o in enumerate(oof) if j != i]
                save_fold_objects(folds_dir / proto / fname, kind, obj_models.get(fname),
                                  proto, [use[k] for k in test])
                save_fold(folds_dir / proto / fname, kind, booster, names, fth[fname],
                          platt(*(np.concatenate(v) for v in zip(*other, strict=True))),
                          [use[k] for k in test], [c for k, c in enumerate(use) if k not in test],
                          proto, seed)
        t_all, rows_all = best_threshold(scored, GRID)
        rows = held_out_rows(proto, scored, fold_of, eval_sets)
        held[proto] = rows
        for d, r in rows.items():
            print(f"[{kind}] {proto} held-out {d:<9} P {r['precision']:.3f} "
                  f"R {r['recall']:.3f} F1 {r['f1']:.3f} IoU {r['iou']:.3f} "
                  f"objR {r['object_recall']:.3f}  t {r.get('threshold', '')}")
        print(f"[{kind}] {proto}: best single threshold {t_all} (out-of-fold macro F1 "
              f"{macro(rows_all)['f1']:.3f})", flush=True)
        if proto == "cases":  # calibrate per resolution class on the within-domain scores
            cases_scored, cases_fold_of, cases_idx = scored, fold_of, scored_idx
            for cls in RES_CLASSES:
                pool = [s for s in scored if res_class(s[4]) == cls]
                if pool:
                    thresholds[str(cls)] = best_threshold(pool, GRID)[0]
            slope = platt(*(np.concatenate(v) for v in zip(*oof, strict=True)))

    booster = train(x, y, w, names, seed)
    t_train = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / f"learned_{kind}.txt"
    booster.save_model(str(model_path))
    meta = {
        "name": f"learned_{kind}", "model": model_path.name, "format": "lightgbm-text",
        "lightgbm": lgb.__version__, "features": names, "feature_set": kind,
        "calibration": {"method": "platt-prior-shift",
                        "threshold_raw_by_max_res_m": thresholds,
                        "slope": slope,
                        "note": "p = sigmoid(slope * (logit(raw) - logit(t))), t = threshold of "
                                "the finest class whose max_res_m >= res_m: "
                                "Platt slope on case-split out-of-fold scores, prior-shifted "
                                "so that 0.5 is the macro-F1-optimal decision threshold of "
                                "each resolution class (case-split out-of-fold scores; the "
                                "> 25 m class rests on one Landsat scene)"},
        "res_range_m": list(RES_RANGE[kind]),
        "training_cases": [f"{c.dataset}/{c.path.name}" for c in use],
        "held_out": held["lodo"], "held_out_cases": held["cases"],
        "held_out_protocol": "held_out: leave-one-dataset-out; held_out_cases: 3-fold split "
                             "by case (crops grouped with their tiles) within each dataset. "
                             "Decision threshold of a held-out case chosen on other folds' "
                             "out-of-fold scores of its resolution class (lodo: other "
                             "datasets of the class, else all other datasets); pixels pooled "
                             "per dataset; object recall at 50 % cover",
        "params": {**PARAMS, "num_boost_round": N_ROUNDS, "per_class": PER_CLASS, "seed": seed},
        "train_seconds": round(t_train, 1), "lineage": LINEAGE,
        "licence": "weights derived from research-only datasets (LEVIR-CD, OSCD)",
    }
    (out / f"learned_{kind}.json").write_text(json.dumps(meta, indent=1))
    # shipped object model: every case's case-split out-of-fold objects, formed at the
    # shipped thresholds; its acceptance thresholds by cross-validation over the case folds
    ship_objects(out, kind, [(use[i], stacks[i], s[1], thresholds[str(res_class(s[4]))], f)
                             for i, s, f in zip(cases_idx, cases_scored, cases_fold_of,
                                                strict=True)] if objects else None,
                 names, seed, meta, held_obj)
    print(f"[{kind}] wrote {model_path} ({model_path.stat().st_size / 1e6:.2f} MB) "
          f"in {t_train:.0f}s", flush=True)
    return meta


def save_fold_objects(d: Path, kind: str,
                      model: tuple[lgb.Booster | None, dict[str, float]] | None, proto: str,
                      test: list[Case]) -> None:
    """Write (or, without the object stage or any object to learn from, remove) a fold's
    object model."""
    if model is None or model[0] is None:
        for stale in O.object_model_paths(kind, d):
            stale.unlink(missing_ok=True)
        return
    save_object_model(d, kind, model[0], model[1], {
        "protocol": proto, "test_cases": [f"{c.dataset}/{c.path.name}" for c in test],
        "trained_on": "out-of-fold objects of the other folds' cases"})


def save_fold(d: Path, kind: str, booster: lgb.Booster, names: list[str],
              thresholds: dict[str, float], slope: float, test: list[Case], train_cases: list[Case],
              proto: str, seed: int) -> None:
    """Write a fold model as a model folder the learned detector can load."""
    d.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(d / f"learned_{kind}.txt"))
    meta = {
        "name": f"learned_{kind}", "model": f"learned_{kind}.txt", "format": "lightgbm-text",
        "feature_set": kind, "features": names, "res_range_m": list(RES_RANGE[kind]),
        "calibration": {"method": "platt-prior-shift", "threshold_raw_by_max_res_m": thresholds,
                        "slope": slope,
                        "note": "thresholds and slope from the other folds' out-of-fold scores"},
        "protocol": proto, "test_cases": [f"{c.dataset}/{c.path.name}" for c in test],
        "training_cases": [f"{c.dataset}/{c.path.name}" for c in train_cases],
        "params": {**PARAMS, "num_boost_round": N_ROUNDS, "per_class": PER_CLASS, "seed": seed},
        "licence": "weights derived from research-only datasets (LEVIR-CD, OSCD)",
    }
    (d / f"learned_{kind}.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "pipeline" / "models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", default="rgb",
                    help="feature sets, comma-separated: rgb (shipped), ms (RGB+NIR, not "
                         "shipped: written into --out, it would take over RGB+NIR imagery)")
    ap.add_argument("--dump", type=Path, help="save out-of-fold score maps here (npz)")
    ap.add_argument("--objects", action=argparse.BooleanOptionalAction, default=OBJECT_STAGE,
                    help="also train the object stage (pipeline.detect.objects)")
    ap.add_argument("--folds", type=Path,
                    help="also save every fold model as DIR/<protocol>/<fold>/ (see above)")
    args = ap.parse_args(argv)
    cases = [load_case(p) for p in iter_case_dirs(args.cases)]
    for kind in args.sets.split(","):
        run(kind, cases, args.out, args.seed, args.dump, args.folds,
            objects=args.objects and kind == "rgb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
