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
from PIL import Image, ImageDraw

from .errors import MissingFileError
from .evidence import stretch_rgb
from .grid import Grid
from .ingest import open_image, read_overview
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
    t = src.tiles[0]  # native pixel size in CRS units (degrees for lon/lat files)
    res = min((t.bounds[2] - t.bounds[0]) / t.shape[1], (t.bounds[3] - t.bounds[1]) / t.shape[0])
    grid = Grid.from_bounds(src.bounds, res, src.crs)
    arr, valid, og = read_overview(src, grid, max_size)  # works for tiles, band files, STAC
    rgb = [list(src.roles).index(r) for r in ("red", "green", "blue")]
    img = Image.fromarray(stretch_rgb(np.nan_to_num(arr[rgb]), valid))
    transform, crs = og.transform, og.crs
    if patches is not None and len(patches):
        draw = ImageDraw.Draw(img)
        inv = ~transform
        for cat, geom in zip(patches["category"], patches.to_crs(crs).geometry, strict=True):
            color = CATEGORY_COLORS.get(cat, (255, 255, 255))
            for poly in getattr(geom, "geoms", [geom]):
                pts = [inv * xy for xy in poly.exterior.coords]
                draw.line(pts, fill=color, width=width)
    return img
