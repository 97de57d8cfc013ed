import numpy as np
import pytest

from polyp_ssl.bags import (
    eligible_anchors,
    epoch_anchors,
    gumbel_top_k_ranks,
    sample_bags,
    temporal_ranks,
    temporal_temperature,
)


def test_temperature_schedule():
    assert temporal_temperature(0, 50, 0.3, 12) == pytest.approx(0.3)
    assert temporal_temperature(50, 50, 0.3, 12) == pytest.approx(12)
    assert temporal_temperature(25, 50, 0.3, 12) == pytest.approx(0.3 + 0.5 * 11.7)
    values = [temporal_temperature(e, 50, 0.3, 12) for e in range(51)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def _video(n=40, seed=0):
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.uniform(size=n))
    trk = np.arange(n) // 4
    ide = trk % 3
    return pos, trk, ide


@pytest.mark.parametrize("sampler", ["temporaltemperaturebag", "temporalknnbag", "multipos", "tracklet"])
def test_bags_distinct_anchor_first(sampler):
    pos, trk, ide = _video()
    rng = np.random.default_rng(1)
    res = sample_bags(sampler, pos, trk, ide, np.arange(len(pos)), 4, rng, temperature=2.0)
    assert res.bags.shape[1] == 4 and len(res.bags) > 0
    for bag in res.bags:
        assert len(set(bag.tolist())) == 4
        assert ((bag >= 0) & (bag < len(pos))).all()
    assert set(res.bags[:, 0].tolist()) <= set(range(len(pos)))
    if sampler == "tracklet":
        assert (trk[res.bags] == trk[res.bags[:, :1]]).all()
    if sampler == "multipos":
        assert (ide[res.bags] == ide[res.bags[:, :1]]).all()


def test_group_samplers_skip_and_count_small_groups():
    pos = np.linspace(0, 1, 10)
    trk = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    ide = np.array([0, 0, 0, 0, 1, 1, -1, -1, -1, -1])
    res = sample_bags("tracklet", pos, trk, ide, np.arange(10), 4, np.random.default_rng(0))
    assert sorted(res.bags[:, 0].tolist()) == [0, 1, 2, 3, 6, 7, 8, 9]
    assert res.skipped["tracklet_group_too_small"] == 2
    res = sample_bags("multipos", pos, trk, ide, np.arange(10), 4, np.random.default_rng(0))
    assert sorted(res.bags[:, 0].tolist()) == [0, 1, 2, 3]  # unknown identity never groups
    assert res.skipped["multipos_group_too_small"] == 6
    assert eligible_anchors("multipos", trk, ide, 4).sum() == 4


def test_video_with_too_few_fragments_gives_no_bag():
    res = sample_bags(
        "temporalknnbag",
        np.array([0.1, 0.2]),
        np.zeros(2),
        np.zeros(2),
        np.arange(2),
        3,
        np.random.default_rng(0),
    )
    assert len(res.bags) == 0 and res.skipped["video_too_few_fragments"] == 2


def test_knn_takes_nearest_in_time():
    pos = np.array([0.0, 0.1, 0.25, 0.35, 0.9])
    res = sample_bags(
        "temporalknnbag", pos, np.zeros(5), np.zeros(5), np.array([2]), 3, np.random.default_rng(0)
    )
    assert res.bags.tolist() == [[2, 3, 1]]


def test_temporal_ranks_anchor_first_even_with_ties():
    pos = np.array([0.5, 0.5, 0.2, 0.9])
    order = temporal_ranks(pos, 1)
    assert order[0] == 1 and order[1] == 0 and sorted(order.tolist()) == [0, 1, 2, 3]


def test_gumbel_top1_marginals_match_formula():
    temperature, n_others, draws = 2.0, 8, 40000
    rng = np.random.default_rng(0)
    counts = np.zeros(n_others + 1)
    for _ in range(draws):
        counts[gumbel_top_k_ranks(n_others, 1, temperature, rng)[0]] += 1
    r = np.arange(1, n_others + 1)
    expected = np.exp(-r / temperature) / np.exp(-r / temperature).sum()
    empirical = counts[1:] / draws
    assert np.abs(empirical - expected).max() < 0.01


def test_gumbel_top_k_is_sequential_sampling_without_replacement():
    # P(first two ranks = (1, 2)) for K=2 equals p1 * p2 / (1 - p1) (Plackett-Luce)
    temperature, n_others, draws = 1.5, 5, 40000
    rng = np.random.default_rng(3)
    w = np.exp(-np.arange(1, n_others + 1) / temperature)
    p = w / w.sum()
    hits = sum(tuple(gumbel_top_k_ranks(n_others, 2, temperature, rng)) == (1, 2) for _ in range(draws))
    assert hits / draws == pytest.approx(p[0] * p[1] / (1 - p[0]), abs=0.01)


def test_mean_rank_distance_grows_with_temperature():
    pos, trk, ide = _video(n=60)
    means = []
    for temperature in (0.3, 2.0, 12.0):
        rng = np.random.default_rng(5)
        res = sample_bags("temporaltemperaturebag", pos, trk, ide, np.arange(60), 5, rng, temperature)
        ranks = []
        for bag in res.bags:
            order = temporal_ranks(pos, bag[0])
            rank_of = np.empty(60, dtype=int)
            rank_of[order] = np.arange(60)
            ranks.extend(rank_of[bag[1:]].tolist())
        means.append(np.mean(ranks))
    assert means[0] < means[1] < means[2]
    assert means[0] < 3.0  # nearly the nearest neighbours at T = 0.3


def test_same_seed_same_bags():
    pos, trk, ide = _video()
    a = sample_bags("temporaltemperaturebag", pos, trk, ide, np.arange(40), 5, np.random.default_rng(9), 4.0)
    b = sample_bags("temporaltemperaturebag", pos, trk, ide, np.arange(40), 5, np.random.default_rng(9), 4.0)
    c = sample_bags("temporaltemperaturebag", pos, trk, ide, np.arange(40), 5, np.random.default_rng(10), 4.0)
    assert (a.bags == b.bags).all()
    assert not (a.bags == c.bags).all()


def test_epoch_anchors_every_eligible_fragment_once_shuffled():
    ok = np.array([True, False, True, True, True, False, True, True, True, True])
    a = epoch_anchors(ok, np.random.default_rng(0))
    assert sorted(a.tolist()) == np.flatnonzero(ok).tolist()
    orders = {tuple(epoch_anchors(ok, np.random.default_rng(s)).tolist()) for s in range(5)}
    assert len(orders) > 1  # shuffled, seed-dependent
    assert len(epoch_anchors(np.zeros(4, bool), np.random.default_rng(0))) == 0
