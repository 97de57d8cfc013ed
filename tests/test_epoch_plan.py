"""The epoch plan: every bag of the split shuffled together, batches cut from it, streams' shares."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from polyp_ssl.bags import temporal_temperature
from polyp_ssl.diversity import global_shuffle_pair_rate, same_video_pair_rate
from polyp_ssl.epoch_plan import SplitFragments, global_batches, plan_epoch, stream_batches
from polyp_ssl.stream import epoch_batches


def split_fragments(
    frags_per_video: list[int], identities_per_video: int = 2, length: int = 4
) -> SplitFragments:
    """Fragments of several videos, each video's fragments split over `identities_per_video`
    polyps with one tracklet each, positions spread over [0, 1]."""
    start = np.concatenate([[0], np.cumsum(frags_per_video)]).astype(np.int64)
    n = int(start[-1])
    tracklet = np.zeros(n, np.int64)
    identity = np.zeros(n, np.int64)
    position = np.zeros(n)
    for v, k in enumerate(frags_per_video):
        lo = start[v]
        ids = np.arange(k) % identities_per_video
        identity[lo : lo + k] = v * identities_per_video + ids
        tracklet[lo : lo + k] = v * identities_per_video + ids
        position[lo : lo + k] = np.linspace(0, 1, k)
    return SplitFragments(
        start,
        np.arange(len(frags_per_video), dtype=np.int64) * 7 + 3,
        np.repeat(np.arange(len(frags_per_video)), frags_per_video).astype(np.int64),
        np.zeros((n, length), np.int32),
        position,
        tracklet,
        identity,
    )


def paper_like(seed: int = 0) -> SplitFragments:
    """27 videos of unequal length, as in the paper's training split."""
    rng = np.random.default_rng(seed)
    return split_fragments([int(x) for x in rng.integers(20, 120, size=27)])


def test_every_eligible_fragment_anchors_exactly_one_bag_and_batches_take_each_bag_once():
    frags = paper_like()
    plan = plan_epoch(frags, "temporaltemperaturebag", 5, 12, seed=1, epoch=0, temperature=1.0)
    n = int(frags.video_start[-1])
    assert sorted(plan.bags[:, 0].tolist()) == list(range(n))
    assert plan.n_batches == n // 12
    used = plan.batches.reshape(-1)
    assert len(set(used.tolist())) == len(used)  # no bag twice
    assert plan.skipped["bags_left_at_epoch_end"] == n - plan.n_batches * 12
    # a bag's members are fragments of its anchor's video
    for bag in plan.bags[:50]:
        assert len(set(frags.video_of(bag).tolist())) == 1


def test_plan_depends_on_seed_and_epoch_only():
    frags = paper_like()
    args = ("temporaltemperaturebag", 5, 12)
    a = plan_epoch(frags, *args, seed=3, epoch=2, temperature=temporal_temperature(2, 10, 0.3, 12))
    b = plan_epoch(frags, *args, seed=3, epoch=2, temperature=temporal_temperature(2, 10, 0.3, 12))
    c = plan_epoch(frags, *args, seed=3, epoch=3, temperature=temporal_temperature(3, 10, 0.3, 12))
    assert np.array_equal(a.bags, b.bags) and np.array_equal(a.batches, b.batches)
    assert not np.array_equal(a.batches, c.batches)


@pytest.mark.parametrize("seed", range(3))
def test_same_video_pair_rate_of_the_plan_matches_a_global_shuffle(seed):
    frags = paper_like(seed)
    rates = []
    for epoch in range(20):
        plan = plan_epoch(frags, "temporaltemperaturebag", 5, 12, seed=seed, epoch=epoch, temperature=1.0)
        videos = frags.video_of(plan.bags[plan.batches, 0])  # [G, n_bags]
        rates += [same_video_pair_rate(v) for v in videos]
    expected = global_shuffle_pair_rate(np.diff(frags.video_start))
    measured = float(np.mean(rates))
    # the plan is a global shuffle: the mean over ~900 batches is within a few % of the expectation
    assert abs(measured - expected) / expected < 0.1, (measured, expected)


def test_distinct_identities_per_batch_and_few_bags_left_out():
    rng = np.random.default_rng(0)
    identity = rng.integers(0, 30, size=600)
    batches, skipped = global_batches(identity, 12, np.random.default_rng(1), distinct_identities=True)
    assert len(batches) >= 600 // 12 - 3
    for row in batches:
        assert len(set(identity[row].tolist())) == 12
    assert len(set(batches.reshape(-1).tolist())) == batches.size
    assert skipped["bags_left_at_epoch_end"] == 600 - batches.size


def test_distinct_identities_with_one_dominant_identity_is_bounded():
    identity = np.array([0] * 5000 + list(range(1, 40)) * 5)
    batches, skipped = global_batches(identity, 4, np.random.default_rng(0), distinct_identities=True)
    for row in batches:
        assert len(set(identity[row].tolist())) == 4
    assert skipped["multipos_bag_identity_in_every_waiting_batch"] > 0


def test_multipos_plan_has_distinct_identities():
    frags = split_fragments([40] * 10, identities_per_video=3)
    plan = plan_epoch(frags, "multipos", 4, 6, seed=0, epoch=0, temperature=1.0)
    assert plan.n_batches > 0
    for row in plan.batches:
        ids = frags.identity[plan.bags[row, 0]]
        assert len(set(ids.tolist())) == 6
        for bag in plan.bags[row]:  # a multipos bag is one identity
            assert len(set(frags.identity[bag].tolist())) == 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2, 5])
def test_streams_together_yield_every_plan_batch(world_size, num_workers):
    n_global = 37
    per_worker, per_rank = epoch_batches(n_global * 12, 12, world_size, num_workers)
    nw = max(num_workers, 1)
    seen: Counter = Counter()
    for rank in range(world_size):
        order = []
        for w in range(nw):
            order.append(stream_batches(n_global, rank, world_size, w, num_workers, per_worker))
        # the loader's order: worker 0's first, worker 1's first, ...
        rank_seq = np.stack(order, axis=1).reshape(-1)
        assert len(rank_seq) == per_rank
        expected = (rank + np.arange(per_rank) * world_size) % n_global
        assert np.array_equal(rank_seq, expected)
        seen.update(rank_seq.tolist())
    assert set(seen) == set(range(n_global))
    # equal step counts make some batches repeat, but no batch more than the rounding requires
    assert max(seen.values()) <= -(-per_rank * world_size // n_global)
