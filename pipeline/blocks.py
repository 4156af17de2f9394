"""Where block work runs: inline, a local process pool, or a Dask distributed cluster.

The one place that knows about parallelism. A job is a picklable object shipped once per
worker; ``fn(job, block)`` is a top-level function. Results come back in completion order and
at most ``2 × workers`` blocks are in flight, so memory is bounded by block size and worker
count, never by scene size.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from .errors import TubanError

log = logging.getLogger(__name__)
J = TypeVar("J")
T = TypeVar("T")  # an item of work: a Block, or anything picklable
R = TypeVar("R")

_JOB: Any = None  # the job, set once per worker process

#: environment of local worker processes: one BLAS/OpenMP thread each (the pool is the
#: parallelism) and a small GDAL block cache (each worker reads its own windows once)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "GDAL_CACHEMAX": "64"}


#: environment variable that makes :mod:`pipeline.detect.gbm` import LightGBM without its
#: scikit-learn layer: set by the ``tuban`` command and in the local workers' fork server
LEAN_LIGHTGBM_ENV = "TUBAN_LIGHTGBM_WITHOUT_SKLEARN"

#: modules the local workers import once, in the fork server: the block and chip tasks, and
#: what each worker otherwise imported on its first block (LightGBM; onnxruntime; the
#: morphology that scikit-image's ``label`` imports on its first call, 0.15 s)
PRELOAD = ("pipeline.batch", "pipeline.chips", "pipeline.detect.gbm", "onnxruntime",
           "skimage.morphology")


def _init_worker(job: Any, parent: int) -> None:
    global _JOB
    _JOB = job
    _worker_env()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(pid: int, every_s: float = 1.0) -> None:
    """End this local worker once process ``pid`` (the one that made the pool) is gone.

    A killed run (SIGKILL, a scheduler's timeout) cannot shut its pool down: its workers would
    wait for tasks forever, and their fork server with them.
    """
    while True:
        time.sleep(every_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # alive, owned by someone else
            pass


def _worker_env() -> None:
    """On any worker: :data:`WORKER_ENV` (a small GDAL block cache, not 5 % of RAM each)
    unless already set, before the worker's first read; and glibc's heap reuse."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    _reuse_freed_arrays()


def _reuse_freed_arrays() -> None:
    """Let glibc keep freed block-sized arrays for reuse where ``MALLOC_TRIM_THRESHOLD_`` is
    set, as Dask's nanny sets it (64 KiB): that also switches off glibc's adaptive mmap
    threshold, so every array of a few MB is mmapped afresh and page-faulted on first touch,
    which made block work 1.3-1.8x slower (measured). Up to 128 MiB of freed heap is kept."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
    libc.mallopt(m_trim_threshold, 128 << 20)


def _call(fn: Callable[[Any, Any], Any], block: Any) -> Any:
    return fn(_JOB, block)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


#: memory (MiB) a run may use, when set; default: half of what is available at the start
MEMORY_ENV = "TUBAN_MEMORY_MIB"
#: what the main process keeps beside the workers (rule layers, patches, the models it loads)
MAIN_MIB = 512.0
#: a block worker's memory (peak RSS, shared pages of the fork server counted in full),
#: measured with the learned detector (the heavier one) on the 1 m RGB+NIR bench pair: a fixed
#: part (libraries, models, what the first block leaves) and per pixel of a block with its
#: halo (features, then the network's activations, which onnxruntime hands back after each
#: block): 640² px 510-514 MiB, 1152² 798-876 MiB, rounded up. The spectral detector needs
#: about a tenth of that per pixel
WORKER_FIXED_MIB = 350.0
WORKER_PX_BYTES = 450.0


def worker_memory_mib(workers: int) -> float:
    """Each local worker's share of the run's memory: ``$TUBAN_MEMORY_MIB`` (else half of the
    memory available now) less :data:`MAIN_MIB`, over ``workers``."""
    env = os.environ.get(MEMORY_ENV, "").strip()
    try:
        total = float(env) if env else None
    except ValueError:
        raise TubanError(f"{MEMORY_ENV}={env!r}: expected a number of MiB, e.g. 4000") from None
    if total is None:
        import psutil

        total = psutil.virtual_memory().available / 2**20 / 2
    return max(0.0, total - MAIN_MIB) / max(1, workers)


def worker_px(workers: int) -> float:
    """Pixels of a block with its halo that each of ``workers`` local workers can hold in its
    share of the memory (:func:`worker_memory_mib`, :data:`WORKER_FIXED_MIB`,
    :data:`WORKER_PX_BYTES`)."""
    return max(0.0, worker_memory_mib(workers) - WORKER_FIXED_MIB) * 2**20 / WORKER_PX_BYTES


def fit_workers(workers: int, min_px: float) -> int:
    """The most local workers, up to ``workers``, each of which can hold a block of ``min_px``
    pixels (halo included) in its share of the memory (:func:`worker_px`); 1 if none can."""
    return next((n for n in range(workers, 1, -1) if worker_px(n) >= min_px), 1)


def _context(preload: Iterable[str] = ()) -> Any:
    ctx = mp.get_context("forkserver")
    mods = sorted({"numpy", "scipy.ndimage", "rasterio", *preload})
    ctx.set_forkserver_preload(mods)
    return ctx


def import_path_env() -> dict[str, str]:
    """Environment under which a new Python process searches for modules where this one does.

    Python 3.11's fork server starts with its working directory first on ``sys.path`` and
    ignores the path it is handed: run from a folder holding a ``pipeline`` package (another
    checkout, a project's own ``pipeline/``), the workers imported that one instead of
    tuban's. ``PYTHONSAFEPATH`` keeps the working directory off; ``PYTHONPATH`` is this
    process's path (an empty entry, the working directory, made absolute)."""
    path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    return {"PYTHONSAFEPATH": "1", "PYTHONPATH": os.pathsep.join(path)}


def warm_up(preload: Iterable[str] = ()) -> None:
    """Start the fork server now, importing ``preload`` once, so that workers forked from it
    later start in milliseconds (call before other work; it runs in the background)."""
    _context(preload)
    from multiprocessing import forkserver

    # the fork server and its workers are tuban's own: LightGBM without scikit-learn there
    env = {**WORKER_ENV, LEAN_LIGHTGBM_ENV: "1"}
    paths = import_path_env()
    saved = {k: os.environ.get(k) for k in (*env, *paths)}
    os.environ.update({k: os.environ.get(k) or v for k, v in env.items()})
    os.environ.update(paths)
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def map_blocks(fn: Callable[[J, T], R], job: J, blocks: Iterable[T], *,
               workers: int | None = None, scheduler: str | None = None,
               ) -> Iterator[tuple[T, R]]:
    """Run ``fn(job, block)`` for every block (or other item); yield ``(block, result)`` as
    they finish."""
    blocks = list(blocks)
    if scheduler:
        yield from _map_dask(fn, job, blocks, scheduler)
        return
    n = min(workers or default_workers(), len(blocks))
    if n <= 1:
        for b in blocks:
            yield b, fn(job, b)
        return
    warm_up([fn.__module__])
    with ProcessPoolExecutor(n, mp_context=_context([fn.__module__]),
                             initializer=_init_worker, initargs=(job, os.getpid())) as pool:
        yield from _bounded(lambda b: pool.submit(_call, fn, b), blocks, 2 * n)


def _bounded(submit: Callable[[Any], Future], blocks: list[Any],
             limit: int) -> Iterator[tuple[Any, Any]]:
    todo = iter(blocks)
    running: dict[Future, Any] = {}
    for b in todo:
        running[submit(b)] = b
        if len(running) >= limit:
            break
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for f in done:
            b = running.pop(f)
            yield b, f.result()
            nxt = next(todo, None)
            if nxt is not None:
                running[submit(nxt)] = nxt


_CLIENTS: dict[str, Any] = {}


def _preload(modules: Iterable[str]) -> None:
    """On a Dask worker: the local workers' environment, and import what block tasks use."""
    import importlib

    _worker_env()
    for m in modules:
        importlib.import_module(m)


def dask_client(address: str) -> Any:
    """A client of the Dask scheduler at ``address``, one per process (closed at exit).

    On first connection every worker gets the local workers' environment and starts
    importing the task modules in the background, while this process goes on.
    """
    client = _CLIENTS.get(address)
    if client is not None and client.status == "running":
        return client
    try:
        from distributed import Client, fire_and_forget
    except ImportError as err:  # pragma: no cover - distributed is a dependency
        raise TubanError("dask.distributed is not installed; pip install 'dask[distributed]'"
                         ) from err
    try:
        client = Client(address, timeout="10s", set_as_default=False)
    except OSError as err:
        raise TubanError(f"cannot reach Dask scheduler {address}: {err}; start it or fix "
                         "--scheduler") from None
    for w in client.scheduler_info()["workers"]:  # one import task per worker, not awaited
        fire_and_forget(client.submit(_preload, PRELOAD, workers=[w], pure=False,
                                      allow_other_workers=False))
    _CLIENTS[address] = client
    if len(_CLIENTS) == 1:
        atexit.register(close_dask_clients)
    return client


def close_dask_clients() -> None:
    """Disconnect from every Dask scheduler this process connected to (end of a job)."""
    for c in _CLIENTS.values():
        with contextlib.suppress(Exception):
            c.close()
    _CLIENTS.clear()


def _map_dask(fn: Callable[[Any, Any], Any], job: Any, blocks: list[Any],
              address: str) -> Iterator[tuple[Any, Any]]:
    from distributed import as_completed

    client = dask_client(address)
    n = max(1, sum(client.nthreads().values()))
    client.run(_worker_env)  # workers that joined since the client connected
    [job_f] = client.scatter([job], broadcast=True, hash=False)
    todo = iter(blocks)
    futures = {}
    try:
        for b in todo:
            futures[client.submit(fn, job_f, b, pure=False)] = b
            if len(futures) >= 2 * n:
                break
        ac = as_completed(list(futures), loop=client.loop)
        for f in ac:
            b = futures.pop(f)
            yield b, f.result()
            f.release()
            nxt = next(todo, None)
            if nxt is not None:
                nf = client.submit(fn, job_f, nxt, pure=False)
                futures[nf] = nxt
                ac.add(nf)
    finally:
        client.cancel([*futures, job_f])
