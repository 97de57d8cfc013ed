"""Where the shard tasks of an ingest run: the executor seam.

An executor takes the planned tasks and yields each finished task's result (`write_shard(task)`:
`shard`, its relative path, and its counts; the catalog rows are in the shard's stats file), in
any order. A task's own exception (an `IngestError` for bad input in fail mode, an OSError, ...)
comes out of the iteration once the tasks still running have ended, after the results of those
that finished. When the run stops early (Ctrl-C in the caller) a generator's `close()` is
called: it stops the tasks. The phases of `ingest.run` see nothing else of it, so another
executor (a cluster's) plugs in by being such a callable:

    Executor = Callable[[Sequence[ShardTask]], Iterator[dict]]

`LocalPool` is the one of `polyp-ssl ingest`: in this process for one worker, else a process
pool whose workers never outlive the ingest process (`worker_init`); `executor_dask.DaskExecutor`
runs the same tasks on a Dask cluster (`--executor dask`). An executor may also have a
`report()` method: its dict goes into the run's summary as `executor` (retries, lost workers).
An executor that cannot run the tasks (its cluster lost) raises `ExecutorError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from polyp_ssl.ingest.plan import ShardTask
from polyp_ssl.ingest.workers import clear as clear_worker_records
from polyp_ssl.ingest.workers import register as register_worker
from polyp_ssl.ingest.write import write_shard
from polyp_ssl.shards.lock import process_alive

log = logging.getLogger("ingest")
# a worker checks this often that the ingest process that started it is still alive
WATCHDOG_PERIOD_S = 0.25
PR_SET_PDEATHSIG = 1

TaskResult = dict[str, Any]
Executor = Callable[[Sequence[ShardTask]], Iterator[TaskResult]]


class ExecutorError(RuntimeError):
    """The executor could not run the tasks (a cluster unreachable or lost, a worker that cannot
    see the input); the message is one line saying so. `bad_input`: refused before any work (a
    setup to fix, exit 2), not a run to resume. `before_work`: nothing of the run started (no
    shard to keep), exit 1."""

    bad_input = False

    def __init__(self, message: str, before_work: bool = False) -> None:
        super().__init__(message)
        self.before_work = before_work


@dataclass(frozen=True)
class LocalPool:
    """`workers` processes on this machine (in this process for 1). With `registry`, each worker
    records itself there (ingest.workers) until the pool has ended."""

    workers: int = 1
    registry: str | None = None

    def __call__(self, tasks: Sequence[ShardTask]) -> Iterator[TaskResult]:
        if self.workers <= 1:
            for task in tasks:
                yield write_shard(task)
            return
        ctx = multiprocessing.get_context("forkserver")
        if self.registry is not None:
            os.makedirs(self.registry, exist_ok=True)
        try:
            with ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=ctx,
                initializer=worker_init,
                initargs=(os.getpid(), self.registry),
            ) as pool:
                try:
                    yield from _results(pool, tasks)
                except _TaskRaised as raised:  # the pool has ended already
                    raise raised.exc from None
                except BaseException:
                    # Ctrl-C (or another error) in this process, or the caller stopped: stop the
                    # workers now, instead of letting the pool's exit wait for the shards they write
                    stop_pool(pool)
                    raise
        finally:
            if self.registry is not None:  # the pool has ended: its workers are gone
                clear_worker_records(self.registry)


class _TaskRaised(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__("shard task failed")
        self.exc = exc


def _results(pool: ProcessPoolExecutor, tasks: Sequence[ShardTask]) -> Iterator[TaskResult]:
    """The results as the tasks finish; on the first task that raises, the others are cancelled,
    the running ones waited for and their results yielded, then `_TaskRaised`."""
    futures: list[Future] = [pool.submit(write_shard, t) for t in tasks]
    pending = set(futures)
    yielded: set[Future] = set()
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        for fut in done:
            exc = fut.exception()
            if exc is not None:
                for other in pending:
                    other.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                for other in futures:
                    if (
                        other not in yielded
                        and other.done()
                        and not other.cancelled()
                        and other.exception() is None
                    ):
                        yielded.add(other)
                        yield other.result()
                raise _TaskRaised(exc)
            yielded.add(fut)
            yield fut.result()


def worker_init(parent_pid: int, registry: str | None = None) -> None:
    """Pool initializer: a worker never outlives the ingest process that started it.

    Its OS parent is the forkserver, which exits when the ingest process dies; the parent-death
    signal kills the worker then. A watchdog thread also polls the ingest process itself (covers
    non-Linux systems and a forkserver that lingers). Since that takes a moment, the worker also
    records itself in `registry`, so that the next ingest of the output waits for it (or kills
    it) before writing (ingest.workers). Ctrl-C is the ingest process's to handle: it stops the
    workers, so they ignore SIGINT.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone
            log.debug("prctl(PR_SET_PDEATHSIG) not available")
    if registry is not None:  # before the check below: a parent dying after it finds the record
        register_worker(registry, parent_pid)
    if not process_alive(parent_pid):  # it died before the signal was set
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watchdog, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watchdog(parent_pid: int) -> None:
    while process_alive(parent_pid):
        time.sleep(WATCHDOG_PERIOD_S)
    os.kill(os.getpid(), signal.SIGKILL)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers and shut it down without waiting for their tasks."""
    # the executor has no public handle on its processes; killing them is the only way not to
    # wait for a running task (a whole shard)
    processes = list(getattr(pool, "_processes", {}).values())
    for proc in processes:
        with contextlib.suppress(OSError, ValueError):
            proc.kill()
    for proc in processes:
        proc.join(5)
    pool.shutdown(wait=True, cancel_futures=True)
