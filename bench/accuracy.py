"""Accuracy of tuban's change detection on the labelled real cases.

For every case ``<cases>/<dataset>/<case>/{before,after,label}.tif`` this runs
``tuban compare BEFORE AFTER -o OUT`` (default) or calls the detector directly on arrays
(``--direct``), rasterizes ``patches.geojson`` back onto ``label.tif``'s grid, and scores the
labelled pixels (label 0/1; 255 is ignored). The textbook reference (per-band standardisation,
change-vector magnitude, Otsu, 3×3 opening, 4-pixel minimum) is scored in the same run.

Metrics per dataset pool the pixels of its cases: precision, recall, F1, IoU, and object recall
(a connected label object counts as found when at least 50 % of its labelled pixels are detected).
Datasets are then macro-averaged. Cases the shipped model was trained on are marked ``*``; the
honest (held-out, leave-one-dataset-out) figures recorded at training time are printed with them.

Usage::

    python bench/accuracy.py [--cases DIR] [--direct] [--json PATH] [--only levir,oscd]
"""

from __future__ import annotations

import argparse
import json
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
from rasterio.warp import reproject, transform_geom
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ROOT.parent / "shared" / "data" / "cases"
OBJECT_COVER = 0.5


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


def run_compare(case_dir: Path, workdir: Path) -> np.ndarray:
    """Run ``tuban compare`` on a case and return its patches on the label grid."""
    out = workdir / case_dir.parent.name / case_dir.name
    exe = Path(sys.executable).with_name("tuban")
    cmd = [str(exe) if exe.exists() else "tuban", "compare", str(case_dir / "before.tif"),
           str(case_dir / "after.tif"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
    return rasterize_patches(out / "patches.geojson", case_dir / "label.tif")


def direct_detect(case: Case) -> np.ndarray:
    """Call the registry's detector on the arrays and apply the learned decision clean-up."""
    from pipeline.detect.learned import LearnedDetector, decide

    det = LearnedDetector()
    out = det(case.before, case.after, case.valid, case.roles, case.res_m)
    return decide(out["change"], case.valid, case.res_m)


def _table(rows: dict[str, dict[str, float]], title: str) -> str:
    lines = [title, f"{'dataset':<10} {'P':>6} {'R':>6} {'F1':>6} {'IoU':>6} {'objR':>6}"]
    for ds, s in rows.items():
        lines.append(f"{ds:<10} {s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f} "
                     f"{s['iou']:6.3f} {s['object_recall']:6.3f}")
    return "\n".join(lines)


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


def _auto_detector(roles: tuple[str, ...], res_m: float) -> str:
    """Which detector ``method: auto`` uses for these bands: ``learned_<set>`` or spectral."""
    try:
        from pipeline.detect import learned

        kind = learned._kind_for(tuple(roles), learned.MODEL_DIR, res_m, exact=True)
    except Exception:  # noqa: BLE001 - lightgbm or models missing
        kind = None
    return f"learned_{kind}" if kind else "spectral"


def _honest(models: dict[str, dict], picked: dict[str, str],
            rows: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    """Held-out rows per dataset from the model ``auto`` uses for it (spectral: as measured)."""
    lodo, cases = {}, {}
    keys = ("precision", "recall", "f1", "iou", "object_recall")
    for d, det in picked.items():
        if det == "spectral":
            lodo[d] = cases[d] = {k: rows[d][k] for k in keys}
            continue
        meta = models.get(det.removeprefix("learned_"), {})
        for dst, src in ((lodo, "held_out"), (cases, "held_out_cases")):
            r = meta.get(src, {}).get(d)
            if r:
                dst[d] = {k: float(r[k]) for k in keys}
    for t in (lodo, cases):
        if t:
            t["macro"] = macro(t)
    return lodo, cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    ap.add_argument("--direct", action="store_true",
                    help="call the learned detector on arrays instead of `tuban compare`")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "accuracy.json")
    ap.add_argument("--only", help="comma-separated datasets")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    dirs = iter_case_dirs(args.cases, only)
    if not dirs:
        print(f"no cases under {args.cases}", file=sys.stderr)
        return 2
    models = _shipped_models()
    picked: dict[str, str] = {}  # dataset -> detector `auto` uses for its bands and pixel size
    acc: dict[str, dict[str, float]] = {}
    ref: dict[str, dict[str, float]] = {}
    per_case = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuban-acc-") as tmp:
        for d in dirs:
            case = load_case(d)
            picked.setdefault(case.dataset, _auto_detector(case.roles, case.res_m))
            t = time.perf_counter()
            pred = direct_detect(case) if args.direct else run_compare(d, Path(tmp))
            dt = time.perf_counter() - t
            c, rc = counts(pred, case.label), counts(reference_detect(
                case.before, case.after, case.valid), case.label)
            _add(acc.setdefault(case.dataset, {}), c)
            _add(ref.setdefault(case.dataset, {}), rc)
            key = f"{case.dataset}/{case.name}"
            used = models.get(picked[case.dataset].removeprefix("learned_"), {})
            mark = "*" if key in used.get("training_cases", []) else " "
            s, rs = scores(c), scores(rc)
            per_case.append({"case": key, "trained_on": mark == "*", "seconds": dt,
                             **s, "reference_f1": rs["f1"]})
            print(f"{mark}{key:<32} F1 {s['f1']:.3f} P {s['precision']:.3f} "
                  f"R {s['recall']:.3f}  ref F1 {rs['f1']:.3f}  {dt:5.1f}s", flush=True)
    rows = {ds: scores(c) for ds, c in acc.items()}
    ref_rows = {ds: scores(c) for ds, c in ref.items()}
    rows["macro"], ref_rows["macro"] = macro(rows), macro(ref_rows)
    print()
    print(_table(rows, "tuban" + (" (direct)" if args.direct else " compare")
                 + "   * = case in the training set of the model used (NOT held out)"))
    print()
    print(_table(ref_rows, "reference (change vector + Otsu)"))
    held_out, held_cases = _honest(models, picked, rows)
    print()
    print("detector used by `auto`: " + ", ".join(f"{d}: {k}" for d, k in picked.items()))
    print()
    print(_table(held_out, "HELD OUT, leave-one-dataset-out (from training): the honest figures "
                           "for unseen sensors (spectral rows: untrained, as measured above)"))
    print()
    print(_table(held_cases, "HELD OUT, 3-fold split by case within each dataset, LEVIR crops "
                             "with their tiles (from training)"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "mode": "direct" if args.direct else "compare", "cases": str(args.cases),
        "object_cover": OBJECT_COVER, "seconds": time.perf_counter() - t0,
        "datasets": rows, "reference": ref_rows, "detector": picked,
        "held_out_lodo": held_out, "held_out_cases": held_cases,
        "trained_on_note": "datasets/rows above include cases the shipped models were trained "
                           "on (marked trained_on); report held_out_* as the result",
        "per_case": per_case}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
