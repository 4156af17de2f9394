"""The working grid as a value object, and block iteration over it (no pixels here)."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.windows import Window

from .errors import MissingCRSError
from .types import BBox


def norm_crs(crs: CRS | str | int | None, what: str = "input") -> CRS:
    """Normalise a CRS given as ``CRS``, ``"EPSG:4547"``, WKT or an EPSG code."""
    if crs is None or crs == "":
        raise MissingCRSError(f"{what}: no coordinate reference system; assign one (e.g. "
                              "gdal_edit.py -a_srs EPSG:4547) and retry")
    if isinstance(crs, CRS):
        return crs
    if isinstance(crs, int):
        return CRS.from_epsg(crs)
    return CRS.from_user_input(crs)


@lru_cache(maxsize=64)
def _transformer(src: CRS, dst: CRS, owner: tuple[int, int]) -> Transformer:
    return Transformer.from_crs(src.to_wkt(), dst.to_wkt(), always_xy=True)


def transform_bounds(src: CRS, dst: CRS, left: float, bottom: float, right: float, top: float,
                     densify_pts: int = 21) -> BBox:
    """``rasterio.warp.transform_bounds`` (the same PROJ call and figures) through a
    transformer made once per CRS pair, process and thread (a PROJ transformer stays in the
    thread that made it, and is not shared across a fork): making one took 1-100 ms per call
    (UTM to CGCS2000 about 100 ms), paid on every block read and evidence chip."""
    t = _transformer(src, dst, (os.getpid(), threading.get_ident()))
    return tuple(t.transform_bounds(left, bottom, right, top, densify_pts=densify_pts))


#: the smallest block :meth:`Grid.auto_block_size` picks, and the halo it allows for (px)
SMALLEST_BLOCK = 256
BLOCK_HALO = 64


@dataclass(frozen=True)
class Block:
    """A block of the grid: ``core`` is what it owns, ``outer`` adds the halo for neighbourhoods."""

    index: int
    core: Window
    outer: Window

    @property
    def inner_slices(self) -> tuple[slice, slice]:
        """Slices that cut ``core`` out of an array covering ``outer``."""
        r0 = int(self.core.row_off - self.outer.row_off)
        c0 = int(self.core.col_off - self.outer.col_off)
        return slice(r0, r0 + int(self.core.height)), slice(c0, c0 + int(self.core.width))


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid: ``shape`` (rows, cols), ``transform`` and ``crs``."""

    shape: tuple[int, int]
    transform: Affine
    crs: CRS

    @classmethod
    def from_bounds(cls, bounds: BBox, resolution: float, crs: CRS | str) -> Grid:
        """Grid covering ``bounds`` at ``resolution``, snapped outward to multiples of it."""
        minx, miny, maxx, maxy = bounds
        r = float(resolution)
        x0 = math.floor(minx / r + 1e-9) * r
        y1 = math.ceil(maxy / r - 1e-9) * r
        x1 = math.ceil(maxx / r - 1e-9) * r
        y0 = math.floor(miny / r + 1e-9) * r
        w, h = max(1, round((x1 - x0) / r)), max(1, round((y1 - y0) / r))
        return cls((h, w), Affine(r, 0.0, x0, 0.0, -r, y1), norm_crs(crs))

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    @property
    def res(self) -> float:
        return float(self.transform.a)

    @property
    def pixel_area_m2(self) -> float:
        return abs(self.transform.a * self.transform.e)

    @property
    def bounds(self) -> BBox:
        t = self.transform
        return (t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)

    def bounds_in(self, crs: CRS | str) -> BBox:
        return tuple(transform_bounds(self.crs, norm_crs(crs), *self.bounds, densify_pts=21))

    def window_transform(self, window: Window) -> Affine:
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def window_bounds(self, window: Window) -> BBox:
        t = self.window_transform(window)
        return (t.c, t.f + t.e * window.height, t.c + t.a * window.width, t.f)

    def subgrid(self, window: Window) -> Grid:
        return Grid((int(window.height), int(window.width)), self.window_transform(window),
                    self.crs)

    def shifted(self, dx_px: float, dy_px: float) -> Grid:
        """The same grid translated by a sub-pixel offset (used to co-register a period)."""
        return Grid(self.shape, self.transform @ Affine.translation(dx_px, dy_px), self.crs)

    def blocks(self, size: int, halo: int = 0) -> Iterator[Block]:
        """Row-major blocks of ``size`` px with ``halo`` px of context clipped to the grid."""
        h, w = self.shape
        i = 0
        for r in range(0, h, size):
            for c in range(0, w, size):
                core = Window(c, r, min(size, w - c), min(size, h - r))
                r0, c0 = max(0, r - halo), max(0, c - halo)
                r1 = min(h, r + int(core.height) + halo)
                c1 = min(w, c + int(core.width) + halo)
                yield Block(i, core, Window(c0, r0, c1 - c0, r1 - r0))
                i += 1

    def auto_block_size(self, workers: int, *, largest: int | None = None,
                        smallest: int = SMALLEST_BLOCK, worker_px: float | None = None,
                        halo: int = BLOCK_HALO) -> int:
        """Big blocks (the halo costs less) but at least two per worker when the scene allows,
        in multiples of 128 px; 768 px at most above 64 Mpx, to bound worker memory; and, given
        ``worker_px`` (the pixels a worker's memory holds, :func:`pipeline.blocks.worker_px`),
        no bigger than that with its ``halo``."""
        if largest is None:
            largest = 768 if self.height * self.width > 64e6 else 1024
        side = math.sqrt(self.height * self.width / max(1, 2 * workers))
        size = int(min(largest, max(smallest, 128 * math.ceil(side / 128))))
        if worker_px is not None:
            fits = 128 * int((math.sqrt(worker_px) - 2 * halo) // 128)
            size = max(smallest, min(size, fits))
        return size

    def n_blocks(self, size: int) -> int:
        return math.ceil(self.height / size) * math.ceil(self.width / size)
