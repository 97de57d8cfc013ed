"""One ingest run: validate, plan, write shards (in worker processes), build the catalog.

`run_ingest(IngestConfig(...))` is the Python API behind `polyp-ssl ingest`; it returns the run's
summary, raises `IngestError` for bad input (with `--on-error fail`) and `IngestRefused` when it
will not start (existing output without --resume/--overwrite, a stale shard, bad options).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm import tqdm

from ingest.catalog_build import MANIFEST, catalog_tables, write_catalog
from ingest.coco import VideoPlan, drop_shared_identities, load_split
from ingest.errors import ErrorSink, IngestError, count_by_reason
from ingest.plan import IngestParams, ShardTask, plan_split, select_part
from ingest.write import stats_path, video_row, write_shard
from shards.writer import file_sha256

log = logging.getLogger("ingest")
ANNOTATION_RE = re.compile(r"^instances_(.+)\.json$")


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


class IngestRefused(Exception):
    """The run did not start: the message says why and what to do."""


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
    except (OSError, json.JSONDecodeError) as e:
        return False, f"unreadable stats file ({e})"
    if stats.get("fingerprint") != task.fingerprint:
        raise StaleShard(task.rel_path)
    if (
        not os.path.exists(tar)
        or os.path.getsize(tar) != stats.get("n_bytes")
        or file_sha256(tar) != stats.get("sha256")
    ):
        return False, "tar missing or not matching its stats"
    return True, ""


def run_tasks(tasks: list[ShardTask], workers: int, progress: bool) -> list[str]:
    """Run the tasks; returns the shards written. Raises the first worker exception."""
    written: list[str] = []
    bar = tqdm(total=sum(t.n_boxes for t in tasks), unit="frame", desc="ingest", disable=not progress)
    try:
        if workers <= 1:
            for task in tasks:
                written.append(write_shard(task)["shard"])
                bar.update(task.n_boxes)
            return written
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
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
        return written
    except _WorkerFailed:
        raise
    except BaseException as e:
        raise _WorkerFailed(written) from e
    finally:
        bar.close()


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
    splits = list(cfg.splits or find_splits(root))
    if not splits:
        raise IngestRefused(f"no annotation files {root}/annotations/instances_*.json")
    images_dir = os.path.join(root, "images")
    videos_dir = os.path.abspath(cfg.videos_dir) if cfg.videos_dir else None
    params = replace(
        p, source="video" if videos_dir else "images", jpeg_draft=p.jpeg_draft and not videos_dir
    )

    # existing output of this run's name pattern
    catalog_dir = catalog_dir_of(out, part)
    existing = own_shard_files(out, splits, part) + own_catalog_files(catalog_dir)
    if existing:
        if cfg.overwrite:
            log.info("--overwrite: removing %d files of an earlier run", len(existing))
            remove_files(existing)
        elif not cfg.resume:
            complete = os.path.exists(os.path.join(catalog_dir, MANIFEST))
            what = "a complete ingest output" if complete else "a partial ingest run"
            raise IngestRefused(
                f"{what} exists in {out} ({len(existing)} files, e.g. {existing[0]}); "
                "use --resume to finish it or --overwrite to start again"
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
        if os.path.exists(path):
            inputs[os.path.relpath(path, root)] = file_sha256(path)
        videos, n_ann = load_split(path, split, sink)
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
            out,
            images_dir,
            videos_dir,
            cfg.on_error,
            input_sha,
            part.index if part else None,
        )
    main_errors = [r.to_dict() for r in sink.rows] if part is None or part.index == 0 else []
    n_annotations_in += sum(1 for r in main_errors if r["action"] == "skipped")

    # resume: keep finished shards that match this run
    planned = {os.path.join(out, t.rel_path) for t in tasks}
    planned |= {stats_path(p) for p in planned}
    strays = [f for f in own_shard_files(out, splits, part) if not f.endswith(".tmp") and f not in planned]
    if cfg.resume and strays:
        raise IngestRefused(
            f"{strays[0]} is not a shard of this run's plan (made with other input or parameters); "
            "use --overwrite to start again"
        )
    todo = []
    for task in tasks:
        if cfg.resume:
            try:
                done, why = shard_is_done(task)
            except StaleShard:
                raise IngestRefused(
                    f"{task.rel_path} was made from other input or parameters; use --overwrite to start again"
                ) from None
            if done:
                continue
            log.info("redoing %s: %s", task.rel_path, why)
        todo.append(task)
    remove_files([f for f in own_shard_files(out, splits, part) if f.endswith(".tmp")])
    if cfg.resume:
        log.info("resume: %d of %d shards already done", len(tasks) - len(todo), len(tasks))

    try:
        run_tasks(todo, cfg.workers, progress=cfg.progress)
    except _WorkerFailed as e:
        cause = e.__cause__
        own = own_shard_files(out, splits, part)
        # temporaries, and tars whose worker was killed before it wrote their stats file
        remove_files([f for f in own if f.endswith(".tmp")])
        remove_files([f for f in own if f.endswith(".tar") and stats_path(f) not in own])
        if isinstance(cause, IngestError):
            # fail mode: leave nothing of this run visible
            for rel in e.written:
                tar = os.path.join(out, rel)
                remove_files([stats_path(tar), tar])
            raise cause from None
        if cause is not None:
            raise cause from None
        raise

    # catalog
    stats_list = []
    for task in tasks:
        with open(stats_path(os.path.join(out, task.rel_path)), encoding="utf-8") as f:
            stats_list.append(json.load(f))
    tables = catalog_tables(stats_list, main_errors, empty_videos)
    manifest = write_catalog(
        catalog_dir,
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
        "errors": count_by_reason(tables["errors"]),
        "seconds": round(elapsed, 2),
        "frames_per_second": round(n_frames / elapsed, 1) if elapsed > 0 else None,
    }
    return summary


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("polyp-ssl")
    except Exception:
        return "unknown"
