"""A run's work folder, kept when an attempt is killed so that the next one resumes it.

``.<run>.work/`` beside the run folder holds, per compared pair (``blocks-<a>-<b>/``), the
alignment and every block the pass has finished (:class:`BlockStore`), plus the files the
stages write on the way (category and score rasters, checkpoints for export). It belongs to
one attempt's inputs: ``fingerprint.json`` (tuban's version, the config, the stage, and the
size and modification time of every input file) must match for the next attempt to resume;
otherwise it starts over. On success the folder goes; on failure it stays only when it holds
finished blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .align import AlignParams, params_from_record, params_record
from .atomic import atomic_write, file_lock
from .errors import OutputExistsError, RegisterError

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"


def work_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.work"


def file_stamps(paths: Iterable[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file: what a resumed attempt must find unchanged
    (cheap, unlike the checksums ``run.json`` records)."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")


def _plain(data: Any) -> Any:
    """``data`` as JSON gives it back (tuples as lists), for comparing with a read one."""
    return json.loads(json.dumps(data, sort_keys=True))


def interrupted(parent: Path, fingerprint: dict[str, Any]) -> str | None:
    """The name of a run folder under ``parent`` whose killed attempt had this fingerprint
    (the newest), or None."""
    fingerprint = _plain(fingerprint)
    found = [d for d in parent.glob(".*.work")
             if d.is_dir() and _read_json(d / FINGERPRINT) == fingerprint]
    if not found:
        return None
    newest = max(found, key=lambda d: d.stat().st_mtime)
    return newest.name[1:-len(".work")]


@contextlib.contextmanager
def work_dir(out_dir: Path, fingerprint: dict[str, Any]) -> Iterator[Path]:
    """The work folder of ``out_dir``: a killed attempt's with this same ``fingerprint``, else
    a new one. Held under a lock: a second attempt at the same run meanwhile is an error."""
    d = work_path(out_dir)
    d.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = _plain(fingerprint)
    with contextlib.ExitStack() as stack:
        try:
            lock = stack.enter_context(file_lock(d, timeout_s=0))
        except RegisterError:
            raise OutputExistsError(f"{out_dir}: another attempt at this run is running "
                                    f"({d}.lock); wait for it to finish") from None
        if d.exists():
            if _read_json(d / FINGERPRINT) == fingerprint:
                log.info("resuming an interrupted attempt at this run from %s", d)
            else:
                log.info("discarding %s: left by an attempt with other inputs or settings", d)
                shutil.rmtree(d)
        d.mkdir(exist_ok=True)
        _write_json(d / FINGERPRINT, fingerprint)
        try:
            yield d
        except BaseException:
            n = sum(1 for _ in d.glob("blocks-*/*.pkl"))
            if n:
                log.warning("kept %s with %d finished block(s): the next attempt at this run "
                            "resumes from them (delete it to start over)", d, n)
            else:
                shutil.rmtree(d, ignore_errors=True)
            raise
        shutil.rmtree(d, ignore_errors=True)
        lock.unlink(missing_ok=True)


class BlockStore:
    """One pair's finished blocks, a pickle each (trusted: written by this tool into the
    run's own work folder), and its alignment. A store made for another block layout is
    emptied."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)

    def alignment(self) -> AlignParams | None:
        rec = _read_json(self.dir / "alignment.json")
        return None if rec is None else params_from_record(rec)

    def save_alignment(self, params: AlignParams) -> None:
        _write_json(self.dir / "alignment.json", params_record(params))

    def use_layout(self, layout: dict[str, Any]) -> dict[int, Path]:
        """Keep the finished blocks when they were made with ``layout`` (block size, halo,
        detector); return them by block index."""
        meta = self.dir / "layout.json"
        if _read_json(meta) != _plain(layout):
            for p in self.dir.glob("*.pkl"):
                p.unlink()
            _write_json(meta, layout)
        return {int(p.stem): p for p in self.dir.glob("*.pkl")}

    def save(self, index: int, result: Any) -> None:
        """Keep a finished block (zlib level 1: a block's category core is mostly 0, so the
        folder stays a few % of a byte per pixel)."""
        tmp = self.dir / f"{index}.pkl.tmp"
        tmp.write_bytes(zlib.compress(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), 1))
        os.replace(tmp, self.dir / f"{index}.pkl")

    @staticmethod
    def load(path: Path) -> Any:
        return pickle.loads(zlib.decompress(path.read_bytes()))  # noqa: S301 - our own
