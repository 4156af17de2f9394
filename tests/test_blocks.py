"""Block scheduling: inline, process pool and bounded in-flight work give the same results."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from pipeline.blocks import _bounded, default_workers, map_blocks
from pipeline.grid import Block, Grid
from pipeline.progress import Progress, Timings


def _square_sum(job: int, block: Block) -> tuple[int, int]:
    return block.index, job * int(block.core.width * block.core.height)


def test_grid_blocks_cover_the_grid_once() -> None:
    from affine import Affine

    grid = Grid((130, 200), Affine(1, 0, 0, 0, -1, 0), "EPSG:32650")
    blocks = list(grid.blocks(64, halo=8))
    assert len(blocks) == grid.n_blocks(64) == 3 * 4
    cover = np.zeros(grid.shape, int)
    for b in blocks:
        r, c = int(b.core.row_off), int(b.core.col_off)
        cover[r:r + int(b.core.height), c:c + int(b.core.width)] += 1
        assert b.outer.row_off >= 0 and b.outer.col_off >= 0
        assert b.outer.row_off + b.outer.height <= 130
        assert b.outer.col_off + b.outer.width <= 200
    assert (cover == 1).all()


def test_inline_and_pool_give_the_same_results() -> None:
    from affine import Affine

    grid = Grid((300, 300), Affine(1, 0, 0, 0, -1, 0), "EPSG:32650")
    blocks = list(grid.blocks(64, halo=4))
    inline = dict(r for _, r in map_blocks(_square_sum, 3, blocks, workers=1))
    pooled = dict(r for _, r in map_blocks(_square_sum, 3, blocks, workers=2))
    assert inline == pooled
    assert sum(inline.values()) == 3 * 300 * 300
    assert default_workers() >= 1


def test_bounded_keeps_at_most_limit_in_flight() -> None:
    from affine import Affine

    grid = Grid((100, 100), Affine(1, 0, 0, 0, -1, 0), "EPSG:32650")
    blocks = list(grid.blocks(10))
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def submit(b: Block) -> Future:
        nonlocal in_flight, peak
        f: Future = Future()
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)

        def done(_: Future) -> None:
            nonlocal in_flight
            with lock:
                in_flight -= 1

        f.add_done_callback(done)
        threading.Timer(0.001, f.set_result, args=(b.index,)).start()
        return f

    got = sorted(r for _, r in _bounded(submit, blocks, 4))
    assert got == list(range(len(blocks)))
    assert peak <= 4


def test_progress_logs_without_a_terminal(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    caplog.set_level(logging.INFO, logger="tuban")
    p = Progress("detect", 20, enabled=False)
    for _ in range(20):
        p.update()
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("detect:")]
    assert 5 <= len(lines) <= 11
    assert "20/20 blocks (100%)" in lines[-1] and "eta" in lines[-1]
    caplog.clear()
    p = Progress("evidence", 3, enabled=False, unit="patch", units="patches")
    for _ in range(3):
        p.update()
    assert "evidence: 3/3 patches (100%)" in caplog.records[-1].getMessage()
    t = Timings()
    with t.stage("align"):
        pass
    assert "align" in t and t["align"] >= 0


def test_timings_stage_entered_twice_adds_up_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """``compare`` opens its images in the ingest stage before the run's own ingest: one
    stage in run.json, and the log does not read as two ingests."""
    caplog.set_level(logging.INFO, logger="tuban")
    t = Timings()
    for _ in range(2):
        with t.stage("ingest"):
            time.sleep(0.01)
    assert list(t) == ["ingest"] and t["ingest"] >= 0.02
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stage ingest ..." and lines[2] == "stage ingest continued ..."
    assert lines[1].startswith("stage ingest done in ") and not lines[1].endswith("in all")
    assert lines[3] == f"stage ingest done in {t['ingest']:.2f}s in all"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")
def test_dask_style_trim_threshold_no_longer_page_faults_every_array() -> None:
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: every block-sized array
    # is then mmapped afresh and faulted in; after _reuse_freed_arrays the heap is reused
    code = """
import resource, numpy as np
from pipeline.blocks import _reuse_freed_arrays
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def churn():
    for _ in range(20):
        a = np.ones(5_000_000, np.float32)
        del a
f0 = faults(); churn(); f1 = faults()
_reuse_freed_arrays()
churn(); churn(); f2 = faults()
print(f1 - f0, (f2 - f1) / 2)
"""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    before, after = float(out[0]), float(out[1])
    assert before > 1000 and after * 4 < before


def test_local_workers_start_with_the_block_path_imported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Workers forked from the fork server hold, before their first task, what the block path
    would otherwise import during a worker's first block (each import repeated per worker)."""
    (tmp_path / "probe_mod.py").write_text(
        "import sys\n\n\ndef missing(job, item):\n"
        "    return [m for m in job if m not in sys.modules]\n")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from pipeline.blocks import PRELOAD, map_blocks, warm_up\n"
        "warm_up(PRELOAD)\n"
        "import probe_mod\n"
        "mods = ['onnxruntime', 'skimage.morphology', 'lightgbm', 'pipeline.batch']\n"
        "print([r for _, r in map_blocks(probe_mod.missing, mods, [0, 1], workers=2)])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[[], []]", out.stdout + out.stderr


def test_workers_import_tuban_not_a_pipeline_folder_in_the_working_directory(
        tmp_path: Path) -> None:
    """Python 3.11's fork server imports its preloads with the working directory first on its
    path, and its workers inherit them: run from another checkout, the workers ran that
    checkout's block code; here, a ``pipeline`` whose ``batch`` fails to import, the fork
    server died and the pool with it."""
    work = tmp_path / "work"
    (work / "pipeline").mkdir(parents=True)
    (work / "pipeline" / "__init__.py").write_text("")
    (work / "pipeline" / "batch.py").write_text("raise RuntimeError('not tuban')\n")
    script = tmp_path / "run.py"
    script.write_text(
        "import os\n"
        "from pipeline.blocks import PRELOAD, map_blocks, warm_up\n"
        "if __name__ == '__main__':\n"
        "    warm_up(PRELOAD)  # as tuban does\n"
        "    print(sorted(r for _, r in map_blocks(os.path.join, 'a', ['b', 'c'], workers=2)))\n")
    res = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    joined = [os.path.join("a", "b"), os.path.join("a", "c")]
    assert res.stdout.strip().splitlines()[-1] == repr(joined)
