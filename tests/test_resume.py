"""A killed run resumes from the blocks it finished (pipeline.resume)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import pytest
import yaml
from test_cli import ROOT, sample_config, tuban

from pipeline import resume
from pipeline.errors import OutputExistsError

ROOT_RULES = ROOT / "sample_tiles" / "rules"


def _keys(run: Path) -> list[tuple[str, bytes]]:
    gdf = gpd.read_file(run / "patches.gpkg")
    return sorted((c, g.normalize().wkb) for c, g in zip(gdf["category"], gdf.geometry,
                                                           strict=True))


def _small_blocks(tmp: Path) -> Path:
    tmp.mkdir()
    cfg = sample_config(tmp)
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["block_size"] = 64  # 256 blocks: a pass long enough to be killed in the middle
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return cfg


def test_killed_run_resumes_from_its_finished_blocks(tmp_path: Path) -> None:
    ref = _small_blocks(tmp_path / "ref")
    assert tuban("run", ref, "--run-id", "ref").returncode == 0
    cfg = _small_blocks(tmp_path / "k")
    runs = tmp_path / "k" / "runs"
    blocks = runs / ".k.work" / "blocks-0-1"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--run-id",
                             "k"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(blocks.glob("*.pkl"))) < 8:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(blocks.glob("*.pkl")))
    assert 8 <= done < 256, done
    assert not (runs / "k").exists()
    # the scheduled command again, without a run id: the interrupted run is resumed
    res = tuban("run", cfg)
    assert res.returncode == 0, res.stderr
    assert "resuming: " in res.stderr and " of 256 blocks" in res.stderr, res.stderr
    n = int(res.stderr.split("resuming: ")[1].split(" of ")[0])
    assert n >= done
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith("register")) == ["k"]
    assert _keys(runs / "k") == _keys(tmp_path / "ref" / "runs" / "ref")
    assert not list(runs.glob(".k.work*"))


def test_work_dir_resumes_only_the_same_inputs(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "r"
    work = resume.work_path(out)
    with pytest.raises(RuntimeError), resume.work_dir(out, {"v": 1}) as d:
        resume.BlockStore(d / "blocks-0-1").save(3, {"block": 3})
        raise RuntimeError("killed")
    assert (work / "blocks-0-1" / "3.pkl").exists()  # kept: a finished block
    with pytest.raises(RuntimeError), resume.work_dir(out, {"v": 1}) as d:
        store = resume.BlockStore(d / "blocks-0-1")
        assert store.use_layout({"block_size": 64}) == {}  # first layout recorded: emptied
        store.save(3, {"block": 3})
        # a running attempt is found too: a second one at the same run then stops (below)
        assert resume.interrupted(out.parent, {"v": 1}) == "r"
        raise RuntimeError("killed again")
    assert resume.interrupted(out.parent, {"v": 1}) == "r"
    assert resume.interrupted(out.parent, {"v": 2}) is None
    with pytest.raises(RuntimeError), resume.work_dir(out, {"v": 1}) as d:
        store = resume.BlockStore(d / "blocks-0-1")
        assert store.use_layout({"block_size": 64}) == {3: d / "blocks-0-1" / "3.pkl"}
        assert store.load(d / "blocks-0-1" / "3.pkl") == {"block": 3}
        assert store.use_layout({"block_size": 128}) == {}  # other blocks: start over
        raise RuntimeError("nothing finished this time")
    assert not work.exists()  # no finished block: nothing kept
    with pytest.raises(RuntimeError), resume.work_dir(out, {"v": 1}) as d:
        resume.BlockStore(d / "blocks-0-1").save(0, 0)
        raise RuntimeError
    with resume.work_dir(out, {"v": 2}) as d:  # other inputs: discarded
        assert not list(d.rglob("*.pkl"))
        with pytest.raises(OutputExistsError, match="another attempt"), \
                resume.work_dir(out, {"v": 2}):
            pass
    assert not work.exists() and not Path(f"{work}.lock").exists()


def test_a_shapefile_edited_in_its_attributes_alone_is_not_resumed(tmp_path: Path) -> None:
    """Editing a permit's attributes in a GIS rewrites the shapefile's .dbf and leaves the .shp
    as it was: a killed attempt made with the old attributes must not be resumed."""
    from pipeline import ingest
    from pipeline.config import load_config
    from pipeline.jobs import fingerprint

    shp = tmp_path / "permits.shp"
    gpd.read_file(ROOT_RULES / "permits.geojson").to_file(shp)
    assert {p.suffix for p in ingest.layer_files(shp)} >= {".shp", ".shx", ".dbf", ".prj"}
    assert ingest.layer_files(ROOT_RULES / "permits.geojson") == [ROOT_RULES / "permits.geojson"]
    cfg_path = sample_config(tmp_path)
    data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    data["rules"]["permits"]["path"] = str(shp)
    cfg_path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    cfg = load_config(cfg_path)
    sources = [ingest.open_period(p, cfg.base_dir) for p in cfg.periods]
    before = fingerprint(cfg, sources, {"job": "run"})
    dbf = shp.with_suffix(".dbf")
    stat = shp.stat()
    dbf.write_bytes(dbf.read_bytes() + b"\x1a")  # a rewritten attribute table
    assert shp.stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(cfg, sources, {"job": "run"}) != before
