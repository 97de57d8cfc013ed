"""Same-video bag pairs per batch of the streaming loader vs a global shuffle, by stream count.

Every other bag of a batch is a negative; two bags of one video often show the same polyp. A
global shuffle of the epoch's bags (the reference code's batches) gives
`polyp_ssl.diversity.global_shuffle_pair_rate`; this script streams one epoch for 1, 14 and 112
streams (ranks x loader workers) over a synthetic 27-video index, with each --shard_access
(random: batches from the epoch's global plan, frames read at their catalog spans; sequential:
each stream's own open videos), and prints one JSON object with the measured rate and its ratio
to the global shuffle.

    python scripts/bench_batch_diversity.py [--streams 1 14 112] [--open_videos 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from polyp_ssl.diversity import bag_videos, global_shuffle_pair_rate, same_video_pair_rate
from polyp_ssl.stream import BagStream, StreamParams, build_index
from tests.shard_factory import make_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 14, 112])
    ap.add_argument("--videos", type=int, default=27)
    ap.add_argument("--open_videos", type=int, default=4)
    ap.add_argument("--batch_size", type=int, default=24)
    ap.add_argument("--n_views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="epochs streamed per setting (more: less noise)")
    ap.add_argument("--shard_access", nargs="+", default=["random", "sequential"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_root(
            Path(tmp) / "root",
            videos={"train": a.videos, "val": 1},
            polyps_per_video=2,
            tracklets_per_polyp=3,
            frames_per_tracklet=40,
            videos_per_shard=1,
        )
        base = StreamParams(
            batch_size=a.batch_size,
            n_views=a.n_views,
            fragment_length=2,
            fragment_stride=4,
            min_tracklet_length=4,
            im_size=16,
            open_videos=a.open_videos,
            aug_anchorcrop=True,
            max_epochs=max(a.epochs, 2),
        )
        index = build_index(root, "train", base)
        expect = global_shuffle_pair_rate(index.video_eligible)
        out: dict = {
            "videos": len(index.video_ids),
            "bags_per_batch": base.n_bags,
            "open_videos": a.open_videos,
            "epochs": a.epochs,
            "global_shuffle_rate": round(expect, 4),
        }
        for access in a.shard_access:
            params = replace(base, shard_access=access)
            for streams in a.streams:
                ds = BagStream(index, params, 0, 1, streams)
                rates = [
                    same_video_pair_rate(bag_videos(b["bag"].numpy(), b["video"].numpy()))
                    for epoch in range(a.epochs)
                    for s in range(streams)
                    for b in ds.iter_stream(epoch, s)
                ]
                rate = float(np.mean(rates))
                out[f"{access}_streams_{streams}"] = {
                    "rate": round(rate, 4),
                    "ratio": round(rate / expect, 2),
                    "batches": len(rates),
                }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
