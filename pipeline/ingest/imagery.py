"""Describe each period's imagery: tiles, band roles, date, scale, nodata; the working grid.

Nothing here reads a whole image: ``open_period``/``open_image`` read only metadata (plus a
≤256 px thumbnail to pick a scale when nothing else says). A period is one of:

- multi-band GeoTIFF tiles (files, folders or globs), band roles from ``bands:``/``--bands``, a
  sensor preset, or the files' band descriptions / colour interpretation;
- per-band product files (Sentinel-2 ``*_B04.tif``, Landsat ``*_SR_B4.TIF``), recognised by
  name and grouped into tiles by file-name prefix, with their ``SCL``/``QA60``/``QA_PIXEL``
  masks (:mod:`pipeline.sensors`);
- a STAC Item / ItemCollection / Catalog JSON with local assets (:mod:`pipeline.stac`).
"""

from __future__ import annotations

import datetime as dt
import functools
import glob
import hashlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_args

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from .. import stac
from ..config import PeriodConfig
from ..errors import (
    BandRoleError,
    InputError,
    MissingCRSError,
    MissingFileError,
    NoOverlapError,
    NotRasterError,
)
from ..grid import Grid, norm_crs, transform_bounds
from ..sensors import (
    DEFAULT_ROLES,
    NAME_ROLES,
    BandSet,
    QaKind,
    group_band_files,
    resolve_preset,
)
from ..types import BandRole, BBox

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
    if missing and count < 3:
        raise BandRoleError(f"{path}: has {count} band(s), and tuban needs red, green and "
                            "blue (a panchromatic or radar image alone is not enough); give "
                            "the multispectral or pan-sharpened product")
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


def names_file_on_read_error(fn: _F) -> _F:
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


@names_file_on_read_error
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



def file_checksum(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
