"""Before/after RGB chips for the evidence PNGs, read on the aligned grid.

Each chip is a small window read through :func:`pipeline.align.read_aligned_block` (same shift
and radiometry as detection) and stretched for display. Evidence for many patches is read,
drawn and PNG-encoded (:mod:`pipeline.evidence`) in batches on the block workers (local
processes or Dask) and handed back in the order asked for; the export stage writes the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.windows import Window

from . import align, ingest
from .blocks import default_workers, map_blocks
from .evidence import render_all, stretch_rgb
from .grid import Grid

BBox = tuple[float, float, float, float]
Pair = tuple[np.ndarray, np.ndarray]
#: chips per task, and the fewest chips worth starting workers for
BATCH = 8
PARALLEL_MIN = 24


@dataclass(frozen=True)
class ChipJob:
    """What a worker needs to read chips (picklable)."""

    before: ingest.ImageSource
    after: ingest.ImageSource
    grid: Grid
    params: align.AlignParams


def read_pair(job: ChipJob, bounds: BBox) -> Pair:
    """Before and after RGB chips (``(h, w, 3)`` uint8) covering ``bounds`` (working CRS)."""
    inv = ~job.grid.transform
    c0, r0 = inv * (bounds[0], bounds[3])
    c1, r1 = inv * (bounds[2], bounds[1])
    win = Window(round(c0), round(r0), max(1, round(c1 - c0)), max(1, round(r1 - r0)))
    b, a, valid = align.read_aligned_block(job.before, job.after, job.grid, win, job.params,
                                           cloud_mask=False)
    rgb = [list(job.params.roles).index(r) for r in ("red", "green", "blue")]
    return stretch_rgb(b[rgb], valid), stretch_rgb(a[rgb], valid)


def _render_batch(job: ChipJob, item: tuple[int, list[tuple[dict, BBox]], int],
                  ) -> tuple[int, list[bytes | str]]:
    """One task: the evidence PNGs of a batch of ``(patch, bounds)``."""
    start, items, panel_px = item
    return start, list(render_all(items, panel_px, *_readers(job)))


def _readers(job: ChipJob) -> tuple[Callable[[BBox], np.ndarray], Callable[[BBox], np.ndarray]]:
    last: dict[BBox, Pair] = {}

    def pair(b: BBox) -> Pair:
        if b not in last:
            last.clear()
            last[b] = read_pair(job, b)
        return last[b]
    return (lambda b: pair(b)[0]), (lambda b: pair(b)[1])


class ChipSource:
    """Chips of one before/after pair; ``evidence`` renders many PNGs on the workers."""

    def __init__(self, before: ingest.ImageSource, after: ingest.ImageSource, grid: Grid,
                 params: align.AlignParams, *, workers: int | None = None,
                 scheduler: str | None = None) -> None:
        self.job = ChipJob(before, after, grid, params)
        self.workers, self.scheduler = workers, scheduler

    def evidence(self, items: list[tuple[dict, BBox]], panel_px: int,
                 ) -> Iterator[bytes | str]:
        """Evidence PNGs for ``(patch, bounds)`` items, in order (see
        :data:`pipeline.export.EvidenceRenderer`): read, drawn and encoded on the workers."""
        n = self.workers or default_workers()
        if self.scheduler is None and (n <= 1 or len(items) < PARALLEL_MIN):
            yield from _render_batch(self.job, (0, items, panel_px))[1]
            return
        batches = [(i, items[i:i + BATCH], panel_px) for i in range(0, len(items), BATCH)]
        done: dict[int, list[Any]] = {}
        nxt = 0
        for _, (start, got) in map_blocks(_render_batch, self.job, batches,
                                          workers=self.workers, scheduler=self.scheduler):
            done[start] = got
            while nxt in done:  # hand PNGs over in order as soon as they are contiguous
                chunk = done.pop(nxt)
                yield from chunk
                nxt += len(chunk)
