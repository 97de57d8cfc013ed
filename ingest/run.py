"""One ingest run: read the inputs, plan, write shards (by an executor), build the catalog.

`run_ingest(IngestConfig(...))` is the Python API behind `polyp-ssl ingest`; it returns the run's
summary, raises `IngestError` for bad input (with `--on-error fail`) and `IngestRefused` when it
will not start (existing output without --resume/--overwrite, a stale shard, bad options, another
writer holding OUT's lock).

`run_ingest` is wiring over named phases:

    check_config        the options, the splits, the dataset root           -> RunSetup
    OutputArea.locked   OUT's write lock, as a `with` block                  (ingest.output_area)
    OutputArea.open     old workers stopped, an interrupted swap finished, existing output
                        refused or taken over (--resume / --overwrite), where the run writes
    read_inputs         the annotation files, checked                       -> Inputs
    plan_run            the shard tasks, the catalog rows of the plan       -> RunPlan
    OutputArea.select   the tasks left to run (--resume, strays, temporaries)
    run_tasks           the tasks, by an executor                           (ingest.executor)
    build_catalog       the catalog tables and manifest
    OutputArea.commit   an --overwrite's staged output swapped in           (ingest.staged protocol)
    summarize           the summary the CLI prints

Crash safety: the run holds OUT's write lock (`shards.lock`) throughout; worker processes die with
the ingest process (`executor.worker_init`), and the next run waits for (or kills) those of a
killed run before it writes (`ingest.workers`); `--overwrite` builds the new output in a staging
folder and swaps it in only once complete, by the one swap protocol of `ingest.staged`
(`output_area.swap_in`, rolled forward by `output_area.finish_interrupted_swap`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm import tqdm

from polyp_ssl.ingest.catalog_build import catalog_tables, write_catalog
from polyp_ssl.ingest.coco import VideoPlan, drop_shared_identities, load_split
from polyp_ssl.ingest.convert.common import read_report_rows
from polyp_ssl.ingest.convert.mot import root_identities
from polyp_ssl.ingest.errors import ErrorRow, ErrorSink, IngestError, IngestRefused, count_by_reason
from polyp_ssl.ingest.executor import Executor, LocalPool
from polyp_ssl.ingest.output_area import OutputArea, Part
from polyp_ssl.ingest.plan import IngestParams, ShardTask, plan_split, select_part
from polyp_ssl.ingest.staged import pending_swap
from polyp_ssl.ingest.write import stats_path, video_row
from polyp_ssl.shards.ids import UnsafeIdError, path_component
from polyp_ssl.shards.writer import file_sha256

__all__ = ["IngestConfig", "IngestRefused", "Part", "run_ingest"]

log = logging.getLogger("ingest")
ANNOTATION_RE = re.compile(r"^instances_(.+)\.json$")


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


@dataclass(frozen=True)
class RunSetup:
    """The checked options of a run: absolute folders, the splits, the parameters it records."""

    root: str
    out: str
    splits: list[str]
    images_dir: str
    videos_dir: str | None
    params: IngestParams


@dataclass
class Inputs:
    """The annotation files read: their videos per split, paths, sha256 and error rows."""

    videos: dict[str, list[VideoPlan]]
    sources: dict[str, str]  # split -> annotation file
    sha256: dict[str, str]  # annotation file, relative to the root -> sha256
    n_annotations: int  # annotations in the files
    sink: ErrorSink


@dataclass
class RunPlan:
    tasks: list[ShardTask]
    empty_videos: list[dict[str, Any]]  # catalog rows of the videos without a box
    errors: list[dict[str, Any]]  # the rows this run (or part) puts in the catalog's errors table
    n_annotations_in: int  # annotations of this part, skipped ones included


def run_ingest(cfg: IngestConfig, executor: Executor | None = None) -> dict[str, Any]:
    """Ingest `cfg.root` into its output (see the module doc for the phases). `executor` runs the
    shard tasks; by default a `LocalPool` of `cfg.workers` processes."""
    t0 = time.perf_counter()
    setup = check_config(cfg)
    area = OutputArea(setup.out, setup.splits, cfg.part, overwrite=cfg.overwrite, resume=cfg.resume)
    with area.locked():
        area.open()
        inputs = read_inputs(setup.root, setup.splits, cfg.on_error)
        plan = plan_run(cfg, setup, inputs, area.write_root)
        todo = area.select(plan.tasks)
        executor = executor or LocalPool(cfg.workers, area.worker_registry)
        run_tasks(todo, executor, area, cfg.progress)
        manifest, tables, stats = build_catalog(cfg, setup, inputs, plan, area)
        area.commit()
    summary = summarize(setup.out, t0, manifest, tables, stats, len(todo))
    if (report := getattr(executor, "report", None)) is not None:  # e.g. a cluster's retries
        summary["executor"] = report()
    return summary


def check_config(cfg: IngestConfig) -> RunSetup:
    """The options and the dataset root, checked before anything is written; IngestRefused."""
    root = os.path.abspath(cfg.root)
    out = os.path.abspath(cfg.out or cfg.root)
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
    videos_dir = os.path.abspath(cfg.videos_dir) if cfg.videos_dir else None
    params = replace(
        p, source="video" if videos_dir else "images", jpeg_draft=p.jpeg_draft and not videos_dir
    )
    return RunSetup(root, out, splits, os.path.join(root, "images"), videos_dir, params)


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


def read_inputs(root: str, splits: list[str], on_error: str) -> Inputs:
    """Every annotation file, checked up front (IngestError in fail mode, rows in skip mode);
    a video identity shared by two splits is dropped."""
    inputs = Inputs({}, {}, {}, 0, ErrorSink(on_error))
    for split in splits:
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        inputs.sources[split] = path
        videos, n_ann = load_split(path, split, inputs.sink)  # first: names a FIFO or bad file as such
        if os.path.exists(path):
            inputs.sha256[os.path.relpath(path, root)] = file_sha256(path)
        inputs.videos[split] = videos
        inputs.n_annotations += n_ann
    drop_shared_identities([v for s in splits for v in inputs.videos[s]], inputs.sink, inputs.sources)
    return inputs


def plan_run(cfg: IngestConfig, setup: RunSetup, inputs: Inputs, write_root: str) -> RunPlan:
    """The shard tasks of this run (or part), writing under `write_root`, and the catalog rows
    that come from the plan (videos without a box; the input's and the converter's error rows,
    kept by part 0)."""
    part = cfg.part
    plan = RunPlan([], [], [], 0)
    for split in setup.splits:
        chosen = select_part(inputs.videos[split], part.index if part else None, part.count if part else None)
        plan.n_annotations_in += sum(len(v.annotations) for v in chosen)
        plan.empty_videos += [video_row(v, 0, 0) for v in chosen if not v.annotations]
        input_sha = inputs.sha256.get(os.path.relpath(inputs.sources[split], setup.root), "")
        plan.tasks += plan_split(
            split,
            chosen,
            setup.params,
            write_root,
            setup.images_dir,
            setup.videos_dir,
            cfg.on_error,
            input_sha,
            part.index if part else None,
        )
    for task in plan.tasks:
        task.follow_symlinks = cfg.follow_symlinks
    if part is None or part.index == 0:
        plan.errors = [r.to_dict() for r in inputs.sink.rows]
        plan.n_annotations_in += sum(1 for r in plan.errors if r["action"] == "skipped")
        plan.errors += read_report_rows(setup.root)  # the converter's counts (ROOT/convert_report.json)
    return plan


def run_tasks(todo: list[ShardTask], executor: Executor, area: OutputArea, progress: bool) -> None:
    """Run the tasks by `executor`, with a progress bar of frames. When they stop on an error
    (or Ctrl-C), the area is cleaned (`OutputArea.clean_after_failed_tasks`) and the error raised."""
    written: list[str] = []
    n_boxes = {t.rel_path: t.n_boxes for t in todo}
    try:
        bar = tqdm(total=sum(n_boxes.values()), unit="frame", desc="ingest", disable=not progress)
        results = executor(todo)
        with bar:
            try:
                for result in results:
                    written.append(result["shard"])
                    bar.update(n_boxes.get(result["shard"], 0))
            finally:  # stopped early (Ctrl-C): the executor stops its tasks
                if isinstance(results, Generator):
                    results.close()
    except BaseException as exc:
        area.clean_after_failed_tasks(exc, written)
        raise


def build_catalog(
    cfg: IngestConfig, setup: RunSetup, inputs: Inputs, plan: RunPlan, area: OutputArea
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """The catalog of every planned shard's stats file and the plan's rows: (manifest, tables,
    stats). A run that skipped every input (nothing left) is a failure: its shards are removed."""
    stats_list = []
    for task in plan.tasks:
        with open(stats_path(os.path.join(area.write_root, task.rel_path)), encoding="utf-8") as f:
            stats_list.append(json.load(f))
    tables = catalog_tables(stats_list, plan.errors, plan.empty_videos)
    if not tables["tracklets"] and (failure := all_skipped_error(setup.root, tables["errors"])):
        # shards of no sample, written by this run: not a dataset
        area.discard([os.path.join(area.write_root, t.rel_path) for t in plan.tasks])
        raise failure
    part = cfg.part
    manifest = write_catalog(
        area.catalog_dir,
        tables,
        {
            "tool": "polyp-ssl ingest",
            "tool_version": tool_version(),
            "parameters": asdict(setup.params),
            "splits": setup.splits,
            "part": None if part is None else [part.index, part.count],
            "inputs": inputs.sha256,
            "source": {"images_dir": "images", "videos_dir": setup.videos_dir},
            "annotations_in": plan.n_annotations_in,
            "annotations_in_files": inputs.n_annotations,
            **({"identities": "tracks"} if root_identities(setup.root) == "tracks" else {}),
        },
    )
    return manifest, tables, stats_list


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


def summarize(
    out: str,
    t0: float,
    manifest: dict[str, Any],
    tables: dict[str, list[dict[str, Any]]],
    stats_list: list[dict[str, Any]],
    n_written: int,
) -> dict[str, Any]:
    """The run's summary (printed as JSON by the CLI)."""
    elapsed = time.perf_counter() - t0
    n_frames = manifest["counts"]["frames"]
    return {
        "out": out,
        "tracklets": manifest["counts"]["tracklets"],
        "frames": n_frames,
        "shards": len(stats_list),
        "shards_written": n_written,
        "bytes": sum(s["n_bytes"] for s in stats_list),
        "errors": count_by_reason(tables["errors"]),  # items per reason (47 dropped boxes: 47)
        "error_rows": len(tables["errors"]),  # rows of the catalog's errors table
        "seconds": round(elapsed, 2),
        "frames_per_second": round(n_frames / elapsed, 1) if elapsed > 0 else None,
    }


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("polyp-ssl")
    except Exception:
        return "unknown"
