"""The default executor: this machine, one process, with a pool of threads or of worker processes."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from dedup._io import DEFAULT_HINT, OUTPUT_ERRNOS
from dedup._types import Shard
from dedup.errors import DedupError
from dedup.executors.base import Markers, OnDone, OnProgress, Step, split_finished


class ShardFailedError(DedupError):
    """A shard's step raised (not a bad sample: those are rows) more often than retries allow."""


class LocalExecutor:
    """Runs shards in this process (``workers=1``), or ``workers`` at a time on a pool of
    threads of this process (``threads=True``) or of worker processes.

    Threads share one Python, one numpy and pyarrow, and one model (the step caches it per
    process): the per-shard work (decoding, resizing, SHA-256, PDQ by ctypes, ONNX Runtime,
    OpenCV) runs with the GIL released. Worker processes start with ``spawn``: ONNX Runtime
    and faiss keep thread pools that do not survive ``fork``; each builds its model once and
    then takes shard after shard. Results are collected as they finish; markers are written by
    this process's own thread, after the step's outputs are in place, so a crash never leaves a
    marker without its outputs.
    """

    def __init__(self, workers: int = 1, retries: int = 1, *, threads: bool = False) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)  # 0: one per core
        self.retries = max(0, retries)
        self.threads = threads

    def run(
        self,
        step: Step,
        shards: Sequence[Shard],
        *,
        markers: Markers,
        on_done: OnDone | None = None,
        on_progress: OnProgress | None = None,
    ) -> dict[str, dict[str, Any]]:
        results, todo = split_finished(shards, markers, on_done)
        if self.workers == 1 or len(todo) <= 1:
            for shard in todo:
                stats = self._attempt_inline(step, shard, on_progress)
                self._finish(shard, stats, markers, results, on_done)
            return results
        share = max(1, (os.cpu_count() or 1) // self.workers)
        pool: Executor
        if self.threads:
            # Steps report samples as they go (as inline), through one lock: progress bars
            # are not made for several writers.
            lock = threading.Lock()

            def told(n: int) -> None:
                with lock:
                    assert on_progress is not None
                    on_progress(n)

            kwargs: dict[str, Any] = {"progress": told} if on_progress is not None else {}
            pool = ThreadPoolExecutor(max_workers=min(self.workers, len(todo)))
            limits: AbstractContextManager[None] = nullcontext()
        else:
            kwargs = {}
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(
                max_workers=min(self.workers, len(todo)), mp_context=ctx, initializer=_exit_with_parent, initargs=(os.getpid(),)
            )
            limits = _blas_threads(share)
        with limits, pool:
            attempts = {s.shard_id: 0 for s in todo}
            pending: dict[Future[dict[str, Any]], Shard] = {pool.submit(step, s, **kwargs): s for s in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    shard = pending.pop(fut)
                    try:
                        stats = fut.result()
                    except Exception as err:
                        attempts[shard.shard_id] += 1
                        if attempts[shard.shard_id] > self.retries:
                            for other in pending:
                                other.cancel()
                            raise _failed(shard, err) from err
                        pending[pool.submit(step, shard, **kwargs)] = shard
                        continue
                    if on_progress is not None and not kwargs:
                        on_progress(int(stats.get("samples", 0)))
                    self._finish(shard, stats, markers, results, on_done)
        return results

    def _attempt_inline(self, step: Step, shard: Shard, on_progress: OnProgress | None) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                return step(shard, progress=on_progress)
            except DedupError:
                raise
            except Exception as err:
                if attempt == self.retries:
                    raise _failed(shard, err) from err
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _finish(
        shard: Shard,
        stats: dict[str, Any],
        markers: Markers,
        results: dict[str, dict[str, Any]],
        on_done: OnDone | None,
    ) -> None:
        markers.write(shard, stats)
        results[shard.shard_id] = stats
        if on_done is not None:
            on_done(shard, stats)


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """First thing in each worker process: a daemon thread that ends the worker once the run's
    process is gone. A pool's workers hold their own end of the task queue's pipe, so a run
    killed with SIGKILL (the OOM killer, ``kill -9``, a CI timeout) would leave them waiting on
    it forever, each holding its model's memory. Reparented, they see another parent id."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="dedup-exit-with-parent", daemon=True).start()


# Errors only a write meets: a worker's OSError with one of them is about its outputs.
_WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _failed(shard: Shard, err: Exception) -> ShardFailedError:
    if isinstance(err, DedupError):
        return ShardFailedError(f"shard {shard.shard_id}: {err}")
    if isinstance(err, OSError) and err.errno in _WRITE_ONLY_ERRNOS:
        # A full disk met by a write that did not name its file (a worker's buffered write):
        # the same one-line message as every other full disk, not a crash report.
        where = f" {err.filename}" if err.filename else f" the files of shard {shard.shard_id}"
        return ShardFailedError(f"cannot write{where}: {OUTPUT_ERRNOS[err.errno]} ({err.strerror or err}); hint: {DEFAULT_HINT}")
    return ShardFailedError(
        f"shard {shard.shard_id} ({shard.path}) failed: {type(err).__name__}: {err}; "
        "finished shards are kept: fix the cause and rerun the same command to resume"
    )


@contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """Worker processes started inside this block give numpy's BLAS ``threads`` threads (their
    share of the cores), unless the user set it. OpenBLAS otherwise starts a thread per core in
    every worker, whose spinning fights the other workers for the cores: on the quality bench
    (2 cores, 2 workers) one thread each made the run 10 % faster (97.9 -> 88.0 s, 181 -> 163
    CPU-s). Read when a worker imports numpy, so the parent's own BLAS is left as it is.
    """
    names = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ.setdefault(name, str(threads))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)

