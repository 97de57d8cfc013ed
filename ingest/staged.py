"""All-or-nothing writing of a set of files into one dataset root (split, merge, the converters).

The protocol of `ingest --overwrite` (ingest/run.py `swap_in`), for files of a dataset root:

1. every new file is written complete into the staging folder `ROOT/.polyp-ssl-staging/`
   (inside the root: the same file system, so the files are later renamed, never copied);
2. a marker listing them (and the files they replace) is written atomically: the commit point;
3. each file is renamed into place, the replaced files are removed, the marker goes last.

A failure before the marker (a full disk, bad input, Ctrl-C) leaves the root exactly as it was
and the draft is removed; the error names the file that failed. A process killed after the
marker is rolled forward by the next writer of the root (`finish_interrupted`, called under the
root's write lock), and `polyp-ssl ingest` refuses a root whose swap did not finish
(`pending_swap`), so no reader ever sees half of a new set of files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from polyp_ssl.ingest.faults import crash_point
from polyp_ssl.shards.writer import fsync_dir, write_atomic

log = logging.getLogger(__name__)

STAGING_DIR = ".polyp-ssl-staging"
MARKER = ".swap.json"
MAX_MARKER_BYTES = 1 << 20  # the marker lists file names: far below this


class StagedWriteError(OSError):
    """Writing one file of a staged set failed (disk full, read-only folder, ...): the message
    names that file; nothing of the set reached the root."""

    def __init__(self, exc: OSError, path: Path, root: Path) -> None:
        super().__init__(exc.errno, exc.strerror or str(exc), str(path))
        self.root = root

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}; {self.root} was left as it was (no new file was put in)"


def staging_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / STAGING_DIR


def pending_swap(root: str | os.PathLike[str]) -> Path | None:
    """The marker of a swap a killed writer began in `root` and nobody finished, or None."""
    marker = staging_dir(root) / MARKER
    return marker if marker.exists() else None


def _check_rel(rel: str, where: str) -> str:
    """`rel` when it is a relative path inside the root (not absolute, no '.' or '..' part, no
    empty part, no NUL); ValueError else. A marker is read back from disk: its paths never
    lead out of the root."""
    parts = rel.split("/")
    if rel.startswith("/") or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{where}: {rel!r} is not a relative path inside the root")
    return rel


def _refuse_link(staging: Path) -> None:
    if staging.is_symlink():  # never walked, emptied or read: it could lead anywhere
        raise ValueError(f"{staging} is a symbolic link, not a staging folder; remove it")


def _read_marker(marker: Path) -> tuple[list[str], list[str]]:
    """(files, remove) of a marker, each a relative path of plain names."""
    try:
        with open(marker, "rb") as f:
            data = json.loads(f.read(MAX_MARKER_BYTES + 1)[:MAX_MARKER_BYTES].decode("utf-8"))
        files, remove = data["files"], data["remove"]
        if not isinstance(files, list) or not isinstance(remove, list):
            raise TypeError("'files' and 'remove' must be lists")
        if not all(isinstance(x, str) for x in [*files, *remove]):
            raise TypeError("not a list of strings")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{marker}: unreadable swap marker of an interrupted write ({exc}); "
            f"remove {marker.parent} and run the command again"
        ) from None
    return [_check_rel(r, str(marker)) for r in files], [_check_rel(r, str(marker)) for r in remove]


def _swap(root: Path, files: list[str], remove: list[str], point: str = "staged_moved") -> None:
    """The renames after the commit point; safe to run again after a kill at any point."""
    staging = staging_dir(root)
    folders = set()
    for rel in files:
        src = staging / rel
        if not src.exists():  # renamed already by the killed run
            continue
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        folders.add(dst.parent)
        crash_point(point)
    keep = set(files)
    for rel in remove:
        if rel not in keep:
            (root / rel).unlink(missing_ok=True)
    for folder in sorted(folders):
        fsync_dir(folder)
    discard(root)


def discard(root: str | os.PathLike[str]) -> None:
    """Remove the staging folder of `root`; its marker goes last, so an interrupted removal never
    leaves a marker without the files it lists."""
    staging = staging_dir(root)
    _refuse_link(staging)
    if not staging.is_dir():
        return
    marker = staging / MARKER
    for folder, dirs, names in os.walk(staging, topdown=False):
        for n in names:
            path = Path(folder) / n
            if path != marker:
                path.unlink(missing_ok=True)
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(Path(folder) / d)
    marker.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted(root: str | os.PathLike[str]) -> bool:
    """Under the root's write lock, before writing: roll forward a swap a killed writer began
    (True), else remove a draft it left (False)."""
    root = Path(root)
    _refuse_link(staging_dir(root))
    marker = pending_swap(root)
    if marker is None:
        if staging_dir(root).is_dir():
            log.info("removing the staging folder of %s (an interrupted run, none of it put in)", root)
            discard(root)
        return False
    log.warning("finishing the swap of an interrupted run into %s", root)
    files, remove = _read_marker(marker)
    _swap(root, files, remove)
    return True


class StagedFiles:
    """A set of new files of `root`, put in all together or not at all:

        with StagedFiles(root) as staged:
            with staged.writing("annotations/instances_train.json") as path:
                write(path)                      # complete file under the staging folder
            staged.remove_on_commit("annotations/instances_all.json")
            staged.commit()                      # the set replaces the old files

    Leaving the block without `commit()` (an exception) removes the draft."""

    def __init__(self, root: str | os.PathLike[str], point: str = "staged_moved") -> None:
        self.root = Path(root)
        self.point = point  # the crash point after each rename (ingest.faults)
        self.staging = staging_dir(self.root)
        self.files: list[str] = []
        self.remove: list[str] = []
        self.committed = False

    def __enter__(self) -> StagedFiles:
        finish_interrupted(self.root)
        self.staging.mkdir(parents=True, exist_ok=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            discard(self.root)

    @contextlib.contextmanager
    def writing(self, rel: str) -> Iterator[Path]:
        """The staged path to write `rel` to; an OSError while writing becomes a StagedWriteError
        naming the final path."""
        _check_rel(rel, "staged file")
        path = self.staging / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield path
            if not path.is_file():
                raise FileNotFoundError(2, "the staged file was not written", str(path))
        except StagedWriteError:
            raise
        except OSError as exc:
            raise StagedWriteError(exc, self.root / rel, self.root) from exc
        if rel not in self.files:
            self.files.append(rel)

    def remove_on_commit(self, rel: str) -> None:
        """A file of the root that the new set replaces (removed after the renames)."""
        self.remove.append(_check_rel(rel, "file to remove"))

    def commit(self) -> None:
        """Write the marker (the commit point), then rename the files into place."""
        for folder, _, names in os.walk(self.staging):
            if names:
                fsync_dir(folder)
        marker = self.staging / MARKER
        data = json.dumps({"files": self.files, "remove": self.remove}, indent=1).encode("utf-8")
        try:
            write_atomic(marker, data)
        except OSError as exc:
            raise StagedWriteError(exc, marker, self.root) from exc
        self.committed = True
        _swap(self.root, self.files, self.remove, self.point)
