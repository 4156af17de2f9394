"""The two jobs: ``run`` (a scheduled batch over a config) and ``compare`` (one pair).

Both: ingest → (align → detect → classify → vectorize in :mod:`pipeline.batch`) → track →
export (:func:`execute`). All outputs are written into a staging folder and moved into place
only on success; a killed attempt resumes (:mod:`pipeline.resume`). The stage commands on a
finished run are in :mod:`pipeline.stages`.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np

from . import __version__, align, export, ingest, persistence, resume
from .batch import PairResult, detect_pair
from .blocks import close_dask_clients, default_workers, fit_workers, worker_px
from .chips import ChipSource
from .config import PipelineConfig, config_from_dict, load_config
from .errors import InputError, OutputExistsError
from .grid import BLOCK_HALO, SMALLEST_BLOCK, Grid, norm_crs, transform_bounds
from .patches import build_patches
from .progress import Timings

log = logging.getLogger(__name__)
#: below this share of the grid observed on both dates a run warns (the rest is unobserved)
OBSERVED_WARN = 0.5

#: checkpoint folder inside a finished run, read by the stage commands
WORK = "work"
RULE_ROLES = ("forest", "farmland", "ecological_redline", "permits", "cemeteries")


def new_run_id(cfg_name: str, after_name: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{after_name}-{secrets.token_hex(2)}"


def _versions() -> dict[str, str]:
    import geopandas
    import numpy
    import rasterio
    import shapely
    import skimage

    return {"tuban": __version__, "python": platform.python_version(),
            "numpy": numpy.__version__, "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__, "geopandas": geopandas.__version__,
            "shapely": shapely.__version__, "scikit-image": skimage.__version__}


def rule_layer_paths(cfg: PipelineConfig) -> dict[str, Path]:
    """The files of ``cfg``'s rule layers by role, and its street offices as ``admin``."""
    out = {r: cfg.path(c.path) for r, c in cfg.rules.items()}
    if cfg.admin:
        out["admin"] = cfg.path(cfg.admin.path)
    return out


def _inputs_manifest(sources: list[ingest.ImageSource], layers: dict[str, Path]
                     ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in sources:
        for p in s.paths:
            out.append({"role": f"image:{s.name}", "path": str(p),
                        "sha256": ingest.file_checksum(p)})
    for role, path in layers.items():
        for p in ingest.layer_files(path):
            out.append({"role": f"layer:{role}", "path": str(p),
                        "sha256": ingest.file_checksum(p)})
    return out


def _finish(out_dir: Path, change_tif: Path, *, cfg: PipelineConfig, grid: Grid,
            before: ingest.ImageSource, after: ingest.ImageSource, pair: PairResult,
            patches: gpd.GeoDataFrame, timings: Timings, manifest: dict[str, Any],
            checkpoints: dict[str, Path] | None = None, workers: int | None = None,
            scheduler: str | None = None) -> None:
    """Hand everything to export, the only writer of results."""
    chips = ChipSource(before, after, grid, pair.params, workers=workers, scheduler=scheduler)
    observed = pair.n_valid / max(pair.n_pixels, 1)
    if observed < OBSERVED_WARN:
        log.warning("%s -> %s: only %.0f %% of the grid was observed on both dates (nodata, "
                    "cloud, shadow or outside the images); no patches there means nothing was "
                    "seen, not that nothing changed", before.name, after.name, 100 * observed)
    manifest.update({
        "excluded": pair.excluded,
        "observed_fraction": round(observed, 4),
        "not_observed_fraction": round(1 - observed, 4),
        "detector": pair.detector,
        "blocks": {**pair.blocks, "workers": "dask" if scheduler else workers},
        "alignment": align.params_record(pair.params),
    })
    with timings.stage("export"):
        manifest["timings_s"] = timings
        export.export_all(out_dir, patches, manifest=manifest, change_tif=change_tif,
                          evidence=chips.evidence, config=cfg, extent=grid.bounds,
                          checkpoints=checkpoints)


def iso_date(date: dt.date | None) -> str | None:
    return date.isoformat() if date else None


def _meta(before: ingest.ImageSource, after: ingest.ImageSource, grid: Grid,
          run_id: str) -> dict[str, Any]:
    return {"before_date": iso_date(before.date), "after_date": iso_date(after.date),
            "sensor": after.sensor, "resolution_m": grid.res, "run_id": run_id}


@dataclass(frozen=True)
class Reuse:
    """What a stage rerun keeps of a finished run, per pair (:func:`pair_key`): the alignment
    (``tuban detect``) and the detector's stored decisions (``tuban classify``)."""

    params: dict[str, align.AlignParams]
    scores: dict[str, Path] = field(default_factory=dict)


def pair_key(a: int, b: int) -> str:
    """A compared pair of a run, by the indices of its periods in the config."""
    return f"{a}-{b}"


def scores_name(a: int, b: int) -> str:
    """Where a run keeps a pair's stored decisions (:func:`pipeline.batch.stored_scores`)."""
    return f"{WORK}/scores-{pair_key(a, b)}.tif"


def report_pairs(n_sources: int, persist_periods: int,
                 ) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """The pair a run reports and the spans that confirm it: the last pair, or with
    ``persist_periods = n > 1`` the pair (L-n, L-n+1) whose change is still there n-1
    periods later, compared directly with each later period."""
    last, n = n_sources - 1, persist_periods
    if n > 1 and last >= n:
        k = last - n
        return (k, k + 1), tuple((k, k + m) for m in range(2, n + 1))
    return (last - 1, last), ()


def execute(cfg: PipelineConfig, sources: list[ingest.ImageSource], out_dir: Path, *,
              run_id: str, scheduler: str | None, workers: int | None,
              register: Path | None, timings: Timings, extra: dict[str, Any],
              report: tuple[int, int] | None = None,
              spans: tuple[tuple[int, int], ...] = (), reuse: Reuse | None = None,
              expect: dict[str, Any] | None = None) -> Path:
    """Detect ``report`` (default: the last two sources), confirm it with ``spans``
    (comparisons of its before-period with later periods), track and export. ``reuse``:
    what a stage rerun keeps; ``expect``: its ``run.json``, whose grid and imagery must be
    those of this pass."""
    k, j = report or (len(sources) - 2, len(sources) - 1)
    before, after = sources[k], sources[j]
    used = sorted({k, j, *(i for sp in spans for i in sp)})
    with timings.stage("ingest"):
        grid = ingest.working_grid([sources[i] for i in used], crs=cfg.crs,
                                   resolution=cfg.resolution, bounds=cfg.bounds)
        if expect is not None:
            _same_grid(grid, expect, out_dir)
        rules = ingest.load_rules(cfg, grid)
        admin = ingest.load_admin(cfg, grid) if cfg.admin else None
    layer_paths = rule_layer_paths(cfg)
    manifest: dict[str, Any] = {
        "run_id": run_id, "tool": "tuban", "versions": _versions(),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json", by_alias=True, exclude={"base_dir"}),

        "grid": {"crs": grid.crs.to_string(), "wkt": grid.crs.to_wkt(),
                 "shape": list(grid.shape), "transform": list(grid.transform)[:6],
                 "resolution_m": grid.res, "bounds": list(grid.bounds)},
        "base_dir": str(cfg.base_dir),
        "periods": {"before": {"name": before.name, "date": iso_date(before.date),
                               "sensor": before.sensor},
                    "after": {"name": after.name, "date": iso_date(after.date),
                              "sensor": after.sensor}},
        **extra,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # input checksums (whole files) are hashed in a thread while the blocks are processed
    hasher = ThreadPoolExecutor(1)
    inputs = hasher.submit(_inputs_manifest, [sources[i] for i in used], layer_paths)
    hasher.shutdown(wait=False)
    if expect is not None and reuse is not None:  # before any work that would be wasted
        _same_imagery(inputs.result(), expect, out_dir)
    with resume.work_dir(out_dir, fingerprint(cfg, sources, extra)) as work:
        n_workers = workers or cfg.workers or default_workers()
        # local workers share this machine's memory (Dask workers have their own): unless the
        # block size or the workers are set, as many workers as can hold the smallest block
        fit = not (scheduler or cfg.block_size)
        if fit and not (workers or cfg.workers):
            few = fit_workers(n_workers, (SMALLEST_BLOCK + 2 * BLOCK_HALO) ** 2)
            if few < n_workers:
                log.info("block workers: %d, not %d, to fit the memory (TUBAN_MEMORY_MIB, "
                         "else half of what is available)", few, n_workers)
            n_workers = few
        block_size = cfg.block_size or grid.auto_block_size(
            n_workers, worker_px=worker_px(n_workers) if fit else None)

        checkpoints: dict[str, Path] = {}
        pairs: dict[str, Any] = {}

        def detect(a: int, b: int, name: str) -> tuple[PairResult, gpd.GeoDataFrame]:
            key = pair_key(a, b)
            replay = reuse.scores.get(key) if reuse else None
            scores = None if replay else work / Path(scores_name(a, b)).name
            res = detect_pair(sources[a], sources[b], grid, rules=rules,
                              detection=cfg.detection, categories=dict(cfg.categories),
                              block_size=block_size, change_path=work / name,
                              resampling=cfg.align.resampling,
                              workers=n_workers, scheduler=scheduler, timings=timings,
                              params=reuse.params.get(key) if reuse else None,
                              scores_out=scores, scores_in=replay,
                              checkpoint=work / f"blocks-{key}")
            if scores is not None:
                checkpoints[scores_name(a, b)] = scores
            pairs[key] = {"before": sources[a].name, "after": sources[b].name,
                          "alignment": align.params_record(res.params),
                          "scores": scores_name(a, b)}
            meta = _meta(sources[a], sources[b], grid, run_id)
            return res, build_patches(res.records, grid.crs, rules=rules, admin=admin,
                                      meta=meta)

        change_tif = work / "change-tiled.tif"
        pair, patches = detect(k, j, change_tif.name)
        if spans:
            patches = _confirm(patches, {sp: detect(*sp, f"span-{sp[0]}-{sp[1]}.tif")[1]
                                         for sp in spans}, (k, j), sources, cfg, manifest)
        manifest["pairs"] = pairs
        # checkpoint for `tuban track RUN_DIR`
        checkpoints[f"{WORK}/candidates.gpkg"] = work / "candidates.gpkg"
        export.write_gpkg(patches, checkpoints[f"{WORK}/candidates.gpkg"])
        manifest["inputs"] = inputs.result()
        with timings.stage("track"):
            patches = track_patches(patches, register, run_id,
                                    iso_date(after.date) or run_id)
        _finish(out_dir, change_tif, cfg=cfg, grid=grid, before=before, after=after,
                pair=pair, patches=patches, timings=timings, manifest=manifest,
                checkpoints=checkpoints, workers=n_workers, scheduler=scheduler)
    log.info("wrote %s", out_dir)
    return out_dir


def fingerprint(cfg: PipelineConfig, sources: list[ingest.ImageSource],
                extra: dict[str, Any]) -> dict[str, Any]:
    """What an interrupted attempt must share with the next for it to resume: tuban's
    version, the job and stage, the config, and every input file's size and time."""
    return {"tuban": __version__, "job": extra.get("job"),
            "stage": (extra.get("rerun") or {}).get("stage"),
            "config": cfg.model_dump(mode="json", by_alias=True),
            "files": resume.file_stamps([
                *(p for s in sources for p in s.paths),
                *(f for p in rule_layer_paths(cfg).values() for f in ingest.layer_files(p))])}


def _confirm(patches: gpd.GeoDataFrame, span_patches: dict[tuple[int, int], gpd.GeoDataFrame],
             report: tuple[int, int], sources: list[ingest.ImageSource],
             cfg: PipelineConfig, manifest: dict[str, Any]) -> gpd.GeoDataFrame:
    """Keep the reported pair's patches whose change persists (pipeline.persistence)."""
    judged = persistence.confirm({report: patches, **span_patches},
                                 [s.name for s in sources],
                                 persist_periods=cfg.detection.persist_periods)
    kept = persistence.keep_confirmed(judged)
    manifest["persistence"] = {
        "persist_periods": cfg.detection.persist_periods,
        "confirmed_by": [f"{sources[a].name}→{sources[b].name}" for a, b in span_patches],
        "judged": judged["persistence"].value_counts().to_dict(),
    }
    log.info("persistence: %s", manifest["persistence"]["judged"])
    return kept.drop(columns=["pair", "first_seen", "seen_periods", "persistence"])


def clear_leftovers(out_dir: Path) -> None:
    """Remove what a killed attempt at this same run left (work and staging folders)."""
    parent = out_dir.parent
    if not parent.is_dir():
        return
    # (``.<run>.work-*``: the work folders of tuban before resumable runs)
    for p in [*parent.glob(f".{out_dir.name}.work-*"), *parent.glob(f"{out_dir.name}.partial-*")]:
        log.info("removing leftovers of an interrupted attempt: %s", p)
        shutil.rmtree(p, ignore_errors=True)


def track_patches(patches: gpd.GeoDataFrame, register: Path | None, run_id: str,
                  run_date: str) -> gpd.GeoDataFrame:
    from . import track

    if register is None:  # compare: ids from an empty register, every patch new
        return track.match(patches, track.empty_register(patches.crs), run_date=run_date,
                           run_id=run_id)[0]
    return track.Register(register).update(patches, run_id=run_id, run_date=run_date)


def run(config: str | Path, *, scheduler: str | None = None, workers: int | None = None,
        run_id: str | None = None) -> Path:
    """Scheduled batch over ``config``'s periods; writes ``runs/<run_id>/``.

    Reports the last pair, or with ``detection.persist_periods = n > 1`` the pair
    (L-n, L-n+1) whose change is still there n-1 periods later.
    """
    cfg = load_config(config)
    timings = Timings()
    with timings.stage("ingest"):
        sources = [ingest.open_period(p, cfg.base_dir) for p in cfg.periods]
    report, spans = report_pairs(len(sources), cfg.detection.persist_periods)
    after = sources[report[1]]
    extra = {"job": "run", "config_path": str(Path(config))}
    if run_id is None:  # a killed attempt over the same inputs is resumed, else a new run
        run_id = (resume.interrupted(cfg.path(cfg.output.dir), fingerprint(cfg, sources, extra))
                  or new_run_id(cfg.name, after.name))
    out_dir = cfg.path(cfg.output.dir) / run_id
    clear_leftovers(out_dir)
    if (out_dir / "run.json").exists():
        raise OutputExistsError(f"{out_dir}: run {run_id} already finished; choose another "
                                "--run-id or delete the folder")
    try:
        return execute(cfg, sources, out_dir, run_id=run_id, scheduler=scheduler,
                       workers=workers, register=cfg.register_file, timings=timings,
                       extra=extra, report=report, spans=spans)
    finally:
        if scheduler:  # a client per job: nothing stays connected after it
            close_dask_clients()


def _auto_grid(before: ingest.ImageSource, after: ingest.ImageSource) -> tuple[str, float]:
    """Working CRS and resolution for a bare pair: before's projected CRS (else UTM), coarser
    native resolution."""
    from pyproj import CRS as PCRS
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    crs = before.crs
    if crs.is_projected:
        name = crs.to_string()
    else:
        w, s, e, n = transform_bounds(crs, norm_crs("EPSG:4326"), *before.bounds)
        info = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(
            w, s, e, n))
        name = f"EPSG:{info[0].code}" if info else PCRS("EPSG:3857").to_string()
    return name, float(max(before.res, after.res))


def compare(before_path: str | Path, after_path: str | Path, outdir: str | Path, *,
            config: str | Path | None = None, bands: dict[str, int] | None = None,
            rules_dir: str | Path | None = None, scheduler: str | None = None,
            workers: int | None = None) -> Path:
    """One pair of images, no register; same outputs as a run."""
    timings = Timings()
    with timings.stage("ingest"):
        before = ingest.open_image(before_path, bands=bands, name="before")
        after = ingest.open_image(after_path, bands=bands, name="after")
    crs, res = _auto_grid(before, after)
    # a compare config may leave out what the two images give (name, grid, periods)
    periods = [{"name": "before", "images": [str(before_path)]},
               {"name": "after", "images": [str(after_path)]}]
    base_cfg = (load_config(config, {"name": "compare", "crs": crs, "resolution": res,
                                     "periods": periods}) if config else None)
    data: dict[str, Any] = {} if base_cfg is None else base_cfg.model_dump(
        by_alias=True, exclude={"base_dir", "periods", "rules", "admin", "register_path"})
    data.setdefault("name", "compare")
    data.setdefault("crs", crs)
    data.setdefault("resolution", res)
    data["periods"] = periods
    data["register"] = None
    if rules_dir is not None:
        data["rules"], data["admin"] = rules_from_dir(Path(rules_dir))
    elif base_cfg is not None:
        # the config's layers, their paths made absolute (compare resolves from the cwd)
        def absolute(layer: Any) -> dict[str, Any]:
            return {**layer.model_dump(), "path": str(base_cfg.path(layer.path))}

        data["rules"] = {k: absolute(v) for k, v in base_cfg.rules.items()}
        if base_cfg.admin:
            data["admin"] = absolute(base_cfg.admin)
    cfg = config_from_dict(data, Path(config or "compare"), Path.cwd())
    run_id = new_run_id("compare", "pair")
    try:
        return execute(cfg, [before, after], Path(outdir), run_id=run_id,
                       scheduler=scheduler, workers=workers, register=None, timings=timings,
                       extra={"job": "compare"})
    finally:
        if scheduler:  # a client per job: nothing stays connected after it
            close_dask_clients()


def rules_from_dir(d: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Rule layers (by role) and street offices of a folder whose files are named by role
    (``forest.gpkg``, ``permits.geojson``, ``street_offices.shp``, ...): config entries."""
    if not d.is_dir():
        raise InputError(f"{d}: --rules must be a folder of rule layers (forest.gpkg, ...)")
    files = {p.stem.lower(): p for p in sorted(d.iterdir())
             if p.suffix.lower() in (".gpkg", ".geojson", ".json", ".shp")}
    rules = {r: {"path": str(files[r])} for r in RULE_ROLES if r in files}
    admin = next(({"path": str(files[k])} for k in ("street_offices", "admin") if k in files),
                 None)
    return rules, admin


def _same_grid(grid: Grid, expect: dict[str, Any], out_dir: Path) -> None:
    g = expect["grid"]
    same = (list(grid.shape) == list(g["shape"])
            and np.allclose(list(grid.transform)[:6], g["transform"])
            and grid.crs == norm_crs(g["wkt"]))
    if not same:
        raise InputError(f"{out_dir / 'run.json'}: the config's imagery now gives another "
                         f"working grid than this run's; start a new run (tuban run CONFIG)")


def _same_imagery(inputs: list[dict[str, Any]], expect: dict[str, Any], out_dir: Path) -> None:
    """A stored alignment (and decisions) belongs to the imagery it came from."""
    def images(rows: list[dict[str, Any]]) -> dict[str, str]:
        return {r["path"]: r["sha256"] for r in rows if str(r["role"]).startswith("image:")}

    now, then = images(inputs), images(expect.get("inputs") or [])
    changed = sorted(p for p in now if then.get(p) != now[p])
    if changed:
        raise InputError(f"{changed[0]}: changed since run {expect['run_id']}, whose "
                         f"alignment and decisions were made on it; rerun from the align "
                         f"stage: tuban align {out_dir}")
