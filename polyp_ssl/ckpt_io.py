"""Checkpoint files that are either complete or absent, on the runs folder's own filesystem.

Lightning's own atomic save writes through fsspec, whose local "transaction" writes the file in the
system temp folder and moves it into place; when the runs folder is on another filesystem that move
is a copy, so a kill during it leaves a truncated ``last.ckpt``. `AtomicCheckpointIO` instead
serialises the checkpoint in memory, writes it to a temporary file in the target's own folder,
flushes and fsyncs it, renames it over the target and fsyncs the folder. Before a new ``last.ckpt``
replaces the old one, the old one becomes ``last.prev.ckpt`` (a hard link renamed into place, so
``last.ckpt`` itself never disappears), hence one loadable file always exists.

Failure injection (tests): ``POLYP_SSL_TEST_CRASH_AT=POINT[:N]`` makes the process SIGKILL itself
the N-th time (default 1) it reaches POINT while saving ``last.ckpt``: ``ckpt_write`` (half of the
temporary file written), ``ckpt_saved`` (the new file in place). Unset, empty or another point name:
inert.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from polyp_ssl.shards.writer import fsync_dir

log = logging.getLogger(__name__)

CRASH_ENV = "POLYP_SSL_TEST_CRASH_AT"
CRASH_POINTS = ("ckpt_write", "ckpt_saved")
LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"
TMP_MARK = ".tmp"
_reached: dict[str, int] = {}


def crash_point_from_env(env: dict[str, str] | None = None) -> tuple[str, int] | None:
    """(point, n) of ``POLYP_SSL_TEST_CRASH_AT=POINT[:N]``; None (inert) when unset or empty."""
    value = (os.environ if env is None else env).get(CRASH_ENV, "")
    if not value:
        return None
    point, _, n = value.partition(":")
    try:
        return point, int(n) if n else 1
    except ValueError as exc:
        raise ValueError(f"{CRASH_ENV}={value!r}: expected POINT[:N]") from exc


def _maybe_crash(point: str) -> None:
    hook = crash_point_from_env()
    if hook is None or hook[0] != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == hook[1]:
        log.warning("%s=%s: killing this process (test hook)", CRASH_ENV, os.environ[CRASH_ENV])
        os.kill(os.getpid(), signal.SIGKILL)


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the checkpoint that `path` replaced is kept (``last.ckpt`` -> ``last.prev.ckpt``)."""
    return Path(path).with_name(PREVIOUS)


def temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Temporary files a killed save left in `folder` (never loaded, safe to delete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*.ckpt{TMP_MARK}*") if p.is_file())


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done : done + (1 << 22)])


def _write_file(tmp: Path, data: memoryview, hook: bool) -> None:
    """Write and fsync `tmp` (a new file); with `hook`, the ``ckpt_write`` crash point is checked once
    half of the bytes are on disk."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if hook:
            half = len(data) // 2
            _write_all(fd, data[:half])
            os.fsync(fd)
            _maybe_crash("ckpt_write")
            _write_all(fd, data[half:])
        else:
            _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview, keep_previous: bool) -> None:
    """Write `data` to `path` so that `path` is always either the old complete file or the new one.

    The temporary file lies beside `path` (same folder, hence same filesystem: the rename is atomic).
    With `keep_previous`, an existing `path` is first kept as ``last.prev.ckpt``. On any error the
    temporary is removed and the old file is left as it was; an OSError names `path`.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f"{path.name}{TMP_MARK}{os.getpid()}"
    view = memoryview(data).cast("B")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_file(tmp, view, hook=path.name == LAST)
        if keep_previous and path.is_file():
            prev, prev_tmp = previous_path(path), folder / f"{PREVIOUS}{TMP_MARK}{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                prev_tmp.unlink()  # left by a killed process that had this pid
            try:
                os.link(path, prev_tmp)  # last.ckpt stays in place until the new one replaces it
                os.replace(prev_tmp, prev)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                os.replace(path, prev)  # no hard links here: a moment without last.ckpt, prev is kept
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException as exc:
        for leftover in (tmp, folder / f"{PREVIOUS}{TMP_MARK}{os.getpid()}"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    if path.name == LAST:
        _maybe_crash("ckpt_saved")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic on the target's own filesystem and keep the
    previous ``last.ckpt`` as ``last.prev.ckpt`` (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                f" is not supported for `{self.__class__.__name__}`."
            )
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer(), keep_previous=Path(path).name == LAST)
