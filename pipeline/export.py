"""The only writer of results: GeoJSON, GeoPackage, COG, tasks.csv, evidence PNGs, report, manifest.

Each ``write_*`` function writes one file atomically (temp file, fsync, rename).
:func:`export_all` writes everything into a staging folder next to ``outdir`` and moves the files
in only when all of them were written, manifest last, so a failed export leaves ``outdir`` as it
was.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import gc
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape as xml_escape

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import rasterio.shutil
import shapely

from . import report as report_mod
from .atomic import atomic_open, atomic_write, staging_dir
from .errors import InputError, TubanWarning
from .evidence import (
    EVIDENCE_FIELDS,
    ChipReader,
    chip_bounds,
    has_cjk_font,
    render_all,
    render_evidence,
)
from .grid import norm_crs, transform_bounds
from .progress import Progress
from .report import CATEGORY_COLORS, office_task_name
from .track import empty_register, issued, match
from .types import CATEGORY_CODES, CATEGORY_ZH, MU_M2, NOT_OBSERVED, VIOLATIONS, BBox
from .values import jsonable

if TYPE_CHECKING:
    from .config import PipelineConfig

log = logging.getLogger(__name__)

#: renders the evidence PNGs of many ``(patch, chip bounds)`` at a panel width, in order;
#: the error message instead of the PNG where a chip cannot be read (see pipeline.chips)
EvidenceRenderer = Callable[[list[tuple[dict[str, Any], BBox]], int], Iterator[bytes | str]]

#: Patch-record fields in output order (extra columns follow).
PATCH_FIELDS: tuple[str, ...] = (
    "patch_id", "category", "category_zh", "confidence", "area_m2", "area_mu", "centroid_lon",
    "centroid_lat", "admin_code", "admin_name", "forest_m2", "farmland_m2",
    "ecological_redline_m2", "permits_m2", "cemeteries_m2", "water_m2", "construction_land_m2",
    "before_date", "after_date", "sensor", "resolution_m", "run_id", "first_seen", "status",
    "evidence", "ndvi_before", "ndvi_after", "bright_before", "bright_after")

#: tasks.csv columns: (field, Chinese header); the header cell is ``"<中文> <field>"``.
TASK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("seq", "序号"), ("patch_id", "图斑编号"), ("admin_name", "街道"), ("admin_code", "街道代码"),
    ("category_zh", "类别"), ("category", "类别代码"), ("priority", "优先级"),
    ("area_mu", "面积(亩)"), ("area_m2", "面积(平方米)"), ("confidence", "置信度"),
    ("centroid_lon", "经度"), ("centroid_lat", "纬度"), ("status", "状态"),
    ("first_seen", "首次发现"), ("before_date", "前时相"), ("after_date", "后时相"),
    ("evidence", "证据图"))
DEFAULT_PRIORITIES: dict[str, int] = {"illegal_construction": 1, "forest_grave": 1,
                                      "land_occupation": 2, "other_change": 4}
_COORD_DECIMALS = 7


# --------------------------------------------------------------------------- values


def _json_column(col: pd.Series) -> list[Any]:
    """:func:`jsonable` of every value of a column, a whole numeric column at a time."""
    kind = col.dtype.kind if isinstance(col.dtype, np.dtype) else "O"  # not nullable ones
    if kind == "f":
        vals = col.to_numpy(dtype=float)
        return [v if math.isfinite(v) else None for v in vals.tolist()]
    if kind in "iub":
        return col.tolist()
    if kind == "O" and pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty"):
        return [v if isinstance(v, str) else None for v in col.tolist()]  # None, NaN, NA
    return [jsonable(v) for v in col.tolist()]


def _ordered_columns(df: pd.DataFrame) -> list[str]:
    geom = df.geometry.name if isinstance(df, gpd.GeoDataFrame) else "geometry"
    cols = [c for c in PATCH_FIELDS if c in df.columns]
    return cols + [c for c in df.columns if c not in cols and c != geom]


# --------------------------------------------------------------------------- GeoJSON / GPKG


def _round_coords(coords: Any) -> Any:
    if isinstance(coords[0], int | float):
        return [round(float(c), _COORD_DECIMALS) for c in coords]
    return [_round_coords(c) for c in coords]


def _ring_coords(poly: shapely.Polygon) -> list:
    return [np.round(np.asarray(r.coords), _COORD_DECIMALS).tolist()
            for r in (poly.exterior, *poly.interiors)]


def _geojson_geometry(geom: shapely.Geometry) -> dict[str, Any]:
    """GeoJSON geometry with coordinates rounded to ``_COORD_DECIMALS`` (whole rings at a
    time for polygons: 110k patches)."""
    if geom.geom_type == "Polygon":
        return {"type": "Polygon", "coordinates": _ring_coords(geom)}
    if geom.geom_type == "MultiPolygon":
        return {"type": "MultiPolygon", "coordinates": [_ring_coords(p) for p in geom.geoms]}
    m = shapely.geometry.mapping(geom)
    return {"type": m["type"], "coordinates": _round_coords(m["coordinates"])}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building millions of small lists (coordinates,
    rows) otherwise triggers full collections over everything already built (110k patches:
    GeoJSON 2.7 s -> 1.3 s). Export makes no reference cycles worth collecting meanwhile."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def geojson_geometries(geoms: np.ndarray) -> list[dict[str, Any] | None]:
    """:func:`_geojson_geometry` of every geometry (None where missing or empty), polygons all
    at once: one coordinate array rounded and listed for the whole set, then cut into rings
    (110k patches: 0.3 s instead of 4 s one geometry at a time)."""
    geoms = np.asarray(geoms, dtype=object)
    out: list[dict[str, Any] | None] = [None] * len(geoms)
    if not len(geoms):
        return out
    types = shapely.get_type_id(geoms).tolist()  # -1 missing, 3 Polygon, 6 MultiPolygon
    empty = (shapely.is_empty(geoms) | shapely.is_missing(geoms)).tolist()
    polygonal = np.array([t in (3, 6) and not e for t, e in zip(types, empty, strict=True)])
    sel = np.flatnonzero(polygonal)
    polys, gidx = shapely.get_parts(geoms[sel], return_index=True)
    rings, pidx = shapely.get_rings(polys, return_index=True)  # exterior first, in order
    xy = np.round(shapely.get_coordinates(rings), _COORD_DECIMALS).tolist()
    per_poly: list[list[list]] = [[] for _ in range(len(polys))]
    pos = 0
    for n, p in zip(shapely.get_num_coordinates(rings).tolist(), pidx.tolist(), strict=True):
        per_poly[p].append(xy[pos:pos + n])
        pos += n
    per_geom: list[list[list[list]]] = [[] for _ in range(len(sel))]
    for rs, g in zip(per_poly, gidx.tolist(), strict=True):
        per_geom[g].append(rs)
    for k, i in enumerate(sel.tolist()):
        out[i] = ({"type": "Polygon", "coordinates": per_geom[k][0]} if types[i] == 3
                  else {"type": "MultiPolygon", "coordinates": per_geom[k]})
    for i in np.flatnonzero(~polygonal).tolist():  # other geometry types, one at a time
        if not empty[i]:
            out[i] = _geojson_geometry(geoms[i])
    return out


@_gc_paused()
def to_rfc7946(patches: gpd.GeoDataFrame) -> dict[str, Any]:
    """The patches as an RFC 7946 FeatureCollection (lon/lat, CCW outer rings, no ``crs``).

    Args:
        patches: Patch table with a CRS (any; reprojected to EPSG:4326).

    Returns:
        A JSON-ready dict; properties follow :data:`PATCH_FIELDS` and NaN becomes null.
    """
    if patches.crs is None:
        raise InputError("patches have no CRS; set the working CRS before export")
    wgs = patches.to_crs(4326) if len(patches) else patches.set_crs(4326, allow_override=True)
    geoms = shapely.orient_polygons(np.asarray(wgs.geometry.values), exterior_cw=False)
    cols = _ordered_columns(patches)
    columns = [_json_column(patches[c]) for c in cols]
    feats = []
    for row, gj in zip(zip(*columns, strict=True) if cols else ({},) * len(geoms),
                       geojson_geometries(geoms), strict=True):
        props = dict(zip(cols, row, strict=True))
        feat: dict[str, Any] = {"type": "Feature"}
        if props.get("patch_id") is not None:
            feat["id"] = props["patch_id"]
        feat.update(geometry=gj, properties=props)
        feats.append(feat)
    fc: dict[str, Any] = {"type": "FeatureCollection"}
    if len(wgs):
        fc["bbox"] = [round(float(v), _COORD_DECIMALS) for v in wgs.total_bounds]
    fc["features"] = feats
    return fc


def write_geojson(patches: gpd.GeoDataFrame, path: str | Path) -> dict[str, Any]:
    """Write ``patches.geojson`` (RFC 7946, UTF-8, Chinese unescaped).

    Returns:
        The FeatureCollection written (reused by the report).
    """
    fc = to_rfc7946(patches)
    with atomic_open(path, "w", encoding="utf-8") as f:
        # dumps, not dump: only the one-shot encoder is the C one (7x faster at 110k patches)
        f.write(json.dumps(fc, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
        f.write("\n")
    return fc


def write_gpkg(patches: gpd.GeoDataFrame, path: str | Path, layer: str = "patches") -> None:
    """Write the patches in the working CRS to a GeoPackage layer (MultiPolygon)."""
    df = gpd.GeoDataFrame(patches[[*_ordered_columns(patches), patches.geometry.name]],
                          geometry=patches.geometry.name, crs=patches.crs)
    with atomic_write(path) as tmp:
        pyogrio.write_dataframe(df, tmp, layer=layer, driver="GPKG",
                                geometry_type="MultiPolygon", promote_to_multi=True)


# --------------------------------------------------------------------------- COG


def _category_vrt(src: rasterio.DatasetReader, src_path: Path) -> str:
    """VRT XML over ``src`` adding nodata 255, the category colour table and code names."""
    entries = []
    for code in range(256):
        cat = next((c for c, v in CATEGORY_CODES.items() if v == code), None)
        r, g, b = CATEGORY_COLORS[cat] if cat else (0, 0, 0)
        entries.append(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{255 if cat else 0}"/>')
    mdi = "".join(f'<MDI key="CATEGORY_{v}">{k}</MDI>' for k, v in CATEGORY_CODES.items())
    mdi += '<MDI key="CATEGORY_0">no_change</MDI><MDI key="CATEGORY_255">not_observed</MDI>'
    gt = ", ".join(repr(float(v)) for v in src.transform.to_gdal())
    srs = f"<SRS>{xml_escape(src.crs.to_wkt())}</SRS>" if src.crs else ""
    return (f'<VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}">{srs}'
            f"<GeoTransform>{gt}</GeoTransform><Metadata>{mdi}</Metadata>"
            '<VRTRasterBand dataType="Byte" band="1"><Description>category</Description>'
            f"<NoDataValue>{NOT_OBSERVED}</NoDataValue><ColorInterp>Palette</ColorInterp>"
            f"<ColorTable>{''.join(entries)}</ColorTable><SimpleSource>"
            f'<SourceFilename relativeToVRT="0">{xml_escape(str(src_path))}</SourceFilename>'
            "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>")


def write_cog(src_tif: str | Path, path: str | Path, *, blocksize: int = 512) -> None:
    """Convert the category GeoTIFF (uint8, 1 band) into a Cloud-Optimized GeoTIFF.

    Adds nodata 255, a colour table for the category codes and mode-resampled overviews.

    Args:
        src_tif: The tiled GeoTIFF written by the block stage.
        path: Destination (``change.tif``).
        blocksize: Tile size in pixels (overviews are built down to one tile).

    Raises:
        InputError: ``src_tif`` is not a single-band uint8 raster.
    """
    src_tif = Path(src_tif).resolve()
    with rasterio.open(src_tif) as src:
        if src.count != 1 or src.dtypes[0] != "uint8":
            raise InputError(f"{src_tif}: expected a 1-band uint8 category raster, got "
                             f"{src.count} band(s) of {src.dtypes[0]}; rerun the classify stage")
        vrt_xml = _category_vrt(src, src_tif)
    with tempfile.TemporaryDirectory(prefix="tuban-cog-") as td, atomic_write(path) as tmp:
        vrt = Path(td) / "category.vrt"
        vrt.write_text(vrt_xml, encoding="utf-8")
        rasterio.shutil.copy(str(vrt), str(tmp), driver="COG", COMPRESS="DEFLATE",
                             BLOCKSIZE=str(blocksize), OVERVIEW_RESAMPLING="MODE",
                             BIGTIFF="IF_SAFER")
        # no NUM_THREADS: the category raster compresses in well under a second on one
        # thread, and GDAL's thread pool made it 6x slower after a Dask run (8000²: 4.2 s)


# --------------------------------------------------------------------------- tasks.csv


def task_rows(patches: pd.DataFrame, priorities: Mapping[str, int] | None = None,
              ) -> list[dict[str, Any]]:
    """The patches to verify, grouped by street office and sorted by priority (pure).

    Violations only, with status new, grown or reappeared (all violations when there is no
    ``status`` column). Street offices in code order (unassigned last); within one, by
    priority (1 first), confidence desc, area desc, then ``patch_id``.

    Returns:
        One dict per row with the keys of :data:`TASK_COLUMNS`.
    """
    prio = {**DEFAULT_PRIORITIES, **(priorities or {})}
    df = pd.DataFrame(patches.drop(columns="geometry", errors="ignore"))
    df = df[issued(df)].copy()
    for c, _ in TASK_COLUMNS:
        if c not in df:
            df[c] = None
    df["priority"] = df["category"].map(prio).fillna(9).astype(int)
    code = df["admin_code"].astype(object).where(df["admin_code"].notna(), None)
    df["_no_admin"] = code.map(lambda v: v is None or str(v).strip() == "")
    df["_code"] = code.map(lambda v: "" if v is None else str(v))
    df["_conf"] = pd.to_numeric(df["confidence"], errors="coerce").fillna(-1.0)
    df["_area"] = pd.to_numeric(df["area_m2"], errors="coerce").fillna(0.0)
    df = df.sort_values(["_no_admin", "_code", "priority", "_conf", "_area", "patch_id"],
                        ascending=[True, True, True, False, False, True], kind="mergesort")
    rows = []
    cols = [c for c, _ in TASK_COLUMNS]
    values = zip(*(_json_column(df[c]) for c in cols), strict=True) if len(df) else iter(())
    for seq, (vals, cat) in enumerate(zip(values, df["category"].tolist(), strict=True),
                                      start=1):
        row = dict(zip(cols, vals, strict=True))
        row["seq"] = seq
        row["category_zh"] = row["category_zh"] or CATEGORY_ZH.get(str(cat))
        area = row["area_m2"]
        row["area_mu"] = round(area / MU_M2, 2) if area is not None else None
        for key, nd in (("area_m2", 1), ("confidence", 3), ("centroid_lon", 6),
                        ("centroid_lat", 6)):
            if isinstance(row[key], float):
                row[key] = round(row[key], nd)
        rows.append(row)
    return rows


def write_tasks_csv(rows: list[dict[str, Any]], path: str | Path) -> int:
    """Write task rows (:func:`task_rows`) as ``tasks.csv`` (UTF-8 with BOM, CRLF, bilingual
    headers) for field verification.

    Returns:
        The number of task rows.
    """
    with atomic_open(path, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"{zh} {key}" for key, zh in TASK_COLUMNS])
        for row in rows:
            w.writerow(["" if row[k] is None else row[k] for k, _ in TASK_COLUMNS])
    return len(rows)


def write_office_tasks(rows: list[dict[str, Any]], folder: str | Path) -> dict[str, int]:
    """One task list per street office in ``folder`` (the rows of :func:`task_rows` that are
    its own, numbered from 1; same columns as ``tasks.csv``, evidence paths relative to the
    run folder), for handing each office its own list. Returns file name -> rows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_file.setdefault(office_task_name(row["admin_code"], row["admin_name"]),
                           []).append(row)
    for name, own in by_file.items():
        write_tasks_csv([{**r, "seq": i} for i, r in enumerate(own, start=1)], folder / name)
    return {name: len(own) for name, own in by_file.items()}


# --------------------------------------------------------------------------- evidence


def write_evidence(patch: Mapping[str, Any], before_chip: np.ndarray, after_chip: np.ndarray,
                   path: str | Path, *, bounds: BBox, panel_px: int = 256) -> None:
    """Write :func:`render_evidence` to ``path`` (atomically)."""
    data = render_evidence(patch, before_chip, after_chip, bounds=bounds, panel_px=panel_px)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def _write_all_evidence(patches: gpd.GeoDataFrame, folder: Path, render: EvidenceRenderer, *,
                        min_size_m: float, panel_px: int) -> list[Any]:
    """Evidence for every violation patch (the ones field teams visit); returns the relative
    paths (None for other_change and where a chip failed)."""
    recs = patches[[c for c in EVIDENCE_FIELDS if c in patches]].to_dict("records")
    todo = [i for i, r in enumerate(recs) if r["category"] in VIOLATIONS]
    items = [({k: recs[i].get(k) for k in EVIDENCE_FIELDS},
              chip_bounds(recs[i]["geometry"], min_size_m=min_size_m)) for i in todo]
    rel: list[Any] = [None] * len(recs)
    folder.mkdir(parents=True, exist_ok=True)
    if todo and not has_cjk_font():
        log.info("no CJK font found: evidence captions name categories in English only "
                 "(install one, e.g. Debian's fonts-wqy-microhei)")
    progress = Progress("evidence", len(todo), unit="patch", units="patches")
    for i, png in zip(todo, render(items, panel_px), strict=True):
        progress.update()
        pid = str(recs[i]["patch_id"])
        if isinstance(png, str):
            warnings.warn(f"{pid}: no evidence chip ({png})", TubanWarning, stacklevel=2)
            continue
        (folder / f"{pid}.png").write_bytes(png)  # the staging folder is published whole
        rel[i] = f"evidence/{pid}.png"
    progress.close()
    return rel


# --------------------------------------------------------------------------- manifest/report


def write_manifest(manifest: Mapping[str, Any], path: str | Path) -> None:
    """Write ``run.json`` (pretty, UTF-8, NaN -> null)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(jsonable(manifest), f, ensure_ascii=False, indent=2, allow_nan=False)
        f.write("\n")


def write_report(patches: gpd.GeoDataFrame, geojson: Mapping[str, Any], meta: Mapping[str, Any],
                 path: str | Path) -> dict[str, Any]:
    """Write ``report.html``; returns the summary."""
    summary = report_mod.summarize(patches)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(report_mod.render_html(summary, geojson, meta))
    return summary


def _first(patches: pd.DataFrame, col: str) -> Any:
    if col not in patches or not len(patches):
        return None
    s = patches[col].dropna()
    return jsonable(s.iloc[0]) if len(s) else None


def _ensure_ids(patches: gpd.GeoDataFrame, run_id: str) -> gpd.GeoDataFrame:
    """Give patches without a register (``compare``) ids and status ``new``."""
    if "patch_id" in patches and patches["patch_id"].notna().all():
        return patches
    date = str(_first(patches, "after_date") or dt.date.today().isoformat())[:10]
    out, _, _ = match(patches, empty_register(patches.crs), run_date=date, run_id=run_id)
    return out


@_gc_paused()
def export_all(outdir: str | Path, patches: gpd.GeoDataFrame, *,
               manifest: Mapping[str, Any],
               change_tif: str | Path | None = None,
               before_chip: ChipReader | None = None,
               after_chip: ChipReader | None = None,
               evidence: EvidenceRenderer | None = None,
               config: PipelineConfig | None = None,
               extent: BBox | None = None,
               cog_blocksize: int = 512,
               checkpoints: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Write every output of a run into ``outdir`` (all or nothing).

    Args:
        outdir: ``runs/<run_id>/`` or the ``compare -o`` folder.
        patches: Tracked patches in the working CRS (``patch_id``/``status`` from
            :mod:`pipeline.track`; if absent, ids are made and every patch is ``new``).
        manifest: ``run.json`` content (inputs, config, versions, timings); ``outputs``,
            ``counts`` and ``export_s`` are added.
        change_tif: The block stage's category GeoTIFF, converted to ``change.tif`` (COG).
        before_chip: Chip reader for the before date; evidence is written when both readers
            are given (and ``config.output.evidence`` is not false).
        after_chip: Chip reader for the after date.
        evidence: Instead of the two readers: renders many evidence PNGs at once (e.g. on
            the block workers, :meth:`pipeline.chips.ChipSource.evidence`).
        config: Supplies category priorities, output switches, chip size and the title.
        extent: Scene extent in the working CRS for the report map (default: change_tif's).
        cog_blocksize: COG tile size.
        checkpoints: Relative path -> file: moved into ``outdir`` with the outputs (what the
            stage commands read again, e.g. ``work/scores-0-1.tif``).

    Returns:
        Output name -> final path (``geojson``, ``gpkg``, ``tasks``, ``manifest`` and, when
        written, ``cog``, ``report``, ``evidence``).
    """
    t0 = time.perf_counter()
    outdir = Path(outdir)
    out_cfg = config.output if config is not None else None
    priorities = ({k: v.priority for k, v in config.categories.items()} if config else None)
    run_id = str(manifest.get("run_id") or _first(patches, "run_id") or outdir.name)
    patches = _ensure_ids(patches.reset_index(drop=True), run_id)
    rel: dict[str, str] = {}
    # a rerun replaces the evidence of patches it no longer has
    with staging_dir(outdir, replace=("evidence", "tasks")) as stage, ThreadPoolExecutor(1) as bg:
        # the COG (GDAL, outside the GIL) is written while the evidence is made
        cog = (bg.submit(write_cog, change_tif, stage / "change.tif", blocksize=cog_blocksize)
               if change_tif is not None else None)
        if evidence is None and before_chip is not None and after_chip is not None:
            evidence = partial(render_all, before=before_chip, after=after_chip)
        if evidence is not None and (out_cfg is None or out_cfg.evidence):
            res = float(config.resolution) if config else float(
                _first(patches, "resolution_m") or 1.0)
            px = out_cfg.chip_size_px if out_cfg else 96
            patches["evidence"] = _write_all_evidence(
                patches, stage / "evidence", evidence, min_size_m=px * res, panel_px=max(256, px))
            rel["evidence"] = "evidence"
        elif "evidence" not in patches:
            patches["evidence"] = None
        fc = write_geojson(patches, stage / "patches.geojson")
        rel["geojson"] = "patches.geojson"
        write_gpkg(patches, stage / "patches.gpkg")
        rel["gpkg"] = "patches.gpkg"
        if cog is not None:
            cog.result()
            rel["cog"] = "change.tif"
            if extent is None:
                with rasterio.open(change_tif) as src:
                    extent = tuple(src.bounds)
        rows = task_rows(patches, priorities)
        n_tasks = write_tasks_csv(rows, stage / "tasks.csv")
        rel["tasks"] = "tasks.csv"
        by_office = write_office_tasks(rows, stage / "tasks")
        rel["office_tasks"] = "tasks"
        summary = report_mod.summarize(patches)
        if out_cfg is None or out_cfg.report:
            meta = _report_meta(patches, manifest, config, extent, run_id)
            write_report(patches, fc, meta, stage / "report.html")
            rel["report"] = "report.html"
        for name, src in (checkpoints or {}).items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src, stage / name)
        rel["manifest"] = "run.json"
        man = dict(manifest)
        man.setdefault("run_id", run_id)
        man["outputs"] = dict(rel)
        man["counts"] = {"patches": len(patches), "tasks": n_tasks, "tasks_by_file": by_office,
                         "by_category": {c: v["count"] for c, v in
                                         summary["by_category"].items()},
                         "by_status": summary["by_status"]}
        man["export_s"] = round(time.perf_counter() - t0, 3)
        man["timings_s"] = {**dict(man.get("timings_s") or {}), "export": man["export_s"]}
        write_manifest(man, stage / "run.json")
    log.info("exported %d patches (%d tasks) to %s", len(patches), n_tasks, outdir)
    return {k: outdir / v for k, v in rel.items()}


def _report_meta(patches: gpd.GeoDataFrame, manifest: Mapping[str, Any],
                 config: PipelineConfig | None, extent: Sequence[float] | None,
                 run_id: str) -> dict[str, Any]:
    ext_ll = None
    if extent is not None and patches.crs is not None:
        ext_ll = transform_bounds(norm_crs(patches.crs.to_wkt()), norm_crs("EPSG:4326"), *extent)
    name = config.name if config else manifest.get("name")
    return {
        "title": f"图斑变化检测报告 {name or ''}".strip(),
        "run_id": run_id,
        "before_date": _first(patches, "before_date") or manifest.get("before_date"),
        "after_date": _first(patches, "after_date") or manifest.get("after_date"),
        "sensor": _first(patches, "sensor"),
        "crs": patches.crs.to_string() if patches.crs is not None else None,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "extent": ext_ll,
    }
