"""`polyp-ssl ingest ROOT`: dataset root -> WebDataset shards + Parquet catalog.

Parses the options, calls `ingest.run.run_ingest` and prints its summary (docs/ingest.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from concurrent.futures.process import BrokenProcessPool

from polyp_ssl.ingest.errors import ON_ERROR, IngestError
from polyp_ssl.ingest.executor import Executor, ExecutorError
from polyp_ssl.ingest.plan import IngestParams
from polyp_ssl.ingest.run import IngestConfig, IngestRefused, Part, run_ingest
from polyp_ssl.ingest.sources import link_targets
from polyp_ssl.shards.cli_errors import debug_enabled
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

EXECUTORS = ("local", "dask")


def make_executor(args: argparse.Namespace) -> Executor | None:
    """The executor `--executor` asks for (None: the local pool); IngestRefused for a flag that
    does not go with it, ExecutorError when Dask is not installed."""
    if args.executor != "dask":
        if args.scheduler:
            raise IngestRefused("--scheduler goes with --executor dask")
        return None
    out = args.out or args.root
    if "://" in out:
        raise IngestRefused(
            f"--executor dask writes OUT by path on every worker: --out {out} (a URL) is not supported; "
            "give a folder every worker mounts"
        )
    from polyp_ssl.ingest.executor_dask import DaskExecutor, require_dask

    require_dask()
    root = os.path.abspath(args.root)
    read = (root, os.path.abspath(args.videos_dir)) if args.videos_dir else (root,)
    return DaskExecutor(args.scheduler, args.workers, read, os.path.abspath(out))


def parse_part(text: str) -> Part:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--part wants I/N with 0 <= I < N, got {text!r}")
    return Part(int(m.group(1)), int(m.group(2)))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1G, 1000000)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise argparse.ArgumentTypeError(f"a size must be at least 1 byte, got {text!r}")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl ingest",
        description="Build WebDataset shards (one sample per tracklet) and the Parquet catalog from a "
        "dataset root with images/ and annotations/instances_{split}.json.",
    )
    p.add_argument("root", help="dataset root")
    p.add_argument(
        "--splits", nargs="+", help="splits to ingest (default: every annotations/instances_*.json)"
    )
    p.add_argument("--out", help="output root (default: ROOT)")
    p.add_argument(
        "--videos-dir", help="read frame frame_id of DIR/{sequence_id}.mp4 (decord) instead of images/"
    )
    p.add_argument(
        "--crop-scale", type=float, default=5.0, help="stored crop = box enlarged this much (default 5)"
    )
    p.add_argument(
        "--store-size", type=int, default=256, help="longer side of a stored crop at most (default 256)"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored crops (default 90)")
    p.add_argument(
        "--shard-max-bytes",
        type=parse_size,
        default=parse_size("256MB"),
        help="a shard closes after the video that reaches this estimated size (default 256MB)",
    )
    p.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode source JPEGs at 1/2, 1/4 or 1/8 size (DCT scaling) when every crop of the frame "
        "still has at least its stored size: faster, crops within JPEG error of a full decode",
    )
    p.add_argument("--separation", type=int, default=1, help="max frame gap inside a tracklet (default 1)")
    p.add_argument("--iou-min", type=float, default=0.1, help="min IoU of consecutive boxes (default 0.1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each writes whole shards")
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: a process pool on this machine; dask: Dask distributed workers (--scheduler, or a "
        "LocalCluster of --workers processes), which need ROOT and OUT by the same paths (docs/ingest.md)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --executor dask: the scheduler to run on (tcp://host:port); default: start a LocalCluster",
    )
    p.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted run")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an earlier output of this run's shards/catalog"
    )
    p.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="fail: stop at the first bad input; skip: record it in the errors table and go on",
    )
    p.add_argument("--part", type=parse_part, help="I/N: ingest every N-th video starting at I (scale out)")
    p.add_argument(
        "--follow-symlinks",
        nargs="*",
        metavar="DIR",
        default=None,
        help="read frames (and --videos-dir videos) through symbolic links whose target stays inside "
        "the dataset root (or --videos-dir), or inside a DIR named here (e.g. the RAW folder of "
        "`convert --link symlink`); default: a linked file or folder is refused, and a link leading "
        "elsewhere is never followed",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="also print debug-level log messages")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    params = IngestParams(
        crop_scale=args.crop_scale,
        store_size=args.store_size,
        jpeg_quality=args.jpeg_quality,
        separation=args.separation,
        iou_min=args.iou_min,
        shard_max_bytes=args.shard_max_bytes,
        jpeg_draft=args.jpeg_draft,
    )
    cfg = IngestConfig(
        root=args.root,
        out=args.out,
        splits=args.splits,
        videos_dir=args.videos_dir,
        params=params,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        on_error=args.on_error,
        part=args.part,
        progress=not args.no_progress,
        follow_symlinks=link_targets(args.follow_symlinks),
    )
    try:
        summary = run_ingest(cfg, make_executor(args))
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        again = "--overwrite" if args.overwrite else "--resume"
        print(f"polyp-ssl ingest: interrupted; finished shards are kept: rerun with {again}", file=sys.stderr)
        return 130
    except IngestError as e:
        print(f"ingest: {e}", file=sys.stderr)
        return 1
    except IngestRefused as e:
        print(f"ingest: {e}", file=sys.stderr)
        return 2
    except ExecutorError as e:
        if debug_enabled():
            raise
        kept = "" if e.bad_input or e.before_work else "; finished shards are kept: re-run with --resume"
        print(f"ingest: {e}{kept}", file=sys.stderr)
        return 2 if e.bad_input else 1
    except BrokenProcessPool as e:
        if debug_enabled():
            raise
        print(
            f"ingest: a worker process died ({e}); finished shards are kept: re-run with --resume",
            file=sys.stderr,
        )
        return 1
    except OSError as e:
        if debug_enabled():
            raise
        again = "--resume"
        if args.overwrite:
            again = "--overwrite (the earlier output is kept until the new one is complete)"
        print(
            f"ingest: cannot read or write {e.filename or cfg.out or cfg.root}: {e.strerror or e}; "
            f"finished shards are kept: fix the cause and re-run with {again}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(summary, indent=2))
    return 0
