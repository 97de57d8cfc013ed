"""`polyp-ssl convert NAME RAW_DIR OUT_ROOT`: raw dataset layouts -> the seed's COCO layout."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

CONVERTERS = ("realcolon", "sun", "polypsset", "ldpolyp", "table", "mot", "merge")


def _parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl convert",
        description="Convert a raw dataset layout into the seed's layout (images/ + "
        "annotations/instances_{split}.json) that `polyp-ssl ingest` reads.",
        epilog="example: polyp-ssl convert realcolon /data/real-colon /data/rc --split-file splits.csv",
    )
    p.add_argument(
        "converter",
        choices=CONVERTERS,
        help="raw layout: realcolon (REAL-Colon VOC XML + CSVs); others: polyp-ssl convert NAME --help",
    )
    p.add_argument(
        "raw_dir",
        type=Path,
        help="the raw dataset folder (SSS-VVV_frames/, SSS-VVV_annotations/, "
        "lesion_info.csv, video_info.csv)",
    )
    _common_options(p)
    p.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="video -> split, CSV (video,split) or JSON; videos it does not list are left out "
        "(and counted). 'paper': the paper's split (per site, videos 001-008 with a lesion train, "
        "009-010 val, 011-015 test: 27 + 10 + 9 videos). Default: per site (SSS), sorted videos "
        "dealt 3 train : 1 val : 1 test",
    )
    p.add_argument(
        "--empty-frames",
        choices=("keep", "drop"),
        default="keep",
        help="frames without any polyp: keep them as images without annotations, or drop them",
    )
    return p


def _convert_locked(cfg: Any, run: Callable[[], dict]) -> dict:
    """`run()` holding the output root's write lock (shards.lock): a second convert, or an ingest
    writing there, is refused. A root made only to hold the lock is removed again on failure."""
    from polyp_ssl.shards.lock import output_lock

    out = Path(cfg.out_root)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with output_lock(out, "polyp-ssl convert"):
            return run()
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when still empty
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in OTHER_PARSERS:
        return _main_other(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    if args.converter in OTHER_PARSERS:  # options before the name: parse again with its parser
        return _main_other(args.converter, [a for a in argv if a != args.converter])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from polyp_ssl.ingest.convert.realcolon import ConvertConfig, convert

    cfg = ConvertConfig(
        raw_dir=args.raw_dir,
        out_root=args.out_root,
        split_file=args.split_file,
        link=args.link,
        on_error=args.on_error,
        empty_frames=args.empty_frames,
        workers=args.workers,
        follow_symlinks=args.follow_symlinks,
    )
    return _run(cfg, lambda: convert(cfg, progress=not args.no_progress))


def _run(cfg: Any, run: Callable[[], dict]) -> int:
    """Run a conversion under the output lock; print its discrepancy report; exit code."""
    from polyp_ssl.ingest.convert.common import REPORT_NAME, ConvertError, report_lines
    from polyp_ssl.shards.lock import LockHeld

    try:
        report = _convert_locked(cfg, run)
    except LockHeld as exc:
        print(f"polyp-ssl convert: {exc}", file=sys.stderr)
        return 2
    except ConvertError as exc:
        print(f"polyp-ssl convert: error: {exc}", file=sys.stderr)
        skip = " or use --on-error skip (leaves such items out)" if exc.skippable else ""
        print(f"polyp-ssl convert: nothing was written; fix the input{skip}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"polyp-ssl convert: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"polyp-ssl convert: error: {exc}", file=sys.stderr)
        return 2 if getattr(exc, "bad_input", False) else 1  # a FIFO or device given as input
    for line in report_lines(report):
        print(line)
    if report.get("n_skipped"):
        print(f"details of the skipped items in {Path(cfg.out_root) / REPORT_NAME}")
    print(f"wrote {cfg.out_root}/annotations/instances_{{{','.join(report['splits'])}}}.json")
    return 0


def _common_options(p: argparse.ArgumentParser, on_error: bool = True) -> None:
    p.add_argument("out_root", type=Path, help="output dataset root")
    p.add_argument(
        "--link",
        choices=("hardlink", "symlink", "copy"),
        default="hardlink",
        help="how frames reach OUT_ROOT/images (hardlink falls back to copy across file systems)",
    )
    if on_error:
        p.add_argument(
            "--on-error",
            choices=("fail", "skip"),
            default="fail",
            help="bad input: stop naming file, line/id and field (fail), or leave it out and count it (skip)",
        )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read raw files through symbolic links whose target stays inside the raw folder; "
        "default: a linked file or folder is refused",
    )
    p.add_argument("--workers", type=int, default=8, help="threads reading files and placing frames (I/O)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sun_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl convert sun",
        description="SUN database (caseN/*.jpg, annotation_txt/caseN.txt, case_info.csv) -> the "
        "seed's layout; one polyp per positive case; boxes clamped to the frame; sizes like '6mm', "
        "'15mm-' in mm.",
    )
    p.add_argument("raw_dir", type=Path, help="raw SUN folder")
    _common_options(p)
    p.add_argument(
        "--case-info", type=Path, default=None, help="per-case table (default RAW_DIR/case_info.csv)"
    )
    p.add_argument(
        "--negatives", action="store_true", help="also convert negative cases, as frames without boxes"
    )
    p.add_argument("--split", default="all", help="split name of the output (default %(default)s)")
    p.add_argument(
        "--empty-frames",
        choices=("keep", "drop"),
        default="keep",
        help="frames of a positive case without a box line: keep them without boxes, or drop them",
    )
    return p


def _polypsset_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl convert polypsset",
        description="PolypsSet / KUMC ({train2019,val2019,test2019}/{Image,Annotation}, VOC XML) -> "
        "the seed's layout; one polyp per val/test sequence; images and XML paired by name, the "
        "unpaired counted.",
    )
    p.add_argument("raw_dir", type=Path, help="raw PolypsSet folder")
    _common_options(p)
    p.add_argument(
        "--train2019",
        choices=("skip", "frames"),
        default="skip",
        help="train2019 has no sequences: leave it out (default) or one sequence per frame",
    )
    return p


def _ldpolyp_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl convert ldpolyp",
        description="LDPolypVideo ({TrainValid,Test}/{Images,Annotations}/<video>/) -> the seed's "
        "layout; one polyp per video (the dataset has no polyp ids).",
    )
    p.add_argument("raw_dir", type=Path, help="raw LDPolypVideo folder")
    _common_options(p)
    return p


def _table_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl convert table",
        description="A table of boxes (CSV or Parquet) with the columns video,frame,image_path,x,y,w,h,"
        "identity,size_mm,histology (or video_path instead of image_path) -> the seed's layout. "
        "See docs/datasets.md.",
    )
    p.add_argument("table", type=Path, help="the table (.csv or .parquet); paths in it are relative to it")
    _common_options(p)
    p.add_argument("--dataset-id", default=None, help="dataset_id of every image (default: the table's name)")
    p.add_argument(
        "--split", default="all", help="split of rows without a 'split' column (default %(default)s)"
    )
    return p


def _mot_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl convert mot",
        description="MOTChallenge sequences (SEQ/img1/000001.jpg, SEQ/seqinfo.ini; or videos) with a "
        "tracker's output (TRACKS/SEQ.txt: frame,id,bb_left,bb_top,bb_width,bb_height,conf,x,y,z) -> the "
        "seed's layout; each track is its own identity, a track and not a polyp. Without --tracks: the "
        "sequences' gt/gt.txt, whose ids are polyps. See docs/datasets.md.",
    )
    p.add_argument("raw_dir", type=Path, help="folder of sequence folders (RAW/SEQ or RAW/SPLIT/SEQ)")
    _common_options(p)
    p.add_argument(
        "--tracks",
        type=Path,
        default=None,
        help="folder of the tracker's output, one SEQ.txt per sequence; default: each SEQ/gt/gt.txt "
        "(polyp identities)",
    )
    p.add_argument(
        "--min-conf", type=float, default=0.0, help="drop tracks whose mean confidence is below this"
    )
    p.add_argument("--min-track-frames", type=int, default=8, help="drop tracks with fewer boxes than this")
    p.add_argument(
        "--videos-dir", type=Path, default=None, help="sequences as videos DIR/SEQ.mp4 (frame f = index f-1)"
    )
    p.add_argument("--split", default="all", help="split of sequences directly in RAW (RAW/SPLIT/SEQ: SPLIT)")
    p.add_argument("--dataset-id", default="mot", help="dataset_id of every image")
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl convert merge",
        description="Merge dataset roots into one: a dataset_id per source, ids that cannot collide, images "
        "hard-linked. SOURCE::val,test takes only those splits of a source.",
    )
    p.add_argument("roots", nargs="+", help="source roots, then the output root (last)")
    p.add_argument(
        "--dataset-ids",
        default=None,
        help="comma-separated, one per source (default: each source's own dataset_id, else its folder name)",
    )
    p.add_argument("--split", default="all", help="split name of the merged file (default %(default)s)")
    p.add_argument("--keep-splits", action="store_true", help="keep the sources' split names instead")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="OUT already holds a dataset: replace the whole output (its old images, annotation files "
        "and annotations/source/) in one swap; without it such an OUT is refused",
    )
    p.add_argument(
        "--link",
        choices=("hardlink", "symlink", "copy"),
        default="hardlink",
        help="how images reach the output root (hardlink falls back to copy across file systems)",
    )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read sources through symbolic links whose target stays inside the source root",
    )
    p.add_argument("--workers", type=int, default=8, help="threads placing images (I/O)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


OTHER_PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "sun": _sun_parser,
    "polypsset": _polypsset_parser,
    "ldpolyp": _ldpolyp_parser,
    "table": _table_parser,
    "mot": _mot_parser,
    "merge": _merge_parser,
}


def _main_other(name: str, argv: list[str]) -> int:
    args = OTHER_PARSERS[name]().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    progress = not args.no_progress
    if name == "sun":
        from polyp_ssl.ingest.convert.sun import SunConfig, convert_sun

        cfg: Any = SunConfig(
            args.raw_dir,
            args.out_root,
            args.case_info,
            args.negatives,
            args.split,
            args.link,
            args.on_error,
            args.empty_frames,
            args.workers,
            args.follow_symlinks,
        )
        return _run(cfg, lambda: convert_sun(cfg, progress))
    if name == "polypsset":
        from polyp_ssl.ingest.convert.polypsset import PolypsSetConfig, convert_polypsset

        cfg = PolypsSetConfig(
            args.raw_dir,
            args.out_root,
            args.train2019,
            args.link,
            args.on_error,
            args.workers,
            args.follow_symlinks,
        )
        return _run(cfg, lambda: convert_polypsset(cfg, progress))
    if name == "ldpolyp":
        from polyp_ssl.ingest.convert.ldpolyp import LDPolypConfig, convert_ldpolyp

        cfg = LDPolypConfig(
            args.raw_dir, args.out_root, args.link, args.on_error, args.workers, args.follow_symlinks
        )
        return _run(cfg, lambda: convert_ldpolyp(cfg, progress))
    if name == "table":
        from polyp_ssl.ingest.convert.table import TableConfig, convert_table

        cfg = TableConfig(
            args.table,
            args.out_root,
            args.dataset_id,
            args.split,
            args.link,
            args.on_error,
            args.workers,
            args.follow_symlinks,
        )
        return _run(cfg, lambda: convert_table(cfg, progress))
    if name == "mot":
        from polyp_ssl.ingest.convert.mot import MotConfig, convert_mot

        cfg = MotConfig(
            args.raw_dir,
            args.out_root,
            args.tracks,
            args.videos_dir,
            args.min_conf,
            args.min_track_frames,
            args.split,
            args.dataset_id,
            args.link,
            args.on_error,
            args.workers,
            args.follow_symlinks,
        )
        return _run(cfg, lambda: convert_mot(cfg, progress))
    from polyp_ssl.ingest.convert.merge import MergeConfig, check_roots, merge

    if len(args.roots) < 2:
        print("polyp-ssl convert merge: give at least one source root and the output root", file=sys.stderr)
        return 2
    try:  # before the output root is made or locked: `merge ROOT ROOT` leaves ROOT untouched
        check_roots(args.roots[:-1], args.roots[-1])
    except ValueError as exc:
        print(f"polyp-ssl convert merge: error: {exc}", file=sys.stderr)
        return 2
    ids = [s.strip() for s in args.dataset_ids.split(",")] if args.dataset_ids else None
    cfg = MergeConfig(
        args.roots[:-1],
        Path(args.roots[-1]),
        ids,
        args.split,
        args.keep_splits,
        args.link,
        args.workers,
        args.follow_symlinks,
        args.overwrite,
    )
    return _run(cfg, lambda: merge(cfg, progress))
