"""Worker processes of an ingest that was killed: found, waited for, killed, before a new run
writes into the same output.

A worker dies with the ingest process that started it (`run.worker_init`: a parent-death
signal, and a watchdog thread polling the parent), but not at the same instant: after a
`kill -9` of the parent it may still be writing its shard for a moment (the watchdog polls
every 0.25 s; a loaded machine, a stopped forkserver or a worker in the middle of a system call
makes that longer). The output lock does not cover it (the kernel drops the lock with the
parent), so the next ingest of the output could start while an old worker still writes there.

So each worker records itself in `OUT/.ingest-workers/{all|III-of-NNN}/PID.json` (pid, its start
time, host, and its parent's pid and start time); the ingest removes the records when its pool
has ended. A new ingest, holding the lock, first looks at the records left there: a worker whose
ingest is gone (its parent is dead, or the pid now belongs to another process) is waited for up
to `grace_s`, then killed (SIGKILL), and the run starts only once none is left. A record is
trusted only as far as it is checked: a process is waited for or killed only when it is alive
on this host, has the recorded start time, runs as this user and is a multiprocessing worker
(forkserver child); anything else in the folder is ignored and removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from polyp_ssl.shards.textio import load_json

log = logging.getLogger("ingest")

WORKERS_DIR = ".ingest-workers"
GRACE_S = 2.0  # an orphan normally dies within its watchdog period (0.25 s): then it is killed
KILL_WAIT_S = 5.0  # after SIGKILL (a process in uninterruptible sleep takes its time)
MAX_RECORD_BYTES = 4096
POLL_S = 0.02


class OldWorkersAlive(RuntimeError):
    """Workers of an interrupted ingest that did not end even when killed."""


def registry_dir(out: str, part_name: str | None) -> str:
    return os.path.join(out, WORKERS_DIR, part_name or "all")


def start_time(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), or None when
    it does not run (or is a zombie) or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def register(folder: str, parent_pid: int) -> None:
    """In a worker: record this process (written whole: a temporary renamed into place)."""
    pid = os.getpid()
    record = {
        "pid": pid,
        "start": start_time(pid),
        "host": socket.gethostname(),
        "parent": parent_pid,
        "parent_start": start_time(parent_pid),
    }
    path = os.path.join(folder, f"{pid}.json")
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:  # the run goes on; only a later run's wait for orphans is lost
        log.debug("worker %d not recorded in %s: %s", pid, folder, exc)


def clear(folder: str) -> None:
    """After a pool has ended (its workers are gone): remove its records and the empty folders."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
    for path in (folder, os.path.dirname(folder)):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _read(path: Path) -> dict | None:
    try:
        record = load_json(path, "worker record", max_bytes=MAX_RECORD_BYTES)  # a FIFO: refused
    except (OSError, ValueError):
        return None
    keys = ("pid", "start", "parent", "parent_start")
    if not isinstance(record, dict) or not all(type(record.get(k)) is int for k in keys):
        return None
    return record if isinstance(record.get("host"), str) else None


def _is_our_worker(pid: int, start: int) -> bool:
    """`pid` still is the recorded worker: same start time, our user, a multiprocessing child."""
    if start_time(pid) != start:
        return False
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(65536)
    except OSError:
        return False
    return b"multiprocessing" in cmdline


def _orphans(out: str) -> tuple[dict[int, int], list[Path]]:
    """({pid: start time} of live workers whose ingest is gone, records that can be removed)."""
    base = Path(out) / WORKERS_DIR
    if base.is_symlink() or not base.is_dir():
        return [], []
    host = socket.gethostname()
    pids: dict[int, int] = {}
    done: list[Path] = []
    for folder in sorted(base.iterdir()):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            record = _read(path) if path.suffix == ".json" and not path.is_symlink() else None
            if record is None:
                done.append(path)  # not a record (or a temporary of one): nothing to wait for
                continue
            if record["host"] != host:
                continue  # another machine's process: neither seen nor touched from here
            if start_time(record["parent"]) == record["parent_start"]:
                continue  # its ingest still runs (another part): not an orphan
            if _is_our_worker(record["pid"], record["start"]):
                pids[record["pid"]] = record["start"]
            done.append(path)
    return pids, done


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = [p for p in pids if start_time(p) is not None]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_S)
        alive = [p for p in alive if start_time(p) is not None]
    return alive


def stop_old_workers(out: str, grace_s: float = GRACE_S) -> list[int]:
    """Under OUT's lock, before anything is written: wait up to `grace_s` for the workers of a
    killed ingest of OUT to end, kill those left; returns the pids that were still alive.
    OldWorkersAlive when one survives even SIGKILL for KILL_WAIT_S."""
    pids, records = _orphans(out)
    if pids:
        log.info("waiting for the worker processes %s of an interrupted ingest of %s", sorted(pids), out)
        left = _wait_gone(sorted(pids), grace_s)
        for pid in left:
            if _is_our_worker(pid, pids[pid]):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if left:
            log.warning("killed %d worker processes of an interrupted ingest: %s", len(left), left)
        stuck = _wait_gone(left, KILL_WAIT_S)
        if stuck:
            raise OldWorkersAlive(
                f"worker processes {stuck} of an interrupted ingest of {out} are still running after "
                f"SIGKILL; wait for them to end, then run again"
            )
    for path in records:
        with contextlib.suppress(OSError):
            path.unlink()
    base = Path(out) / WORKERS_DIR
    if base.is_dir() and not base.is_symlink():
        for folder in base.iterdir():
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()
    return sorted(pids)
