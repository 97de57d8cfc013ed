"""The sequential path's bag pools: each stream's videos for an epoch (`assign_videos`), a video's
fragments and bags once its samples are read (`open_video`), and batches taken across the open
videos (`take_batch`). Pure logic over samples already in memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from polyp_ssl.bags import eligible_anchors, epoch_anchors, sample_bags
from polyp_ssl.fragments import cut_tracklet
from polyp_ssl.shards.sample import (
    TrackletSample,
    sample_meta,
)
from polyp_ssl.stream_index import StreamIndex, StreamParams
from polyp_ssl.tar_samples import PARSED_META


def assign_videos(index: StreamIndex, n_streams: int, seed: int, epoch: int) -> list[list[int]]:
    """Video indices of each stream for one epoch: disjoint, balanced by fragment count.

    Whole shards go to streams when there are at least as many shards as streams; else single
    videos (a stream then reads a shared shard and skips the other streams' samples). With fewer
    videos than streams, the streams left empty get videos of others (resampling).
    """
    rng = np.random.default_rng([seed, epoch, 7])
    shards = sorted(set(index.video_shard))
    by_shard: dict[str, list[int]] = {s: [] for s in shards}
    for v, s in enumerate(index.video_shard):
        by_shard[s].append(v)
    if len(shards) >= n_streams:
        units = [by_shard[s] for s in shards]
    else:
        units = [[v] for v in range(len(index.video_ids))]
    loads = np.array([index.video_fragments[u].sum() for u in units], dtype=np.float64)
    perm = rng.permutation(len(units))
    order = perm[np.argsort(-loads[perm], kind="stable")]
    stream_load = np.zeros(n_streams)
    out: list[list[int]] = [[] for _ in range(n_streams)]
    for u in order:
        s = int(np.argmin(stream_load))
        out[s].extend(units[u])
        stream_load[s] += loads[u]
    n_videos = len(index.video_ids)
    for s in range(n_streams):
        if not out[s]:
            out[s] = [int(rng.integers(n_videos))]
    for s in range(n_streams):
        # read shards in a per-stream random order; a shard's videos in catalog (= shard) order
        srng = np.random.default_rng([seed, epoch, s, 11])
        shard_rank = {
            sh: r for r, sh in enumerate(srng.permutation(sorted({index.video_shard[v] for v in out[s]})))
        }
        out[s].sort(key=lambda v: (shard_rank[index.video_shard[v]], v))
    return out


# ---------------------------------------------------------------- videos, fragments, bags


@dataclass
class _FragRef:
    key: str
    frames: tuple[int, ...]
    position: float
    tracklet: int
    identity: int


@dataclass
class _OpenVideo:
    index: int
    code: int
    samples: dict[str, dict[str, Any]]
    metas: dict[str, TrackletSample]
    frags: list[_FragRef]
    bags: list[np.ndarray]  # remaining bags, in drawn (shuffled) order


def video_fragments(
    samples: list[dict[str, Any]], metas: list[TrackletSample], codes: list[tuple[int, int]], p: StreamParams
) -> list[_FragRef]:
    out = []
    for s, meta, (t_code, i_code) in zip(samples, metas, codes, strict=False):
        for f in cut_tracklet(
            meta.frame_ids,
            meta.video_first_frame,
            meta.video_last_frame,
            p.fragment_length,
            p.fragment_stride,
            p.fragment_drop_last,
            p.min_tracklet_length,
        ):
            out.append(_FragRef(s["__key__"], f.frame_indices, f.position, t_code, i_code))
    return out


def open_video(
    v: int,
    code: int,
    samples: list[dict[str, Any]],
    codes: list[tuple[int, int]],
    p: StreamParams,
    rng: np.random.Generator,
    temperature: float,
    stats: Counter,
) -> _OpenVideo:
    metas = [s.pop(PARSED_META, None) or sample_meta(s) for s in samples]
    frags = video_fragments(samples, metas, codes, p)
    pos = np.array([f.position for f in frags])
    trk = np.array([f.tracklet for f in frags], dtype=np.int64)
    ide = np.array([f.identity for f in frags], dtype=np.int64)
    bags: list[np.ndarray] = []
    if len(frags) >= p.n_views:
        anchors = epoch_anchors(eligible_anchors(p.sampler, trk, ide, p.n_views), rng)
        result = sample_bags(p.sampler, pos, trk, ide, anchors, p.n_views, rng, temperature)
        stats.update(result.skipped)
        bags = list(result.bags)
    else:
        stats["video_too_few_fragments"] += 1
    drop_unused_jpegs(samples, frags, bags)
    return _OpenVideo(v, code, {s["__key__"]: s for s in samples}, {m.key: m for m in metas}, frags, bags)


def drop_unused_jpegs(samples: list[dict[str, Any]], frags: list[_FragRef], bags: list[np.ndarray]) -> None:
    """Free the JPEG bytes no bag uses (frames between strides, fragments not drawn): an open
    video then holds only what its batches will decode."""
    used: dict[str, set[int]] = {}
    for bag in bags:
        for m in bag:
            fr = frags[int(m)]
            used.setdefault(fr.key, set()).update(fr.frames)
    for sample in samples:
        keep = used.get(sample["__key__"], set())
        for ext in [e for e in sample if e.endswith(".jpg")]:
            if int(ext.split(".", 1)[0]) not in keep:
                del sample[ext]


def bag_identity(ov: _OpenVideo, bag: np.ndarray) -> int:
    """The identity code of a bag: its anchor's (a multipos bag is one identity)."""
    return ov.frags[int(bag[0])].identity


def pool_identities(pool: list[_OpenVideo]) -> set[int]:
    """The distinct identities of the bags left in the pool."""
    return {bag_identity(ov, b) for ov in pool for b in ov.bags}


def can_fill(pool: list[_OpenVideo], n_bags: int, distinct_identities: bool = False) -> bool:
    """Whether take_batch can form a full batch of n_bags from the pool now."""
    if distinct_identities:
        return len(pool_identities(pool)) >= n_bags
    return sum(len(o.bags) for o in pool) >= n_bags


def take_batch(
    pool: list[_OpenVideo], n_bags: int, rng: np.random.Generator, distinct_identities: bool = False
) -> list[tuple[_OpenVideo, np.ndarray]]:
    """n_bags bags from the open videos, one per video in a random video order, round after round,
    so a batch spans as many videos as the pool holds. Exhausted videos leave the pool.

    With distinct_identities (the multipos sampler), no two bags of the batch share an identity: each
    video gives its latest-drawn bag of an identity not yet in the batch, or none this round. The
    rounds stop when no bag left has a new identity, so the batch is full whenever
    ``can_fill(pool, n_bags, True)`` held; otherwise it is short (callers check can_fill first)."""
    chosen: list[tuple[_OpenVideo, np.ndarray]] = []
    used: set[int] = set()
    while len(chosen) < n_bags:
        live = [ov for ov in pool if ov.bags]
        if not live:
            break
        progress = False
        for j in rng.permutation(len(live)):
            if len(chosen) == n_bags:
                break
            ov = live[j]
            if not distinct_identities:
                chosen.append((ov, ov.bags.pop()))
                progress = True
                continue
            fresh = (i for i in range(len(ov.bags) - 1, -1, -1) if bag_identity(ov, ov.bags[i]) not in used)
            pick = next(fresh, None)
            if pick is None:
                continue
            bag = ov.bags.pop(pick)
            used.add(bag_identity(ov, bag))
            chosen.append((ov, bag))
            progress = True
        if not progress:
            break
    pool[:] = [ov for ov in pool if ov.bags]
    return chosen
