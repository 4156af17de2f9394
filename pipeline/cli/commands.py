"""Subcommands: run, compare, evaluate. Thin: parse options, call :mod:`pipeline.jobs`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import BandRoleError
from .main import cli

scheduler_opt = click.option(
    "--scheduler", metavar="ADDRESS", default=None,
    help="Dask distributed scheduler (tcp://HOST:PORT); default: local processes.")
workers_opt = click.option("--workers", type=click.IntRange(1), default=None,
                           help="Local worker processes (default: all cores).")


def _start_workers(scheduler: str | None, workers: int | None) -> None:
    """Start the local workers' fork server, or connect to the Dask cluster, first: the
    workers' imports overlap the job's own."""
    from ..blocks import PRELOAD, dask_client, warm_up

    if scheduler is not None:
        dask_client(scheduler)
    elif workers != 1:
        warm_up(PRELOAD)


def parse_bands(text: str | None) -> dict[str, int] | None:
    """``red=3,green=2,blue=1,nir=4`` -> {"red": 3, ...}; one-line error on bad syntax."""
    if not text:
        return None
    out: dict[str, int] = {}
    for part in text.split(","):
        role, sep, idx = part.partition("=")
        role = role.strip().lower()
        if not sep or not idx.strip().isdigit() or int(idx) < 1 or not role:
            raise BandRoleError(f"--bands {text!r}: expected ROLE=INDEX pairs such as "
                                "red=3,green=2,blue=1,nir=4 (1-based band numbers)")
        out[role] = int(idx)
    return out


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@scheduler_opt
@workers_opt
@click.option("--run-id", default=None, help="Run identifier (default: derived from time).")
def run(config: Path, scheduler: str | None, workers: int | None, run_id: str | None) -> None:
    """Scheduled batch run over the periods CONFIG names; writes runs/<run_id>/."""
    _start_workers(scheduler, workers)
    from .. import jobs

    out = jobs.run(config, scheduler=scheduler, workers=workers, run_id=run_id)
    click.echo(str(out))


@cli.command()
@click.argument("before", type=click.Path(path_type=Path))
@click.argument("after", type=click.Path(path_type=Path))
@click.option("-o", "--outdir", type=click.Path(path_type=Path), required=True,
              help="Output folder.")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="Take thresholds, categories, CRS and resolution from this config.")
@click.option("--bands", default=None, metavar="ROLE=N,...",
              help="Band roles, e.g. red=3,green=2,blue=1,nir=4 (applies to both images).")
@click.option("--rules", type=click.Path(path_type=Path), default=None,
              help="Folder of rule layers named forest.*, farmland.*, permits.*, ...")
@scheduler_opt
@workers_opt
def compare(before: Path, after: Path, outdir: Path, config: Path | None, bands: str | None,
            rules: Path | None, scheduler: str | None, workers: int | None) -> None:
    """Detect change between one BEFORE and one AFTER image (no register)."""
    _start_workers(scheduler, workers)
    from .. import jobs

    out = jobs.compare(before, after, outdir, config=config, bands=parse_bands(bands),
                       rules_dir=rules, scheduler=scheduler, workers=workers)
    click.echo(str(out))


@cli.command()
@click.argument("patches", type=click.Path(path_type=Path))
@click.option("--truth", type=click.Path(path_type=Path), default=None,
              help="Truth polygons with a 'category' column.")
@click.option("--label", type=click.Path(path_type=Path), default=None,
              help="Label raster (>0 = change, nodata = not labelled).")
@click.option("--distractors", type=click.Path(path_type=Path), default=None,
              help="Polygons with a 'kind' column that must not be reported.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the scores here.")
def evaluate(patches: Path, truth: Path | None, label: Path | None,
             distractors: Path | None, json_out: Path | None) -> None:
    """Score PATCHES (GeoJSON/GeoPackage) against truth polygons or a label raster."""
    from ..evaluate import evaluate as run_eval

    scores = run_eval(patches, truth=truth, label=label, distractors=distractors)
    text = json.dumps(scores, indent=2, ensure_ascii=False)
    if json_out:
        json_out.write_text(text + "\n", encoding="utf-8")
    click.echo(text)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("results", type=click.Path(path_type=Path))
def verify(config: Path, results: Path) -> None:
    """Import field verification RESULTS (CSV or vector: patch_id, verification) into the
    register of CONFIG. verification: verified_violation, false_positive, legal_permit,
    rectified (or 属实 / 误报 / 合法 / 已整改)."""
    from ..config import load_config
    from ..errors import ConfigError
    from ..track import Register

    cfg = load_config(config)
    if cfg.register_file is None:
        raise ConfigError(f"{config}: no register configured; set register: PATH")
    n = Register(cfg.register_file).import_verification(results)
    click.echo(f"{n} patches updated")


# ------------------------------------------------------------------- one command per stage


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
def ingest(config: Path) -> None:
    """Stage ingest alone: validate CONFIG's imagery and rule layers and describe them."""
    from .. import stages

    click.echo(json.dumps(stages.inventory(config), indent=2, ensure_ascii=False))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def track(run_dir: Path) -> None:
    """Stage track again on a finished run (e.g. after `tuban verify`), then re-export."""
    from .. import stages

    click.echo(str(stages.rerun_track(run_dir)))


@cli.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
def export_cmd(run_dir: Path) -> None:
    """Stage export again on a finished run: rewrite its outputs from its patches."""
    from .. import stages

    click.echo(str(stages.rerun_export(run_dir)))


def _rerun_command(stage: str, doc: str) -> None:
    @cli.command(stage, help=doc)
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @click.option("--rules", type=click.Path(path_type=Path), default=None,
                  help="Folder of rule layers to use instead of the run's (forest.gpkg, "
                       "permits.geojson, ..., street_offices.gpkg), as for compare.")
    @click.option("--config", "config", type=click.Path(path_type=Path), default=None,
                  help="A config to use instead of the run's (runs of `tuban run`): same "
                       "imagery and register, e.g. new minimum areas or rule layers.")
    @scheduler_opt
    @workers_opt
    def command(run_dir: Path, rules: Path | None, config: Path | None,
                scheduler: str | None, workers: int | None) -> None:
        from .. import stages

        _start_workers(scheduler, workers)
        click.echo(str(stages.rerun_from(run_dir, stage, rules_dir=rules, config=config,
                                         workers=workers, scheduler=scheduler)))


_rerun_command("align", "Stage align again on a finished run, and every stage after it: the "
               "whole pass again in place (same run id, config and imagery; the rule layers "
               "as their files are now), then track and export.")
_rerun_command("detect", "Stage detect again on a finished run, keeping its alignment (e.g. "
               "after new models), then classify, vectorize, track and export.")
_rerun_command("classify", "Stage classify again on a finished run with the rule layers as "
               "their files are now (e.g. new permits): keeps its alignment and the "
               "detector's stored decisions, then vectorize, track and export.")
_rerun_command("vectorize", "Stage vectorize again on a finished run: classify and vectorize "
               "run as one block pass, so this is `tuban classify RUN_DIR`.")
