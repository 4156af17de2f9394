"""Progress reporting: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("tuban")


class Progress:
    """Counts done/total for one stage; draws a tqdm bar on a TTY, logs every ~10 % otherwise."""

    def __init__(self, stage: str, total: int, *, enabled: bool | None = None,
                 unit: str = "block", units: str | None = None) -> None:
        self.stage, self.total, self.done = stage, max(total, 0), 0
        self.units = units or f"{unit}s"
        self._t0 = time.perf_counter()
        self._next_pct = 10
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        if tty and log.isEnabledFor(logging.INFO):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit=unit, leave=False,
                             file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        pct = 100 * self.done / self.total if self.total else 100
        if pct >= self._next_pct or self.done == self.total:
            el = time.perf_counter() - self._t0
            eta = el / self.done * (self.total - self.done) if self.done else 0.0
            log.info("%s: %d/%d %s (%.0f%%), %.1fs elapsed, eta %.1fs",
                     self.stage, self.done, self.total, self.units, pct, el, eta)
            while self._next_pct <= pct:
                self._next_pct += 10

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Timings(dict[str, float]):
    """Per-stage wall-clock seconds, filled by ``with timings.stage("detect"):``. A stage
    entered again (``compare`` opens its two images before the run's own ingest) adds to its
    time, and its log lines say so."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        again = name in self
        log.info("stage %s %s", name, "continued ..." if again else "...")
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - t0, 3)
            log.info("stage %s done in %.2fs%s", name, self[name], " in all" if again else "")
