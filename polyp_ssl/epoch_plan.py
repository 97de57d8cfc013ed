"""One epoch's batches for the whole split, the same on every rank and loader worker: pure numpy.

The reference code draws every bag of the epoch and shuffles them all before cutting batches, so
a batch's bags come from anywhere in the training set. This module does the same from the
split's fragments alone (no frame is read): `epoch_bags` draws each video's bags (every eligible
fragment anchors one), `global_batches` shuffles all of them together and cuts batches of
`n_bags` (with distinct identities per batch for the multipos sampler), and `stream_batches`
says which of those batches a stream (rank x worker) yields, so that the batches of all ranks
together are the plan's batches, in order, whatever the number of ranks and workers.

Every stream computes the same plan from (seed, epoch); none needs to talk to another.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from polyp_ssl.bags import eligible_anchors, epoch_anchors, sample_bags

# multipos: how many unfinished batches wait for bags of new identities before a bag whose
# identity every waiting batch already holds is set aside (bounds the work of a skewed split)
MAX_WAITING_BATCHES = 256


@dataclass
class SplitFragments:
    """Every training fragment of a split, grouped by video (fragments of video v are rows
    `video_start[v]:video_start[v + 1]`)."""

    video_start: np.ndarray  # int64 [V + 1]
    video_code: np.ndarray  # int64 [V], stable codes (seed the per-video draws)
    slot: np.ndarray  # int64 [F], the fragment's tracklet (row of the span table)
    frames: np.ndarray  # int32 [F, fragment_length], frame indices within the tracklet
    position: np.ndarray  # float64 [F], the fragment's position in its video
    tracklet: np.ndarray  # int64 [F], tracklet codes
    identity: np.ndarray  # int64 [F], identity codes (-1 unknown)

    @property
    def n_videos(self) -> int:
        return len(self.video_start) - 1

    def video_of(self, fragments: np.ndarray) -> np.ndarray:
        """The video index of each fragment id."""
        return np.searchsorted(self.video_start, np.asarray(fragments), side="right") - 1


@dataclass
class EpochPlan:
    """The epoch's batches: `batches[g]` holds the bag ids of global batch g, `bags[b]` the
    fragment ids of bag b (anchor first)."""

    bags: np.ndarray  # int64 [N, n_views]
    batches: np.ndarray  # int64 [G, n_bags]
    skipped: Counter

    @property
    def n_batches(self) -> int:
        return len(self.batches)


def epoch_bags(
    frags: SplitFragments,
    sampler: str,
    n_views: int,
    seed: int,
    epoch: int,
    temperature: float,
) -> tuple[np.ndarray, Counter]:
    """Every video's bags of the epoch as global fragment ids [N, n_views]: each eligible fragment
    anchors one bag (bags.epoch_anchors, bags.sample_bags), drawn with a generator seeded by
    (seed, epoch, video code) so that any stream draws the same bags."""
    out = []
    skipped: Counter = Counter()
    for v in range(frags.n_videos):
        lo, hi = int(frags.video_start[v]), int(frags.video_start[v + 1])
        if hi - lo < n_views:
            if hi > lo:
                skipped["video_too_few_fragments"] += 1
            continue
        trk, ide = frags.tracklet[lo:hi], frags.identity[lo:hi]
        rng = np.random.default_rng([seed, epoch, int(frags.video_code[v]), 5])
        anchors = epoch_anchors(eligible_anchors(sampler, trk, ide, n_views), rng)
        result = sample_bags(sampler, frags.position[lo:hi], trk, ide, anchors, n_views, rng, temperature)
        skipped.update(result.skipped)
        out.append(result.bags + lo)
    bags = np.concatenate(out) if out else np.zeros((0, n_views), dtype=np.int64)
    return bags.astype(np.int64, copy=False), skipped


def global_batches(
    bag_identity: np.ndarray, n_bags: int, rng: np.random.Generator, distinct_identities: bool = False
) -> tuple[np.ndarray, Counter]:
    """All bags shuffled together and cut into batches of n_bags bag ids [G, n_bags]; the last
    partial batch is left out (counted as `bags_left_at_epoch_end`).

    With distinct_identities (multipos), a bag goes to the oldest unfinished batch that does not
    hold its identity yet (first fit over the shuffled order), so batches still take the bags in
    shuffled order; unfinished batches at the end are left out, counted."""
    n = len(bag_identity)
    order = rng.permutation(n)
    skipped: Counter = Counter()
    if not distinct_identities:
        g = n // n_bags
        if n - g * n_bags:
            skipped["bags_left_at_epoch_end"] += n - g * n_bags
        return order[: g * n_bags].reshape(g, n_bags).astype(np.int64), skipped
    waiting: list[tuple[list[int], set[int]]] = []
    done: list[list[int]] = []
    for b in order:
        ide = int(bag_identity[b])
        k = next((k for k, (_, held) in enumerate(waiting) if ide not in held), None)
        if k is None:
            if len(waiting) >= MAX_WAITING_BATCHES:
                skipped["multipos_bag_identity_in_every_waiting_batch"] += 1
                continue
            waiting.append(([], set()))
            k = len(waiting) - 1
        members, held = waiting[k]
        members.append(int(b))
        held.add(ide)
        if len(members) == n_bags:
            done.append(members)
            del waiting[k]
    left = sum(len(m) for m, _ in waiting)
    if left:
        skipped["bags_left_at_epoch_end"] += left
    arr = np.asarray(done, dtype=np.int64).reshape(-1, n_bags)
    return arr, skipped


def plan_epoch(
    frags: SplitFragments,
    sampler: str,
    n_views: int,
    n_bags: int,
    seed: int,
    epoch: int,
    temperature: float,
) -> EpochPlan:
    """The epoch's bags and global batches (see the module docstring)."""
    bags, skipped = epoch_bags(frags, sampler, n_views, seed, epoch, temperature)
    rng = np.random.default_rng([seed, epoch, 9])
    identity = frags.identity[bags[:, 0]] if len(bags) else np.zeros(0, np.int64)
    batches, more = global_batches(identity, n_bags, rng, sampler == "multipos")
    skipped.update(more)
    return EpochPlan(bags, batches, skipped)


def stream_batches(
    n_global: int, rank: int, world_size: int, logical_worker: int, num_workers: int, per_worker: int
) -> np.ndarray:
    """The global batch ids that logical worker `logical_worker` of rank `rank` yields, in order.

    A rank's loader takes batches from its workers round-robin, so its j-th batch is worker
    j % workers' (j // workers)-th; rank r's j-th batch is global batch r + j * world_size. An
    epoch longer than the plan (ranks get equal counts, multipos may cut fewer batches) wraps
    around to the plan's first batches."""
    if n_global <= 0:
        raise ValueError("the epoch plan has no batch")
    nw = max(num_workers, 1)
    j = np.arange(per_worker, dtype=np.int64) * nw + logical_worker
    return (rank + j * world_size) % n_global
