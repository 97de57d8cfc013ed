"""Ingest's shard tasks on a Dask distributed cluster: `polyp-ssl ingest --executor dask`.

`DaskExecutor` is an `ingest.executor.Executor`: it submits each `ShardTask` (the same unit of
work as the local pool, `write.write_shard`) to a Dask scheduler, either the one at `scheduler`
(`tcp://host:port`) or a `LocalCluster` of `workers` processes on 127.0.0.1 that it starts and
stops, and yields each task's result as it completes. The client (the `polyp-ssl ingest`
process) keeps the plan, the lock, the staging and swap, the catalog and the report.

Workers read ROOT and write OUT by path, so they need the same file system view as the client:
before any work, every worker checks that it sees the folders the tasks read, and a probe file
the client writes in OUT (`check_workers`); each task checks the folders again on its worker
(a worker that joins later). A worker that cannot see them fails the run in one line naming
the worker and the path.

Faults: a worker that dies while running a task has it run again elsewhere by the scheduler
(up to `distributed.scheduler.allowed-failures` worker deaths per task); a task that raises
something other than bad input (an OSError of a network file system) is retried `retries`
times (Dask `retries=`). Both are safe because a task writes its shard under a temporary name,
renames it, and writes its stats file last: a task run twice leaves one result. Bad input
(`IngestError`) is not retried: it comes back as a value and follows `--on-error` as locally
(the tasks still running end, their results are yielded, then the error is raised; queued
tasks do nothing). Worker deaths and task retries are counted from the scheduler's events
(`report()`, the `executor` entry of the run's summary). A task of a killed client may still
run on a worker: a new run into the same OUT waits until none that writes one of its shards is
left (`wait_for_earlier_tasks`). Not covered: a worker that the scheduler declares dead while
it still runs (a network partition) can write a shard at the same time as the task's rerun,
both through the shard's one temporary name.

Dask is imported only when this executor runs (`pip install 'polyp-ssl[dask]'`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from polyp_ssl.ingest.errors import IngestError
from polyp_ssl.ingest.executor import ExecutorError, TaskResult
from polyp_ssl.ingest.plan import ShardTask
from polyp_ssl.ingest.write import write_shard

log = logging.getLogger("ingest")

INSTALL_HINT = "pip install 'polyp-ssl[dask]'"
RETRIES = 2  # Dask retries of a task that raised an error other than bad input
CONNECT_TIMEOUT_S = 30.0  # reaching the scheduler, and waiting for a first worker to join it
EVENT_TOPIC = "polyp-ssl-ingest"  # the workers' task-retry events
PROBE_PREFIX = ".ingest-probe-"
TOKEN_BYTES = 4  # a run's token in its task keys: 8 hex digits
# The LocalCluster's workers: no statistical profiler (it samples the task thread every 10 ms),
# and glibc's malloc left as it is: the nanny's MALLOC_TRIM_THRESHOLD_ (65536) turns off its
# adaptive mmap threshold, so every decoded frame's buffer is mapped and unmapped again (measured:
# the shard tasks' CPU time +30% on 1240 x 1080 frames). docs/ingest.md says how to do the same
# on a cluster of one's own.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}
EARLIER_TASKS_WAIT_S = 1800.0  # tasks of a killed client that still run: waited for this long
EARLIER_TASKS_POLL_S = 0.5


class DaskMissing(ExecutorError):
    """`--executor dask` without Dask installed."""

    bad_input = True


class WorkerCannotSee(ExecutorError):
    """A worker does not see ROOT or OUT as the client does."""

    bad_input = True


def require_dask() -> None:
    """DaskMissing (naming the extra to install) when `dask.distributed` cannot be imported."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise DaskMissing(f"--executor dask needs Dask distributed: {INSTALL_HINT}") from None


def is_url(path: str) -> bool:
    """`s3://bucket/x`, `gs://...`, `file://...`: a URL, not a folder path."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


# ---------------------------------------------------------------- on the workers


def view_problem(
    read_paths: Sequence[str], out: str, probe: str | None = None, token: str = ""
) -> str | None:
    """On a worker: why it cannot work on these paths (a folder it cannot see or read, OUT not
    writable, OUT's probe file missing or other than the client's), or None."""
    for path in read_paths:
        if not os.path.isdir(path):
            return f"cannot see {path} (no such folder there)"
        if not os.access(path, os.R_OK | os.X_OK):
            return f"cannot read {path}"
    if not os.path.isdir(out) or not os.access(out, os.W_OK | os.X_OK):
        return f"cannot write {out}"
    if probe is not None:
        try:
            with open(probe, encoding="utf-8") as f:
                seen = f.read()
        except OSError:
            seen = None
        if seen != token:
            return f"sees another {out} (the client's probe file {os.path.basename(probe)} is not there)"
    return None


def worker_address() -> str:
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:  # not in a worker (a test calling the function directly)
        return "local"


def run_task(task: ShardTask, read_paths: Sequence[str], out: str, abort: str, key: str = "") -> TaskResult:
    """On a worker: `write_shard(task)`, unless the run has stopped (`abort` set: nothing done).
    Bad input and a worker that cannot see the paths come back as `error` (not retried); any
    other exception is logged as a scheduler event and raised (Dask retries it)."""
    from distributed import Event, get_client

    if Event(abort, client=get_client()).is_set():
        return {"shard": task.rel_path, "aborted": True}
    worker = worker_address()
    if (problem := view_problem(read_paths, out)) is not None:
        return {"shard": task.rel_path, "error": WorkerCannotSee(f"Dask worker {worker} {problem}")}
    try:
        result = write_shard(task)
    except IngestError as exc:
        return {"shard": task.rel_path, "error": exc}
    except Exception as exc:
        with contextlib.suppress(Exception):
            from distributed import get_worker

            get_worker().log_event(
                EVENT_TOPIC, {"action": "task-error", "key": key, "error": repr(exc)[:300]}
            )
        raise
    return {**result, "worker": worker}


# ---------------------------------------------------------------- on the client


@dataclass
class DaskExecutor:
    """Shard tasks on the Dask scheduler at `scheduler`, or on a LocalCluster of `workers`
    processes (127.0.0.1, one thread each) when it is None. `read_paths` (ROOT, and the videos
    folder) and `out` are checked on every worker before any work."""

    scheduler: str | None = None
    workers: int = 1
    read_paths: tuple[str, ...] = ()
    out: str = ""
    retries: int = RETRIES
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    stats: dict[str, Any] = field(default_factory=dict, init=False)

    def __call__(self, tasks: Sequence[ShardTask]) -> Iterator[TaskResult]:
        if not tasks:  # (--resume of a finished run) no cluster needed
            self.stats = {"executor": "dask", "tasks": 0}
            return
        if not self.read_paths or not self.out:
            raise ValueError("DaskExecutor needs read_paths (ROOT, the videos folder) and out (OUT)")
        require_dask()
        with self._client() as client:
            t0 = time.perf_counter()
            check_workers(client, self.read_paths, self.out)
            self.stats["check_seconds"] = round(time.perf_counter() - t0, 2)
            yield from self._run(client, tasks)
            self.stats["tasks_seconds"] = round(time.perf_counter() - t0 - self.stats["check_seconds"], 2)

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        import dask
        from distributed import Client, LocalCluster

        if not log.isEnabledFor(logging.DEBUG):  # Dask's own INFO lines are not the run's
            logging.getLogger("distributed").setLevel(logging.WARNING)
            # a lost scheduler is the run's one line (ExecutorError), not also the client's
            logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
        t0 = time.perf_counter()
        where = self.scheduler or f"a LocalCluster of {self.workers} workers"
        with contextlib.ExitStack() as stack:
            try:
                if self.scheduler is None:
                    stack.enter_context(dask.config.set(LOCAL_CLUSTER_CONFIG))
                    cluster = stack.enter_context(
                        LocalCluster(
                            n_workers=self.workers,
                            processes=True,
                            threads_per_worker=1,
                            host="127.0.0.1",
                            dashboard_address=None,
                        )
                    )
                    client = stack.enter_context(Client(cluster, set_as_default=False))
                else:
                    client = stack.enter_context(
                        Client(self.scheduler, timeout=self.connect_timeout_s, set_as_default=False)
                    )
            except (OSError, TimeoutError) as exc:
                raise ExecutorError(
                    f"cannot reach the Dask scheduler at {where}: {exc}", before_work=True
                ) from None
            try:
                client.wait_for_workers(1, timeout=self.connect_timeout_s)
            except (OSError, TimeoutError):
                raise ExecutorError(
                    f"no Dask worker joined the scheduler at {where} within {self.connect_timeout_s:.0f} s",
                    before_work=True,
                ) from None
            self.stats = {
                "executor": "dask",
                "scheduler": client.scheduler.address,
                "workers": len(client.scheduler_info()["workers"]),
                "cluster_start_seconds": round(time.perf_counter() - t0, 2),
            }
            yield client

    def _run(self, client: Any, tasks: Sequence[ShardTask]) -> Iterator[TaskResult]:
        from distributed import Event, as_completed

        prefix = key_prefix(self.out)
        wait_for_earlier_tasks(client, prefix, {t.rel_path for t in tasks})
        token = secrets.token_hex(TOKEN_BYTES)
        abort = Event(f"polyp-ssl-ingest-abort-{token}", client=client)
        rel_of = {f"{prefix}{token}-{t.rel_path}": t.rel_path for t in tasks}
        futures = [
            client.submit(
                run_task,
                t,
                self.read_paths,
                self.out,
                abort.name,
                key,
                key=key,
                retries=self.retries,
                pure=False,
            )
            for key, t in zip(rel_of, tasks, strict=True)
        ]
        failure: BaseException | None = None
        ran_on: Counter[str] = Counter()
        finished = False
        try:
            for fut in as_completed(futures, loop=client.loop):
                result, error = _outcome(fut, client, rel_of)
                fut.release()
                if error is not None:
                    if failure is None:
                        failure = error
                        with contextlib.suppress(Exception):  # (a lost scheduler: nothing runs)
                            abort.set()  # queued tasks do nothing; the running ones end
                    continue
                if result.get("aborted"):
                    continue
                ran_on[result.pop("worker", "?")] += 1
                yield result
            finished = True
        finally:
            if not finished:  # the caller stopped (Ctrl-C): queued tasks are dropped
                with contextlib.suppress(Exception):
                    abort.set()
                    client.cancel(futures)
            with contextlib.suppress(Exception):
                self.stats.update(retry_stats(client, rel_of))
                self.stats["tasks"] = len(tasks)
                self.stats["ran_on"] = dict(sorted(ran_on.items()))
                log_retries(self.stats)
        if failure is not None:
            raise failure

    def report(self) -> dict[str, Any]:
        """What the run did on the cluster: scheduler, workers, tasks, retries and lost workers."""
        return dict(self.stats)


def _outcome(fut: Any, client: Any, rel_of: dict[str, str]) -> tuple[TaskResult, BaseException | None]:
    """(result, None) of a finished future, or ({}, the error the run stops on)."""
    from distributed import KilledWorker

    rel = rel_of.get(str(fut.key), str(fut.key))
    try:
        result = fut.result()
    except KilledWorker as exc:
        return {}, ExecutorError(f"{rel}: the Dask workers running it died too often ({exc})")
    except Exception as exc:
        if client.status != "running" or fut.status == "cancelled":  # the scheduler is gone
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return {}, ExecutorError(f"lost the Dask scheduler at {client.scheduler.address} ({detail})")
        return {}, exc  # the task's own error (an OSError), after its retries
    error = result.pop("error", None)
    return result, error


def key_prefix(out: str) -> str:
    """The start of the task keys of every run into OUT; a key is `{prefix}{run token}-{shard}`."""
    return f"ingest-{hashlib.sha256(out.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}-"


def running_keys(prefix: str, dask_worker: Any = None) -> list[str]:
    """On a worker: the keys starting with `prefix` whose function still runs there (a task of
    a killed client keeps running after the scheduler dropped it)."""
    return sorted(k for ts in dask_worker.state.all_running_tasks if (k := str(ts.key)).startswith(prefix))


def wait_for_earlier_tasks(
    client: Any, prefix: str, shards: set[str], timeout_s: float = EARLIER_TASKS_WAIT_S
) -> None:
    """Before submitting: wait while tasks of an earlier run writing one of `shards` into the same
    OUT (a client that was killed) still run on the workers, so that no two tasks write one shard
    at once (another part's tasks are not waited for)."""
    deadline = time.monotonic() + timeout_s
    said = False
    start = len(prefix) + 2 * TOKEN_BYTES + 1  # the shard's path in a key

    def ours(keys: list[str]) -> list[str]:
        return [k for k in keys if k[start:] in shards]

    while running := {
        w: mine for w, keys in _run_on_workers(client, running_keys, prefix) if (mine := ours(keys))
    }:
        if not said:
            n = sum(len(keys) for keys in running.values())
            log.info("waiting for %d tasks of an earlier run into this output, still running on %s", n,
                     ", ".join(sorted(running)))  # fmt: skip
            said = True
        if time.monotonic() > deadline:
            raise ExecutorError(
                f"tasks of an earlier run into this output still run on the Dask workers {sorted(running)} "
                f"after {timeout_s:.0f} s; wait for them to end (or restart the workers), then run again"
            )
        time.sleep(EARLIER_TASKS_POLL_S)


def _run_on_workers(client: Any, func: Any, *args: Any) -> list[tuple[str, Any]]:
    """`client.run(func, *args)` on every worker: [(worker, result)]; ExecutorError when the
    scheduler is lost meanwhile (an OSError of the connection)."""
    try:
        return sorted(client.run(func, *args).items())
    except OSError as exc:
        raise ExecutorError(f"lost the Dask scheduler at {client.scheduler.address} ({exc})") from None


def check_workers(client: Any, read_paths: Sequence[str], out: str) -> None:
    """Before any work: every worker sees `read_paths` and the client's OUT (a probe file written
    here, read there); ExecutorError naming the first worker and path otherwise."""
    token = secrets.token_hex(8)
    probe = os.path.join(out, f"{PROBE_PREFIX}{os.getpid()}-{token}")
    with open(probe, "w", encoding="utf-8") as f:
        f.write(token)
    try:
        problems = dict(_run_on_workers(client, view_problem, list(read_paths), out, probe, token))
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    for worker, problem in sorted(problems.items()):
        if problem is not None:
            raise WorkerCannotSee(
                f"Dask worker {worker} {problem}: every worker needs the same file system view of "
                "ROOT and OUT as this machine (a shared file system)"
            )


def retry_stats(client: Any, rel_of: dict[str, str]) -> dict[str, Any]:
    """From the scheduler's events about this run's task keys (`rel_of`): the tasks that were
    running on a worker that died (run again elsewhere), those workers, the task errors retried."""
    lost: dict[str, list[str]] = {}
    for _, msg in client.get_events("all"):
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            continue
        if msg.get("expected"):
            continue
        ours = sorted(rel_of[k] for k in msg.get("processing-tasks", ()) if k in rel_of)
        if ours:
            lost.setdefault(str(msg.get("worker")), []).extend(ours)
    errors = [m for _, m in client.get_events(EVENT_TOPIC) if isinstance(m, dict) and m.get("key") in rel_of]
    retried = sorted({rel for rels in lost.values() for rel in rels} | {rel_of[m["key"]] for m in errors})
    return {
        "retried": len(retried),
        "retried_tasks": retried,
        "lost_workers": {w: len(rels) for w, rels in sorted(lost.items())},
        "task_errors_retried": len(errors),
    }


def log_retries(stats: dict[str, Any]) -> None:
    if stats.get("retried"):
        log.warning(
            "dask: %d of %d tasks ran again (workers lost: %s; task errors retried: %d)",
            stats["retried"],
            stats.get("tasks", 0),
            ", ".join(f"{w} ({n} tasks)" for w, n in stats.get("lost_workers", {}).items()) or "none",
            stats.get("task_errors_retried", 0),
        )
