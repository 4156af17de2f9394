"""Held-out accuracy when the imagery differs from what the models learned from.

Detection is judged on sensors, cities and seasons that are not in ``../shared``. This bench
asks how far the held-out figures of ``bench/accuracy.py`` (case split: each case runs through
``tuban compare`` with the fold model that did not see it) move when each case's images are
changed the way another sensor or acquisition would change them, the label left as it is:

- ``tone_after``: the after date brighter, with another gamma and a colour cast (another sensor,
  sun or atmosphere on one date; radiometric normalisation should absorb it);
- ``sensor_both``: both dates hazier and flatter, with another tone curve and colour balance
  (a sensor whose colours the model never saw);
- ``shift_after``: the after date moved by (1.5, -1.0) pixels (co-registration);
- ``blur_after``: the after date blurred by a Gaussian of 0.8 px (another optic);
- ``noise_both``: Gaussian noise of 1 % of full scale on both dates;
- ``coarser``: both dates averaged 2×2, e.g. 0.5 m → 1 m (GF-2, Jilin-1) and 10 m → 20 m;
- ``finer``: both dates resampled bilinearly to half the pixel size, e.g. 0.5 m → 0.25 m
  (aerial imagery; no new detail, but every size in pixels doubles);
- ``swap_dates``: the after image as the before and the other way round (what was built has
  been demolished; the labels mark both);
- ``warp_after`` (only when asked for): the after date displaced by a smooth field of up to
  about 2 px that varies across the image (orthorectification and relief errors);
- ``finer4`` (only when asked for): 4× finer, e.g. 0.5 m → 0.125 m (an aerial or drone survey);
- ``coarser4`` (only when asked for): 4× coarser, e.g. LEVIR's 0.55 m → 2.2 m (GF-1, ZY-3: the
  building network sees the imagery enlarged);
- ``coarser6``, ``coarser8`` (only when asked for): 6× and 8× coarser, LEVIR at 3.3 and 4.4 m
  (PlanetScope; the top of the sub-metre regime, which ends at 4.5 m);
- ``tiles256`` (only when asked for): each case cut into tiles of 256² px (the last ones in a
  row or column smaller), each run through ``tuban compare`` on its own, as datasets delivered
  in small tiles are: every tile has only its own scene statistics and context.

It prints per dataset F1 and precision for the images as they are and for each change, the
change in F1, and the textbook reference's F1 on the same changed images (on the same tiles for
``tiles256``), which the issue asks every dataset to beat. Run it under the CPU lock after
``bench/accuracy.py`` has trained the fold models::

    flock /tmp/tuban-cpu.lock .venv/bin/python bench/robustness.py [--only levir,oscd]
        [--perturb tone_after,coarser] [--json PATH]

On cases the shipped models never learned from (``--cases DIR``, as in ``bench/accuracy.py``)
it runs the shipped models, held out as they are, and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject
from rasterio.windows import Window, from_bounds
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import (  # noqa: E402
    DEFAULT_CASES,
    StaleFolds,
    _add,
    _scale,
    case_key,
    cases_in_training,
    counts,
    fold_models,
    iter_case_dirs,
    load_case,
    macro,
    reference_detect,
    run_compare,
    scores,
)

#: (band-stack in 0–1, which date) -> perturbed band-stack; None leaves that date alone
Perturb = Callable[[np.ndarray, str], np.ndarray | None]


def _cast(n: int, gains: tuple[float, float, float]) -> np.ndarray:
    """Per-band gains for the first three bands (others 1), as a (bands, 1, 1) array."""
    g = np.ones(n, np.float32)
    g[: min(3, n)] = gains[: min(3, n)]
    return g[:, None, None]


def tone_after(x: np.ndarray, date: str) -> np.ndarray | None:
    if date != "after":
        return None
    return 1.08 * np.power(x, 0.8) * _cast(len(x), (1.06, 1.0, 0.92)) + 0.02


def sensor_both(x: np.ndarray, date: str) -> np.ndarray:
    return 0.1 + 0.75 * np.power(x, 1.25) * _cast(len(x), (0.95, 1.0, 1.08))


def shift_after(x: np.ndarray, date: str) -> np.ndarray | None:
    if date != "after":
        return None
    return np.stack([ndi.shift(b, (1.5, -1.0), order=1, mode="nearest") for b in x])


def warp_after(x: np.ndarray, date: str) -> np.ndarray | None:
    """The after date displaced by a smooth field of up to about 2 px that varies across the
    image (orthorectification and relief errors between dates, which one global shift cannot
    take out)."""
    if date != "after":
        return None
    h, w = x.shape[1:]
    rng = np.random.default_rng(7)
    field = [ndi.zoom(rng.standard_normal((4, 4)), (h / 4, w / 4), order=3, mode="nearest",
                      grid_mode=True)[:h, :w] for _ in range(2)]
    dy, dx = (2.0 * f / max(1e-6, np.abs(f).max()) for f in field)
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([ndi.map_coordinates(b, (rr + dy, cc + dx), order=1, mode="nearest")
                     for b in x])


def blur_after(x: np.ndarray, date: str) -> np.ndarray | None:
    if date != "after":
        return None
    return np.stack([ndi.gaussian_filter(b, 0.8) for b in x])


def noise_both(x: np.ndarray, date: str) -> np.ndarray:
    seed = 1 if date == "after" else 0
    return x + np.random.default_rng(seed).normal(0, 0.01, x.shape).astype(np.float32)


PERTURBATIONS: dict[str, Perturb] = {
    "tone_after": tone_after, "sensor_both": sensor_both, "shift_after": shift_after,
    "blur_after": blur_after, "noise_both": noise_both,
}
#: run only when asked (``--perturb warp_after``)
EXTRA_PERTURBATIONS: dict[str, Perturb] = {"warp_after": warp_after}


def _finer(src: rasterio.DatasetReader, x: np.ndarray, f: int = 2) -> tuple[np.ndarray, Affine]:
    y = ndi.zoom(x, (1, f, f), order=1, mode="nearest", grid_mode=True)
    return y, src.transform * Affine.scale(1 / f)


def _coarser(src: rasterio.DatasetReader, x: np.ndarray, f: int = 2,
             ) -> tuple[np.ndarray, Affine]:
    h, w = (x.shape[1] // f) * f, (x.shape[2] // f) * f
    y = x[:, :h, :w].reshape(len(x), h // f, f, w // f, f).mean(axis=(2, 4))
    return y, src.transform * Affine.scale(f)


RESAMPLE = {"coarser": _coarser, "finer": _finer}
#: run only when asked: ``finer4`` has 16× the pixels of a case; ``coarser3`` takes LEVIR to
#: 1.7 m (aerial orthophotos at 1.5 m, SPOT 6/7), ``coarser4`` to 2.2 m (GF-1, ZY-3);
#: ``coarser6`` and ``coarser8`` to 3.3 and 4.4 m (PlanetScope; the top of the sub-metre
#: regime, which ends at 4.5 m)
EXTRA = {"finer4": partial(_finer, f=4), "coarser3": partial(_coarser, f=3),
         "coarser4": partial(_coarser, f=4),
         "coarser6": partial(_coarser, f=6), "coarser8": partial(_coarser, f=8)}
#: every resampling and every in-place change by name, the defaults and those run when asked
ALL_RESAMPLE = {**RESAMPLE, **EXTRA}
ALL_PERTURBATIONS = {**PERTURBATIONS, **EXTRA_PERTURBATIONS}


def write_perturbed(case_dir: Path, out_dir: Path, name: str) -> None:
    """Write ``before.tif``/``after.tif`` of ``case_dir`` changed by ``name`` into ``out_dir``
    (same dtype and band descriptions; nodata pixels stay nodata)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    zoom = 1.0  # new pixel size / old
    for date in ("before", "after"):
        source = {"before": "after", "after": "before"}[date] if name == "swap_dates" else date
        with rasterio.open(case_dir / f"{source}.tif") as src:
            prof = src.profile
            scale = _scale(src.dtypes[0])
            raw = src.read()
            x = raw.astype(np.float32) / scale
            nodata = (raw == src.nodata).all(0) if src.nodata is not None else None
            tr = src.transform
            resample = ALL_RESAMPLE.get(name)
            if resample is not None:
                x, tr = resample(src, x)
                if nodata is not None:
                    nodata = resample(src, nodata[None] * 1.0)[0][0] > 0
            elif name != "swap_dates":
                y = ALL_PERTURBATIONS[name](x, date)
                x = x if y is None else y
            hi = {"uint8": 255, "uint16": 65535}.get(src.dtypes[0])
            arr = x * scale
            if hi is not None:
                arr = np.clip(np.rint(arr), 0, hi)
            arr = arr.astype(src.dtypes[0])
            if nodata is not None:
                arr[:, nodata] = src.nodata
            zoom = tr.a / src.transform.a
            prof.update(width=arr.shape[2], height=arr.shape[1], transform=tr, tiled=False)
            for key in ("blockxsize", "blockysize"):
                prof.pop(key, None)
            with rasterio.open(out_dir / f"{date}.tif", "w", **prof) as dst:
                dst.write(arr)
                dst.descriptions = src.descriptions
    (out_dir / "label.tif").symlink_to((case_dir / "label.tif").resolve())
    meta = json.loads((case_dir / "meta.json").read_text())
    meta["gsd_m"] = float(meta["gsd_m"]) * zoom
    (out_dir / "meta.json").write_text(json.dumps(meta))


TILE_PX = 256


def write_tile(case_dir: Path, out_dir: Path, win: Window) -> None:
    """``case_dir``'s images and label inside ``win`` of the before grid (the after image cut
    to the same bounds on its own grid)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with rasterio.open(case_dir / "before.tif") as src:
        bounds = rasterio.windows.bounds(win, src.transform)
    for name in ("before", "after", "label"):
        with rasterio.open(case_dir / f"{name}.tif") as src:
            w = win if name != "after" else from_bounds(*bounds, transform=src.transform)
            w = w.round_offsets().round_lengths()
            prof = src.profile
            prof.update(width=int(w.width), height=int(w.height), tiled=False,
                        transform=src.window_transform(w))
            for key in ("blockxsize", "blockysize"):
                prof.pop(key, None)
            with rasterio.open(out_dir / f"{name}.tif", "w", **prof) as dst:
                dst.write(src.read(window=w, boundless=True, fill_value=src.nodata or 0))
                dst.descriptions = src.descriptions
    (out_dir / "meta.json").write_text((case_dir / "meta.json").read_text())


def reference_on_label(case_dir: Path) -> np.ndarray:
    """The textbook reference's changed pixels of ``case_dir`` on its label's grid (nearest
    neighbour where the images were resampled)."""
    c = load_case(case_dir)
    pred = reference_detect(c.before, c.after, c.valid).astype(np.uint8)
    with rasterio.open(case_dir / "before.tif") as img, \
            rasterio.open(case_dir / "label.tif") as lab:
        if img.transform == lab.transform and img.shape == lab.shape:
            return pred.astype(bool)
        out = np.zeros(lab.shape, np.uint8)
        reproject(pred, out, src_transform=img.transform, src_crs=img.crs,
                  dst_transform=lab.transform, dst_crs=lab.crs, resampling=Resampling.nearest)
    return out.astype(bool)


def run_tiles(case_dir: Path, tmp: Path, model_dir: Path | None,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Predictions of ``case_dir`` run tile by tile (:data:`TILE_PX`), and the reference's on
    the same tiles, on the label grid."""
    with rasterio.open(case_dir / "label.tif") as src:
        h, w = src.shape
    pred, ref = np.zeros((h, w), bool), np.zeros((h, w), bool)
    for r in range(0, h, TILE_PX):
        for c in range(0, w, TILE_PX):
            win = Window(c, r, min(TILE_PX, w - c), min(TILE_PX, h - r))
            d = tmp / "tiles" / case_dir.parent.name / f"{case_dir.name}_{r}_{c}"
            write_tile(case_dir, d, win)
            cut = np.s_[r:r + win.height, c:c + win.width]
            pred[cut] = run_compare(d, tmp / "out_tiles", model_dir)
            ref[cut] = reference_on_label(d)
    return pred, ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    ap.add_argument("--only", help="comma-separated datasets")
    ap.add_argument("--perturb", default=",".join([*PERTURBATIONS, *RESAMPLE, "swap_dates"]))
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "robustness.json")
    ap.add_argument("--retrain", action="store_true",
                    help="replace cached fold models made by another recipe (see accuracy.py)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    names = ["none", *[p for p in args.perturb.split(",") if p]]
    unknown = set(names) - {"none", *ALL_RESAMPLE, *ALL_PERTURBATIONS, "swap_dates", "tiles256"}
    if unknown:
        print(f"unknown perturbation(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    dirs = iter_case_dirs(args.cases, only)
    if not dirs:
        print(f"no cases under {args.cases}", file=sys.stderr)
        return 2
    if cases_in_training(iter_case_dirs(args.cases)):
        protocol = "cases"
        try:
            folds: dict[str, Path | None] = fold_models(
                args.cases, protocols=("cases",), retrain=args.retrain)["cases"]
        except StaleFolds as err:
            print(f"robustness: {err}", file=sys.stderr)
            return 2
    else:  # cases the shipped models never learned from: they are held out as they are
        protocol = "shipped"
        folds = {case_key(d): None for d in dirs}
    acc: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
    ref: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}  # the reference's
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuban-rob-") as tmp:
        for d in dirs:
            key = case_key(d)
            with rasterio.open(d / "label.tif") as src:
                label = src.read(1)
            line = f"{key:<32}"
            for n in names:
                case_dir = d
                if n == "tiles256":
                    pred, rpred = run_tiles(d, Path(tmp), folds[key])
                else:
                    if n != "none":
                        case_dir = Path(tmp) / n / d.parent.name / d.name
                        write_perturbed(d, case_dir, n)
                    pred = run_compare(case_dir, Path(tmp) / "out" / n, folds[key])
                    rpred = reference_on_label(case_dir)
                c = counts(pred, label)
                _add(acc[n].setdefault(d.parent.name, {}), c)
                _add(ref[n].setdefault(d.parent.name, {}), counts(rpred, label))
                line += f" | {n} {scores(c)['f1']:.3f}"
            print(line, flush=True)
    tables, references = {}, {}
    for n in names:
        for out, got in ((tables, acc[n]), (references, ref[n])):
            rows = {ds: scores(c) for ds, c in got.items()}
            rows["macro"] = macro(rows)
            out[n] = rows
    base = tables["none"]
    how = "case split" if protocol == "cases" else "shipped models, cases they never saw"
    print(f"\nheld out ({how}) F1 / precision, the F1 change against the images as they are, "
          "and the reference's F1 on the same images")
    print(f"{'':<12}" + "".join(f"{ds:>28}" for ds in base))
    for n in names:
        cells = "".join(
            f"{t['f1']:>8.3f} {t['precision']:>5.3f} {t['f1'] - base[ds]['f1']:>+7.3f}"
            f" {references[n][ds]['f1']:>5.3f}" for ds, t in tables[n].items())
        print(f"{n:<12}{cells}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cases": str(args.cases), "protocol": protocol,
                                     "seconds": time.perf_counter() - t0, "tables": tables,
                                     "reference": references}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
