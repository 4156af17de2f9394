"""Orchestration of one change-detection pass: plan → block pass → patches.

``detect_pair`` runs align → detect → classify → vectorize block by block (locally or on Dask)
and writes the category raster into a staging folder; it returns patch records. ``run`` and
``compare`` (in :mod:`pipeline.jobs`) wrap it with tracking and export.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from . import align, classify, ingest
from .blocks import PRELOAD, default_workers, map_blocks, warm_up
from .config import CategoryConfig, DetectionConfig
from .detect.features import halo_px
from .detect.registry import (
    DECISIONS,
    block_multiple,
    describe,
    evidence_of,
    get_detector,
    scene_samples,
    takes_scene_samples,
    work_factor,
)
from .errors import InputError
from .grid import Block, Grid
from .progress import Progress
from .resume import BlockStore
from .types import NO_CHANGE, NOT_OBSERVED
from .vectorize import BlockPolygons, block_polygons, join_blocks, to_map

log = logging.getLogger(__name__)

#: context pixels around each block for neighbourhood operations and object decisions.
#: Seams: detection is exact across blocks (every neighbourhood fits in the halo), polygons
#: are joined exactly, and an object whose extent fits within the halo is classified from the
#: same pixels, hence identically, in every block that sees it. The area rules (graves up to
#: 400 m², missed clouds from 1000 m²) fit within 64 px at 1 m. A wider object is decided
#: from what each block sees of it; when its parts end up with different categories they are
#: joined under the category of the larger part, in the polygons and the category raster
#: (``join_blocks``, :func:`recode_raster`). Only farmland parcel pieces, cut apart on purpose,
#: stay apart; they are counted and logged, and a larger ``block_size`` removes them.
DEFAULT_HALO = 64


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs for any block; shipped once per worker (picklable)."""

    before: ingest.ImageSource
    after: ingest.ImageSource
    grid: Grid
    params: align.AlignParams
    rules: dict[str, gpd.GeoDataFrame]
    detection: DetectionConfig
    categories: dict[str, CategoryConfig]
    resampling: str = "bilinear"
    #: change scores stored by an earlier pass (:func:`scores_profile`): classify them again
    #: instead of running the detector's decisions (``tuban classify RUN_DIR``)
    scores: str | None = None


@dataclass
class BlockResult:
    category: np.ndarray  # uint8, the block core
    polygons: BlockPolygons
    n_valid: int
    excluded: dict[str, int] = field(default_factory=dict)
    #: the core's change scores as stored (:func:`stored_scores`), sparse: the flat indices
    #: of the pixels where one is above 0 and their values ``(2, n)`` (the block's result
    #: stays about a byte per pixel)
    scores: tuple[np.ndarray, np.ndarray] | None = None


@lru_cache(maxsize=4)
def _detector(method: str, roles: tuple[str, ...], res: float, network: bool = True,
              stretch: tuple[tuple[tuple[float, float], ...], ...] = (),
              medians: tuple[tuple[str, float], ...] = (),
              threshold: float | None = None) -> Any:
    st = tuple(np.asarray(x, np.float32) for x in stretch) if stretch else None
    return get_detector(method, roles, res, threshold=threshold, network=network, stretch=st,
                        medians=dict(medians) or None)


def _job_detector(job: BlockJob) -> Any:
    """The detector of a block job, with the scene's statistics from the alignment."""
    return _detector(job.detection.method, job.params.roles, job.grid.res,
                     job.detection.building_network, _stretch(job.params),
                     job.params.feature_medians, job.detection.threshold)


def _stretch(params: align.AlignParams) -> tuple[tuple[tuple[float, float], ...], ...]:
    """The scene's stretch from the alignment, as ``_detector`` takes it (() when unknown)."""
    ok = params.stretch_before and params.stretch_after
    return (params.stretch_before, params.stretch_after) if ok else ()


def _rules_for(rules: dict[str, gpd.GeoDataFrame], grid: Grid) -> dict[str, gpd.GeoDataFrame]:
    box = shapely.box(*grid.bounds)
    out = {}
    for role, gdf in rules.items():
        idx = gdf.sindex.query(box, predicate="intersects") if len(gdf) else []
        out[role] = gdf.iloc[np.sort(idx)] if len(idx) else gdf.iloc[:0]
    return out


def process_block(job: BlockJob, block: Block) -> BlockResult:
    """Align, detect, classify and vectorize one block (pure apart from reading the images)."""
    before, after, valid = align.read_aligned_block(
        job.before, job.after, job.grid, block.outer, job.params,
        cloud_mask=job.detection.cloud_mask)
    res = job.grid.res
    roles = job.params.roles
    det = _job_detector(job)
    if job.scores is None:
        evidence = det(before, after, valid, roles, res)
    else:  # a replay: the decisions as stored, the rest of the evidence computed again
        evidence = {**evidence_of(det, before, after, valid, roles, res),
                    **read_scores(job.scores, block.outer)}
    del before, after  # the block's imagery is not needed past the detector
    outer_grid = job.grid.subgrid(block.outer)
    masks = classify.rasterize_rules(_rules_for(job.rules, outer_grid), outer_grid)
    core = block.inner_slices
    category, confidence, excluded = classify.classify_block(
        evidence, masks, valid, res_m=res, cfg=job.detection, categories=job.categories,
        core=core)
    cat_core = np.ascontiguousarray(category[core])
    ev_core = {k: v[core] for k, v in evidence.items() if k not in ("change", "change_any")}
    ev_core["confidence"] = confidence[core]
    parcel = masks.get(classify.PARCEL_KEY)
    polys = block_polygons(cat_core, block.core, job.grid.shape, ev_core,
                           None if parcel is None else parcel[core] > 0)
    scores = None
    if job.scores is None:
        dense = stored_scores(evidence, core).reshape(len(DECISIONS), -1)
        idx = np.flatnonzero(dense.any(axis=0)).astype(np.int32)
        scores = (idx, dense[:, idx])
    return BlockResult(cat_core, polys, int(valid[core].sum()), dict(excluded), scores)


def stored_scores(evidence: dict[str, np.ndarray],
                  core: tuple[slice, slice]) -> np.ndarray:
    """The decisions of a detector's ``evidence`` (:data:`DECISIONS`) on ``core``, as
    stored for a replay: 0 below :data:`classify.P_GROW`, which classify never reads (its
    objects are the hysteresis above it), so the stored layers are sparse and a replay
    classifies the same scores. ``change_any`` is ``change`` where a detector has none."""
    change = evidence["change"][core]
    any_ = evidence.get("change_any")
    out = np.stack([change, change if any_ is None else any_[core]]).astype(np.float32)
    out[~(out >= classify.P_GROW)] = 0.0  # NaN too
    return out


def scores_profile(grid: Grid) -> dict[str, Any]:
    """Tiled GeoTIFF of :func:`stored_scores` on ``grid`` (float32, two bands)."""
    return {**change_profile(grid), "count": len(DECISIONS), "dtype": "float32",
            "nodata": None, "predictor": 3}


def read_scores(path: str | Path, window: Window) -> dict[str, np.ndarray]:
    """The stored decisions on ``window`` (:func:`stored_scores`), by layer name."""
    try:
        with rasterio.open(path) as src:
            data = src.read(window=window)
            names = src.descriptions
    except RasterioError as err:
        raise InputError(f"{path}: stored change scores unreadable ({err}); rerun the "
                         "detect stage (tuban detect RUN_DIR)") from None
    if tuple(names) != DECISIONS:
        raise InputError(f"{path}: not a tuban change-score raster (bands {names}); rerun "
                         "the detect stage (tuban detect RUN_DIR)")
    return dict(zip(DECISIONS, data, strict=True))


#: the scene medians sample every ``MEDIAN_STEP``-th row and column of the grid, on the whole
#: grid up to ``MEDIAN_WHOLE_PX`` pixels (1024², as the models' training cases), else on the
#: alignment's sample windows
MEDIAN_STEP = 2
MEDIAN_WHOLE_PX = 1024 * 1024


def median_windows(grid: Grid) -> list[Window]:
    """Where the learned detector's scene medians are measured (see :data:`MEDIAN_WHOLE_PX`)."""
    if grid.height * grid.width <= MEDIAN_WHOLE_PX:
        return [Window(0, 0, grid.width, grid.height)]
    return align.sample_windows(grid, align.SAMPLE_WINDOW_PX)


def _sample_lattice(window: Window, earlier: list[Window], shape: tuple[int, int],
                    margin: int, step: int = MEDIAN_STEP) -> np.ndarray:
    """Pixels of ``window`` on the grid's sampling lattice that no ``earlier`` window holds
    (overlapping windows then sample each pixel once) and that lie ``margin`` px or more from
    its sides inside the grid (where its neighbourhoods are the scene's; at the grid's own
    edges every block pads as a whole-image pass does)."""
    r0, c0, h, w = (int(v) for v in (window.row_off, window.col_off, window.height,
                                     window.width))
    rows = np.arange(r0, r0 + h)
    cols = np.arange(c0, c0 + w)
    rok = (rows % step == 0) & ((rows >= r0 + margin) | (r0 == 0)) & (
        (rows < r0 + h - margin) | (r0 + h >= shape[0]))
    cok = (cols % step == 0) & ((cols >= c0 + margin) | (c0 == 0)) & (
        (cols < c0 + w - margin) | (c0 + w >= shape[1]))
    keep = rok[:, None] & cok[None, :]
    for e in earlier:
        er, ec = int(e.row_off) - r0, int(e.col_off) - c0
        keep[max(0, er):max(0, er + int(e.height)), max(0, ec):max(0, ec + int(e.width))] = False
    return keep


def with_scene_medians(job: BlockJob, reads: dict | None = None,
                       threads: int = 1) -> align.AlignParams:
    """``job.params`` with the learned detector's scene medians, measured on the whole scene or
    the alignment's sample windows (:func:`median_windows`): every block then divides its
    ``*_rel`` features by the same medians, whatever the block size. Unchanged for detectors
    without scene statistics.

    Here, not on the workers: a worker would load the model once for the windows and again in
    the block pool (LEVIR 1024², 2 workers: align stage 2.3 s there, 1.4 s here, 0.7 s of it
    loading the model, which this process does anyway), on up to ``threads`` threads.
    ``reads``: the alignment's window reads (:func:`pipeline.align.fit_alignment`), not read
    again where they serve.
    """
    from .detect.features import scene_medians

    det = _job_detector(job)
    if not takes_scene_samples(det):
        return job.params
    wins = median_windows(job.grid)
    f = work_factor(det)
    margin = halo_px(job.grid.res * f) * f
    samples = []
    for k, win in enumerate(wins):
        before, after, valid = align.read_aligned_block(
            job.before, job.after, job.grid, win, job.params,
            cloud_mask=job.detection.cloud_mask,
            raw=(reads or {}).get(align.window_key(win)))
        keep = _sample_lattice(win, wins[:k], job.grid.shape, margin)
        samples.append(scene_samples(det, before, after, valid, job.params.roles,
                                     job.grid.res, keep, threads))
    return replace(job.params, feature_medians=tuple(sorted(scene_medians(samples).items())))


def process_run(job: BlockJob, run: list[Block]) -> list[BlockResult]:
    """Neighbouring blocks of one row in one task: the worker's GDAL cache still holds the
    image tiles their halos share."""
    return [process_block(job, b) for b in run]


def _runs(blocks: list[Block], k: int = 2) -> list[list[Block]]:
    """Blocks (row-major) grouped into runs of up to ``k`` neighbours in the same row (4000²:
    block work 11 % faster than one block per task)."""
    out: list[list[Block]] = []
    for b in blocks:
        if out and len(out[-1]) < k and out[-1][-1].core.row_off == b.core.row_off:
            out[-1].append(b)
        else:
            out.append([b])
    return out


def change_profile(grid: Grid) -> dict[str, Any]:
    """Tiled GeoTIFF for the block stage's category raster (export turns it into a COG)."""
    return {"driver": "GTiff", "width": grid.width, "height": grid.height, "count": 1,
            "dtype": "uint8", "crs": grid.crs, "transform": grid.transform,
            "nodata": NOT_OBSERVED, "tiled": True, "blockxsize": 256,
            "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}


def recode_raster(path: Path, objects: list[tuple[shapely.Geometry, int]]) -> None:
    """Give the changed pixels of each polygon (global pixel coordinates) its category code
    in the category raster at ``path``, in place (objects joined across seams)."""
    from rasterio.features import geometry_mask

    with rasterio.open(path, "r+") as dst:
        for geom, code in objects:
            x0, y0, x1, y1 = (int(v) for v in np.round(geom.bounds))
            win = Window(x0, y0, x1 - x0, y1 - y0)
            cat = dst.read(1, window=win)
            inside = geometry_mask([geom], cat.shape, Affine.translation(x0, y0), invert=True)
            changed = inside & (cat != NO_CHANGE) & (cat != NOT_OBSERVED)
            cat[changed] = code
            dst.write(cat, 1, window=win)


@dataclass
class PairResult:
    records: list[dict]
    n_pixels: int
    n_valid: int
    excluded: dict[str, int]
    params: align.AlignParams
    #: the detector and the model files it used (:func:`pipeline.detect.registry.describe`)
    detector: dict[str, Any] = field(default_factory=dict)
    #: the blocks it ran: ``block_size`` and ``halo`` (px, on the detector's lattice), ``n``
    blocks: dict[str, int] = field(default_factory=dict)


def _block_pass(job: BlockJob, blocks: list[Block], done: dict[int, Path],
                store: BlockStore | None, change_path: Path, scores_out: Path | None,
                workers: int | None, scheduler: str | None,
                ) -> tuple[list[tuple[int, BlockPolygons]], Counter[str], int]:
    """Every block, the ``done`` ones from ``store``: rasters written, polygons collected."""
    parts: list[tuple[int, BlockPolygons]] = []
    excluded: Counter[str] = Counter()
    n_valid = 0
    progress = Progress("detect", len(blocks))
    with (rasterio.open(change_path, "w", **change_profile(job.grid)) as dst,
          _scores_writer(scores_out, job.grid) as sdst):

        def take(block: Block, res: BlockResult) -> None:
            nonlocal n_valid
            dst.write(res.category, 1, window=block.core)
            if sdst is not None and res.scores is not None:
                dense = np.zeros((len(DECISIONS), res.category.size), np.float32)
                dense[:, res.scores[0]] = res.scores[1]
                sdst.write(dense.reshape(-1, *res.category.shape), window=block.core)
            parts.append((block.index, res.polygons))
            excluded.update(res.excluded)
            n_valid += res.n_valid
            progress.update()

        for block in blocks:
            if block.index in done:
                take(block, BlockStore.load(done[block.index]))
        runs = _runs([b for b in blocks if b.index not in done])
        for run, results in map_blocks(process_run, job, runs, workers=workers,
                                       scheduler=scheduler):
            for block, res in zip(run, results, strict=True):
                if store is not None:
                    store.save(block.index, res)
                take(block, res)
    progress.close()
    return parts, excluded, n_valid


@contextmanager
def _scores_writer(path: Path | None, grid: Grid) -> Iterator[Any]:
    if path is None:
        yield None
        return
    with rasterio.open(path, "w", **scores_profile(grid)) as dst:
        dst.descriptions = DECISIONS
        yield dst


def _round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is at least ``n``."""
    return -(-n // m) * m


def detect_pair(before: ingest.ImageSource, after: ingest.ImageSource, grid: Grid, *,
                rules: dict[str, gpd.GeoDataFrame], detection: DetectionConfig,
                categories: dict[str, CategoryConfig], block_size: int, change_path: Path,
                resampling: str = "bilinear", workers: int | None = None,
                scheduler: str | None = None, timings: Any = None,
                params: align.AlignParams | None = None, scores_out: Path | None = None,
                scores_in: Path | None = None, checkpoint: Path | None = None) -> PairResult:
    """Block pass over ``grid``: writes ``change_path`` and returns the patch records.

    Given ``params`` (an earlier pass's alignment) it is not estimated again. The detector's
    decisions are written to ``scores_out`` (:func:`scores_profile`), or with ``scores_in``
    read from there instead of decided again (the rest of the evidence is computed again).
    ``checkpoint``: a folder (:class:`pipeline.resume.BlockStore`) that keeps the alignment
    and each finished block, and gives them back to a resumed attempt.
    """
    from contextlib import nullcontext

    stage = timings.stage if timings is not None else (lambda _n: nullcontext())
    n_workers = workers or default_workers()
    pool = scheduler is None and n_workers > 1 and grid.n_blocks(block_size) > 1
    if pool:
        warm_up(PRELOAD)  # worker start-up (imports) overlaps the alignment
    store = BlockStore(checkpoint) if checkpoint is not None else None
    with stage("align"):
        # given, or a resumed attempt's, or estimated (on the workers only when they are
        # there for the blocks anyway)
        reads: dict = {}  # the alignment's window reads, for the scene medians
        params = params or (store.alignment() if store else None) or align.fit_alignment(
            before, after, grid, coregister=detection.coregister,
            normalize=detection.normalize, max_shift_px=detection.max_shift_px,
            workers=n_workers if pool else 1, scheduler=scheduler, reads=reads)
        log.info("alignment: shift %s px%s, gain %s", params.shift_px,
                 (f" (varying across the scene: {len(params.local_shifts)} windows, "
                  "each block reads its own)") if params.local_shifts else "",
                 np.round(np.asarray(params.gain), 3).tolist())
        job = BlockJob(before, after, grid, params, rules, detection, categories, resampling,
                       None if scores_in is None else str(scores_in))
        if not params.feature_medians:
            # here, while the block workers wait: on their cores
            params = with_scene_medians(job, reads, threads=n_workers if pool else 1)
        del reads
    if store is not None:
        store.save_alignment(params)
    job = replace(job, params=params)
    det = _job_detector(job)
    detector = describe(det, params.roles, grid.res)
    # blocks start on the detector's lattice: each averages the cells and pools on the grid of a
    # whole-image pass (the building network's 2^4 poolings at its coarsest scale)
    m = block_multiple(det)
    halo = _round_up(max(DEFAULT_HALO, int(getattr(det, "halo", 0))), m)
    block_size = _round_up(block_size, m)
    blocks = list(grid.blocks(block_size, halo=halo))
    layout = {"block_size": block_size, "halo": halo, "n": len(blocks)}
    done: dict[int, Path] = {}
    if store is not None:
        done = store.use_layout({**layout, "scores": scores_in is None, "detector": detector})
        if done:
            log.info("resuming: %d of %d blocks of %s -> %s already done", len(done),
                     len(blocks), before.name, after.name)
    with stage("detect"):
        parts, excluded, n_valid = _block_pass(job, blocks, done, store, change_path,
                                               scores_out, workers, scheduler)
    with stage("vectorize"):
        # blocks finish in any order: sort parts by block so results never depend on it
        joined = join_blocks(p for _, p in sorted(parts, key=lambda t: t[0]))
        if joined.reconciled:
            log.info("%d object(s) wider than the %d px halo, decided differently on each "
                     "side of a block seam, joined under the larger part's category",
                     len(joined.reconciled), halo)
            recode_raster(change_path, [(joined.geoms[i], joined.codes[i])
                                        for i in joined.reconciled])
        if joined.seam_conflicts:
            log.warning("%d farmland parcel piece(s) meet another category across a block "
                        "seam: parcel pieces wider than the %d px halo may be decided "
                        "differently on each side; raise block_size to keep them in one "
                        "block", joined.seam_conflicts, halo)
        mins = {k: c.min_area_m2 for k, c in categories.items()}
        records = to_map(joined, grid.transform, simplify_px=0.5, min_area_m2=mins)
    return PairResult(records, grid.height * grid.width, n_valid, dict(excluded), params,
                      detector, layout)
