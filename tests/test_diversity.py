"""Batch diversity measures against brute-force counting and a simulated global shuffle."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from polyp_ssl.diversity import (
    bag_videos,
    batch_same_video_pair_rate,
    global_shuffle_pair_rate,
    same_video_pair_rate,
)


def test_pair_rate_counts_pairs_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.integers(0, 5, size=int(rng.integers(2, 14)))
        pairs = list(itertools.combinations(range(len(v)), 2))
        expect = sum(v[i] == v[j] for i, j in pairs) / len(pairs)
        assert abs(same_video_pair_rate(v) - expect) < 1e-12
    assert same_video_pair_rate(np.array([3])) == 0.0


def test_bag_videos_takes_each_bags_video_in_bag_order():
    bag = np.array([0, 0, 1, 1, 2, 2])
    video = np.array([7, 7, 3, 3, 7, 7])
    assert bag_videos(bag, video).tolist() == [7, 3, 7]


def test_global_shuffle_expectation_matches_a_simulated_shuffle():
    anchors = np.array([40, 10, 25, 5, 20])
    pool = np.repeat(np.arange(len(anchors)), anchors)
    rng = np.random.default_rng(1)
    rates = [same_video_pair_rate(rng.permutation(pool)[:12]) for _ in range(20000)]
    assert abs(np.mean(rates) - global_shuffle_pair_rate(anchors)) < 0.003
    assert global_shuffle_pair_rate(np.array([1])) == 0.0


def test_the_tensor_version_equals_the_bag_level_count():
    rng = np.random.default_rng(2)
    for n_bags, views in ((2, 1), (6, 2), (12, 5)):
        bag = np.repeat(np.arange(n_bags), views)
        video = np.repeat(rng.integers(0, 4, size=n_bags), views)
        got = batch_same_video_pair_rate(torch.as_tensor(bag), torch.as_tensor(video))
        assert abs(float(got) - same_video_pair_rate(bag_videos(bag, video))) < 1e-6
    one = batch_same_video_pair_rate(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert float(one) == 0.0


def test_bag_positive_rates_against_a_hand_count():
    from polyp_ssl.diversity import bag_positive_rates

    identity = np.array([0, 0, 1, -1, 1, 0])
    tracklet = np.array([0, 1, 2, 3, 2, 0])
    bags = np.array([[0, 1, 2], [2, 4, 3], [5, 0, 1]])
    r = bag_positive_rates(bags, identity, tracklet)
    # known pairs: (0,1) same, (0,2) no, (2,4) same, (2,3) unknown, (5,0) same, (5,1) same -> 4 / 5
    assert r["same_identity"] == 4 / 5
    # same tracklet: (0,1) no, (0,2) no, (2,4) yes, (2,3) no, (5,0) yes, (5,1) no -> 2 / 6
    assert r["same_tracklet"] == 2 / 6 and r["members"] == 6
