"""One command per stage (DESIGN.md): the ingest stage alone, and every later stage again on
a finished run (``run`` or ``compare``), in place. The block-pass stages go through
:func:`pipeline.jobs.execute` with what the run kept; track and export redo only
themselves."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
from affine import Affine

from . import align, export, ingest
from .blocks import close_dask_clients
from .chips import ChipSource
from .config import PipelineConfig, config_from_dict, load_config
from .errors import InputError, MissingFileError
from .grid import Grid, norm_crs
from .jobs import (
    WORK,
    Reuse,
    clear_leftovers,
    execute,
    iso_date,
    pair_key,
    report_pairs,
    rules_from_dir,
    track_patches,
)
from .progress import Timings


def inventory(config: str | Path) -> dict[str, Any]:
    """The ingest stage alone: validate a config's imagery and layers and describe them."""
    cfg = load_config(config)
    sources = [ingest.open_period(p, cfg.base_dir) for p in cfg.periods]
    grid = ingest.working_grid(sources, crs=cfg.crs, resolution=cfg.resolution,
                               bounds=cfg.bounds)
    rules = ingest.load_rules(cfg, grid)
    return {
        "config": str(config),
        "grid": {"crs": grid.crs.to_string(), "shape": list(grid.shape),
                 "resolution_m": grid.res, "bounds_lonlat": list(grid.bounds_in(4326))},
        "periods": [{"name": s.name, "date": iso_date(s.date),
                     "sensor": s.sensor, "roles": list(s.roles), "files": len(s.paths),
                     "crs": s.crs.to_string(), "resolution_m": s.res} for s in sources],
        "rules": {role: int(len(gdf)) for role, gdf in rules.items()},
    }


@dataclass
class FinishedRun:
    """A finished run reloaded from its ``run.json`` (its imagery is opened where needed)."""

    dir: Path
    manifest: dict[str, Any]
    cfg: PipelineConfig
    grid: Grid
    params: align.AlignParams


def load_finished(run_dir: str | Path) -> FinishedRun:
    """Reload a run folder written by ``run`` or ``compare``."""
    d = Path(run_dir)
    man_path = d / "run.json"
    if not man_path.is_file():
        raise MissingFileError(f"{d}: no run.json; give the folder of a finished run")
    man = json.loads(man_path.read_text(encoding="utf-8"))
    cfg = config_from_dict(man["config"], man_path, Path(man.get("base_dir", ".")))
    g = man["grid"]
    grid = Grid(tuple(g["shape"]), Affine(*g["transform"]), norm_crs(g["wkt"]))
    params = align.params_from_record(man["alignment"])
    return FinishedRun(d, man, cfg, grid, params)


def _rerun_stamp(stage: str) -> dict[str, str]:
    """``run.json``'s ``rerun``: the stage a rerun started from, and when."""
    return {"stage": stage, "at": dt.datetime.now().isoformat(timespec="seconds")}


def _reexport(run: FinishedRun, patches: gpd.GeoDataFrame, stage: str) -> Path:
    by_name = {p.name: p for p in run.cfg.periods}
    before, after = (ingest.open_period(by_name[run.manifest["periods"][k]["name"]],
                                        run.cfg.base_dir) for k in ("before", "after"))
    chips = ChipSource(before, after, run.grid, run.params)
    # the run's other stages keep their times; export's is this one's alone
    timings = Timings({k: v for k, v in (run.manifest.get("timings_s") or {}).items()
                       if k != "export"})
    manifest = {**run.manifest, "rerun": _rerun_stamp(stage)}
    with tempfile.TemporaryDirectory(dir=run.dir.parent) as tmp:
        change = Path(tmp) / "change.tif"  # the COG itself is the block stage's raster
        shutil.copyfile(run.dir / "change.tif", change)
        with timings.stage("export"):
            manifest["timings_s"] = timings
            export.export_all(run.dir, patches.drop(columns=["evidence"], errors="ignore"),
                              manifest=manifest, change_tif=change,
                              evidence=chips.evidence, config=run.cfg, extent=run.grid.bounds)
    return run.dir


def rerun_from(run_dir: str | Path, stage: str, *, rules_dir: str | Path | None = None,
               config: str | Path | None = None, workers: int | None = None,
               scheduler: str | None = None) -> Path:
    """Redo a finished run (``run`` or ``compare``) from ``stage`` on, in place: same run id,
    config and imagery, the rule layers as their files are now, or those of ``rules_dir``
    (named by role as for ``compare --rules``; the street offices stay the run's when the
    folder has none); then track and export. ``config`` (runs of ``tuban run`` only) replaces
    the run's config: same imagery and register, and the settings the stored alignment and
    decisions were made with (:data:`KEPT_BY_STAGE`), e.g. new minimum areas.

    ``classify`` (and ``vectorize``, the same block pass) keeps the alignment and the
    detector's decisions stored in the run (``work/scores-*.tif``) and computes only the
    spectral evidence again: the way to apply new permits, forest or farmland layers without
    running the models again. ``detect`` keeps the alignment and runs the detector (e.g. new
    models). ``align`` estimates everything again. The config is the run's (``run.json``);
    the rerun stops before writing anything when the imagery changed since (stored alignment
    and decisions would not fit it: ``align`` then) or gives another grid.
    """
    if stage == "vectorize":  # one block pass with classify
        stage = "classify"
    if stage not in RERUN_STAGES:
        raise ValueError(f"no stage {stage!r} to rerun from: {', '.join(RERUN_STAGES)}")
    run = load_finished(run_dir)
    cfg, man = run.cfg, run.manifest
    if config is not None:
        cfg = _with_config(run, Path(config), stage)
    if rules_dir is not None:
        cfg = _with_rules(cfg, Path(rules_dir), run.dir / "run.json")
    clear_leftovers(run.dir)
    timings = Timings()
    with timings.stage("ingest"):
        sources = [ingest.open_period(p, cfg.base_dir) for p in cfg.periods]
    if config is not None:
        _same_imagery_as(run, sources, Path(config))
    report, spans = report_pairs(len(sources), cfg.detection.persist_periods)
    reuse = None
    if stage != "align":
        reuse = _reuse(run, [report, *spans], with_scores=stage == "classify")
    register = cfg.register_file if man.get("job") == "run" else None
    extra = {k: man[k] for k in ("job", "config_path") if k in man}
    if config is not None:
        extra["config_path"] = str(config)
    extra["rerun"] = _rerun_stamp(stage)
    try:
        return execute(cfg, sources, run.dir, run_id=man["run_id"], scheduler=scheduler,
                       workers=workers, register=register, timings=timings, extra=extra,
                       report=report, spans=spans, reuse=reuse, expect=man)
    finally:
        if scheduler:
            close_dask_clients()


#: settings a rerun from each stage keeps from the run (a config given to it must have them):
#: what its stored alignment, and for classify its stored decisions, were made with
_ALIGNED: tuple[str, ...] = ("align", "detection.coregister", "detection.normalize",
                             "detection.max_shift_px", "detection.cloud_mask")
KEPT_BY_STAGE: dict[str, tuple[str, ...]] = {
    "align": ("detection.persist_periods",),
    "detect": ("detection.persist_periods", *_ALIGNED),
    "classify": ("detection.persist_periods", *_ALIGNED, "detection.method",
                 "detection.threshold", "detection.building_network"),
}
#: the stages a block-pass rerun can start from (``vectorize`` is ``classify``'s pass)
RERUN_STAGES: tuple[str, ...] = tuple(KEPT_BY_STAGE)


def _with_config(run: FinishedRun, config: Path, stage: str) -> PipelineConfig:
    """``config`` for a rerun of ``run`` from ``stage``, once it is known to keep the run's
    register and kept settings (its imagery: :func:`_same_imagery_as`; its grid is checked
    with the imagery)."""
    if run.manifest.get("job") != "run":
        raise InputError(f"{config}: --config reruns runs of `tuban run`; {run.dir} is a "
                         "compare: give its new rule layers with --rules DIR")
    new, old = load_config(config), run.cfg
    run_id = run.manifest["run_id"]
    if new.register_file != old.register_file:
        raise _new_run(config, run_id)
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for key in KEPT_BY_STAGE[stage]:
        va, vb = a, b
        for part in key.split("."):
            va, vb = va[part], vb[part]
        if va != vb:
            back = "align" if key in (*_ALIGNED, "detection.persist_periods") else "detect"
            raise InputError(f"{config}: {key} is {vb!r}, run {run_id} was made with {va!r}; "
                             f"rerun from an earlier stage: tuban {back} {run.dir} "
                             f"--config {config}")
    return new


def _new_run(config: Path, run_id: str) -> InputError:
    return InputError(f"{config}: its periods, imagery or register differ from run {run_id}'s; "
                      f"start a new run (tuban run {config})")


def _same_imagery_as(run: FinishedRun, sources: list[ingest.ImageSource],
                     config: Path) -> None:
    """The periods of ``config``, opened as ``sources``, are the run's, file for file."""
    old = [ingest.open_period(p, run.cfg.base_dir) for p in run.cfg.periods]
    if [(s.name, s.paths) for s in sources] != [(s.name, s.paths) for s in old]:
        raise _new_run(config, run.manifest["run_id"])


def _with_rules(cfg: PipelineConfig, rules_dir: Path, source: Path) -> PipelineConfig:
    """``cfg`` with the rule layers of ``rules_dir`` (and its street offices, if it has them)."""
    rules, admin = rules_from_dir(rules_dir.resolve())  # absolute: the run's base is not cwd
    if not rules:
        raise InputError(f"{rules_dir}: no rule layers (forest, farmland, ecological_redline, "
                         "permits or cemeteries as .gpkg, .geojson or .shp); give the folder "
                         "that holds them")
    data = cfg.model_dump(by_alias=True, exclude={"base_dir"})
    data["rules"] = rules
    if admin is not None:
        data["admin"] = admin
    return config_from_dict(data, source, cfg.base_dir)


def _reuse(run: FinishedRun, pairs: list[tuple[int, int]], *, with_scores: bool) -> Reuse:
    """The stored alignment (and decisions) of each of a run's pairs."""
    stored = run.manifest.get("pairs") or {}
    params, scores = {}, {}
    for a, b in pairs:
        key = pair_key(a, b)
        if key not in stored:
            raise MissingFileError(f"{run.dir / 'run.json'}: no stored alignment of pair "
                                   f"{key} (a run of an older tuban); rerun from the "
                                   f"start: tuban align {run.dir}")
        params[key] = align.params_from_record(stored[key]["alignment"])
        if with_scores:
            path = run.dir / stored[key]["scores"]
            if not path.is_file():
                raise MissingFileError(f"{path}: the run's stored decisions are missing; "
                                       f"rerun from the detect stage: tuban detect {run.dir}")
            scores[key] = path
    return Reuse(params, scores)


def rerun_export(run_dir: str | Path) -> Path:
    """Rewrite a run's outputs from its tracked patches (e.g. after a change to export)."""
    run = load_finished(run_dir)
    return _reexport(run, gpd.read_file(run.dir / "patches.gpkg"), "export")


def rerun_track(run_dir: str | Path) -> Path:
    """Match a run's patches against the register again (e.g. after importing field
    verification), then re-export."""
    run = load_finished(run_dir)
    cand = run.dir / WORK / "candidates.gpkg"
    if not cand.is_file():
        raise MissingFileError(f"{cand}: no checkpoint of detected patches; rerun the run")
    run_id = run.manifest["run_id"]
    after_date = run.manifest["periods"]["after"]["date"]
    patches = track_patches(gpd.read_file(cand), run.cfg.register_file, run_id,
                            after_date or run_id)
    return _reexport(run, patches, "track")
