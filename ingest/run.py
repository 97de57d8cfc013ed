"""One ingest run: validate, plan, write shards (in worker processes), build the catalog.

`run_ingest(IngestConfig(...))` is the Python API behind `polyp-ssl ingest`; it returns the run's
summary, raises `IngestError` for bad input (with `--on-error fail`) and `IngestRefused` when it
will not start (existing output without --resume/--overwrite, a stale shard, bad options, another
writer holding OUT's lock).

Crash safety: the run holds OUT's write lock (`shards.lock`) throughout; worker processes die with
the ingest process (`worker_init`), and the next run waits for (or kills) those of a killed run
before it writes (`ingest.workers`); `--overwrite` builds the new output in a staging folder and
swaps it in only once complete (`swap_in`, rolled forward by `finish_interrupted_swap`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm import tqdm

from polyp_ssl.ingest.catalog_build import MANIFEST, catalog_tables, write_catalog
from polyp_ssl.ingest.coco import VideoPlan, drop_shared_identities, load_split
from polyp_ssl.ingest.convert.common import read_report_rows
from polyp_ssl.ingest.errors import ErrorRow, ErrorSink, IngestError, count_by_reason
from polyp_ssl.ingest.faults import crash_point
from polyp_ssl.ingest.plan import IngestParams, ShardTask, plan_split, select_part
from polyp_ssl.ingest.staged import pending_swap
from polyp_ssl.ingest.workers import OldWorkersAlive, stop_old_workers
from polyp_ssl.ingest.workers import clear as clear_worker_records
from polyp_ssl.ingest.workers import register as register_worker
from polyp_ssl.ingest.workers import registry_dir as worker_registry_dir
from polyp_ssl.ingest.write import STATS_VERSION, stats_path, video_row, write_shard
from polyp_ssl.shards.ids import UnsafeIdError, path_component
from polyp_ssl.shards.lock import LockHeld, output_lock, process_alive
from polyp_ssl.shards.writer import file_sha256, fsync_dir, write_atomic

log = logging.getLogger("ingest")
ANNOTATION_RE = re.compile(r"^instances_(.+)\.json$")
# `--overwrite` writes the new output here (same file system as OUT), then swaps it in.
STAGING_DIR = ".ingest-staging"
SWAP_MARKER = ".swap.json"  # in the staging folder: the new output is complete, the swap has begun
_PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# a worker checks this often that the ingest process that started it is still alive
WATCHDOG_PERIOD_S = 0.25
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Part:
    index: int
    count: int

    @property
    def dir_name(self) -> str:
        return f"{self.index:03d}-of-{self.count:03d}"


@dataclass
class IngestConfig:
    root: str
    out: str | None = None  # default: root
    splits: list[str] | None = None  # default: every annotations/instances_*.json
    videos_dir: str | None = None
    params: IngestParams = field(default_factory=IngestParams)
    workers: int = 1
    resume: bool = False
    overwrite: bool = False
    on_error: str = "fail"
    part: Part | None = None
    progress: bool = True
    follow_symlinks: bool | tuple[str, ...] = False  # links inside the root (True) or also these folders


class IngestRefused(Exception):
    """The run did not start: the message says why and what to do."""


def check_split_names(root: str, splits: list[str]) -> None:
    """Split names become folders and file names (`shards/{split}/{split}-NNNNNN.tar`): each must be
    one plain name (shards.ids); IngestRefused naming the annotation file otherwise."""
    for split in splits:
        try:
            path_component(split, "split name")
        except UnsafeIdError as exc:
            path = os.path.join(root, "annotations", f"instances_{split}.json")
            raise IngestRefused(f"{path}: {exc}") from None


def find_splits(root: str) -> list[str]:
    names = (
        sorted(os.listdir(os.path.join(root, "annotations")))
        if os.path.isdir(os.path.join(root, "annotations"))
        else []
    )
    return [m.group(1) for n in names if (m := ANNOTATION_RE.match(n))]


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


def all_skipped_error(root: str, errors: list[dict[str, Any]]) -> IngestError | None:
    """An error when the run skipped input and kept nothing (`--on-error skip` with every
    annotation bad): such a run is a failure, not an empty dataset."""
    skipped = [r for r in errors if r.get("action") == "skipped"]
    if not skipped:
        return None
    reasons = ", ".join(f"{k} {n}" for k, n in count_by_reason(skipped).items())
    first = ErrorRow(**{k: skipped[0].get(k) for k in ("source", "id", "field", "reason", "detail")})
    detail = (
        f"every input was skipped, no tracklet is left: {len(skipped)} skipped ({reasons}); first: "
        f"{first.message()}; nothing was written"
    )
    return IngestError(ErrorRow(os.path.join(root, "annotations"), None, None, "all_skipped", detail))


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


def run_tasks(tasks: list[ShardTask], workers: int, progress: bool, registry: str | None = None) -> list[str]:
    """Run the tasks; returns the shards written. Raises the first worker exception. With
    `registry`, each worker records itself there (ingest.workers) until the pool has ended."""
    written: list[str] = []
    bar = tqdm(total=sum(t.n_boxes for t in tasks), unit="frame", desc="ingest", disable=not progress)
    try:
        if workers <= 1:
            for task in tasks:
                written.append(write_shard(task)["shard"])
                bar.update(task.n_boxes)
            return written
        ctx = multiprocessing.get_context("forkserver")
        if registry is not None:
            os.makedirs(registry, exist_ok=True)
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=worker_init, initargs=(os.getpid(), registry)
        ) as pool:
            try:
                _run_in_pool(pool, tasks, written, bar)
            except _WorkerFailed:
                raise
            except BaseException:
                # Ctrl-C (or another error) in this process: stop the workers now, instead of
                # letting the pool's exit wait for the shards they are writing
                stop_pool(pool)
                raise
        return written
    except _WorkerFailed:
        raise
    except BaseException as e:
        raise _WorkerFailed(written) from e
    finally:
        bar.close()
        if registry is not None and workers > 1:  # the pool has ended: its workers are gone
            clear_worker_records(registry)


def _run_in_pool(pool: ProcessPoolExecutor, tasks: list[ShardTask], written: list[str], bar: Any) -> None:
    futures = {pool.submit(write_shard, t): t for t in tasks}
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                for other in pending:
                    other.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                for other in futures:
                    if other.done() and not other.cancelled() and other.exception() is None:
                        written.append(other.result()["shard"])
                raise _WorkerFailed(written) from fut.exception()
            written.append(fut.result()["shard"])
            bar.update(futures[fut].n_boxes)


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


class StaleShard(Exception):
    """A finished shard of an earlier run made from other input or parameters."""


class _WorkerFailed(Exception):
    def __init__(self, written: list[str]) -> None:
        super().__init__("shard task failed")
        self.written = written


def run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = os.path.abspath(cfg.root)
    out = os.path.abspath(cfg.out or cfg.root)
    part = cfg.part
    p = cfg.params
    if cfg.resume and cfg.overwrite:
        raise IngestRefused("--resume and --overwrite exclude each other")
    if cfg.workers < 1 or p.store_size < 1 or not 1 <= p.jpeg_quality <= 100 or p.crop_scale <= 0:
        raise IngestRefused(
            "--workers, --store-size, --crop-scale must be positive, --jpeg-quality in 1..100"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise IngestRefused(f"--out {out} is a file, not a folder")
    if (marker := pending_swap(root)) is not None:
        raise IngestRefused(
            f"{marker}: a split, merge or convert of {root} was interrupted while putting its annotation "
            "files in; run that command again (it finishes the swap) before ingesting"
        )
    splits = list(cfg.splits or find_splits(root))
    if not splits:
        raise IngestRefused(f"no annotation files {root}/annotations/instances_*.json")
    check_split_names(root, splits)
    images_dir = os.path.join(root, "images")
    videos_dir = os.path.abspath(cfg.videos_dir) if cfg.videos_dir else None
    params = replace(
        p, source="video" if videos_dir else "images", jpeg_draft=p.jpeg_draft and not videos_dir
    )

    # one writer per output root (or part of one): a second ingest, a merge or a convert is refused
    made = not os.path.exists(out)
    own_dirs = run_dirs(out, splits, part)
    existed = {d for d in own_dirs if os.path.isdir(d)}
    os.makedirs(out, exist_ok=True)
    try:
        lock = output_lock(out, "polyp-ssl ingest", part.dir_name if part else None)
        lock.__enter__()
    except LockHeld as e:
        raise IngestRefused(str(e)) from None
    try:
        return _ingest_locked(cfg, t0, root, out, splits, images_dir, videos_dir, params)
    except BaseException:
        # a failed run leaves no empty `shards/` or `catalog/` folder of its own that looks like output
        remove_empty_dirs([d for d in own_dirs if d not in existed])
        raise
    finally:
        lock.__exit__(None, None, None)
        if made:  # a folder made for this run and left empty (refused, bad input): removed again
            with contextlib.suppress(OSError):
                os.rmdir(out)


def _ingest_locked(
    cfg: IngestConfig,
    t0: float,
    root: str,
    out: str,
    splits: list[str],
    images_dir: str,
    videos_dir: str | None,
    params: IngestParams,
) -> dict[str, Any]:
    part = cfg.part
    # the workers of a killed ingest of OUT may still write for a moment: none is left from here on
    try:
        stop_old_workers(out)
    except OldWorkersAlive as exc:
        raise IngestRefused(str(exc)) from None
    staging = staging_dir_of(out, part)
    for folder in (os.path.dirname(staging), staging):
        if os.path.islink(folder):  # never walked or emptied: it could lead anywhere
            raise IngestRefused(f"{folder} is a symbolic link, not ingest's staging folder; remove it")
    # an --overwrite killed while swapping its complete new output in: finish that first
    finish_interrupted_swap(out, part)

    # existing output of this run's name pattern
    catalog_dir = catalog_dir_of(out, part)
    existing = own_shard_files(out, splits, part) + own_catalog_files(catalog_dir)
    if existing and not cfg.overwrite and not cfg.resume:
        complete = os.path.exists(os.path.join(catalog_dir, MANIFEST))
        what = "a complete ingest output" if complete else "a partial ingest run"
        raise IngestRefused(
            f"{what} exists in {out} ({len(existing)} files, e.g. {existing[0]}); "
            "use --resume to finish it or --overwrite to start again"
        )
    # --overwrite of an existing output: the new run is written into a staging folder and
    # replaces the old files only once it is complete (swap_in); until then the old output stays
    staged = cfg.overwrite and bool(existing)
    if os.path.isdir(staging) and not staged:
        log.info("removing %s, left by an unfinished --overwrite (the output in %s was kept)", staging, out)
        remove_staging(staging)
    write_root = staging if staged else out
    if staged:
        log.info(
            "--overwrite: writing the new output into %s; the %d files of the earlier run stay until "
            "it is complete",
            staging,
            len(existing),
        )

    # validate the annotation files up front
    sink = ErrorSink(cfg.on_error)
    inputs: dict[str, str] = {}
    sources: dict[str, str] = {}
    all_videos: dict[str, list[VideoPlan]] = {}
    n_annotations_total = 0
    for split in splits:
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        sources[split] = path
        videos, n_ann = load_split(path, split, sink)  # first: names a FIFO or bad file as such
        if os.path.exists(path):
            inputs[os.path.relpath(path, root)] = file_sha256(path)
        all_videos[split] = videos
        n_annotations_total += n_ann
    drop_shared_identities([v for s in splits for v in all_videos[s]], sink, sources)

    # plan
    tasks: list[ShardTask] = []
    empty_videos: list[dict[str, Any]] = []
    n_annotations_in = 0
    for split in splits:
        chosen = select_part(all_videos[split], part.index if part else None, part.count if part else None)
        n_annotations_in += sum(len(v.annotations) for v in chosen)
        empty_videos += [video_row(v, 0, 0) for v in chosen if not v.annotations]
        input_sha = inputs.get(os.path.relpath(sources[split], root), "")
        tasks += plan_split(
            split,
            chosen,
            params,
            write_root,
            images_dir,
            videos_dir,
            cfg.on_error,
            input_sha,
            part.index if part else None,
        )
    for task in tasks:
        task.follow_symlinks = cfg.follow_symlinks
    main_errors = [r.to_dict() for r in sink.rows] if part is None or part.index == 0 else []
    n_annotations_in += sum(1 for r in main_errors if r["action"] == "skipped")
    if part is None or part.index == 0:  # the converter's counts (ROOT/convert_report.json), if any
        main_errors += read_report_rows(root)

    # resume (or an --overwrite started again): keep finished shards that match this run
    reuse = cfg.resume or staged
    planned = {os.path.join(write_root, t.rel_path) for t in tasks}
    planned |= {stats_path(p) for p in planned}
    strays = [
        f for f in own_shard_files(write_root, splits, part) if not f.endswith(".tmp") and f not in planned
    ]
    if cfg.resume and strays:
        raise IngestRefused(
            f"{strays[0]} is not a shard of this run's plan (made with other input or parameters); "
            "use --overwrite to start again"
        )
    if staged:  # left in the staging folder by an earlier --overwrite with other input or options
        remove_files(strays)
    todo = []
    for task in tasks:
        if reuse:
            try:
                done, why = shard_is_done(task)
            except StaleShard:
                if not staged:
                    raise IngestRefused(
                        f"{task.rel_path} was made from other input or parameters; "
                        "use --overwrite to start again"
                    ) from None
                done, why = False, "staged by an --overwrite with other input or parameters"
            if done:
                continue
            log.info("redoing %s: %s", task.rel_path, why)
        todo.append(task)
    remove_files([f for f in own_shard_files(write_root, splits, part) if f.endswith(".tmp")])
    if reuse:
        log.info("resume: %d of %d shards already done", len(tasks) - len(todo), len(tasks))

    try:
        registry = worker_registry_dir(out, part.dir_name if part else None)
        run_tasks(todo, cfg.workers, progress=cfg.progress, registry=registry)
    except _WorkerFailed as e:
        cause = e.__cause__
        own = own_shard_files(write_root, splits, part)
        # temporaries, and tars whose worker was killed before it wrote their stats file
        remove_files([f for f in own if f.endswith(".tmp")])
        remove_files([f for f in own if f.endswith(".tar") and stats_path(f) not in own])
        if isinstance(cause, IngestError):
            # fail mode: leave nothing of this run visible
            for rel in e.written:
                tar = os.path.join(write_root, rel)
                remove_files([stats_path(tar), tar])
            if staged:
                remove_staging(staging)
            raise cause from None
        if cause is not None:
            raise cause from None
        raise

    # catalog
    stats_list = []
    for task in tasks:
        with open(stats_path(os.path.join(write_root, task.rel_path)), encoding="utf-8") as f:
            stats_list.append(json.load(f))
    tables = catalog_tables(stats_list, main_errors, empty_videos)
    if not tables["tracklets"] and (failure := all_skipped_error(root, tables["errors"])):
        for task in tasks:  # shards of no sample, written by this run: not a dataset
            tar = os.path.join(write_root, task.rel_path)
            remove_files([stats_path(tar), tar])
        if staged:
            remove_staging(staging)
        raise failure
    manifest = write_catalog(
        catalog_dir_of(write_root, part),
        tables,
        {
            "tool": "polyp-ssl ingest",
            "tool_version": tool_version(),
            "parameters": asdict(params),
            "splits": splits,
            "part": None if part is None else [part.index, part.count],
            "inputs": inputs,
            "source": {"images_dir": "images", "videos_dir": videos_dir},
            "annotations_in": n_annotations_in,
            "annotations_in_files": n_annotations_total,
        },
    )
    if staged:
        swap_in(out, part, splits)
    elapsed = time.perf_counter() - t0
    n_bytes = sum(s["n_bytes"] for s in stats_list)
    n_frames = manifest["counts"]["frames"]
    summary = {
        "out": out,
        "tracklets": manifest["counts"]["tracklets"],
        "frames": n_frames,
        "shards": len(stats_list),
        "shards_written": len(todo),
        "bytes": n_bytes,
        "errors": count_by_reason(tables["errors"]),  # items per reason (47 dropped boxes: 47)
        "error_rows": len(tables["errors"]),  # rows of the catalog's errors table
        "seconds": round(elapsed, 2),
        "frames_per_second": round(n_frames / elapsed, 1) if elapsed > 0 else None,
    }
    return summary


# ---------------------------------------------------------------- --overwrite: staging and swap


def staging_dir_of(out: str, part: Part | None) -> str:
    """Where `--overwrite` writes the new output (inside OUT: same file system, so renames)."""
    return os.path.join(out, STAGING_DIR, part.dir_name if part else "all")


def remove_staging(staging: str) -> None:
    """Delete a staging folder; its swap marker goes last, so an interrupted removal never
    leaves a marker without the files it lists."""
    marker = os.path.join(staging, SWAP_MARKER)
    for folder, _, names in os.walk(staging, topdown=False):
        remove_files([os.path.join(folder, n) for n in names if os.path.join(folder, n) != marker])
    remove_files([marker])
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(staging))  # .ingest-staging, when no other part uses it


def swap_in(out: str, part: Part | None, splits: list[str]) -> None:
    """Replace this run's files in OUT by the complete new output in the staging folder.

    The marker (written atomically, listing the new files) is the commit point: before it the
    old output is untouched and the staging folder is a draft; from it on the new output wins,
    and a run killed during the swap is rolled forward by the next ingest of OUT
    (`finish_interrupted_swap`). Order: old manifest out (the old catalog stops reading as
    complete), new shards and tables in by rename, old files the new output lacks deleted,
    new manifest in last."""
    staging = staging_dir_of(out, part)
    files = sorted(
        os.path.relpath(f, staging)
        for f in own_shard_files(staging, splits, part) + own_catalog_files(catalog_dir_of(staging, part))
        if not f.endswith(".tmp")
    )
    marker = {"files": files, "splits": splits, "part": None if part is None else [part.index, part.count]}
    write_atomic(os.path.join(staging, SWAP_MARKER), json.dumps(marker, indent=1).encode("utf-8"))
    _swap(out, part, files, splits)


def _read_marker(path: str, out: str, part: Part | None) -> tuple[list[str], list[str]]:
    """(files, splits) of a swap marker, each checked to be one of this run's own relative paths."""
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
        files, splits = marker["files"], marker["splits"]
        if not all(isinstance(x, str) for x in [*files, *splits]):
            raise TypeError("not a list of strings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IngestRefused(
            f"{path}: unreadable swap marker of an interrupted --overwrite ({e}); "
            f"remove {os.path.dirname(path)} and run again with --overwrite"
        ) from None
    cat_rel = os.path.relpath(catalog_dir_of(out, part), out)
    for s in splits:
        if not _PLAIN_NAME_RE.match(s):
            raise IngestRefused(f"{path}: field 'splits' holds {s!r}, not a plain split name")
    for rel in files:
        parts = rel.split("/")
        ok = (
            not os.path.isabs(rel)
            and ".." not in parts
            and all(_PLAIN_NAME_RE.match(x) for x in parts)
            and (rel.startswith("shards/") or os.path.dirname(rel) == cat_rel)
        )
        if not ok:
            raise IngestRefused(f"{path}: field 'files' holds {rel!r}, not a path of this run's output")
    return files, splits


def finish_interrupted_swap(out: str, part: Part | None) -> bool:
    """Roll forward a swap that a killed `--overwrite` began; True when there was one."""
    marker = os.path.join(staging_dir_of(out, part), SWAP_MARKER)
    if not os.path.exists(marker):
        return False
    log.warning("finishing the swap of an interrupted --overwrite into %s", out)
    files, splits = _read_marker(marker, out, part)
    _swap(out, part, files, splits)
    return True


def _swap(out: str, part: Part | None, files: list[str], splits: list[str]) -> None:
    """The renames of `swap_in`; safe to run again after it was killed at any point."""
    staging = staging_dir_of(out, part)
    catalog_dir = catalog_dir_of(out, part)
    manifest_rel = os.path.relpath(os.path.join(catalog_dir, MANIFEST), out)
    new_manifest = os.path.join(staging, manifest_rel)
    if os.path.exists(new_manifest):  # else the swap got past its last rename: only cleaning is left
        remove_files([os.path.join(out, manifest_rel)])
        folders = {catalog_dir}
        for rel in files:
            src = os.path.join(staging, rel)
            if rel == manifest_rel or not os.path.exists(src):
                continue
            dst = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
            folders.add(os.path.dirname(dst))
            crash_point("swap_moved")
        new = {os.path.join(out, rel) for rel in files}
        old = own_shard_files(out, splits, part) + own_catalog_files(catalog_dir)
        remove_files([f for f in old if f not in new])
        for folder in sorted(folders):
            fsync_dir(folder)
        os.replace(new_manifest, os.path.join(out, manifest_rel))
        fsync_dir(catalog_dir)
        crash_point("swap_moved")
    remove_staging(staging)


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("polyp-ssl")
    except Exception:
        return "unknown"
