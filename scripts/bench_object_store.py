"""Random-access training batches from an S3 endpoint on loopback vs the local copy of the same root.

Builds a synthetic root of stored crops (JPEGs of a few tens of KB, REAL-Colon-like crops), uploads
it to moto's S3 server on 127.0.0.1 (as `aws s3 sync` would), and puts a small proxy
(tests/object_store_proxy.py) in front of it that adds a fixed latency to every request (0, 20,
100 ms: a real store's first-byte latency). For each latency and loader worker count it times the
training loader (random access, decoding in the workers) reading from the bucket
(`build_index("s3://...")`, the path `polyp-ssl train --dataset_root s3://...` takes) and from the
local copy, and prints one JSON object with:

- frames/s from the server and from the local copy, and their ratio;
- requests per batch (range GETs and HEADs counted by the proxy) and range GETs per frame read;
- whether the batches are identical (a digest of every batch's pixels) and the same-video bag-pair
  rate of both;
- the block cache (shards.block_cache) at 25% of the data over two epochs: hit rate per epoch.

    python scripts/bench_object_store.py [--latency_ms 0 20 100] [--workers 1 2] [--batches 4]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np

from polyp_ssl.diversity import bag_videos, global_shuffle_pair_rate, same_video_pair_rate
from polyp_ssl.shards.object_store import ObjectReadOptions
from polyp_ssl.stream import BagStream, StreamLoader, StreamParams, build_index
from tests.object_store_helpers import start_s3_server
from tests.object_store_proxy import LatencyProxy
from tests.shard_factory import make_root


def build_root(out: Path, videos: int) -> Path:
    if (out / "catalog").exists():
        return out
    return make_root(
        out,
        videos={"train": videos, "val": 1},
        polyps_per_video=3,
        tracklets_per_polyp=2,
        frames_per_tracklet=[96, 160, 128],
        videos_per_shard=1,
        store_size=256,
        jpeg_pool=24,
        source_wh=(1240, 1080),
        box_wh=(120.0, 100.0),
    )


def run_loader(ds: BagStream, n_batches: int) -> dict:
    """Frames/s over n_batches, from the loader's start (worker start-up included), with each
    batch's pixel digest and same-video pair rate."""
    t = time.perf_counter()
    frames, digests, rates = 0, [], []
    for i, batch in enumerate(StreamLoader(ds)):
        f = batch["frames"]
        frames += int(f.shape[0] * f.shape[1])
        digests.append(hashlib.sha1(f.numpy().tobytes()).hexdigest())
        rates.append(same_video_pair_rate(bag_videos(batch["bag"].numpy(), batch["video"].numpy())))
        if i + 1 == n_batches:
            break
    secs = time.perf_counter() - t
    return {"frames": frames, "seconds": secs, "digests": digests, "pair_rate": float(np.mean(rates))}


def offline_hit_rates(trace: list[int], capacity_blocks: int) -> dict:
    """Hit rates of the same block lookups under LRU and under Belady's optimum with perfect
    knowledge of the lookup order (the bound no cache can beat), at the same capacity."""
    lru: OrderedDict[int, None] = OrderedDict()
    lru_hits = 0
    for k in trace:
        if k in lru:
            lru_hits += 1
            lru.move_to_end(k)
        else:
            lru[k] = None
            if len(lru) > capacity_blocks:
                lru.popitem(last=False)
    where: dict[int, list[int]] = {}
    for i, k in enumerate(trace):
        where.setdefault(k, []).append(i)

    def next_at(k: int, i: int) -> int:
        p = where[k]
        j = bisect.bisect_right(p, i)
        return p[j] if j < len(p) else len(trace) + 1

    held: set[int] = set()
    opt_hits = 0
    for i, k in enumerate(trace):
        if k in held:
            opt_hits += 1
        elif len(held) < capacity_blocks:
            held.add(k)
        else:
            far = max(held, key=lambda x: next_at(x, i))
            if next_at(far, i) > next_at(k, i):
                held.discard(far)
                held.add(k)
    n = max(1, len(trace))
    return {"lru_hit_rate": round(lru_hits / n, 4), "belady_offline_hit_rate": round(opt_hits / n, 4)}


def cache_section(
    root: Path, url: str, params: StreamParams, endpoint: str, cache_dir: Path, block_bytes: int = 256 << 10
) -> dict:
    """Hit rate of the block cache at 25% of the training shards over two epochs, one stream
    reading the whole plan (members only, no decoding: the cache sees the same reads)."""
    data = sum(p.stat().st_size for p in (root / "shards" / "train").glob("*.tar"))
    opts = ObjectReadOptions(
        storage_options={"endpoint_url": endpoint},
        cache_dir=str(cache_dir),
        cache_bytes=data // 4,
        cache_block_bytes=block_bytes,
    )
    index = build_index(url, "train", params, read_options=opts)
    ds = BagStream(index, params)
    out: dict = {"cache_bytes": data // 4, "data_bytes": data, "block_bytes": opts.cache_block_bytes}
    reader = ds.source.reader()
    trace: list[int] = []
    reader._cache.trace = trace
    for epoch in range(2):
        before = dict(reader.cache_stats)
        requests, fetched = reader.stats.range_requests, reader.stats.bytes_fetched
        t = time.perf_counter()
        frames = sum(len(r.frames) for d in ds.source.drafts(epoch, 0) for r in d.rows)
        after = reader.cache_stats
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        out[f"epoch_{epoch}"] = {
            "frames": frames,
            "block_lookups": hits + misses,
            "hit_rate": round(hits / max(1, hits + misses), 4),
            "bytes_served_from_cache": after["bytes_hit"] - before["bytes_hit"],
            "bytes_fetched_from_store": reader.stats.bytes_fetched - fetched,
            "range_requests": reader.stats.range_requests - requests,
            "seconds": round(time.perf_counter() - t, 2),
        }
    out["blocks_evicted"] = reader.cache_stats["blocks_evicted"]
    total = reader.cache_stats
    out["hit_rate_two_epochs"] = total["hit_rate"]
    out["same_lookups_offline"] = offline_hit_rates(trace, (data // 4) // opts.cache_block_bytes)
    on_disk = sum(p.stat().st_size for p in (cache_dir / "blocks").rglob("*.blk"))
    out["bytes_on_disk_at_end"] = on_disk
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency_ms", type=float, nargs="+", default=[0, 20, 100])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, default=4, help="timed batches per worker")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=60)
    ap.add_argument("--n_views", type=int, default=5)
    ap.add_argument("--fragment_length", type=int, default=8)
    ap.add_argument("--im_size", type=int, default=112)
    ap.add_argument("--root", type=Path, default=None, help="build the data here (reused if present)")
    ap.add_argument("--no_cache", action="store_true", help="skip the cache section")
    ap.add_argument("--cache_block_kb", type=int, default=256, help="the cache's block size")
    a = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    base = a.root or Path(tmp.name)
    root = build_root(base / "root", a.videos)
    server = start_s3_server()
    proxy = LatencyProxy(server.endpoint).start()
    os.environ.update(server.environ(endpoint=proxy.endpoint))
    try:
        bucket = server.bucket()
        t = time.perf_counter()
        server.upload_tree(root, bucket, "data")
        upload_s = time.perf_counter() - t
        url = f"s3://{bucket}/data"
        params = StreamParams(
            batch_size=a.batch_size,
            n_views=a.n_views,
            fragment_length=a.fragment_length,
            fragment_stride=4,
            fragment_drop_last=True,
            min_tracklet_length=30,
            im_size=a.im_size,
            bbox_scale_factor=5.0,
        )
        local_index = build_index(root, "train", params)
        remote_index = build_index(
            url,
            "train",
            params,
            read_options=ObjectReadOptions(storage_options={"endpoint_url": proxy.endpoint}),
        )
        frames_total = int(sum(local_index.sample_frames.values()))
        shard_bytes = sum(p.stat().st_size for p in (root / "shards" / "train").glob("*.tar"))
        result: dict = {
            "cpu_count": os.cpu_count(),
            "videos": len(local_index.video_ids),
            "train_frames": frames_total,
            "train_shard_mb": round(shard_bytes / 2**20, 1),
            "mean_jpeg_kb": round(shard_bytes / frames_total / 1024, 1),
            "batch": f"{a.batch_size // a.n_views * a.n_views} fragments x {a.fragment_length} frames",
            "im_size": a.im_size,
            "upload_s": round(upload_s, 1),
            "reader": {
                k: getattr(ObjectReadOptions(), k)
                for k in ("lookahead_batches", "max_gap_bytes", "max_request_bytes", "max_in_flight")
            },
            "global_shuffle_pair_rate": round(global_shuffle_pair_rate(local_index.video_eligible), 4),
            "runs": {},
        }
        for w in a.workers:
            n = a.batches * max(w, 1)
            local = run_loader(BagStream(local_index, params, 0, 1, w, batches_per_worker=a.batches), n)
            local_fps = local["frames"] / local["seconds"]
            for ms in a.latency_ms:
                proxy.latency_s = ms / 1000
                ds = BagStream(remote_index, params, 0, 1, w, batches_per_worker=a.batches)
                proxy.counts.clear()  # the loader's requests only (not the index's JSON reads)
                got = run_loader(ds, n)
                fps = got["frames"] / got["seconds"]
                gets, heads = proxy.counts["GET"], proxy.counts["HEAD"]
                result["runs"][f"workers_{w}_latency_{int(ms)}ms"] = {
                    "server_frames_per_s": round(fps, 1),
                    "local_frames_per_s": round(local_fps, 1),
                    "server_vs_local": round(fps / local_fps, 3),
                    "batches": n,
                    "frames_read": got["frames"],
                    "range_gets": gets,
                    "heads": heads,
                    "gets_per_batch": round(gets / n, 2),
                    "range_gets_per_frame": round(gets / max(1, got["frames"]), 4),
                    "batches_identical": got["digests"] == local["digests"],
                    "server_pair_rate": round(got["pair_rate"], 4),
                    "local_pair_rate": round(local["pair_rate"], 4),
                }
                print(
                    json.dumps(
                        {
                            f"workers_{w}_latency_{int(ms)}ms": result["runs"][
                                f"workers_{w}_latency_{int(ms)}ms"
                            ]
                        }
                    ),
                    file=sys.stderr,
                )
        if not a.no_cache:
            proxy.latency_s = 0.0
            result["cache_25pct_two_epochs"] = cache_section(
                root, url, params, proxy.endpoint, base / "cache"
            )
    finally:
        proxy.stop()
        server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
