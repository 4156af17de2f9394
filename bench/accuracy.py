"""Accuracy of tuban's change detection on the labelled real cases.

For every case ``<cases>/<dataset>/<case>/{before,after,label}.tif`` this runs
``tuban compare BEFORE AFTER -o OUT`` (default) or calls the detector directly on arrays
(``--direct``), rasterizes ``patches.geojson`` back onto ``label.tif``'s grid, and scores the
labelled pixels (label 0/1; 255 is ignored). The textbook reference (per-band standardisation,
change-vector magnitude, Otsu, 3×3 opening, 4-pixel minimum) is scored in the same run.

Metrics per dataset pool the pixels of its cases: precision, recall, F1, IoU, and object recall
(a connected label object counts as found when at least 50 % of its labelled pixels are detected).
Datasets are then macro-averaged.

Held out through the pipeline (default). The shipped model was trained on every case, so its
figures here are training-set figures (printed, marked as such). The honest figures come from
fold models: ``bench/train_detector.py --folds`` (same seeded recipe as the shipped model) trains
them under two protocols, leave-one-dataset-out (``lodo``, 4 models: the headline, a sensor the
model never saw) and a 3-fold case split within each dataset with LEVIR crops kept with their
tiles (``cases``), and each case runs through ``tuban compare`` with the model of the fold that
did not see it (``TUBAN_MODEL_DIR``). Fold models are cached in ``bench/.cache/folds/`` (those of
cases the shipped models never saw in ``bench/.cache/folds-<hash>/``) under a
key of the training recipe (``train_detector.py``, ``features.py``, ``objects.py`` and
``learned.py`` sources, seed) and the case list; a rerun with the same key only runs the
comparisons, and with another key (any edit of those sources) the bench keeps the cached
models and stops until ``--retrain`` says to replace them (the fold networks, under their own
key, take about 105 min: 35 per fold). The ``spectral`` run scores the rule-based spectral
detector through ``tuban compare`` (``detection.method: spectral``): untrained, so held out
by construction. It was ``auto``'s pick for sub-metre RGB+NIR imagery (no labelled pair of
which exists here) until this run showed it below the reference on every dataset; up to 4.5 m
its change now joins the default's inside forest, farmland and ecological land only. The
``farmland`` run (not in the default list) measures that: each case through ``tuban run``
with a farmland rule layer covering it, on the case split's fold models. Run it under the CPU
lock::

    flock /tmp/tuban-cpu.lock .venv/bin/python bench/accuracy.py [--cases DIR] [--only levir]
        [--protocols lodo,cases,spectral,farmland] [--no-train-set] [--direct] [--json PATH]

``--direct`` calls the shipped learned detector on arrays instead (training-set figures only).

On cases the shipped models never learned from (another dataset, sensor or city: ``--cases
DIR`` with none of the ``<dataset>/<case>`` names in their JSONs' training lists), the default is
the shipped models alone through ``tuban compare``, held out as they are, with no fold model
trained on the new cases; the table says how many cases the shipped models learned from::

    .venv/bin/python bench/accuracy.py --cases /data/other_cases --json other.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.warp import reproject, transform_bounds, transform_geom
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ROOT.parent / "shared" / "data" / "cases"
OBJECT_COVER = 0.5
FOLD_CACHE = ROOT / "bench" / ".cache" / "folds"
PROTOCOLS = ("lodo", "cases")
#: runs that need no fold models: the rule-based spectral detector (``method: spectral``),
#: untrained, so held out by construction
UNTRAINED = ("spectral",)
#: runs on another protocol's fold models: ``farmland`` runs each case through ``tuban run``
#: with a farmland rule layer covering it (:func:`run_zoned`), on the case split's models
FOLDS_OF = {"farmland": "cases"}
#: the headline protocol of the held-out table
HEADLINE = "lodo"
SEED = 0


@dataclass
class Case:
    """One labelled pair on the before grid, as float32 reflectance-like arrays."""

    dataset: str
    name: str
    path: Path
    before: np.ndarray
    after: np.ndarray
    valid: np.ndarray
    label: np.ndarray
    roles: tuple[str, ...]
    res_m: float


def _scale(dtype: str) -> float:
    return {"uint8": 255.0, "uint16": 10000.0}.get(dtype, 1.0)


def load_case(path: Path) -> Case:
    """Read a case; the after image is reprojected onto the before grid when they differ."""
    meta = json.loads((path / "meta.json").read_text())
    with rasterio.open(path / "before.tif") as src:
        before = src.read().astype(np.float32) / _scale(src.dtypes[0])
        roles = tuple(d or f"b{i}" for i, d in enumerate(src.descriptions))
        tr, crs, shape = src.transform, src.crs, (src.height, src.width)
    with rasterio.open(path / "after.tif") as src:
        if src.transform == tr and src.crs == crs and (src.height, src.width) == shape:
            after = src.read().astype(np.float32) / _scale(src.dtypes[0])
        else:
            after = np.full((src.count, *shape), np.nan, np.float32)
            reproject(src.read().astype(np.float32) / _scale(src.dtypes[0]), after,
                      src_transform=src.transform, src_crs=src.crs, dst_transform=tr,
                      dst_crs=crs, resampling=Resampling.bilinear, src_nodata=np.nan,
                      dst_nodata=np.nan)
    with rasterio.open(path / "label.tif") as src:
        label = src.read(1)
    valid = (np.isfinite(before).all(0) & np.isfinite(after).all(0)
             & (before.max(0) > 0) & (after.max(0) > 0))
    return Case(meta.get("dataset", path.parent.name), path.name, path, before,
                np.nan_to_num(after), valid, label, roles, float(meta["gsd_m"]))


def case_key(case_dir: Path) -> str:
    """``"<dataset>/<case>"`` of a case folder, as the models' JSONs list their cases."""
    return f"{case_dir.parent.name}/{case_dir.name}"


def iter_case_dirs(root: Path, only: set[str] | None = None) -> list[Path]:
    """Case folders under ``root`` (``<dataset>/<case>/``), sorted."""
    return [p for p in sorted(root.glob("*/*/"))
            if (p / "label.tif").exists() and (only is None or p.parent.name in only)]


def reference_detect(before: np.ndarray, after: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Textbook detector: standardise bands, change-vector magnitude, Otsu, opening, 4 px min."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    def z(x: np.ndarray) -> np.ndarray:
        v = x[:, valid]
        return (x - v.mean(1)[:, None, None]) / (v.std(1)[:, None, None] + 1e-9)

    mag = np.sqrt(((z(after) - z(before)) ** 2).sum(0))
    out = (mag > threshold_otsu(mag[valid])) & valid
    out = ndi.binary_opening(out, np.ones((3, 3), bool))
    return remove_small_objects(out, max_size=3)


def counts(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Pixel confusion counts on labelled pixels plus object hits (50 % cover, 8-connected)."""
    lab = label == 1
    m = label != 255
    objs, n = ndi.label(lab, np.ones((3, 3), bool))
    found = 0
    if n:
        sizes = np.bincount(objs.ravel(), minlength=n + 1)[1:]
        hits = np.bincount(objs[pred & lab].ravel(), minlength=n + 1)[1:]
        found = int((hits >= OBJECT_COVER * sizes).sum())
    return {"tp": float((pred & lab & m).sum()), "fp": float((pred & ~lab & m).sum()),
            "fn": float((~pred & lab & m).sum()), "objects": float(n), "found": float(found)}


def scores(c: dict[str, float]) -> dict[str, float]:
    """Precision, recall, F1, IoU and object recall from summed counts."""
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "iou": tp / (tp + fp + fn) if tp + fp + fn else 0.0,
            "object_recall": c["found"] / c["objects"] if c["objects"] else float("nan")}


def _add(acc: dict[str, float], c: dict[str, float]) -> None:
    for k, v in c.items():
        acc[k] = acc.get(k, 0.0) + v


def rasterize_patches(geojson: Path, label_path: Path) -> np.ndarray:
    """Burn every patch of an EPSG:4326 ``patches.geojson`` onto the label grid."""
    with rasterio.open(label_path) as src:
        shape, tr, crs = (src.height, src.width), src.transform, src.crs
    feats = json.loads(geojson.read_text()).get("features", [])
    geoms = [transform_geom("EPSG:4326", crs, f["geometry"]) for f in feats if f.get("geometry")]
    if not geoms:
        return np.zeros(shape, bool)
    return rasterize(((g, 1) for g in geoms), out_shape=shape, transform=tr,
                     dtype="uint8").astype(bool)


def run_compare(case_dir: Path, workdir: Path, model_dir: Path | None = None,
                config: Path | None = None) -> np.ndarray:
    """Run ``tuban compare`` on a case (with the models in ``model_dir``, default the shipped
    ones, and ``config`` if given) and return its patches on the label grid."""
    out = workdir / case_dir.parent.name / case_dir.name
    args = ["compare", str(case_dir / "before.tif"), str(case_dir / "after.tif"), "-o", str(out)]
    _tuban(args + (["--config", str(config)] if config is not None else []), model_dir, out)
    return rasterize_patches(out / "patches.geojson", case_dir / "label.tif")


def _tuban(args: list[str], model_dir: Path | None, out: Path) -> None:
    """Run ``tuban ARGS`` (with the models in ``model_dir``, default the shipped ones), which
    writes ``out/run.json``; an error when it fails or did not run those models."""
    exe = Path(sys.executable).with_name("tuban")
    cmd = [str(exe) if exe.exists() else "tuban", *args]
    env = {k: v for k, v in os.environ.items() if k != "TUBAN_MODEL_DIR"}
    if model_dir is not None:
        env["TUBAN_MODEL_DIR"] = str(model_dir)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
    used = json.loads((out / "run.json").read_text())["detector"]["name"]
    if model_dir is not None and used != "learned":  # the registry fell back: not a model run
        why = [ln for ln in res.stderr.splitlines() if "learned detector" in ln]
        raise RuntimeError(f"{' '.join(cmd)} ran the {used} detector instead of the models in "
                           f"{model_dir}: {why[-1] if why else res.stderr.strip()[-300:]}")


def utm_crs(lon: float, lat: float) -> str:
    """The WGS 84 / UTM zone holding ``lon``, ``lat`` (EPSG code string)."""
    return f"EPSG:{(32601 if lat >= 0 else 32701) + int((lon + 180) // 6) % 60}"


def run_zoned(case_dir: Path, workdir: Path, case: Case, model_dir: Path | None = None,
              rule: str = "farmland") -> np.ndarray:
    """Run the case through ``tuban run`` with a ``rule`` layer covering all of it (what a
    bureau gets inside forest, farmland or ecological land; default detector, on its UTM zone
    at its pixel size) and return its patches on the label grid."""
    out = workdir / case_dir.parent.name / case_dir.name
    with rasterio.open(case_dir / "before.tif") as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    out.mkdir(parents=True)
    (out / "zone.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    bands = {r: i + 1 for i, r in enumerate(case.roles)}
    periods = []
    for p, date in (("before", "2000-01-01"), ("after", "2001-01-01")):
        (out / p).mkdir()
        (out / p / "scene.tif").symlink_to((case_dir / f"{p}.tif").resolve())
        periods.append({"name": p, "date": date, "images": [p], "bands": bands})
    cfg = {"name": case_dir.name, "crs": utm_crs((w + e) / 2, (s + n) / 2),
           "resolution": case.res_m, "periods": periods, "rules": {rule: {"path": "zone.geojson"}},
           "output": {"dir": "runs", "evidence": False, "report": False},
           "register": "runs/register.gpkg"}
    (out / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    run = out / "runs" / "zoned"
    _tuban(["run", str(out / "config.yaml"), "--run-id", run.name], model_dir, run)
    return rasterize_patches(run / "patches.geojson", case_dir / "label.tif")


def direct_detect(case: Case) -> np.ndarray:
    """Call the registry's detector on the arrays and apply the learned decision clean-up."""
    from pipeline.detect.learned import LearnedDetector, decide

    det = LearnedDetector()
    out = det(case.before, case.after, case.valid, case.roles, case.res_m)
    return decide(out["change"], case.valid, case.res_m)


def _table(rows: dict[str, dict[str, float]], title: str,
           ref: dict[str, dict[str, float]] | None = None) -> str:
    head = f"{'dataset':<10} {'P':>6} {'R':>6} {'F1':>6} {'IoU':>6} {'objR':>6}"
    lines = [title, head + (f" {'refF1':>6}" if ref else "")]
    for ds, s in rows.items():
        line = (f"{ds:<10} {s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f} "
                f"{s['iou']:6.3f} {s['object_recall']:6.3f}")
        if ref and ds in ref:
            line += f" {ref[ds]['f1']:6.3f}"
        lines.append(line)
    return "\n".join(lines)


def recipe_key(case_dirs: list[Path], seed: int = SEED) -> str:
    """Hash of the training recipe (trainer, feature, object-feature and decision sources,
    seed) and the case list."""
    h = hashlib.sha256()
    for f in (ROOT / "bench" / "train_detector.py", ROOT / "pipeline" / "detect" / "features.py",
              ROOT / "pipeline" / "detect" / "objects.py",
              ROOT / "pipeline" / "detect" / "learned.py"):  # decide_raw, predict_map
        h.update(f.read_bytes())
    h.update(f"seed={seed};sets=rgb;".encode())
    h.update("\n".join(map(case_key, case_dirs)).encode())
    return h.hexdigest()[:16]


def fold_cache(case_dirs: list[Path]) -> Path:
    """Where the fold models of these cases are cached: :data:`FOLD_CACHE` for the cases the
    shipped models learned from (or some of them), a folder of their own for other cases, so
    that training folds on new cases leaves the cached ones of the real cases alone."""
    if cases_in_training(case_dirs):
        return FOLD_CACHE
    names = "\n".join(map(case_key, case_dirs))
    return FOLD_CACHE.with_name(f"folds-{hashlib.sha256(names.encode()).hexdigest()[:8]}")


class StaleFolds(RuntimeError):
    """Cached fold models were made by another recipe; replacing them needs ``--retrain``."""


def _stale(what: str, cache: Path, old: list[Path], key: str, minutes: str) -> StaleFolds:
    return StaleFolds(
        f"{cache}: the cached fold {what} ({len(old)} files) were made by another recipe than "
        f"the sources' ({key}); rerun with --retrain to replace them (about {minutes} min), or "
        "restore the sources they were made from")


def _stamped_key(stamp: Path) -> str | None:
    try:
        return json.loads(stamp.read_text()).get("key")
    except (OSError, ValueError):
        return None


def fold_models(cases_root: Path, cache: Path | None = None,
                protocols: tuple[str, ...] = PROTOCOLS,
                retrain: bool = False) -> dict[str, dict[str, Path]]:
    """``{protocol: {"<dataset>/<case>": model folder that did not see it}}``, training the fold
    models with ``bench/train_detector.py --folds`` when the cache (default
    :func:`fold_cache`) lacks them for this key. Cached models of another key are replaced only
    with ``retrain`` (else :class:`StaleFolds`): any edit of a hashed source changes the key,
    and the fold networks take about 105 min to train again."""
    all_dirs = iter_case_dirs(cases_root)
    cache = cache or fold_cache(all_dirs)
    key = recipe_key(all_dirs)
    stamp = cache / "recipe.json"
    ok = _stamped_key(stamp) == key
    old = [f for proto in PROTOCOLS for f in (cache / proto).glob("*/learned_*")]
    if not ok and old and not retrain:
        raise _stale("pixel models", cache, old, key, "10")
    if not ok:
        print(f"training fold models (recipe {key}) into {cache} ...", flush=True)
        stamp.unlink(missing_ok=True)
        for f in old:
            f.unlink()
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "bench" / "train_detector.py"), "--cases",
               str(cases_root), "--sets", "rgb", "--seed", str(SEED),
               "--out", str(cache / "full"), "--folds", str(cache)]
        with open(cache / "train.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
        stamp.write_text(json.dumps({"key": key, "cases": str(cases_root)}))
    fold_networks(cases_root, all_dirs, cache, retrain)
    out: dict[str, dict[str, Path]] = {}
    for proto in protocols:
        m = out.setdefault(proto, {})
        for js in sorted((cache / proto).glob("*/learned_rgb.json")):
            for c in json.loads(js.read_text())["test_cases"]:
                m[c] = js.parent
    return out


def network_key(case_dirs: list[Path], seed: int = SEED) -> str:
    """Hash of the network's training recipe (trainer and network sources, seed) and cases."""
    h = hashlib.sha256()
    for f in (ROOT / "bench" / "train_cnn.py", ROOT / "pipeline" / "detect" / "cnn.py"):
        h.update(f.read_bytes())
    h.update(f"seed={seed};".encode())
    h.update("\n".join(map(case_key, case_dirs)).encode())
    return h.hexdigest()[:16]


def fold_networks(cases_root: Path, all_dirs: list[Path], cache: Path,
                  retrain: bool = False) -> None:
    """Case-split fold networks (``bench/train_cnn.py --folds``) beside the fold models, trained
    when the cache lacks them for this key (cached ones of another key replaced only with
    ``retrain``, else :class:`StaleFolds`). Without PyTorch, stale ones are removed and the
    held-out figures are those of the pixel models alone (said so). The leave-one-dataset-out
    folds get none: LEVIR is the only sub-metre data, so its fold has nothing to learn from, and
    the network does not run on the other datasets' pixel sizes."""
    key = network_key(all_dirs)
    stamp = cache / "network.json"
    if _stamped_key(stamp) == key:
        return
    old = list((cache / "cases").glob("*/cnn_*"))
    if old and not retrain:
        raise _stale("networks", cache, old, key, "105")
    stamp.unlink(missing_ok=True)
    for f in old:
        f.unlink()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch missing (pip install -e '.[train]'): held-out figures WITHOUT the "
              "network", flush=True)
        return
    print(f"training fold networks (recipe {key}) into {cache} ...", flush=True)
    with open(cache / "train_cnn.log", "w") as log:
        subprocess.run([sys.executable, str(ROOT / "bench" / "train_cnn.py"), "--cases",
                        str(cases_root), "--seed", str(SEED), "--folds", str(cache)],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    stamp.write_text(json.dumps({"key": key, "cases": str(cases_root)}))


def macro(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over datasets of every metric."""
    keys = next(iter(rows.values())).keys()
    return {k: float(np.nanmean([r[k] for r in rows.values()])) for k in keys}


def _shipped_models() -> dict[str, dict]:
    """JSON sidecars of the shipped learned models, by feature set."""
    out = {}
    for js in sorted((ROOT / "pipeline" / "models").glob("learned_*.json")):
        meta = json.loads(js.read_text())
        out[meta.get("feature_set", js.stem)] = meta
    return out


def shipped_training_cases() -> set[str]:
    """``"<dataset>/<case>"`` of every case a shipped model (pixel, object or network) learned
    from."""
    out: set[str] = set()
    for js in (ROOT / "pipeline" / "models").glob("*.json"):
        meta = json.loads(js.read_text())
        for k in ("training_cases", "trained_on"):
            if isinstance(meta.get(k), list):
                out.update(map(str, meta[k]))
    return out


def cases_in_training(case_dirs: list[Path]) -> int:
    """How many of these case folders a shipped model learned from."""
    seen = shipped_training_cases()
    return sum(case_key(d) in seen for d in case_dirs)


def shipped_title(n_seen: int, n: int, direct: bool) -> str:
    """Title of the shipped models' run: training-set figures when they learned from these
    cases, held out when they never saw any."""
    how = "direct on arrays" if direct else "`tuban compare`"
    if n_seen == 0:
        return f"HELD OUT: shipped models, {how}, on {n} case(s) none of them learned from"
    if n_seen == n:
        return (f"TRAINING SET (NOT held out): shipped models, {how}, every case was in "
                "their training set")
    return (f"MIXED (NOT held out): shipped models, {how}, {n_seen} of {n} cases were in their "
            "training set")


def _auto_detector(roles: tuple[str, ...], res_m: float) -> str:
    """Which detector ``method: auto`` uses for these bands: ``learned_<set>`` or spectral."""
    try:
        from pipeline.detect import learned

        kind = learned._kind_for(tuple(roles), learned.MODEL_DIR, res_m, exact=True)
    except Exception:  # noqa: BLE001 - lightgbm or models missing
        kind = None
    return f"learned_{kind}" if kind else "spectral"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    ap.add_argument("--direct", action="store_true",
                    help="call the shipped learned detector on arrays (training-set figures)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "accuracy.json")
    ap.add_argument("--only", help="comma-separated datasets")
    ap.add_argument("--protocols",
                    help="held-out protocols to run through `tuban compare` ('' = none; "
                         f"default {','.join(PROTOCOLS + UNTRAINED)} when the shipped models "
                         "learned from some of the cases, else none: the shipped models on "
                         "cases they never saw are held out as they are)")
    ap.add_argument("--retrain", action="store_true",
                    help="replace cached fold models made by another recipe (a hashed source "
                         "changed); without it the bench stops and says so")
    ap.add_argument("--no-train-set", action="store_true",
                    help="skip the shipped models' run (training-set figures on their cases)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    dirs = iter_case_dirs(args.cases, only)
    if not dirs:
        print(f"no cases under {args.cases}", file=sys.stderr)
        return 2
    n_seen = cases_in_training(dirs)
    if args.protocols is None:
        args.protocols = ",".join(PROTOCOLS + UNTRAINED) if n_seen else ""
    protocols = () if args.direct else tuple(p for p in args.protocols.split(",") if p)
    trained = tuple(dict.fromkeys(FOLDS_OF.get(p, p) for p in protocols if p not in UNTRAINED))
    try:
        folds = fold_models(args.cases, protocols=trained, retrain=args.retrain) if trained else {}
    except StaleFolds as err:
        print(f"accuracy: {err}", file=sys.stderr)
        return 2
    runs = ([] if args.no_train_set and protocols else ["train-set"]) + list(protocols)
    models = _shipped_models()
    picked: dict[str, str] = {}  # dataset -> detector `auto` uses for its bands and pixel size
    acc: dict[str, dict[str, dict[str, float]]] = {r: {} for r in runs}
    ref: dict[str, dict[str, float]] = {}
    per_case = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuban-acc-") as tmp:
        spectral_cfg = Path(tmp) / "spectral.yaml"
        spectral_cfg.write_text("detection: {method: spectral}\n")
        for d in dirs:
            case = load_case(d)
            key = f"{case.dataset}/{case.name}"
            picked.setdefault(case.dataset, _auto_detector(case.roles, case.res_m))
            rc = counts(reference_detect(case.before, case.after, case.valid), case.label)
            _add(ref.setdefault(case.dataset, {}), rc)
            row: dict = {"case": key, "reference_f1": scores(rc)["f1"]}
            line = f"{key:<32} ref F1 {row['reference_f1']:.3f}"
            for r in runs:
                t = time.perf_counter()
                if r == "train-set":
                    pred = direct_detect(case) if args.direct else run_compare(d, Path(tmp))
                elif r == "spectral":
                    pred = run_compare(d, Path(tmp) / r, config=spectral_cfg)
                else:
                    mdir = folds[FOLDS_OF.get(r, r)].get(key)
                    if mdir is None:
                        raise RuntimeError(f"no {r} fold model held {key} out: retrain folds")
                    pred = (run_zoned(d, Path(tmp) / r, case, mdir) if r == "farmland"
                            else run_compare(d, Path(tmp) / r, mdir))
                dt = time.perf_counter() - t
                c = counts(pred, case.label)
                _add(acc[r].setdefault(case.dataset, {}), c)
                s = scores(c)
                row[r] = {**s, "seconds": dt}
                name = "shipped" if r == "train-set" else r
                line += f" | {name} F1 {s['f1']:.3f} P {s['precision']:.3f} {dt:4.1f}s"
            per_case.append(row)
            print(line, flush=True)
    ref_rows = {ds: scores(c) for ds, c in ref.items()}
    ref_rows["macro"] = macro(ref_rows)
    tables = {}
    for r in runs:
        rows = {ds: scores(c) for ds, c in acc[r].items()}
        rows["macro"] = macro(rows)
        tables[r] = rows
    titles = {
        "lodo": "HELD OUT through `tuban compare`, leave-one-dataset-out (4 fold models; "
                "HEADLINE)",
        "cases": "HELD OUT through `tuban compare`, 3-fold case split within each dataset, "
                 "LEVIR crops with their tiles",
        "spectral": "spectral detector (rule-based, untrained), `tuban compare` with "
                    "method spectral",
        "farmland": "HELD OUT through `tuban run`, each case declared farmland (case-split "
                    "fold models): the default inside forest, farmland and ecological land",
        "train-set": shipped_title(n_seen, len(dirs), args.direct),
    }
    print()
    print("detector used by `auto`: " + ", ".join(f"{d}: {k}" for d, k in picked.items()))
    order = [HEADLINE] + [p for p in protocols if p != HEADLINE] + ["train-set"]
    for r in dict.fromkeys(order):
        if r in tables:
            print()
            print(_table(tables[r], titles.get(r, r), ref_rows))
    print()
    print(_table(ref_rows, "reference (change vector + Otsu)"))
    # on cases they never learned from, the shipped models' run is held out too
    unseen = "train-set" in tables and not n_seen
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "mode": "direct" if args.direct else "compare", "cases": str(args.cases),
        "object_cover": OBJECT_COVER, "seconds": time.perf_counter() - t0,
        "headline": HEADLINE if HEADLINE in tables else ("shipped" if unseen else None),
        "held_out": {**{p: tables[p] for p in protocols},
                     **({"shipped": tables["train-set"]} if unseen else {})},
        # the shipped models' run under its old name; "shipped" says whether it is one
        "training_set": tables.get("train-set"),
        "shipped": {"table": tables.get("train-set"), "cases": len(dirs),
                    "cases_in_training": n_seen},
        "reference": ref_rows, "detector": picked,
        "models_at_training": {k: {"held_out_lodo_pixel_cv": m.get("held_out"),
                                   "held_out_cases_pixel_cv": m.get("held_out_cases")}
                               for k, m in models.items()},
        "per_case": per_case}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
