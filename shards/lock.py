"""One writer per output root: an advisory `flock` on `ROOT/.polyp-ssl.lock`.

    with output_lock(out, "polyp-ssl ingest"):                 # whole root: ingest, catalog merge, convert
        ...
    with output_lock(out, "polyp-ssl ingest", part="000-of-004"):   # one part of `ingest --part I/N`
        ...

A whole-root writer holds the root lock exclusively. A part holds the root lock shared plus its
own part lock (`ROOT/.polyp-ssl.part-III-of-NNN.lock`) exclusively, so the parts of one ingest
run side by side while a whole-root writer (or `catalog merge`) is refused until they end.
A second writer is refused at once (`LockHeld`, naming the holder's pid and command), never
made to wait. The kernel drops a `flock` when its process dies (even by SIGKILL), so a lock
file left by a dead process never blocks; the file itself is removed by the holder on release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import socket
import sys
from collections.abc import Iterator

LOCK_NAME = ".polyp-ssl.lock"
PART_LOCK_PATTERN = ".polyp-ssl.part-{part}.lock"
MAX_HOLDER_BYTES = 4096  # what is read back of a holder's note (the file is not trusted)


class LockHeld(RuntimeError):
    """Another live process writes into the same root (or part)."""


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"x")


def lock_path(root: str | os.PathLike[str], part: str | None = None) -> str:
    name = LOCK_NAME if part is None else PART_LOCK_PATTERN.format(part=part)
    return os.path.join(os.fspath(root), name)


def read_holder(path: str | os.PathLike[str]) -> dict | None:
    """The note of the process that holds (or last held) the lock file `path`: {"pid", "host",
    "command", ...}; None when there is none or it is not a note (the file is not trusted)."""
    return _read_holder(os.fspath(path))


def _read_holder(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_HOLDER_BYTES)
        holder = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another process"
    command = str(holder.get("command", "?"))[:200]
    return f"pid {holder['pid']} ({command})"


def _is_held(path: str) -> bool:
    """True when some process holds an exclusive lock on `path` now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _holders_of_root(root: str) -> str:
    """Who holds the root lock: the exclusive holder's note, else the running parts' notes."""
    pattern = os.path.join(glob.escape(root), PART_LOCK_PATTERN.format(part="*"))
    parts = [p for p in sorted(glob.glob(pattern)) if _is_held(p)]
    if parts:
        return ", ".join(_describe(_read_holder(p)) for p in parts)
    return _describe(_read_holder(lock_path(root)))


def _acquire(path: str, shared: bool, note: dict) -> int:
    """A file descriptor holding the lock on `path`; raises LockHeld when it is taken."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(path) from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder may have removed the file between our open and our flock: the lock
        # is then on a file nobody else can see; start again with the file now at `path`
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)  # shared holders leave it empty: the note is the exclusive holder's
            if not shared:
                os.pwrite(fd, (json.dumps(note) + "\n").encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, "lock file keeps being replaced", path)


def _release(fd: int, path: str, shared: bool) -> None:
    try:
        if shared:
            # only the last holder removes the file: it is the last one if it can take it exclusively
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.remove(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(root: str | os.PathLike[str], command: str, part: str | None = None) -> Iterator[None]:
    """Hold the write lock of `root` (which must exist) for the block; raises LockHeld at once
    when another live process holds it. `part` names one part of a partitioned ingest."""
    root = os.path.abspath(os.fspath(root))
    note = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "argv": sys.argv[:20]}
    main_path = lock_path(root)
    try:
        main_fd = _acquire(main_path, shared=part is not None, note=note)
    except LockHeld:
        raise LockHeld(
            f"{root} is in use by {_holders_of_root(root)}: another writer (ingest, catalog merge or "
            f"convert) is running there; wait for it to end (lock {main_path})"
        ) from None
    try:
        part_fd = None
        if part is not None:
            part_path = lock_path(root, part)
            try:
                part_fd = _acquire(part_path, shared=False, note=note)
            except LockHeld:
                raise LockHeld(
                    f"part {part} of {root} is in use by {_describe(_read_holder(part_path))}; "
                    f"wait for it to end (lock {part_path})"
                ) from None
        try:
            yield
        finally:
            if part_fd is not None:
                _release(part_fd, lock_path(root, part), shared=False)
    finally:
        _release(main_fd, main_path, shared=part is not None)
