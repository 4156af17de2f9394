"""Ingest: describe each period's imagery, read windows of it onto the working grid, load rules.

Nothing here reads a whole image at full resolution. ``open_period``/``open_image`` read only
metadata (plus a ≤256 px thumbnail to pick a scale when nothing else says). A period is one of:

- multi-band GeoTIFF tiles (files, folders or globs), band roles from ``bands:``/``--bands``, a
  sensor preset, or the files' band descriptions / colour interpretation;
- per-band product files (Sentinel-2 ``*_B04.tif``, Landsat ``*_SR_B4.TIF``), recognised by
  name and grouped into tiles by file-name prefix, with their ``SCL``/``QA60``/``QA_PIXEL``
  masks (:mod:`pipeline.sensors`);
- a STAC Item / ItemCollection / Catalog JSON with local assets (:mod:`pipeline.stac`).

``read_block`` reads, for each tile and each file of it, the source window under one grid window
(plus a few pixels of resampling context), decimated with ``out_shape`` when the grid is coarser
than the source, and warps it with ``rasterio.warp.reproject`` (20/60 m bands are thus resampled
onto a 10 m grid). Product quality masks are folded into its ``valid`` mask. ``read_overview``
is ``read_block`` on a coarsened grid.
"""

from __future__ import annotations

import datetime as dt
import functools
import glob
import hashlib
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_args

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.enums import Resampling as RioResampling
from rasterio.errors import RasterioIOError, WindowError
from rasterio.transform import array_bounds
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from . import qa as qa_masks
from . import stac
from .config import PeriodConfig, PipelineConfig
from .errors import (
    BandRoleError,
    ConfigError,
    InputError,
    MissingCRSError,
    MissingFileError,
    NoOverlapError,
    NotRasterError,
)
from .grid import Grid, norm_crs
from .sensors import (
    DEFAULT_ROLES,
    NAME_ROLES,
    BandSet,
    QaKind,
    group_band_files,
    resolve_preset,
)
from .types import BandRole, BBox, Resampling

log = logging.getLogger(__name__)

#: Canonical output band order.
ROLE_ORDER: tuple[str, ...] = get_args(BandRole)
RASTER_EXTS = (".tif", ".tiff", ".jp2")

# Band descriptions / common names -> role (Sentinel-2 B01..B12, Landsat-8 SR_B1..SR_B7,
# STAC eo common names).
_DESC_ROLES: dict[str, str] = NAME_ROLES
_CI_ROLES = {ColorInterp.red: "red", ColorInterp.green: "green", ColorInterp.blue: "blue"}


@dataclass(frozen=True)
class Tile:
    """One tile of a period: enough metadata to plan reads without reopening for it.

    ``path`` is the tile's (reference) file and ``crs``/``bounds``/``shape`` describe it.
    ``bands`` gives, per role of the source (``ImageSource.roles`` order), the file and 1-based
    band to read: one multi-band file, or one file per band (per-band products, STAC assets),
    each on its own grid. ``qa`` lists product mask rasters folded into the valid mask.
    """

    path: Path
    crs: CRS
    bounds: BBox  # in the tile's own CRS
    shape: tuple[int, int]
    count: int
    bands: tuple[tuple[Path, int], ...] = ()
    qa: tuple[tuple[Path, QaKind], ...] = ()


@dataclass(frozen=True)
class ImageSource:
    """One period's imagery, described, not loaded. Picklable (sent to Dask workers)."""

    name: str
    date: dt.date | None
    sensor: str
    paths: tuple[Path, ...]
    roles: tuple[str, ...]  # output band order
    band_index: tuple[int, ...]  # 1-based, same order as roles
    scale: float
    offset: float
    nodata: float | None
    crs: CRS  # of the first tile
    bounds: BBox  # union of the tiles, in ``crs``
    res: float  # native pixel size in metres (approx)
    dtype: str
    tiles: tuple[Tile, ...] = ()


# --------------------------------------------------------------------------------- discovery


def _expand_images(entries: list[str] | tuple[str, ...], base_dir: Path) -> list[Path]:
    out: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if any(ch in entry for ch in "*?["):
            hits = [Path(h) for h in sorted(glob.glob(str(p), recursive=True))]
            hits = [h for h in hits if h.is_file()]
            if not hits:
                raise MissingFileError(f"{p}: pattern matches no file; check images: in the "
                                       "config")
            out += hits
        elif p.is_dir():
            hits = sorted(h for h in p.iterdir()
                          if h.is_file() and h.suffix.lower() in RASTER_EXTS)
            if not hits:
                raise MissingFileError(f"{p}: folder holds no *.tif/*.tiff/*.jp2; put the GeoTIFFs "
                                       "there or name the files (or a STAC *.json)")
            out += hits
        elif p.is_file():
            out.append(p)
        else:
            raise MissingFileError(f"{p}: no such file or folder; check the path")
    return list(dict.fromkeys(out))


def _metres_per_unit(crs: CRS, lat: float) -> tuple[float, float]:
    if crs.is_geographic:
        return 111_320.0 * math.cos(math.radians(lat)), 110_570.0
    f = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return f, f


_DATE_RE = re.compile(r"(?<!\d)((?:19[7-9]|20\d)\d)[-_.]?(0[1-9]|1[0-2])[-_.]?(0[1-9]|[12]\d|3[01])"
                      r"(?!\d)")


def _date_from_text(text: str) -> dt.date | None:
    for m in _DATE_RE.finditer(text):
        try:
            return dt.date(int(m[1]), int(m[2]), int(m[3]))
        except ValueError:
            continue
    return None


def _date_from_tags(tags: dict[str, str]) -> dt.date | None:
    for key in ("ACQUISITIONDATETIME", "ACQUISITION_DATE", "DATE_ACQUIRED", "TIFFTAG_DATETIME"):
        v = tags.get(key)
        if v and (d := _date_from_text(v.replace(":", "-", 2))):
            return d
    return None


def _roles_from_descriptions(ds: rasterio.DatasetReader) -> dict[str, int]:
    roles: dict[str, int] = {}
    for i, desc in enumerate(ds.descriptions, start=1):
        role = _DESC_ROLES.get((desc or "").strip().lower())
        if role and role not in roles:
            roles[role] = i
    if not {"red", "green", "blue"} <= set(roles):
        for i, ci in enumerate(ds.colorinterp, start=1):
            role = _CI_ROLES.get(ci)
            if role and role not in roles:
                roles[role] = i
    return roles


def _check_roles(bands: dict[str, int], count: int, path: Path) -> dict[str, int]:
    bad = sorted(set(bands) - set(ROLE_ORDER))
    if bad:
        raise BandRoleError(f"{path}: unknown band role {bad[0]!r}; use one of "
                            f"{', '.join(ROLE_ORDER)}")
    for role, idx in bands.items():
        if not 1 <= int(idx) <= count:
            raise BandRoleError(f"{path}: band {role}={idx} is out of range, the file has "
                                f"{count} band(s); fix bands: / --bands")
    missing = [r for r in ("red", "green", "blue") if r not in bands]
    if missing:
        raise BandRoleError(f"{path}: cannot tell which band is {'/'.join(missing)}; pass "
                            "--bands red=3,green=2,blue=1 or set bands: in the config")
    return bands


_F = TypeVar("_F", bound=Callable[..., Any])


def _gdal_reason(err: BaseException) -> str:
    """The innermost message of a chained GDAL error (the one that says what failed)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split())[:160]


def _names_file_on_read_error(fn: _F) -> _F:
    """GDAL read failures inside ``fn(path_or_dataset, ...)`` (a truncated or corrupt file
    whose header opens) become one :class:`InputError` naming the file."""
    @functools.wraps(fn)
    def wrapper(first: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(first, *args, **kw)
        except RasterioIOError as err:
            name = getattr(first, "name", first)
            raise InputError(f"{name}: cannot read its pixels ({_gdal_reason(err)}); the file "
                             "is truncated or corrupt: copy or export it again") from None
    return wrapper  # type: ignore[return-value]


@_names_file_on_read_error
def _sample_values(ds: rasterio.DatasetReader, band: int, n_side: int = 5,
                   size: int = 64) -> np.ndarray:
    """Valid non-zero values of ``band``: the ≤256 px overview when the file has overviews,
    else ``n_side``² small windows spread over the image (never a full decode)."""
    if ds.overviews(band) or max(ds.height, ds.width) <= 4 * size * n_side:
        f = max(1, math.ceil(max(ds.height, ds.width) / 256))
        parts = [ds.read(band, out_shape=(max(1, ds.height // f), max(1, ds.width // f)),
                         masked=True)]
    else:
        bh, bw = ds.block_shapes[band - 1]
        rows = np.linspace(0, ds.height - size, n_side).astype(int)
        cols = np.linspace(0, ds.width - size, n_side).astype(int)
        if bh >= size and bw >= size:  # each window inside one internal tile: one decode
            rows, cols = rows // bh * bh, cols // bw * bw
        parts = [ds.read(band, window=Window(int(c), int(r), size, size), masked=True)
                 for r in rows for c in cols]
    vals = np.concatenate([p.compressed().astype("float64") for p in parts])
    return vals[np.isfinite(vals) & (vals != 0)]


def _scale_for(ds: rasterio.DatasetReader, band: int, *, hint: float | None = None,
               hint_offset: float | None = None, bit_depth: int | None = None,
               ) -> tuple[float, float]:
    """(scale, offset) for DN -> reflectance: the data type first, then the product's factor
    (``hint``), then the sensor's bit depth, else DN / 10000."""
    dtype = np.dtype(ds.dtypes[band - 1])
    if dtype == np.uint8:
        return 1.0 / 255.0, 0.0
    vals = _sample_values(ds, band)
    p99 = float(np.percentile(vals, 99)) if vals.size else 0.0
    if dtype.kind == "f" and p99 <= 255:
        return (1.0, 0.0) if p99 <= 1.5 else (1.0 / 255.0, 0.0)
    if hint is not None:
        return float(hint), float(hint_offset or 0.0)
    if bit_depth and p99 <= 2 ** bit_depth:
        return 1.0 / (2 ** bit_depth - 1), 0.0
    if bit_depth == 8 and vals.size:  # 8-bit sensor delivered as 16-bit: its actual range
        bits = max(8, math.ceil(math.log2(float(vals.max()) + 1)))
        return 1.0 / (2 ** bits - 1), 0.0
    return 1e-4, 0.0


def _open_tiles(paths: list[Path], *, same_count: bool = True) -> list[Tile]:
    tiles: list[Tile] = []
    for p in paths:
        if not p.exists():
            raise MissingFileError(f"{p}: no such file; check the path")
        try:
            with rasterio.open(p) as ds:
                crs = ds.crs
                if crs is None or ds.transform == Affine.identity():
                    raise MissingCRSError(f"{p}: no coordinate reference system or "
                                          "georeference; assign one (e.g. gdal_edit.py -a_srs "
                                          "EPSG:4547) and retry")
                tiles.append(Tile(p, crs, tuple(ds.bounds), ds.shape, ds.count))
        except RasterioIOError:
            raise NotRasterError(f"{p}: not a raster GDAL can read (not an image, or cut short "
                                 "before its header); give a complete GeoTIFF") from None
    counts = {t.count for t in tiles}
    if same_count and len(counts) > 1:
        a, b = tiles[0], next(t for t in tiles if t.count != tiles[0].count)
        raise BandRoleError(f"{b.path}: has {b.count} bands but {a.path} has {a.count}; tiles "
                            "of one period must share the band layout, split them into periods "
                            "or fix the files")
    return tiles


def _union_bounds(tiles: list[Tile], crs: CRS) -> BBox:
    bs = [t.bounds if t.crs == crs else transform_bounds(t.crs, crs, *t.bounds, densify_pts=21)
          for t in tiles]
    return (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs),
            max(b[3] for b in bs))


def _native_res_m(tile: Tile) -> float:
    """Mean pixel size of ``tile`` in metres (approx. for geographic CRSs)."""
    lat = (tile.bounds[1] + tile.bounds[3]) / 2 if tile.crs.is_geographic else 0.0
    mx, my = _metres_per_unit(tile.crs, lat)
    rx = (tile.bounds[2] - tile.bounds[0]) / tile.shape[1]
    ry = (tile.bounds[3] - tile.bounds[1]) / tile.shape[0]
    return float((abs(rx) * mx + abs(ry) * my) / 2)


def _date_from_names(paths: list[Path] | tuple[Path, ...]) -> dt.date | None:
    for p in paths:
        if d := (_date_from_text(p.name) or _date_from_text(p.parent.name)):
            return d
    return None


def _single_band_folder_error(tiles: list[Tile]) -> BandRoleError:
    where = tiles[0].path.parent
    return BandRoleError(f"{where}: holds {len(tiles)} single-band files but none is named like "
                         "a Sentinel-2 (*_B04.tif) or Landsat (*_SR_B4.TIF) band; rename them "
                         "so, or stack them into one multi-band GeoTIFF")


def _source_from_files(paths: list[Path], *, name: str, date: dt.date | None,
                       sensor: str | None, bands: dict[str, int] | None, scale: float | None,
                       offset: float | None, nodata: float | None) -> ImageSource:
    """Multi-band tiles: every file holds every band, in the same order."""
    tiles = _open_tiles(paths)
    first = tiles[0]
    preset = resolve_preset(sensor) if sensor else None
    with rasterio.open(first.path) as ds:
        if bands:
            roles = dict(bands)
        elif preset is not None:
            roles = dict(preset.bands)
        else:
            roles = _roles_from_descriptions(ds)
            if len(tiles) > 1 and first.count == 1 and not roles:
                raise _single_band_folder_error(tiles)
        roles = _check_roles(roles, ds.count, first.path)
        order = [r for r in ROLE_ORDER if r in roles]
        if scale is None:
            scale, offset = _scale_for(
                ds, roles["red"], hint=preset.scale if preset else None,
                hint_offset=preset.offset if preset else None,
                bit_depth=preset.bit_depth if preset else None)
        if nodata is None:
            nodata = ds.nodata
        if date is None:
            date = _date_from_tags({**ds.tags(), **ds.tags(ns="IMAGERY")})
        dtype = ds.dtypes[roles["red"] - 1]
    index = tuple(int(roles[r]) for r in order)
    tiles = [replace(t, bands=tuple((t.path, i) for i in index)) for t in tiles]
    return ImageSource(
        name=name, date=date or _date_from_names(paths),
        sensor=sensor or (preset.name if preset else "unknown"), paths=tuple(paths),
        roles=tuple(order), band_index=index, scale=float(scale), offset=float(offset or 0.0),
        nodata=nodata, crs=first.crs, bounds=_union_bounds(tiles, first.crs),
        res=_native_res_m(first), dtype=str(dtype), tiles=tuple(tiles))


def _bandset_roles(sets: list[BandSet], bands: dict[str, int] | None, where: Path) -> list[str]:
    wanted = set(bands) if bands else set(DEFAULT_ROLES)
    bad = sorted(wanted - set(ROLE_ORDER))
    if bad:
        raise BandRoleError(f"{where}: unknown band role {bad[0]!r}; use one of "
                            f"{', '.join(ROLE_ORDER)}")
    roles = [r for r in ROLE_ORDER if r in wanted and all(r in s.bands for s in sets)]
    missing = [r for r in ("red", "green", "blue") if r not in roles]
    if missing:
        s = next(s for s in sets if any(r not in s.bands for r in missing))
        have = ", ".join(sorted(s.bands)) or "none"
        raise BandRoleError(f"{where}: tile {s.key} has no {'/'.join(missing)} band (has: "
                            f"{have}); add the missing band files/assets or give bands: with "
                            "roles it has")
    return roles


def _source_from_bandsets(sets: list[BandSet], where: Path, *, name: str,
                          date: dt.date | None, sensor: str | None,
                          bands: dict[str, int] | None, scale: float | None,
                          offset: float | None, nodata: float | None,
                          use_qa: bool) -> ImageSource:
    """Tiles whose bands are separate files (per-band products, STAC assets)."""
    preset = resolve_preset(sensor) if sensor else None
    roles = _bandset_roles(sets, bands, where)
    band_files = list(dict.fromkeys(p for s in sets for r in roles for p in [s.bands[r][0]]))
    qa_files = list(dict.fromkeys(p for s in sets for p, _ in s.qa)) if use_qa else []
    meta = {t.path: t for t in _open_tiles(band_files + qa_files, same_count=False)}
    tiles: list[Tile] = []
    for s in sets:
        refs = [s.bands[r] for r in roles]
        for p, i in refs:
            if not 1 <= i <= meta[p].count:
                raise BandRoleError(f"{p}: band {i} is out of range, the file has "
                                    f"{meta[p].count} band(s); fix the STAC eo:bands")
        ref = min((meta[p] for p, _ in refs), key=_native_res_m)
        tiles.append(replace(ref, bands=tuple(refs), qa=s.qa if use_qa else ()))
    first, red = sets[0], sets[0].bands["red"]
    with rasterio.open(red[0]) as ds:
        if scale is None:
            hint, hint_off = first.scale, first.offset
            if hint is None and preset is not None:
                hint, hint_off = preset.scale, preset.offset
            scale, offset = _scale_for(ds, red[1], hint=hint, hint_offset=hint_off,
                                       bit_depth=preset.bit_depth if preset else None)
        if nodata is None:
            nodata = ds.nodata
        dtype = ds.dtypes[red[1] - 1]
        tag_date = _date_from_tags({**ds.tags(), **ds.tags(ns="IMAGERY")})
    dates = [s.date for s in sets if s.date is not None]
    date = date or (min(dates) if dates else None) or tag_date or _date_from_names(band_files)
    res = first.res_m or _native_res_m(tiles[0])
    return ImageSource(
        name=name, date=date, sensor=sensor or first.sensor or "unknown",
        paths=tuple(band_files + qa_files), roles=tuple(roles),
        band_index=tuple(first.bands[r][1] for r in roles), scale=float(scale),
        offset=float(offset or 0.0), nodata=nodata, crs=tiles[0].crs,
        bounds=_union_bounds(tiles, tiles[0].crs), res=float(res), dtype=str(dtype),
        tiles=tuple(tiles))


def _build_source(paths: list[Path], *, name: str, date: dt.date | None, sensor: str | None,
                  bands: dict[str, int] | None, scale: float | None, offset: float | None,
                  nodata: float | None, use_qa: bool = True) -> ImageSource:
    jsons = [p for p in paths if p.suffix.lower() == ".json"]
    sets: list[BandSet] = []
    where = paths[0].parent
    if jsons:
        if len(jsons) != len(paths):
            other = next(p for p in paths if p not in jsons)
            raise InputError(f"{other}: a period is either STAC JSON or image files, not both; "
                             f"list {jsons[0].name} and the images in separate periods")
        sets, where = [bs for j in jsons for bs in stac.read_bandsets(j)], jsons[0]
    else:
        sets, rest = group_band_files(paths, sensor)
        if sets and rest:
            log.warning("ignoring %d file(s) that are not bands of a recognised product: %s",
                        len(rest), ", ".join(p.name for p in rest[:5]))
    if sets:
        return _source_from_bandsets(sets, where, name=name, date=date, sensor=sensor,
                                     bands=bands, scale=scale, offset=offset, nodata=nodata,
                                     use_qa=use_qa)
    return _source_from_files(paths, name=name, date=date, sensor=sensor, bands=bands,
                              scale=scale, offset=offset, nodata=nodata)


def open_period(cfg: PeriodConfig, base_dir: Path) -> ImageSource:
    """Describe one period of a config: discover its tiles, band roles, scale and date."""
    paths = _expand_images(cfg.images, Path(base_dir))
    return _build_source(paths, name=cfg.name, date=cfg.date, sensor=cfg.sensor,
                         bands=dict(cfg.bands) if cfg.bands else None, scale=cfg.scale,
                         offset=cfg.offset if cfg.scale is not None else None,
                         nodata=cfg.nodata, use_qa=bool(getattr(cfg, "qa", True)))


def open_image(path: str | Path, *, bands: dict[str, int] | None = None,
               sensor: str | None = None, name: str | None = None,
               qa: bool = True) -> ImageSource:
    """Describe one image for ``tuban compare``: a file, a folder of tiles or of per-band
    product files, or a STAC JSON. ``qa=False`` ignores product cloud masks."""
    p = Path(path)
    paths = _expand_images([str(p)], Path.cwd())
    return _build_source(paths, name=name or p.stem, date=None, sensor=sensor, bands=bands,
                         scale=None, offset=None, nodata=None, use_qa=qa)


# ------------------------------------------------------------------------------------- grid


def footprint(src: ImageSource, crs: CRS | str) -> BBox:
    """Bounding box of all of ``src``'s tiles in ``crs``."""
    return _union_bounds(list(src.tiles), norm_crs(crs))


def working_grid(sources: list[ImageSource], *, crs: CRS | str, resolution: float,
                 bounds: BBox | None = None) -> Grid:
    """The periods' common footprint in ``crs``, snapped to ``resolution``.

    :raises NoOverlapError: when the images (or ``bounds``) do not overlap.
    """
    crs = norm_crs(crs, "working CRS")
    boxes = [(s.paths[0], footprint(s, crs)) for s in sources]
    if bounds is not None:
        boxes.append((Path("bounds: in the config"), tuple(bounds)))
    minx = max(b[0] for _, b in boxes)
    miny = max(b[1] for _, b in boxes)
    maxx = min(b[2] for _, b in boxes)
    maxy = min(b[3] for _, b in boxes)
    if not (maxx - minx >= resolution and maxy - miny >= resolution):
        names = " and ".join(str(p) for p, _ in boxes)
        raise NoOverlapError(f"{names} do not overlap; check that both images cover the same "
                             "area and have correct CRS")
    return Grid.from_bounds((minx, miny, maxx, maxy), resolution, crs)


# ------------------------------------------------------------------------------------ reads


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


@_names_file_on_read_error
def _warp_file(path: Path, indexes: list[int], dst_transform: Affine,
               dst_shape: tuple[int, int], dst_crs: CRS, resampling: str,
               nodata: float | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Bands ``indexes`` of one file warped onto the destination window:
    (float32 DN with NaN, bool valid), or None when the file does not reach the window."""
    h, w = dst_shape
    left, bottom, right, top = array_bounds(h, w, dst_transform)
    ds = _dataset(path)
    off = _same_grid_window(ds, dst_transform, dst_crs)
    if off is not None:  # the working grid is the file's own: no resampling needed
        return _read_direct(ds, indexes, off, dst_shape, nodata)
    ratio = min(abs(dst_transform.a), abs(dst_transform.e)) / _src_px_in_dst(ds, dst_crs)
    win = _src_window(ds, (left, bottom, right, top), dst_crs, ratio)
    if win is None:
        return None
    factor = max(1, int(ratio))  # read decimated (overviews/out_shape) when grid is coarser
    out_h = max(1, math.ceil(win.height / factor))
    out_w = max(1, math.ceil(win.width / factor))
    down = RioResampling.average if factor > 1 else RioResampling.nearest
    data = ds.read(indexes, window=win, out_shape=(len(indexes), out_h, out_w),
                   resampling=down)
    mask = ds.dataset_mask(window=win, out_shape=(out_h, out_w),
                           resampling=RioResampling.nearest) > 0
    src_transform = ds.window_transform(win) @ Affine.scale(win.width / out_w,
                                                             win.height / out_h)
    src_crs = ds.crs
    arr = data.astype("float32")
    mask &= np.isfinite(arr).all(axis=0)
    mask &= (arr != 0).any(axis=0)
    if nodata is not None and np.isfinite(nodata):
        mask &= (arr != np.float32(nodata)).any(axis=0)
    arr[:, ~mask] = np.nan
    out = np.full((arr.shape[0], h, w), np.nan, dtype="float32")
    rs = RioResampling[resampling]
    if rs in (RioResampling.bilinear, RioResampling.cubic) and ratio >= 1.5:
        rs = RioResampling.average  # downsampling: average, not aliasing interpolation
    reproject(arr, out, src_transform=src_transform, src_crs=src_crs, src_nodata=np.nan,
              dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=np.nan, resampling=rs)
    vout = np.zeros((h, w), dtype="uint8")
    reproject(mask.astype("uint8"), vout, src_transform=src_transform, src_crs=src_crs,
              src_nodata=None, dst_transform=dst_transform, dst_crs=dst_crs, dst_nodata=None,
              resampling=RioResampling.nearest)
    valid = (vout > 0) & np.isfinite(out).all(axis=0)
    return out, valid


@_names_file_on_read_error
def _qa_invalid(path: Path, kind: QaKind, dst_transform: Affine, dst_shape: tuple[int, int],
                dst_crs: CRS) -> np.ndarray | None:
    """A product mask decoded (:mod:`pipeline.qa`) and put on the destination window (nearest);
    True = not observed. None where the mask file does not reach the window."""
    h, w = dst_shape
    with rasterio.open(path) as ds:
        ratio = min(abs(dst_transform.a), abs(dst_transform.e)) / _src_px_in_dst(ds, dst_crs)
        win = _src_window(ds, array_bounds(h, w, dst_transform), dst_crs, ratio)
        if win is None:
            return None
        factor = max(1, int(ratio))
        out_h = max(1, math.ceil(win.height / factor))
        out_w = max(1, math.ceil(win.width / factor))
        codes = ds.read(1, window=win, out_shape=(out_h, out_w),
                        resampling=RioResampling.nearest)
        src_transform = ds.window_transform(win) @ Affine.scale(win.width / out_w,
                                                                 win.height / out_h)
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


# ------------------------------------------------------------------------------ vector layers


def load_layer(path: str | Path, crs: CRS | str, bounds: BBox | None = None,
               layer: str | None = None, where: str | None = None) -> gpd.GeoDataFrame:
    """Read a vector layer, filtered to ``bounds`` (in ``crs``), reprojected and repaired."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file; check the rule/admin layer path")
    crs = norm_crs(crs, "working CRS")
    try:
        info = pyogrio.read_info(p, layer=layer)
    except Exception as err:  # pyogrio raises DataSourceError/DataLayerError and others
        if layer is not None and "layer" in str(err).lower():
            raise InputError(f"{p}: has no layer {layer!r}; available: "
                             f"{', '.join(str(x[0]) for x in _layers(p))}") from None
        raise InputError(f"{p}: not a vector file GDAL can read; give GeoPackage, GeoJSON or "
                         "Shapefile") from None
    if not info.get("crs"):
        raise MissingCRSError(f"{p}: vector layer has no CRS; assign one (e.g. ogr2ogr -a_srs "
                              "EPSG:4326) and retry")
    bbox = None
    if bounds is not None:
        bbox = tuple(transform_bounds(crs, CRS.from_user_input(info["crs"]), *bounds,
                                      densify_pts=21))
    try:
        gdf = pyogrio.read_dataframe(p, layer=layer, where=where, bbox=bbox)
    except Exception as err:
        raise InputError(f"{p}: cannot read ({' '.join(str(err).split())}); check where:/layer:"
                         ) from None
    gdf = gdf.to_crs(crs)
    geoms = shapely.make_valid(gdf.geometry.values)
    if len(gdf) and shapely.get_dimensions(gdf.geometry.values).max() == 2:
        geoms = np.array([_polygonal(g) for g in geoms], dtype=object)
    gdf = gdf.set_geometry(gpd.GeoSeries(geoms, index=gdf.index, crs=crs))
    return gdf[~gdf.geometry.is_empty & gdf.geometry.notna()]


def _layers(p: Path) -> list[tuple[str, str]]:
    try:
        return [tuple(x) for x in pyogrio.list_layers(p)]
    except Exception:
        return []


def _polygonal(g: shapely.Geometry | None) -> shapely.Geometry | None:
    if g is None or g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    parts = [x for x in shapely.get_parts(g) if x.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def load_rules(cfg: PipelineConfig, grid: Grid) -> dict[str, gpd.GeoDataFrame]:
    """Every rule layer of the config, clipped to the grid's bounds, in the working CRS."""
    return {role: load_layer(cfg.path(rc.path), grid.crs, bounds=grid.bounds, layer=rc.layer,
                             where=rc.where) for role, rc in cfg.rules.items()}


def load_admin(cfg: PipelineConfig, grid: Grid) -> gpd.GeoDataFrame:
    """Street-office boundaries as ``admin_code``, ``admin_name``, geometry (may be empty)."""
    if cfg.admin is None:
        return gpd.GeoDataFrame({"admin_code": [], "admin_name": []}, geometry=[], crs=grid.crs)
    a = cfg.admin
    gdf = load_layer(cfg.path(a.path), grid.crs, bounds=grid.bounds, layer=a.layer)
    for key, fld in (("code_field", a.code_field), ("name_field", a.name_field)):
        if fld not in gdf.columns:
            avail = ", ".join(c for c in gdf.columns if c != gdf.geometry.name)
            raise ConfigError(f"{cfg.path(a.path)}: admin.{key} {fld!r} is not a field of the "
                              f"layer; available: {avail}")
    return gpd.GeoDataFrame({"admin_code": gdf[a.code_field].astype(str).to_numpy(),
                             "admin_name": gdf[a.name_field].astype(str).to_numpy()},
                            geometry=gdf.geometry.to_numpy(), crs=grid.crs)


def file_checksum(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
