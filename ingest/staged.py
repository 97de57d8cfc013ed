"""All-or-nothing writing of a set of files into a root: the one swap protocol of ingest.

Used by split, merge and the converters for the files of a dataset root (`StagedFiles`), and by
`ingest --overwrite` for its shards and catalog (`ingest.output_area`, through `commit_swap`,
`run_swap` and `read_marker` with its own staging folder per part):

1. every new file is written complete into a staging folder inside the root (the same file
   system, so the files are later renamed, never copied): `ROOT/.polyp-ssl-staging/` here;
2. a marker listing them (and the files they replace) is written atomically: the commit point;
3. old entries to replace are moved aside into the staging folder, each new file is renamed into
   place (those of `last` after the old files listed in `remove` are deleted: ingest's manifest),
   and the staging folder is removed, its marker last.

A failure before the marker (a full disk, bad input, Ctrl-C) leaves the root exactly as it was
and the draft is removed; the error names the file that failed. A process killed after the
marker is rolled forward by the next writer of the root (`finish_interrupted`, called under the
root's write lock), and `polyp-ssl ingest` refuses a root whose swap did not finish
(`pending_swap`), so no reader ever sees half of a new set of files.

A whole output is replaced the same way (`convert merge --overwrite`): its new folders are
staged whole (`staged.folder("images")`), and the old entries it replaces
(`staged.replace_on_commit("annotations")`) are moved aside into the staging folder after the
marker, before the new ones are renamed in; once every rename is done the marker is rewritten
empty (nothing left to roll forward) and the old entries are deleted with the staging folder.
A kill at any point leaves the old entries in place (before the marker) or is rolled forward to
the new ones: never a mix of the two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.faults import crash_point
from polyp_ssl.shards.textio import load_json
from polyp_ssl.shards.writer import fsync_dir, write_atomic

log = logging.getLogger(__name__)

STAGING_DIR = ".polyp-ssl-staging"
MARKER = ".swap.json"
MAX_MARKER_BYTES = 1 << 20  # the marker lists file names: far below this
REPLACED = ".replaced"  # in the staging folder: old entries moved aside by a whole-output swap


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


def pending_entries(root: str | os.PathLike[str]) -> tuple[set[str], bool]:
    """What an unfinished swap in `root` puts in: (the top-level names of its new entries,
    whether it replaces old entries of the root); (empty set, False) when none is pending."""
    marker = pending_swap(root)
    if marker is None:
        return set(), False
    m = read_marker(marker)
    return {rel.split("/")[0] for rel in [*m.files, *m.last]}, bool(m.replace)


@dataclass
class Marker:
    """A swap marker: the new entries, renamed from the staging folder into the root in order
    (`files`, then `last`), the old files deleted (`remove`, after `files`, before `last`) and
    the old entries moved aside first (`replace`). `extra`: what the writer records besides."""

    files: list[str]
    remove: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    last: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


_LISTS = ("files", "remove", "replace", "last")


def _check_rel(rel: str, where: str, key: str | None = None) -> str:
    """`rel` when it is a relative path inside the root (not absolute, no '.' or '..' part, no
    empty part, no NUL); ValueError else (naming the marker's field `key`). A marker is read
    back from disk: its paths never lead out of the root."""
    parts = rel.split("/")
    if rel.startswith("/") or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        what = f"field {key!r} holds {rel!r}," if key else f"{rel!r} is"
        raise ValueError(f"{where}: {what} not a relative path inside the root")
    return rel


def _refuse_link(staging: Path) -> None:
    if staging.is_symlink():  # never walked, emptied or read: it could lead anywhere
        raise ValueError(f"{staging} is a symbolic link, not a staging folder; remove it")


def read_marker(
    marker: str | os.PathLike[str], writer: str = "write", rerun: str = "run the command again"
) -> Marker:
    """The marker's lists, each a relative path of plain names; ValueError naming the marker, the
    interrupted `writer` and what to do (`rerun`) when it cannot be read."""
    marker = Path(marker)
    try:
        data = load_json(marker, "swap marker", max_bytes=MAX_MARKER_BYTES)  # a FIFO: refused, not waited on
        lists = {k: data[k] if k == "files" else data.get(k, []) for k in _LISTS}
        if not all(isinstance(x, list) for x in lists.values()):
            raise TypeError(f"{', '.join(map(repr, _LISTS))} must be lists")
        if not all(isinstance(x, str) for rels in lists.values() for x in rels):
            raise TypeError("not a list of strings")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{marker}: unreadable swap marker of an interrupted {writer} ({exc}); "
            f"remove {marker.parent} and {rerun}"
        ) from None
    checked = {k: [_check_rel(r, str(marker), k) for r in rels] for k, rels in lists.items()}
    return Marker(**checked, extra={k: v for k, v in data.items() if k not in _LISTS})


def write_marker(path: Path, m: Marker) -> None:
    data = {"files": m.files, "remove": m.remove, "replace": m.replace}
    if m.last:
        data["last"] = m.last
    write_atomic(path, json.dumps({**data, **m.extra}, indent=1).encode("utf-8"))


def _move_aside(root: Path, staging: Path, replace: list[str], point: str) -> None:
    """Old entries (files or whole folders) of a whole-output swap, renamed into the staging
    folder's `.replaced/N`; an N already there was moved by a killed run (or did not exist) and
    is never looked at again, so a new entry renamed in later is never taken for the old one."""
    if not replace:
        return
    parked = staging / REPLACED
    parked.mkdir(exist_ok=True)
    for i, rel in enumerate(replace):
        slot = parked / str(i)
        if os.path.lexists(slot):
            continue
        old = root / rel
        if os.path.lexists(old):
            os.replace(old, slot)
        else:
            slot.mkdir()
        crash_point(point)
    fsync_dir(parked)
    fsync_dir(root)


def _rename_in(root: Path, staging: Path, rels: list[str], point: str) -> None:
    folders = set()
    for rel in rels:
        src = staging / rel
        if not src.exists():  # renamed already by the killed run
            continue
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        folders.add(dst.parent)
        crash_point(point)
    for folder in sorted(folders):
        fsync_dir(folder)


def commit_swap(root: str | os.PathLike[str], staging: str | os.PathLike[str], m: Marker, point: str) -> None:
    """Write the marker (the commit point: the staged entries are complete), then swap."""
    staging = Path(staging)
    for folder, _, names in os.walk(staging):
        if names:
            fsync_dir(folder)
    write_marker(staging / MARKER, m)
    run_swap(root, staging, m, point)


def run_swap(root: str | os.PathLike[str], staging: str | os.PathLike[str], m: Marker, point: str) -> None:
    """The renames after the commit point; safe to run again after a kill at any point. The
    staging folder is removed at the end."""
    root, staging = Path(root), Path(staging)
    _move_aside(root, staging, m.replace, point)
    _rename_in(root, staging, m.files, point)
    keep = set(m.files) | set(m.last)
    for rel in m.remove:
        if rel not in keep:
            (root / rel).unlink(missing_ok=True)
    _rename_in(root, staging, m.last, point)
    if m.replace:  # every new entry is in: nothing is left to roll forward but the cleaning
        write_marker(staging / MARKER, Marker([], extra=m.extra))
    discard_staging(staging)


def discard(root: str | os.PathLike[str]) -> None:
    """Remove the staging folder of `root`."""
    discard_staging(staging_dir(root))


def discard_staging(staging: str | os.PathLike[str]) -> None:
    """Remove a staging folder; its marker goes last, so an interrupted removal never leaves a
    marker without the files it lists."""
    staging = Path(staging)
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
    run_swap(root, staging_dir(root), read_marker(marker), "staged_moved")
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
        self.replace: list[str] = []
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

    def folder(self, rel: str) -> Path:
        """A new folder of the root, filled by the caller under the staging folder and renamed
        into place whole (the old one must be given to `replace_on_commit`)."""
        _check_rel(rel, "staged folder")
        if rel.split("/")[0] == REPLACED:
            raise ValueError(f"staged folder: {rel!r} is a name the swap uses")
        path = self.staging / rel
        path.mkdir(parents=True, exist_ok=True)
        if rel not in self.files:
            self.files.append(rel)
        return path

    def replace_on_commit(self, rel: str) -> None:
        """An old entry of the root (a file or a whole folder) that the new set replaces: moved
        aside after the commit point, before the new entries are renamed in, then deleted."""
        self.replace.append(_check_rel(rel, "entry to replace"))

    def remove_on_commit(self, rel: str) -> None:
        """A file of the root that the new set replaces (removed after the renames)."""
        self.remove.append(_check_rel(rel, "file to remove"))

    def commit(self) -> None:
        """Write the marker (the commit point), then rename the files into place."""
        for folder, _, names in os.walk(self.staging):
            if names:
                fsync_dir(folder)
        marker = self.staging / MARKER
        m = Marker(self.files, self.remove, self.replace)
        try:
            write_marker(marker, m)
        except OSError as exc:
            raise StagedWriteError(exc, marker, self.root) from exc
        self.committed = True
        run_swap(self.root, self.staging, m, self.point)
