"""Cost of checking the tar header before each catalog span (random access), measured in one run.

Random access reads each frame at its catalog byte span. Since the header check, the same pread
also takes the 512-byte tar header right before the span and checks that it names the expected
member with the span's size (`shards.members.check_member_header`), so spans swapped between
frames are refused. This benchmark reads every frame span of a synthetic root through
`SpanReader.read` with the check (`member=` the frame's member name) and without it (`member=None`,
the reader as it was before), alternating rounds so both see the same machine load, and prints one
JSON object: frames/s of each, the paired ratio per round with its median, and, for scale, the
microseconds per frame of the check against those of decoding the same JPEG (the least work a
training worker does for a frame after reading it).

    python scripts/bench_span_reads.py --rounds 7 [--store_size 232]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from polyp_ssl.shards.members import MemberSpan, SpanReader
from polyp_ssl.shards.tables import read_catalog_table
from polyp_ssl.transforms import decode_jpeg_bytes
from tests.shard_factory import make_root


def frame_spans(root: Path) -> list[tuple[str, MemberSpan, str]]:
    """(shard path, span, member name) of every frame of the root, in shard order."""
    frames = read_catalog_table(
        root, "frames", ["tracklet_id", "frame_index", "jpeg_offset", "jpeg_size", "jpeg_crc32"]
    ).to_pylist()
    tracklets = read_catalog_table(root, "tracklets", ["tracklet_id", "sample_key", "shard"]).to_pylist()
    of = {r["tracklet_id"]: (r["shard"], r["sample_key"]) for r in tracklets}
    out = []
    for r in frames:
        shard, key = of[r["tracklet_id"]]
        span = MemberSpan(r["jpeg_offset"], r["jpeg_size"], r["jpeg_crc32"])
        out.append((str(root / shard), span, f"{key}.{r['frame_index']:04d}.jpg"))
    out.sort(key=lambda t: (t[0], t[1].offset))
    return out


def read_all(spans: list[tuple[str, MemberSpan, str]], check: bool) -> float:
    """Seconds to read every span once with a fresh reader (file opens included)."""
    reader = SpanReader()
    t0 = time.perf_counter()
    for path, span, name in spans:
        reader.read(path, span, -1, name if check else None)
    elapsed = time.perf_counter() - t0
    reader.close()
    return elapsed


def decode_all(spans: list[tuple[str, MemberSpan, str]]) -> float:
    """Seconds to read (without the check) and decode every frame once, on one thread."""
    reader = SpanReader()
    t0 = time.perf_counter()
    for path, span, _ in spans:
        decode_jpeg_bytes(reader.read(path, span))
    elapsed = time.perf_counter() - t0
    reader.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames_per_tracklet", type=int, default=40)
    ap.add_argument("--store_size", type=int, default=64, help="stored crop side (ingest --store-size)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_root(
            Path(tmp) / "root",
            videos={"train": args.videos},
            frames_per_tracklet=args.frames_per_tracklet,
            store_size=args.store_size,
            jpeg_pool=16,
        )
        spans = frame_spans(root)
        read_all(spans, True)  # warm the page cache and check every header once
        with_check, without, ratios = [], [], []
        for i in range(args.rounds):
            order = (True, False) if i % 2 == 0 else (False, True)
            times = {c: read_all(spans, c) for c in order}
            with_check.append(times[True])
            without.append(times[False])
            ratios.append(times[True] / times[False])
        torch.set_num_threads(1)
        decode = statistics.median(decode_all(spans) for _ in range(3))
    n = len(spans)
    check_us = (statistics.median(with_check) - statistics.median(without)) / n * 1e6
    print(
        json.dumps(
            {
                "frames": n,
                "store_size": args.store_size,
                "rounds": args.rounds,
                "frames_per_s_with_header_check": round(n / statistics.median(with_check)),
                "frames_per_s_without": round(n / statistics.median(without)),
                "time_ratio_with_over_without": [round(r, 3) for r in ratios],
                "median_time_ratio": round(statistics.median(ratios), 3),
                "header_check_us_per_frame": round(check_us, 2),
                "read_and_decode_us_per_frame": round(decode / n * 1e6, 1),
                "check_share_of_read_and_decode": round(check_us / (decode / n * 1e6), 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
