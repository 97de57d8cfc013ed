"""The output area of one ingest run: OUT's files of this run (or part), under OUT's write lock.

`OutputArea` owns what a run may find in OUT and how it leaves it: the lock (a `with` block), the
workers of a killed run (stopped before anything is written), existing output (refused, resumed
with `--resume`, replaced with `--overwrite`), strays (shards of another plan), temporaries,
the staging folder of `--overwrite` and its swap, and the cleaning after a failed run.

`--overwrite` of an existing output builds the new output in a staging folder inside OUT (same
file system: renames) and swaps it in only once complete (`swap_in`); the swap marker is the
commit point, and a run killed during the swap is rolled forward by the next ingest of OUT
(`finish_interrupted_swap`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from polyp_ssl.ingest.catalog_build import MANIFEST
from polyp_ssl.ingest.errors import IngestError, IngestRefused
from polyp_ssl.ingest.plan import ShardTask
from polyp_ssl.ingest.staged import Marker, commit_swap, discard_staging, read_marker, run_swap
from polyp_ssl.ingest.workers import OldWorkersAlive, registry_dir, stop_old_workers
from polyp_ssl.ingest.write import STATS_VERSION, stats_path
from polyp_ssl.shards.lock import LockHeld, output_lock
from polyp_ssl.shards.writer import file_sha256

log = logging.getLogger("ingest")
# `--overwrite` writes the new output here (same file system as OUT), then swaps it in.
STAGING_DIR = ".ingest-staging"
SWAP_MARKER = ".swap.json"  # in the staging folder: the new output is complete, the swap has begun
_PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Part:
    index: int
    count: int

    @property
    def dir_name(self) -> str:
        return f"{self.index:03d}-of-{self.count:03d}"


class StaleShard(Exception):
    """A finished shard of an earlier run made from other input or parameters."""


@dataclass
class OutputArea:
    """This run's files in OUT (shards of `splits`, the catalog of `part`), and how the run treats
    the ones it finds there (`overwrite`, `resume`). Use as: `with area.locked(): area.open()`,
    then `write_root` for the tasks, `select(tasks)`, and `commit()` once the catalog is written."""

    out: str
    splits: list[str]
    part: Part | None = None
    overwrite: bool = False
    resume: bool = False
    staged: bool = field(default=False, init=False)  # the run writes into the staging folder

    @property
    def staging(self) -> str:
        return staging_dir_of(self.out, self.part)

    @property
    def write_root(self) -> str:
        """Where the tasks and the catalog write: OUT, or the staging folder of an --overwrite."""
        return self.staging if self.staged else self.out

    @property
    def catalog_dir(self) -> str:
        """The catalog folder the run writes (under `write_root`)."""
        return catalog_dir_of(self.write_root, self.part)

    @property
    def part_name(self) -> str | None:
        return self.part.dir_name if self.part else None

    @property
    def worker_registry(self) -> str:
        """Where the run's worker processes record themselves (ingest.workers)."""
        return registry_dir(self.out, self.part_name)

    def own_files(self) -> list[str]:
        """Files of this run's shard name pattern in `write_root` (tars, stats, temporaries)."""
        return own_shard_files(self.write_root, self.splits, self.part)

    @contextlib.contextmanager
    def locked(self) -> Iterator[OutputArea]:
        """OUT's write lock (one writer per output root, or part of one) for the block. A failed
        run leaves no empty folder of its own that looks like output, and an OUT made for the run
        and left empty is removed again."""
        made = not os.path.exists(self.out)
        own_dirs = run_dirs(self.out, self.splits, self.part)
        existed = {d for d in own_dirs if os.path.isdir(d)}
        os.makedirs(self.out, exist_ok=True)
        locked = False
        try:
            with output_lock(self.out, "polyp-ssl ingest", self.part_name):
                locked = True
                try:
                    yield self
                except BaseException:
                    remove_empty_dirs([d for d in own_dirs if d not in existed])
                    raise
        except LockHeld as e:
            if locked:
                raise
            raise IngestRefused(str(e)) from None
        finally:
            if made and locked:  # a folder made for this run and left empty (refused, bad input): removed
                with contextlib.suppress(OSError):
                    os.rmdir(self.out)

    def open(self) -> None:
        """Before reading the input: stop the workers of a killed ingest of OUT, finish an
        interrupted swap, refuse existing output without --resume / --overwrite, and choose where
        the run writes (the staging folder for an --overwrite of existing output)."""
        # the workers of a killed ingest of OUT may still write for a moment: none is left from here on
        try:
            stop_old_workers(self.out)
        except OldWorkersAlive as exc:
            raise IngestRefused(str(exc)) from None
        out, staging = self.out, self.staging
        for folder in (os.path.dirname(staging), staging):
            if os.path.islink(folder):  # never walked or emptied: it could lead anywhere
                raise IngestRefused(f"{folder} is a symbolic link, not ingest's staging folder; remove it")
        # an --overwrite killed while swapping its complete new output in: finish that first
        finish_interrupted_swap(out, self.part)

        catalog_dir = catalog_dir_of(out, self.part)
        existing = own_shard_files(out, self.splits, self.part) + own_catalog_files(catalog_dir)
        if existing and not self.overwrite and not self.resume:
            complete = os.path.exists(os.path.join(catalog_dir, MANIFEST))
            what = "a complete ingest output" if complete else "a partial ingest run"
            raise IngestRefused(
                f"{what} exists in {out} ({len(existing)} files, e.g. {existing[0]}); "
                "use --resume to finish it or --overwrite to start again"
            )
        # --overwrite of an existing output: the new run is written into a staging folder and
        # replaces the old files only once it is complete (swap_in); until then the old output stays
        self.staged = self.overwrite and bool(existing)
        if os.path.isdir(staging) and not self.staged:
            log.info(
                "removing %s, left by an unfinished --overwrite (the output in %s was kept)",
                staging,
                out,
            )
            remove_staging(staging)
        if self.staged:
            log.info(
                "--overwrite: writing the new output into %s; the %d files of the earlier run stay until "
                "it is complete",
                staging,
                len(existing),
            )

    def select(self, tasks: list[ShardTask]) -> list[ShardTask]:
        """The tasks left to run. With --resume (or an --overwrite started again) finished shards
        that match this run are kept; shards of another plan are refused (--resume) or removed
        (staging folder); temporaries are removed."""
        reuse = self.resume or self.staged
        planned = {os.path.join(self.write_root, t.rel_path) for t in tasks}
        planned |= {stats_path(p) for p in planned}
        strays = [f for f in self.own_files() if not f.endswith(".tmp") and f not in planned]
        if self.resume and strays:
            raise IngestRefused(
                f"{strays[0]} is not a shard of this run's plan (made with other input or parameters); "
                "use --overwrite to start again"
            )
        if self.staged:  # left in the staging folder by an earlier --overwrite with other input or options
            remove_files(strays)
        todo = [task for task in tasks if not (reuse and self._reusable(task))]
        remove_files([f for f in self.own_files() if f.endswith(".tmp")])
        if reuse:
            log.info("resume: %d of %d shards already done", len(tasks) - len(todo), len(tasks))
        return todo

    def _reusable(self, task: ShardTask) -> bool:
        try:
            done, why = shard_is_done(task)
        except StaleShard:
            if not self.staged:
                raise IngestRefused(
                    f"{task.rel_path} was made from other input or parameters; use --overwrite to start again"
                ) from None
            done, why = False, "staged by an --overwrite with other input or parameters"
        if not done:
            log.info("redoing %s: %s", task.rel_path, why)
        return done

    def clean_after_failed_tasks(self, cause: BaseException, written: list[str]) -> None:
        """After the tasks stopped on `cause`: remove temporaries and tars without their stats
        file (a worker killed in between); for bad input (IngestError, fail mode) also every shard
        this run wrote and the staging folder: nothing of the run is left visible."""
        own = self.own_files()
        remove_files([f for f in own if f.endswith(".tmp")])
        remove_files([f for f in own if f.endswith(".tar") and stats_path(f) not in own])
        if isinstance(cause, IngestError):
            self.discard([os.path.join(self.write_root, rel) for rel in written])

    def discard(self, tars: list[str]) -> None:
        """Remove these shards (and their stats files) of the run, and its staging folder."""
        for tar in tars:
            remove_files([stats_path(tar), tar])
        if self.staged:
            remove_staging(self.staging)

    def commit(self) -> None:
        """The catalog is written: an --overwrite's staged output replaces the old one."""
        if self.staged:
            swap_in(self.out, self.part, self.splits)


# ---------------------------------------------------------------- the files of a run in OUT


def own_shard_files(out: str, splits: list[str], part: Part | None) -> list[str]:
    """Files of this run's shard name pattern (tars, stats, temporaries) already in OUT."""
    found = []
    for split in splits:
        prefix = re.escape(split) + (rf"-p{part.index:03d}" if part else "")
        pattern = re.compile(rf"^{prefix}-\d{{6}}\.(tar|stats\.json)(\.tmp)?$")
        folder = os.path.join(out, "shards", split)
        if os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if pattern.match(n)]
    return found


def catalog_dir_of(out: str, part: Part | None) -> str:
    return os.path.join(out, "catalog", "parts", part.dir_name) if part else os.path.join(out, "catalog")


def own_catalog_files(catalog_dir: str) -> list[str]:
    if not os.path.isdir(catalog_dir):
        return []
    return [
        os.path.join(catalog_dir, n)
        for n in sorted(os.listdir(catalog_dir))
        if n.endswith((".parquet", ".parquet.tmp")) or n.startswith(MANIFEST)
    ]


def run_dirs(out: str, splits: list[str], part: Part | None) -> list[str]:
    """The folders a run may create in OUT, deepest first (removed again when it fails and leaves
    them empty)."""
    dirs = [os.path.join(out, "shards", s) for s in splits] + [os.path.join(out, "shards")]
    catalog = catalog_dir_of(out, part)
    dirs += [catalog] + ([os.path.dirname(catalog), os.path.join(out, "catalog")] if part else [])
    staging = staging_dir_of(out, part)
    return [*dirs, staging, os.path.dirname(staging)]


def remove_empty_dirs(dirs: list[str]) -> None:
    """rmdir each folder that is empty (and not a link); a folder with anything in it is kept."""
    for d in dirs:
        if os.path.isdir(d) and not os.path.islink(d):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def remove_files(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def shard_is_done(task: ShardTask) -> tuple[bool, str]:
    """(done, why not) for --resume: stats present, same fingerprint, tar of the recorded sha256."""
    tar = os.path.join(task.out_root, task.rel_path)
    spath = stats_path(tar)
    if not os.path.exists(spath):
        return False, "no stats file"
    try:
        with open(spath, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        return False, f"unreadable stats file ({e})"
    if not isinstance(stats, dict):
        return False, "unreadable stats file (not a JSON object)"
    if stats.get("fingerprint") != task.fingerprint:
        raise StaleShard(task.rel_path)
    if stats.get("version") != STATS_VERSION:
        # written by another version of ingest (e.g. before the catalog had member spans): same
        # input and options, but its rows are not the ones this version puts in the catalog
        return False, f"stats file of version {stats.get('version')!r}, this ingest writes {STATS_VERSION}"
    if (
        not os.path.exists(tar)
        or os.path.getsize(tar) != stats.get("n_bytes")
        or file_sha256(tar) != stats.get("sha256")
    ):
        return False, "tar missing or not matching its stats"
    return True, ""


# ---------------------------------------------------------------- --overwrite: staging and swap


def staging_dir_of(out: str, part: Part | None) -> str:
    """Where `--overwrite` writes the new output (inside OUT: same file system, so renames)."""
    return os.path.join(out, STAGING_DIR, part.dir_name if part else "all")


def remove_staging(staging: str) -> None:
    """Delete a staging folder (its swap marker last), and `.ingest-staging` when no other part
    uses it."""
    discard_staging(staging)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(staging))


def swap_in(out: str, part: Part | None, splits: list[str]) -> None:
    """Replace this run's files in OUT by the complete new output in the staging folder, by the
    swap protocol of `ingest.staged`.

    The marker (written atomically, listing the new files) is the commit point: before it the
    old output is untouched and the staging folder is a draft; from it on the new output wins,
    and a run killed during the swap is rolled forward by the next ingest of OUT
    (`finish_interrupted_swap`). Order: old manifest out (moved aside: the old catalog stops
    reading as complete), new shards and tables in by rename, old files the new output lacks
    deleted, new manifest in last."""
    staging = staging_dir_of(out, part)
    new = sorted(
        os.path.relpath(f, staging)
        for f in own_shard_files(staging, splits, part) + own_catalog_files(catalog_dir_of(staging, part))
        if not f.endswith(".tmp")
    )
    old = own_shard_files(out, splits, part) + own_catalog_files(catalog_dir_of(out, part))
    manifest = _manifest_rel(out, part)
    marker = Marker(
        files=[rel for rel in new if rel != manifest],
        remove=sorted(rel for rel in (os.path.relpath(f, out) for f in old) if rel not in new),
        replace=[manifest] if os.path.exists(os.path.join(out, manifest)) else [],
        last=[manifest],
        extra={"splits": splits, "part": None if part is None else [part.index, part.count]},
    )
    commit_swap(out, staging, marker, "swap_moved")
    remove_staging(staging)


def _manifest_rel(out: str, part: Part | None) -> str:
    return os.path.relpath(os.path.join(catalog_dir_of(out, part), MANIFEST), out)


def _read_marker(path: str, out: str, part: Part | None) -> Marker:
    """The swap marker, each of its paths checked to be one of this run's own relative paths."""
    try:
        marker = read_marker(path, "--overwrite", "run again with --overwrite")
    except ValueError as e:
        raise IngestRefused(str(e)) from None
    splits = marker.extra.get("splits", [])
    if not isinstance(splits, list) or not all(
        isinstance(s, str) and _PLAIN_NAME_RE.match(s) for s in splits
    ):
        raise IngestRefused(f"{path}: field 'splits' holds {splits!r}, not a list of plain split names")
    cat_rel = os.path.relpath(catalog_dir_of(out, part), out)
    for key in ("files", "remove", "replace", "last"):
        for rel in getattr(marker, key):
            parts = rel.split("/")
            ok = all(_PLAIN_NAME_RE.match(x) for x in parts) and (
                rel.startswith("shards/") or os.path.dirname(rel) == cat_rel
            )
            if not ok:
                raise IngestRefused(f"{path}: field {key!r} holds {rel!r}, not a path of this run's output")
    return marker


def finish_interrupted_swap(out: str, part: Part | None) -> bool:
    """Roll forward a swap that a killed `--overwrite` began; True when there was one."""
    staging = staging_dir_of(out, part)
    path = os.path.join(staging, SWAP_MARKER)
    if not os.path.exists(path):
        return False
    log.warning("finishing the swap of an interrupted --overwrite into %s", out)
    marker = _read_marker(path, out, part)
    if not marker.last:  # written by an earlier version of ingest (or emptied once every rename was done)
        marker = _earlier_marker(out, part, marker)
    run_swap(out, staging, marker, "swap_moved")
    remove_staging(staging)
    return True


def _earlier_marker(out: str, part: Part | None, marker: Marker) -> Marker:
    """The swap of a marker written by an earlier version of ingest (its `files` hold the new
    manifest; no `remove`: the old files of the run's splits that the new output lacks). Its
    first step, the old manifest out, is redone here while the new one is still staged."""
    manifest = _manifest_rel(out, part)
    if not os.path.exists(os.path.join(staging_dir_of(out, part), manifest)):
        return Marker([])  # the swap got past its last rename: only cleaning is left
    remove_files([os.path.join(out, manifest)])
    old = own_shard_files(out, marker.extra["splits"], part) + own_catalog_files(catalog_dir_of(out, part))
    return Marker(
        files=[rel for rel in marker.files if rel != manifest],
        remove=[os.path.relpath(f, out) for f in old if os.path.relpath(f, out) not in marker.files],
        last=[manifest],
    )
