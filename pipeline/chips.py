"""Before/after RGB chips for the evidence PNGs, read on the aligned grid.

Each chip is a small window read through :func:`pipeline.align.read_aligned_block` (same shift
and radiometry as detection) and stretched for display. Many chips are read in batches on the
block workers (local processes or Dask), in the order asked for: reading and decompressing
the windows is most of the cost of evidence, and it parallelises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.windows import Window

from . import align, ingest
from .blocks import default_workers, map_blocks
from .errors import TubanError
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
    from .export import stretch_rgb

    inv = ~job.grid.transform
    c0, r0 = inv * (bounds[0], bounds[3])
    c1, r1 = inv * (bounds[2], bounds[1])
    win = Window(round(c0), round(r0), max(1, round(c1 - c0)), max(1, round(r1 - r0)))
    b, a, valid = align.read_aligned_block(job.before, job.after, job.grid, win, job.params,
                                           cloud_mask=False)
    rgb = [list(job.params.roles).index(r) for r in ("red", "green", "blue")]
    return stretch_rgb(b[rgb], valid), stretch_rgb(a[rgb], valid)


def _batch(job: ChipJob, item: tuple[int, list[BBox]]) -> tuple[int, list[Pair | str]]:
    """One task: the chips of a batch, or the reason one could not be read."""
    out: list[Pair | str] = []
    for b in item[1]:
        try:
            out.append(read_pair(job, b))
        except (TubanError, OSError, ValueError) as err:
            out.append(str(err))
    return item[0], out


class ChipSource:
    """Chips of one before/after pair; ``pairs`` reads many on the workers."""

    def __init__(self, before: ingest.ImageSource, after: ingest.ImageSource, grid: Grid,
                 params: align.AlignParams, *, workers: int | None = None,
                 scheduler: str | None = None) -> None:
        self.job = ChipJob(before, after, grid, params)
        self.workers, self.scheduler = workers, scheduler
        self._last: tuple[BBox, Pair] | None = None

    def _read(self, bounds: BBox) -> Pair:
        if self._last is None or self._last[0] != bounds:
            self._last = (bounds, read_pair(self.job, bounds))
        return self._last[1]

    def before_chip(self, bounds: BBox) -> np.ndarray:
        return self._read(bounds)[0]

    def after_chip(self, bounds: BBox) -> np.ndarray:
        return self._read(bounds)[1]

    def pairs(self, bounds: list[BBox]) -> Iterator[Pair | str]:
        """Chips for every bounds, in order; a string (the error) where one failed."""
        n = self.workers or default_workers()
        if self.scheduler is None and (n <= 1 or len(bounds) < PARALLEL_MIN):
            for _, got in map(lambda b: _batch(self.job, (0, [b])), bounds):
                yield got[0]
            return
        batches = [(i, bounds[i:i + BATCH]) for i in range(0, len(bounds), BATCH)]
        done: dict[int, list[Any]] = {}
        nxt = 0
        for _, (start, got) in map_blocks(_batch, self.job, batches, workers=self.workers,
                                          scheduler=self.scheduler):
            done[start] = got
            while nxt in done:  # hand chips over in order as soon as they are contiguous
                chunk = done.pop(nxt)
                yield from chunk
                nxt += len(chunk)
