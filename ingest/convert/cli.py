"""`polyp-ssl convert NAME RAW_DIR OUT_ROOT`: raw dataset layouts -> the seed's COCO layout."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

CONVERTERS = ("realcolon",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyp-ssl convert",
        description="Convert a raw dataset layout into the seed's layout (images/ + "
        "annotations/instances_{split}.json) that `polyp-ssl ingest` reads.",
        epilog="example: polyp-ssl convert realcolon /data/real-colon /data/rc --split-file splits.csv",
    )
    p.add_argument("converter", choices=CONVERTERS, help="raw layout: realcolon (REAL-Colon VOC XML + CSVs)")
    p.add_argument(
        "raw_dir",
        type=Path,
        help="the raw dataset folder (SSS-VVV_frames/, SSS-VVV_annotations/, "
        "lesion_info.csv, video_info.csv)",
    )
    p.add_argument("out_root", type=Path, help="output dataset root")
    p.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="video -> split, CSV (video,split) or JSON; videos it does not list are left out "
        "(and counted). Default: per site (SSS), sorted videos dealt 3 train : 1 val : 1 test",
    )
    p.add_argument(
        "--link",
        choices=("hardlink", "symlink", "copy"),
        default="hardlink",
        help="how frames reach OUT_ROOT/images (hardlink falls back to copy across file systems)",
    )
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad input: stop with an error naming file, id and field (fail), or leave the item "
        "out and count it in OUT_ROOT/convert_report.json (skip)",
    )
    p.add_argument(
        "--empty-frames",
        choices=("keep", "drop"),
        default="keep",
        help="frames without any polyp: keep them as images without annotations, or drop them",
    )
    p.add_argument("--workers", type=int, default=8, help="threads reading XMLs and placing frames (I/O)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from ingest.convert.realcolon import ConvertConfig, ConvertError, convert

    cfg = ConvertConfig(
        raw_dir=args.raw_dir,
        out_root=args.out_root,
        split_file=args.split_file,
        link=args.link,
        on_error=args.on_error,
        empty_frames=args.empty_frames,
        workers=args.workers,
    )
    try:
        report = convert(cfg, progress=not args.no_progress)
    except ConvertError as exc:
        print(f"polyp-ssl convert: error: {exc}", file=sys.stderr)
        print("polyp-ssl convert: nothing was written; fix the input or use --on-error skip", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"polyp-ssl convert: error: {exc}", file=sys.stderr)
        return 1
    for split, c in report["splits"].items():
        print(f"{split}: {c['videos']} videos, {c['images']} images, {c['annotations']} annotations")
    if report["n_skipped"]:
        print(
            f"skipped {report['n_skipped']} items: {report['skipped']} (details in "
            f"{args.out_root / 'convert_report.json'})"
        )
    print(f"wrote {args.out_root}/annotations/instances_{{{','.join(report['splits'])}}}.json")
    return 0
