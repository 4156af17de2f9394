"""Scoring patches against truth polygons or a label raster (pure metrics, thin I/O).

Object level: a truth object is *found* when a predicted patch of the same category covers at
least ``min_cover`` of it or overlaps it with IoU ≥ ``min_iou``; a predicted patch is *correct*
when it intersects a truth object of its category. Pixel level: polygons are rasterized onto
the label grid and only labelled pixels (label ≠ nodata) are scored.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio import features

from .errors import InputError, MissingFileError
from .types import VIOLATIONS


def prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Precision, recall, F1 and IoU from counts (0 where undefined, 1 for nothing to find)."""
    p = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    r = tp / (tp + fn) if tp + fn else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    iou = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
            "iou": round(iou, 4)}


def object_scores(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame, *,
                  categories: Iterable[str] = VIOLATIONS, min_cover: float = 0.3,
                  min_iou: float = 0.1) -> dict[str, dict[str, Any]]:
    """Per-category object precision/recall/F1 (same CRS expected)."""
    out: dict[str, dict[str, Any]] = {}
    for cat in categories:
        p = pred[pred["category"] == cat].geometry.values
        t = truth[truth["category"] == cat].geometry.values
        found = np.zeros(len(t), bool)
        correct = np.zeros(len(p), bool)
        if len(p) and len(t):
            ti, pi = shapely.STRtree(p).query(t, predicate="intersects")
            inter = shapely.area(shapely.intersection(t[ti], p[pi]))
            union = shapely.area(shapely.union(t[ti], p[pi]))
            cover = inter / np.maximum(shapely.area(t[ti]), 1e-9)
            hit = (cover >= min_cover) | (inter / np.maximum(union, 1e-9) >= min_iou)
            found[ti[hit]] = True
            correct[pi[inter > 0]] = True
        tp_r, fn = int(found.sum()), int((~found).sum())
        tp_p, fp = int(correct.sum()), int((~correct).sum())
        r = tp_r / len(t) if len(t) else 1.0
        pr = tp_p / len(p) if len(p) else (1.0 if len(t) == 0 else 0.0)
        f = 2 * pr * r / (pr + r) if pr + r else 0.0
        out[cat] = {"precision": round(pr, 4), "recall": round(r, 4), "f1": round(f, 4),
                    "n_pred": int(len(p)), "n_truth": int(len(t)), "found": tp_r,
                    "false_patches": fp, "missed": fn}
    return out


def distractor_hits(pred: gpd.GeoDataFrame, distractors: gpd.GeoDataFrame,
                    categories: Iterable[str] = VIOLATIONS) -> dict[str, int]:
    """How many violation patches touch each distractor kind (should all be 0)."""
    viol = pred[pred["category"].isin(list(categories))].geometry.values
    hits: dict[str, int] = {}
    for kind, grp in distractors.groupby("kind"):
        if len(viol) == 0:
            hits[str(kind)] = 0
            continue
        _, pi = shapely.STRtree(viol).query(grp.geometry.values, predicate="intersects")
        hits[str(kind)] = int(len(np.unique(pi)))
    return hits


def pixel_scores(pred: gpd.GeoDataFrame, label: np.ndarray, transform: Any,
                 nodata: int | None = 255, categories: Iterable[str] = VIOLATIONS
                 ) -> dict[str, float]:
    """Pixel metrics of the union of ``categories`` patches against a binary label raster."""
    sel = pred[pred["category"].isin(list(categories))]
    mask = np.zeros(label.shape, bool)
    if len(sel):
        mask = features.rasterize(((g, 1) for g in sel.geometry.values), out_shape=label.shape,
                                  transform=transform, fill=0, dtype="uint8").astype(bool)
    labelled = np.ones(label.shape, bool) if nodata is None else label != nodata
    truth = (label > 0) & labelled
    tp = int((mask & truth).sum())
    fp = int((mask & ~truth & labelled).sum())
    fn = int((~mask & truth).sum())
    return prf(tp, fp, fn)


def read_vector(path: str | Path) -> gpd.GeoDataFrame:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: file not found; give a GeoJSON/GeoPackage path")
    try:
        return gpd.read_file(p, engine="pyogrio")
    except Exception:
        raise InputError(f"{p}: not a vector file GDAL can read; give GeoJSON or GeoPackage"
                         ) from None


def evaluate(patches: str | Path, *, truth: str | Path | None = None,
             label: str | Path | None = None, distractors: str | Path | None = None,
             categories: Iterable[str] = VIOLATIONS) -> dict[str, Any]:
    """Score a patches file against truth polygons (object level) and/or a label raster."""
    if truth is None and label is None:
        raise InputError("evaluate: nothing to compare with; give --truth and/or --label")
    cats = list(categories)
    pred = read_vector(patches)
    out: dict[str, Any] = {"patches": str(patches), "n_patches": int(len(pred))}
    if truth is not None:
        t = read_vector(truth)
        if "category" not in t.columns:
            raise InputError(f"{truth}: no 'category' column; add one naming each object's "
                             "category (illegal_construction, forest_grave, land_occupation)")
        out["objects"] = object_scores(pred.to_crs(t.crs), t, categories=cats)
    if distractors is not None:
        d = read_vector(distractors)
        out["distractors"] = distractor_hits(pred.to_crs(d.crs), d, cats)
    if label is not None:
        lp = Path(label)
        if not lp.exists():
            raise MissingFileError(f"{lp}: label raster not found; give a GeoTIFF label")
        with rasterio.open(lp) as src:
            arr = src.read(1)
            out["pixels"] = pixel_scores(pred.to_crs(src.crs), arr, src.transform,
                                         src.nodata if src.nodata is not None else None, cats)
    return out
