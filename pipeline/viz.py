"""Notebook helpers: load a run's outputs and draw quick-looks with patch outlines.

Pillow only (an ``Image`` displays inline in Jupyter). Images are read decimated, so a
quick-look of a district-sized scene stays small in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
from PIL import Image, ImageDraw
from rasterio.enums import Resampling

from .errors import MissingFileError
from .export import stretch_rgb
from .ingest import open_image
from .report import CATEGORY_COLORS


def load_run(outdir: str | Path) -> tuple[gpd.GeoDataFrame, dict[str, Any]]:
    """The patches (working CRS, from ``patches.gpkg``) and the ``run.json`` manifest."""
    out = Path(outdir)
    if not (out / "run.json").exists():
        raise MissingFileError(f"{out}: no run.json; give a finished run or compare folder")
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return gpd.read_file(out / "patches.gpkg"), manifest


def summary_table(patches: gpd.GeoDataFrame) -> Any:
    """Count and area (m², 亩) per category and status, as a pandas DataFrame."""
    if patches.empty:
        return patches.drop(columns="geometry")
    return (patches.groupby(["category", "status"])
            .agg(patches=("category", "size"), area_m2=("area_m2", "sum"),
                 area_mu=("area_mu", "sum"))
            .round(2).reset_index())


def quicklook(image: str | Path, patches: gpd.GeoDataFrame | None = None, *,
              max_size: int = 800, bands: dict[str, int] | None = None,
              width: int = 2) -> Image.Image:
    """RGB quick-look of ``image`` (decimated to ``max_size`` px) with patch outlines."""
    src = open_image(image, bands=bands)
    path = src.paths[0]
    roles = list(src.roles)
    idx = [src.band_index[roles.index(r)] for r in ("red", "green", "blue")]
    with rasterio.open(path) as ds:
        scale = max(ds.width, ds.height) / max_size
        shape = (max(1, round(ds.height / max(scale, 1))), max(1, round(ds.width / max(scale, 1))))
        arr = ds.read(idx, out_shape=(3, *shape), resampling=Resampling.average, masked=True)
        transform = ds.transform * ds.transform.scale(ds.width / shape[1], ds.height / shape[0])
        crs = ds.crs
    valid = ~np.ma.getmaskarray(arr).any(axis=0)
    img = Image.fromarray(stretch_rgb(np.ma.filled(arr, 0), valid))
    if patches is not None and len(patches):
        draw = ImageDraw.Draw(img)
        inv = ~transform
        for cat, geom in zip(patches["category"], patches.to_crs(crs).geometry, strict=True):
            color = CATEGORY_COLORS.get(cat, (255, 255, 255))
            for poly in getattr(geom, "geoms", [geom]):
                pts = [inv * xy for xy in poly.exterior.coords]
                draw.line(pts, fill=color, width=width)
    return img
