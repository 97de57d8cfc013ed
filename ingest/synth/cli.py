"""`polyp-ssl synth OUT_DIR [options]` and `polyp-ssl synth --stats ROOT`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from polyp_ssl.ingest.synth.generate import SynthConfig, check_output_dir, generate, validate
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

log = logging.getLogger("polyp_ssl.synth")
DEFAULTS = SynthConfig()


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl synth",
        description="Generate a synthetic colonoscopy dataset in the seed's COCO layout "
        "(images/, annotations/instances_{train,val,test}.json, optionally videos/*.mp4), "
        "or print the measured properties of a dataset root with --stats.",
    )
    p.add_argument("out_dir", nargs="?", type=Path, help="output dataset root (created; must be empty)")
    p.add_argument("--stats", type=Path, metavar="ROOT", help="print the measured properties of ROOT as JSON")
    p.add_argument(
        "--videos", type=int, default=DEFAULTS.videos, help="number of videos (default %(default)s)"
    )
    p.add_argument(
        "--frames-per-video",
        type=int,
        default=DEFAULTS.frames_per_video,
        help="frames per video (default %(default)s)",
    )
    p.add_argument("--width", type=int, default=DEFAULTS.width, help="frame width (default %(default)s)")
    p.add_argument("--height", type=int, default=DEFAULTS.height, help="frame height (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (default %(default)s)")
    p.add_argument(
        "--dataset-id", default=DEFAULTS.dataset_id, help="dataset_id of every image (default %(default)s)"
    )
    p.add_argument(
        "--mp4", action="store_true", help="also write videos/{sequence_id}.mp4 (H.264, every frame)"
    )
    p.add_argument(
        "--workers", type=int, default=2, help="processes, one video per task (default %(default)s)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace images/, annotations/ and videos/ of a dataset already in OUT_DIR",
    )
    p.add_argument(
        "--layout",
        choices=("seed", "sun", "polypsset", "ldpolyp", "table", "realcolon", "mot"),
        default="seed",
        help="write the dataset in the seed's layout (default) or in a public dataset's raw layout, "
        "traps included, for `polyp-ssl convert NAME` (docs/synth.md)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.stats is not None:
        if args.out_dir is not None:
            print("polyp-ssl synth: give either OUT_DIR or --stats ROOT, not both", file=sys.stderr)
            return 2
        from polyp_ssl.ingest.synth.stats import dataset_stats

        try:
            stats = dataset_stats(args.stats)
        except (OSError, ValueError, KeyError) as e:
            print(f"polyp-ssl synth --stats: {e}", file=sys.stderr)
            return 1
        print(json.dumps(stats, indent=2))
        return 0
    if args.out_dir is None:
        print("polyp-ssl synth: OUT_DIR is required (or --stats ROOT)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"polyp-ssl synth: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    cfg = SynthConfig(
        videos=args.videos,
        frames_per_video=args.frames_per_video,
        width=args.width,
        height=args.height,
        seed=args.seed,
        dataset_id=args.dataset_id,
        mp4=args.mp4,
    )
    problems = validate(cfg)
    problem = check_output_dir(args.out_dir, args.overwrite)
    if problems or problem:
        print(f"polyp-ssl synth: {'; '.join(problems + ([problem] if problem else []))}", file=sys.stderr)
        return 2
    if args.layout != "seed":
        from polyp_ssl.ingest.synth.layouts import write_layout

        t0 = time.perf_counter()
        try:
            expected = write_layout(args.layout, cfg, args.out_dir, workers=args.workers)
        except ValueError as e:
            print(f"polyp-ssl synth: {e}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(
                json.dumps(
                    {
                        "layout": args.layout,
                        "out_dir": str(args.out_dir),
                        "seconds": round(time.perf_counter() - t0, 2),
                        **expected["counts"],
                    }
                )
            )
        return 0
    total = cfg.videos * cfg.frames_per_video
    bar = tqdm(total=total, unit="frame", desc="synth", disable=args.quiet, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        summary = generate(
            cfg, args.out_dir, workers=args.workers, overwrite=args.overwrite, progress=bar.update
        )
    except ValueError as e:
        bar.close()
        print(f"polyp-ssl synth: {e}", file=sys.stderr)
        return 2
    bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["out_dir"] = str(args.out_dir)
    if not args.quiet:
        print(json.dumps(summary))
    return 0
