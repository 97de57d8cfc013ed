"""Opening an input file: only a regular file is read, and opening never blocks.

Every path a user or a dataset hands to polyp-ssl (raw frames and videos, annotation files,
CSV/TXT tables, shards, checkpoints, weights, config files, embeddings) is opened through
`open_regular` or checked with `check_regular` first. A FIFO, a character or block device
(`/dev/zero`), a socket or a folder in place of a file is refused by name instead of being read:
`open()` on a FIFO with no writer waits forever, and a device reads without end.

The file is opened with O_NONBLOCK (so opening a FIFO returns at once), checked with `fstat` on
the descriptor that will be read (no window between the check and the read), then switched back
to blocking reads. Standard library only: `polyp-ssl catalog` must start without torch.
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

# What a non-regular file is, for the message.
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


class NotRegularFileError(OSError):
    """An input path that is not a regular file. An OSError, so every place that already reports
    an unreadable input (`PATH: cause`, skip-and-count under `--on-error skip`) reports this one
    the same way; `bad_input` tells the dispatcher to exit 2 (bad input), not 1."""

    bad_input = True

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def kind_of(mode: int) -> str | None:
    """What a file of `mode` is when it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: str | os.PathLike[str], what: str, kind: str) -> NotRegularFileError:
    label = f"{what} is {kind}" if what else f"is {kind}"
    return NotRegularFileError(0, f"{label}, not a regular file", os.fspath(path))


def check_regular(path: str | os.PathLike[str], what: str = "") -> os.stat_result:
    """The stat of `path` (following links) when it is a regular file; NotRegularFileError naming
    the path and what it is otherwise; FileNotFoundError etc. as `os.stat` raises them. `stat`
    never opens the file, so it never blocks. Use it where a library opens the path itself."""
    st = os.stat(path)
    kind = kind_of(st.st_mode)
    if kind is not None:
        raise _refuse(path, what, kind)
    return st


def open_regular_fd(path: str | os.PathLike[str], what: str = "") -> int:
    """A blocking read-only descriptor of `path`, opened without blocking and checked on the
    descriptor itself to be a regular file; the caller closes it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = kind_of(os.fstat(fd).st_mode)
        if kind is not None:
            raise _refuse(path, what, kind)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike[str], what: str = "") -> BinaryIO:
    """`open(path, "rb")` for a regular file; NotRegularFileError (an OSError naming the path and
    what it is) for a FIFO, device, socket or folder, without waiting on it."""
    fd = open_regular_fd(path, what)
    return io.open(fd, "rb", closefd=True)  # noqa: UP020 (a descriptor, not a path)


def open_regular_text(
    path: str | os.PathLike[str],
    what: str = "",
    encoding: str = "utf-8",
    errors: str = "strict",
    newline: str | None = None,
) -> io.TextIOWrapper:
    """`open(path, encoding=...)` for a regular file, refused like `open_regular` otherwise."""
    return io.TextIOWrapper(open_regular(path, what), encoding=encoding, errors=errors, newline=newline)


def read_regular_bytes(path: str | os.PathLike[str], what: str = "", limit: int | None = None) -> bytes:
    """The bytes of a regular file; with `limit`, a file larger than `limit` bytes is refused
    (ValueError naming the path) before anything is read."""
    with open_regular(path, what) as f:
        if limit is not None:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                name = what or "file"
                raise ValueError(f"{os.fspath(path)}: {name} is {size:,} bytes, over the limit of {limit:,}")
        return f.read()


def fd_path(fd: int) -> str:
    """A path that names the already-opened, already-checked file `fd` (Linux /proc), for a library
    that only takes a path (a video decoder): it opens exactly the file that was checked, even
    if the name is replaced in between."""
    return f"/proc/self/fd/{fd}"
