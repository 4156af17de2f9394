"""Read windows of a period onto the working grid, and whole-scene overviews.

``read_block`` reads, for each tile and each file of it, the source window under one grid window
(plus a few pixels of resampling context), decimated with ``out_shape`` when the grid is coarser
than the source, and warps it with ``rasterio.warp.reproject`` (20/60 m bands are thus resampled
onto a 10 m grid). Product quality masks are folded into its ``valid`` mask. ``read_overview``
is ``read_block`` on a coarsened grid.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.enums import Resampling as RioResampling
from rasterio.errors import WindowError
from rasterio.transform import array_bounds
from rasterio.warp import reproject
from rasterio.windows import Window, from_bounds

from .. import qa as qa_masks
from ..grid import Grid, transform_bounds
from ..sensors import QaKind
from ..types import BBox, Resampling
from .imagery import ImageSource, Tile, names_file_on_read_error


def _src_window(ds: rasterio.DatasetReader, dst_bounds: BBox, dst_crs: CRS, ratio: float,
                pad_dst_px: int = 3) -> Window | None:
    """Source window under ``dst_bounds`` plus ``pad_dst_px`` destination pixels of context."""
    b = dst_bounds if dst_crs == ds.crs else transform_bounds(dst_crs, ds.crs, *dst_bounds,
                                                              densify_pts=21)
    w0 = from_bounds(*b, transform=ds.transform)
    pad = (pad_dst_px + 1) * max(1.0, ratio)
    c0, r0 = math.floor(w0.col_off - pad), math.floor(w0.row_off - pad)
    c1 = math.ceil(w0.col_off + w0.width + pad)
    r1 = math.ceil(w0.row_off + w0.height + pad)
    if c1 <= 0 or r1 <= 0 or c0 >= ds.width or r0 >= ds.height:
        return None
    try:
        win = Window(c0, r0, c1 - c0, r1 - r0).intersection(Window(0, 0, ds.width, ds.height))
    except WindowError:
        return None
    return win if win.width >= 1 and win.height >= 1 else None


def _src_px_in_dst(ds: rasterio.DatasetReader, dst_crs: CRS) -> float:
    """Approximate size of one source pixel in destination CRS units."""
    if dst_crs == ds.crs:
        return float(min(abs(ds.transform.a), abs(ds.transform.e)))
    cx, cy = ds.transform @ (ds.width / 2, ds.height / 2)
    n = 16  # a 16-pixel box, for numerical stability
    b = transform_bounds(ds.crs, dst_crs, cx, cy, cx + n * abs(ds.transform.a),
                         cy + n * abs(ds.transform.e))
    return max(min(abs(b[2] - b[0]), abs(b[3] - b[1])) / n, 1e-12)


_OPEN: dict[tuple[Path, int, int, int], rasterio.DatasetReader] = {}


def _dataset(path: Path) -> rasterio.DatasetReader:
    """An open handle on ``path``, kept per process (one per worker); a file rewritten in
    place (new size or mtime) gets a fresh handle. A process forked from one that had the file
    open opens its own: a handle inherited across fork shares its file offset with the
    parent's, and concurrent reads through both return corrupt tiles."""
    st = path.stat()
    key = (path, st.st_mtime_ns, st.st_size, os.getpid())
    ds = _OPEN.get(key)
    if ds is None or ds.closed:
        for k in [k for k in _OPEN if k[3] != key[3]]:  # inherited: leave them to the parent
            del _OPEN[k]
        if len(_OPEN) >= 64:
            for old in _OPEN.values():
                old.close()
            _OPEN.clear()
        ds = _OPEN[key] = rasterio.open(path)
    return ds


def _same_grid_window(ds: rasterio.DatasetReader, dst_transform: Affine, dst_crs: CRS,
                      ) -> tuple[int, int] | None:
    """(col, row) offset when the destination is the source grid shifted by whole pixels."""
    t = ds.transform
    if dst_crs != ds.crs or t.b or t.d or dst_transform.b or dst_transform.d:
        return None
    if abs(t.a - dst_transform.a) > 1e-9 * abs(t.a) or abs(t.e - dst_transform.e) > 1e-9 * abs(t.e):
        return None
    c = (dst_transform.c - t.c) / t.a
    r = (dst_transform.f - t.f) / t.e
    if abs(c - round(c)) > 1e-6 or abs(r - round(r)) > 1e-6:
        return None
    return int(round(c)), int(round(r))


def _needs_dataset_mask(ds: rasterio.DatasetReader, nodata: float | None) -> bool:
    """False when GDAL's mask says no more than the nodata test already made: every band
    all valid, or masked by the file's own nodata value where that is ``nodata``."""
    flags = ds.mask_flag_enums
    if all(f == [MaskFlags.all_valid] for f in flags):
        return False
    return not (all(f == [MaskFlags.nodata] for f in flags) and ds.nodata is not None
                and nodata is not None and float(ds.nodata) == float(nodata))


def _read_direct(ds: rasterio.DatasetReader, indexes: list[int], off: tuple[int, int],
                 dst_shape: tuple[int, int], nodata: float | None,
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    h, w = dst_shape
    c0, r0 = off
    cc0, rr0 = max(c0, 0), max(r0, 0)
    cc1, rr1 = min(c0 + w, ds.width), min(r0 + h, ds.height)
    if cc1 <= cc0 or rr1 <= rr0:
        return None
    win = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
    data = ds.read(indexes, window=win).astype("float32", copy=False)
    mask = (data != 0).any(axis=0)
    if nodata is not None and np.isfinite(nodata):
        mask &= (data != np.float32(nodata)).any(axis=0)
    if data.dtype.kind == "f":
        mask &= np.isfinite(data).all(axis=0)
    if _needs_dataset_mask(ds, nodata):
        mask &= ds.dataset_mask(window=win) > 0
    sl = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
    if not mask.all():
        data[:, ~mask] = np.nan
    if (cc0, rr0, cc1, rr1) == (c0, r0, c0 + w, r0 + h):  # the whole window: no padding
        return data, mask
    out = np.full((len(indexes), h, w), np.nan, dtype="float32")
    valid = np.zeros((h, w), dtype=bool)
    out[(slice(None), *sl)] = data
    valid[sl] = mask
    return out, valid


def _source_read(ds: rasterio.DatasetReader, dst_transform: Affine, dst_shape: tuple[int, int],
                 dst_crs: CRS) -> tuple[float, Window, tuple[int, int], Affine] | None:
    """How to read a file for a destination window: the destination-to-source pixel ratio,
    the source window under it (plus resampling context), the shape to read it at (decimated
    by the ratio's integer part where the grid is coarser: overviews, ``out_shape``) and that
    read's transform; None when the file does not reach the window."""
    h, w = dst_shape
    ratio = min(abs(dst_transform.a), abs(dst_transform.e)) / _src_px_in_dst(ds, dst_crs)
    win = _src_window(ds, array_bounds(h, w, dst_transform), dst_crs, ratio)
    if win is None:
        return None
    factor = max(1, int(ratio))
    shape = (max(1, math.ceil(win.height / factor)), max(1, math.ceil(win.width / factor)))
    src_transform = ds.window_transform(win) @ Affine.scale(win.width / shape[1],
                                                             win.height / shape[0])
    return ratio, win, shape, src_transform


@names_file_on_read_error
def _warp_file(path: Path, indexes: list[int], dst_transform: Affine,
               dst_shape: tuple[int, int], dst_crs: CRS, resampling: str,
               nodata: float | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Bands ``indexes`` of one file warped onto the destination window:
    (float32 DN with NaN, bool valid), or None when the file does not reach the window."""
    h, w = dst_shape
    ds = _dataset(path)
    off = _same_grid_window(ds, dst_transform, dst_crs)
    if off is not None:  # the working grid is the file's own: no resampling needed
        return _read_direct(ds, indexes, off, dst_shape, nodata)
    plan = _source_read(ds, dst_transform, dst_shape, dst_crs)
    if plan is None:
        return None
    ratio, win, shape, src_transform = plan
    down = RioResampling.average if ratio >= 2 else RioResampling.nearest  # decimated read
    data = ds.read(indexes, window=win, out_shape=(len(indexes), *shape), resampling=down)
    mask = ds.dataset_mask(window=win, out_shape=shape, resampling=RioResampling.nearest) > 0
    src_crs = ds.crs
    arr = data.astype("float32")
    mask &= np.isfinite(arr).all(axis=0)
    mask &= (arr != 0).any(axis=0)
    if nodata is not None and np.isfinite(nodata):
        mask &= (arr != np.float32(nodata)).any(axis=0)
    out = np.full((arr.shape[0], h, w), np.nan, dtype="float32")
    rs = RioResampling[resampling]
    if rs in (RioResampling.bilinear, RioResampling.cubic) and ratio >= 1.5:
        rs = RioResampling.average  # downsampling: average, not aliasing interpolation
    # with nothing to leave out, GDAL's kernels without per-pixel validity (about twice as
    # fast); not initialised, ``out`` keeps NaN where no source pixel lands, as with NaN
    # nodata (same result to the bit)
    whole = bool(mask.all())
    if not whole:
        arr[:, ~mask] = np.nan
    nd = None if whole else np.nan
    reproject(arr, out, src_transform=src_transform, src_crs=src_crs, src_nodata=nd,
              dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=nd,
              init_dest_nodata=not whole, resampling=rs)
    vout = np.zeros((h, w), dtype="uint8")
    reproject(mask.astype("uint8"), vout, src_transform=src_transform, src_crs=src_crs,
              src_nodata=None, dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=None,
              resampling=RioResampling.nearest)
    valid = (vout > 0) & np.isfinite(out).all(axis=0)
    return out, valid


@names_file_on_read_error
def _qa_invalid(path: Path, kind: QaKind, dst_transform: Affine, dst_shape: tuple[int, int],
                dst_crs: CRS) -> np.ndarray | None:
    """A product mask decoded (:mod:`pipeline.qa`) and put on the destination window (nearest);
    True = not observed. None where the mask file does not reach the window."""
    h, w = dst_shape
    ds = _dataset(path)
    plan = _source_read(ds, dst_transform, dst_shape, dst_crs)
    if plan is None:
        return None
    _, win, shape, src_transform = plan
    codes = ds.read(1, window=win, out_shape=shape, resampling=RioResampling.nearest)
    src_crs = ds.crs
    bad = qa_masks.invalid_mask(kind, codes).astype("uint8")
    out = np.zeros((h, w), dtype="uint8")  # outside the mask's footprint: no information
    reproject(bad, out, src_transform=src_transform, src_crs=src_crs, src_nodata=None,
              dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=None,
              resampling=RioResampling.nearest)
    return out > 0


def _read_tile(tile: Tile, src: ImageSource, dst_transform: Affine, dst_shape: tuple[int, int],
               dst_crs: CRS, resampling: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One tile (all its band files, minus its product mask) on the destination window."""
    refs = tile.bands or tuple((tile.path, i) for i in src.band_index)
    groups: dict[Path, list[tuple[int, int]]] = {}
    for pos, (p, i) in enumerate(refs):
        groups.setdefault(p, []).append((pos, i))
    out = np.full((len(refs), *dst_shape), np.nan, dtype="float32")
    valid = np.ones(dst_shape, dtype=bool)
    for p, items in groups.items():
        got = _warp_file(p, [i for _, i in items], dst_transform, dst_shape, dst_crs,
                         resampling, src.nodata)
        if got is None:
            return None
        arr, v = got
        out[[pos for pos, _ in items]] = arr
        valid &= v
    for p, kind in tile.qa:
        bad = _qa_invalid(p, kind, dst_transform, dst_shape, dst_crs)
        if bad is not None:
            valid &= ~bad
    return out, valid


def read_block(src: ImageSource, grid: Grid, window: Window, *,
               resampling: Resampling = "bilinear",
               shift_px: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Read one window of the working grid from ``src`` as reflectance.

    Returns float32 ``(len(src.roles), h, w)`` reflectance (DN * scale + offset, NaN where not
    valid) and bool ``valid`` (h, w): False where nodata, masked, NaN, all-zero or outside every
    tile. Tiles are mosaicked first-valid-wins. ``shift_px = (dx, dy)`` samples the source at
    grid position (col + dx, row + dy) for output pixel (row, col): pass the shift returned by
    :func:`pipeline.align.estimate_shift` to line the moving image up with the reference.
    Only the source window under ``window`` (plus a few pixels of resampling context) is read,
    decimated with ``out_shape`` when the grid is coarser than the source.
    """
    h, w = int(window.height), int(window.width)
    g = grid.shifted(*shift_px) if any(shift_px) else grid
    dst_transform = g.window_transform(window)
    out = np.full((len(src.roles), h, w), np.nan, dtype="float32")
    valid = np.zeros((h, w), dtype=bool)
    for tile in src.tiles:
        got = _read_tile(tile, src, dst_transform, (h, w), grid.crs, resampling)
        if got is None:
            continue
        arr, tvalid = got
        if not valid.any():
            out, valid = arr, tvalid.copy()
        else:
            take = tvalid & ~valid
            out[:, take] = arr[:, take]
            valid |= take
        if valid.all():
            break
    out *= np.float32(src.scale)
    out += np.float32(src.offset)
    if not valid.all():
        out[:, ~valid] = np.nan
    return out, valid


def overview_grid(grid: Grid, max_size: int = 1024) -> Grid:
    """``grid`` coarsened by an integer factor so its long side is ≤ ``max_size``."""
    f = max(1, math.ceil(max(grid.shape) / max_size))
    shape = (math.ceil(grid.height / f), math.ceil(grid.width / f))
    return Grid(shape, grid.transform @ Affine.scale(f), grid.crs)


def read_overview(src: ImageSource, grid: Grid, max_size: int = 1024,
                  ) -> tuple[np.ndarray, np.ndarray, Grid]:
    """The whole ``grid`` decimated to ≤ ``max_size`` px (average), for global parameters."""
    og = overview_grid(grid, max_size)
    arr, valid = read_block(src, og, Window(0, 0, og.width, og.height), resampling="average")
    return arr, valid, og

