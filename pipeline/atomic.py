"""Crash-safe file writing: atomic single files, staged output folders and a file lock.

Every writer in tuban goes through these helpers so that a failed or killed run leaves either
the previous file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import RegisterError

#: Suffixes of sidecar files SQLite/GDAL may leave next to a temp file.
_SIDECARS = ("-journal", "-wal", "-shm", ".aux.xml")


def _fsync_path(path: Path) -> None:
    """Flush a file (or directory) to disk; ignore file systems that cannot fsync."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # e.g. EINVAL on some network/virtual file systems
        if err.errno not in (errno.EINVAL, errno.EROFS, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _unlink_quiet(path: Path) -> None:
    for p in (path, *(path.with_name(path.name + s) for s in _SIDECARS)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name next to ``path`` that keeps its suffix (GDAL picks drivers by it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{tag}-{secrets.token_hex(4)}{path.suffix}")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and move it into place.

    Write to the yielded path with any tool (``open``, rasterio, pyogrio). If the block raises,
    the temporary file is deleted and ``path`` is left as it was.

    Args:
        path: Final destination.

    Yields:
        The temporary path to write to (same folder and suffix as ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {path}")
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        _unlink_quiet(tmp)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only if the block succeeds.

    Args:
        path: Final destination.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **kwargs: Passed to :func:`open` (e.g. ``encoding="utf-8"``, ``newline=""``).

    Yields:
        The open file object.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open needs a write mode, got {mode!r}")
    with atomic_write(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, many at once (files written into a staging
    folder need not be atomic one by one: the folder is published as a whole)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [p for p in root.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(min(8, max(1, len(files)))) as pool:
        list(pool.map(_fsync_path, files))


def _merge_tree(src: Path, dst: Path, last: Sequence[str], replace: Sequence[str] = ()) -> None:
    """Move every file under ``src`` into ``dst`` with ``os.replace``; ``last`` names go last.
    Files of ``dst``'s ``replace`` subfolders that ``src`` does not have are removed, when
    ``src`` has that subfolder, before the ``last`` files move."""
    files = sorted(p for p in src.rglob("*") if p.is_file() or p.is_symlink())
    first = [f for f in files if f.relative_to(src).as_posix() not in last]
    final = [f for f in files if f.relative_to(src).as_posix() in last]
    stale = [f for d in replace if (src / d).is_dir() and (dst / d).is_dir()
             for f in (dst / d).rglob("*")
             if (f.is_file() or f.is_symlink()) and not (src / f.relative_to(dst)).exists()]
    dirs = _move_all(first, src, dst)
    for old in stale:
        old.unlink(missing_ok=True)
    dirs |= _move_all(final, src, dst)
    for d in dirs | {dst}:
        _fsync_path(d)


def _move_all(files: list[Path], src: Path, dst: Path) -> set[Path]:
    """``os.replace`` each of ``files`` (under ``src``) to its place under ``dst``; returns the
    folders written to."""
    dirs: set[Path] = set()
    for f in files:
        target = dst / f.relative_to(src)
        if target.parent not in dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(target.parent)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(f, target)
    return dirs


@contextlib.contextmanager
def staging_dir(final_dir: str | Path, *, last: Sequence[str] = ("run.json",),
                replace: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a sibling staging folder whose files move into ``final_dir`` only on success.

    On success every file is flushed to disk and moved into ``final_dir``: a new
    ``final_dir`` is the staging folder renamed; into an existing one existing files are
    replaced, subfolders merged, and files named in ``last`` (relative paths) are moved after
    all others. Files written into the staging folder need no atomic writes of their own.
    On failure the staging folder is removed and ``final_dir`` is left untouched.

    Args:
        final_dir: The output folder.
        last: Relative paths moved last (e.g. the manifest, whose presence marks completion).
        replace: Subfolders whose earlier files go when the staging folder has the subfolder
            (its content replaces theirs rather than merging).

    Yields:
        The staging folder ``<final_dir>.partial-<random>``.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = final_dir.with_name(f"{final_dir.name}.partial-{secrets.token_hex(4)}")
    stage.mkdir()
    try:
        yield stage
        _fsync_tree(stage)
        if not final_dir.exists():
            try:  # a new folder: one rename publishes everything at once
                os.rename(stage, final_dir)
                _fsync_path(final_dir.parent)
                return
            except OSError:
                pass  # created meanwhile: merge into it
        final_dir.mkdir(exist_ok=True)
        _merge_tree(stage, final_dir, last, replace)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float = 600.0, poll_s: float = 0.05) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``<path>.lock`` (works across processes).

    Args:
        path: The file to protect (the lock file sits next to it).
        timeout_s: How long to wait for another holder before giving up.
        poll_s: Polling interval while waiting.

    Yields:
        The lock file path.

    Raises:
        RegisterError: The lock could not be taken within ``timeout_s``.
    """
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegisterError(
                        f"{path}: still locked by another run after {timeout_s:.0f} s "
                        f"({lock}); wait for it to finish, or delete the lock file if no "
                        "tuban process is running") from None
                time.sleep(poll_s)
        try:
            yield lock
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
