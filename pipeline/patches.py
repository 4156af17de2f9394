"""The patch record (图斑): polygons + evidence -> a GeoDataFrame with every DESIGN field.

Rule-layer overlaps and street-office assignment are vector operations through spatial
indexes, so the cost grows near-linearly with the number of patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from rasterio.crs import CRS

from .types import CATEGORY_ZH, MU_M2

#: rule-layer roles whose overlap area is recorded on each patch (column ``<role>_m2``)
OVERLAP_ROLES: tuple[str, ...] = ("forest", "farmland", "ecological_redline", "permits",
                                  "cemeteries", "water", "construction_land")


def overlap_areas(geoms: np.ndarray, layer: gpd.GeoDataFrame | None) -> np.ndarray:
    """Area (m²) of each geometry that lies inside ``layer`` (a union, counted once)."""
    out = np.zeros(len(geoms))
    if layer is None or layer.empty or len(geoms) == 0:
        return out
    layer_geoms = layer.geometry.values
    g_idx, l_idx = layer.sindex.query(geoms, predicate="intersects")
    if g_idx.size == 0:
        return out
    pieces = shapely.intersection(geoms[g_idx], np.asarray(layer_geoms)[l_idx])
    # overlapping rule polygons would double count: union the pieces per patch when needed
    counts = np.bincount(g_idx, minlength=len(geoms))
    area = shapely.area(pieces)
    np.add.at(out, g_idx, area)
    for i in np.flatnonzero(counts > 1):
        out[i] = shapely.area(shapely.union_all(pieces[g_idx == i]))
    return out


def assign_admin(geoms: np.ndarray, admin: gpd.GeoDataFrame | None) -> tuple[list, list]:
    """Street office (code, name) holding each geometry's representative point."""
    n = len(geoms)
    codes: list[Any] = [None] * n
    names: list[Any] = [None] * n
    if admin is None or admin.empty or n == 0:
        return codes, names
    pts = shapely.point_on_surface(geoms)
    p_idx, a_idx = admin.sindex.query(pts, predicate="within")
    for p, a in zip(p_idx, a_idx, strict=True):
        if codes[p] is None:
            codes[p] = str(admin["admin_code"].iloc[a])
            names[p] = str(admin["admin_name"].iloc[a])
    return codes, names


def build_patches(records: Sequence[Mapping[str, Any]], crs: CRS, *,
                  rules: Mapping[str, gpd.GeoDataFrame], admin: gpd.GeoDataFrame | None,
                  meta: Mapping[str, Any]) -> gpd.GeoDataFrame:
    """Assemble the patch table in the working CRS from vectorized records.

    ``meta`` supplies per-run fields: before_date, after_date, sensor, resolution_m, run_id.
    """
    cols = ["category", "category_zh", "confidence", "area_m2", "area_mu", "centroid_lon",
            "centroid_lat", "admin_code", "admin_name",
            *[f"{r}_m2" for r in OVERLAP_ROLES],
            "before_date", "after_date", "sensor", "resolution_m", "run_id",
            "ndvi_before", "ndvi_after", "bright_before", "bright_after"]
    if not records:
        return gpd.GeoDataFrame({c: [] for c in cols}, geometry=[], crs=crs)
    geoms = np.asarray([r["geometry"] for r in records], dtype=object)
    df = pd.DataFrame({k: [r.get(k) for r in records] for k in
                       ("category", "confidence", "area_m2", "ndvi_before", "ndvi_after",
                        "bright_before", "bright_after")})
    df["category_zh"] = df["category"].map(CATEGORY_ZH)
    df["confidence"] = df["confidence"].astype(float).clip(0, 1).round(3)
    df["area_m2"] = df["area_m2"].astype(float).round(2)
    df["area_mu"] = (df["area_m2"] / MU_M2).round(4)
    centroids = gpd.GeoSeries(shapely.centroid(geoms), crs=crs).to_crs(4326)
    df["centroid_lon"] = centroids.x.round(7).to_numpy()
    df["centroid_lat"] = centroids.y.round(7).to_numpy()
    df["admin_code"], df["admin_name"] = assign_admin(geoms, admin)
    for role in OVERLAP_ROLES:
        df[f"{role}_m2"] = overlap_areas(geoms, rules.get(role)).round(2)
    for k in ("before_date", "after_date", "sensor", "resolution_m", "run_id"):
        df[k] = meta.get(k)
    for k in ("ndvi_before", "ndvi_after", "bright_before", "bright_after"):
        df[k] = df[k].astype(float).round(4)
    return gpd.GeoDataFrame(df[cols], geometry=list(geoms), crs=crs)
