"""Conversion speed per raw layout, in frames per second, on synthetic raw downloads.

Writes each layout with `polyp-ssl synth --layout` into a temporary folder (not timed), then
times `polyp-ssl convert NAME` on it (hard links, the default; parsing, pairing, clamping, image
headers, placing frames, writing the report and annotation files) and prints one JSON object.
Not a test: numbers depend on the machine and its file system.

    .venv/bin/python scripts/bench_convert.py [--videos 8 --frames 200 --width 320 --height 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polyp_ssl.entry import main as entry_main

LAYOUTS = ("sun", "polypsset", "ldpolyp", "table")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per layout (the best is kept)")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {"videos": args.videos, "frames_per_video": args.frames, "size": [args.width, args.height]},
        "layouts": {},
    }
    try:
        for layout in LAYOUTS:
            raw = base / f"raw_{layout}"
            synth = ["synth", str(raw), "--layout", layout, "--videos", str(args.videos), "--quiet"]
            synth += ["--frames-per-video", str(args.frames), "--width", str(args.width)]
            synth += ["--height", str(args.height), "--workers", "2"]
            if entry_main(synth) != 0:
                return 1
            source = raw / "boxes.csv" if layout == "table" else raw
            best = None
            for r in range(args.repeats):
                out = base / f"out_{layout}_{r}"
                t0 = time.perf_counter()
                rc = entry_main(["convert", layout, str(source), str(out), "--no-progress"])
                seconds = time.perf_counter() - t0
                if rc != 0:
                    return 1
                best = seconds if best is None else min(best, seconds)
            report = json.loads((base / f"out_{layout}_0" / "convert_report.json").read_text())
            frames = sum(s["images"] for s in report["splits"].values())
            result["layouts"][layout] = {
                "frames": frames,
                "boxes": report["boxes"]["seen"],
                "seconds": round(best, 3),
                "frames_per_s": round(frames / best, 1),
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
