"""Bootstrap intervals over units: estimates equal the metrics, resampling equals rebuilding the data
with units repeated, intervals are reproducible, cover the truth at about the nominal rate, and
paired intervals of a difference are narrower than the separate ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from polyp_ssl.eval.intervals import (
    Classification,
    Interval,
    MeanOverUnits,
    PairRanking,
    RatioOverUnits,
    bootstrap_interval,
    paired_interval,
    pairs_of,
    percentile_interval,
    resample_counts,
)
from polyp_ssl.eval.metrics import matrix_blocks, reid_metrics, retrieval_metrics
from polyp_ssl.eval.probe import probe_metrics


def _clustered_scores(rng: np.random.Generator, n_polyps: int = 12, per: int = 3):
    identity = np.repeat(np.arange(n_polyps), per)
    centres = rng.normal(size=(n_polyps, 6))
    x = centres[identity] + 0.9 * rng.normal(size=(identity.size, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = np.round(x @ x.T, 2)  # rounding makes ties
    return s, identity


def test_resamples_are_reproducible_and_seeded():
    a, b = resample_counts(7, 50, seed=3), resample_counts(7, 50, seed=3)
    assert np.array_equal(a, b) and a.dtype == np.int32
    assert (a.sum(axis=1) == 7).all()
    assert not np.array_equal(a, resample_counts(7, 50, seed=4))
    rng = np.random.default_rng(0)
    stat = MeanOverUnits(rng.random(40), np.repeat(np.arange(10), 4))
    i1, i2 = bootstrap_interval(stat, 300, seed=5), bootstrap_interval(stat, 300, seed=5)
    assert i1 == i2 and isinstance(i1, Interval)
    assert bootstrap_interval(stat, 300, seed=6) != i1
    est, low, high = i1
    assert low <= est <= high and i1.n_units == 10 and i1.n_resamples == 300


def test_estimates_equal_the_metrics():
    rng = np.random.default_rng(1)
    s, identity = _clustered_scores(rng)
    reid = reid_metrics(*matrix_blocks(s), identity)
    ps, same, ua, ub = pairs_of(s, identity)
    for metric, want in (("auroc", reid.auroc), ("aupr", reid.aupr)):
        stat = PairRanking(ps, same, ua, ub, metric)
        assert stat(np.ones((1, 12), dtype=np.int32))[0] == pytest.approx(want, abs=1e-12)
        assert bootstrap_interval(stat, 50).estimate == pytest.approx(want, abs=1e-12)
    assert reid.auroc == pytest.approx(roc_auc_score(same, ps))
    ret = retrieval_metrics(*matrix_blocks(s), identity)
    mean = MeanOverUnits(ret.ap, identity)
    assert bootstrap_interval(mean, 50).estimate == pytest.approx(ret.mAP, abs=1e-12)
    # per-polyp probe predictions
    y = rng.integers(0, 3, size=30)
    pred = np.where(rng.random(30) < 0.7, y, rng.integers(0, 3, size=30))
    units = np.arange(30)
    want = probe_metrics(y, pred, [str(u) for u in units])
    for metric in ("accuracy", "macro_f1", "balanced_accuracy"):
        got = bootstrap_interval(Classification(y, pred, units, metric), 20).estimate
        assert got == pytest.approx(want[metric], abs=1e-12), metric
    ratio = RatioOverUnits([1, 2, 3], [2, 2, 4], ["v0", "v1", "v2"])
    assert bootstrap_interval(ratio, 20).estimate == pytest.approx(6 / 8)


def _rebuilt_pairs(s: np.ndarray, identity: np.ndarray, counts: np.ndarray):
    """The pair list of the dataset with polyp u's tracklets copied counts[u] times: pairs of
    different copies of one polyp are not formed (each copy is its own cluster)."""
    rows = [
        (t, u, c) for u in range(counts.size) for c in range(counts[u]) for t in np.flatnonzero(identity == u)
    ]
    scores, labels = [], []
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            (ta, ua, ca), (tb, ub, cb) = rows[a], rows[b]
            if ua == ub and ca != cb:
                continue
            scores.append(s[ta, tb])
            labels.append(ua == ub)
    return np.array(scores), np.array(labels)


def test_resample_weights_equal_rebuilding_the_resampled_data():
    rng = np.random.default_rng(2)
    s, identity = _clustered_scores(rng, n_polyps=6, per=3)
    ps, same, ua, ub = pairs_of(s, identity)
    counts = resample_counts(6, 5, seed=0)
    auroc, aupr = PairRanking(ps, same, ua, ub, "auroc"), PairRanking(ps, same, ua, ub, "aupr")
    got_auroc, got_aupr = auroc(counts), aupr(counts)
    for r in range(5):
        sc, lab = _rebuilt_pairs(s, identity, counts[r])
        if lab.all() or not lab.any():
            assert math.isnan(got_auroc[r])
            continue
        assert got_auroc[r] == pytest.approx(roc_auc_score(lab, sc), abs=1e-12)
        assert got_aupr[r] == pytest.approx(average_precision_score(lab, sc), abs=1e-12)
    # a mean over queries: the same as repeating each polyp's queries
    values = rng.random(18)
    mean = MeanOverUnits(values, identity)(counts)
    for r in range(5):
        assert mean[r] == pytest.approx(np.mean(np.repeat(values, counts[r][identity])))


def test_bernoulli_rate_interval_covers_at_about_the_nominal_rate():
    rng = np.random.default_rng(10)
    p, n_units, covered = 0.3, 80, 0
    for d in range(200):
        successes = (rng.random(n_units) < p).astype(float)
        iv = bootstrap_interval(MeanOverUnits(successes, np.arange(n_units)), 400, seed=d)
        covered += iv.low <= p <= iv.high
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_auroc_interval_of_two_normals_covers_at_about_the_nominal_rate():
    rng = np.random.default_rng(11)
    truth = 0.5 * (1 + math.erf(1.0 / 2.0))  # P(X > Y), X ~ N(1, 1), Y ~ N(0, 1): Phi(1 / sqrt(2))
    covered = 0
    for d in range(200):
        scores = np.r_[rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 60)]
        labels = np.r_[np.ones(60, bool), np.zeros(60, bool)]
        unit = np.arange(120)  # each score its own unit
        iv = bootstrap_interval(PairRanking(scores, labels, unit, unit, "auroc"), 400, seed=d)
        covered += iv.low <= truth <= iv.high
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_paired_difference_is_narrower_than_separate_intervals():
    rng = np.random.default_rng(12)
    n = 60
    difficulty = rng.normal(0.6, 0.15, n)  # per-polyp: both encoders find the same polyps hard
    a = difficulty + rng.normal(0, 0.02, n)
    b = difficulty - 0.03 + rng.normal(0, 0.02, n)
    units = [f"p{i}" for i in range(n)]
    sa, sb = MeanOverUnits(a, units), MeanOverUnits(b, units)
    ia, ib, diff = bootstrap_interval(sa), bootstrap_interval(sb), paired_interval(sa, sb)
    assert diff.estimate == pytest.approx(ia.estimate - ib.estimate)
    width = diff.high - diff.low
    assert width < 0.25 * min(ia.high - ia.low, ib.high - ib.low)
    assert diff.low > 0  # the 0.03 advantage is resolved, though the separate intervals overlap
    assert ia.low < ib.high
    # re-identification: encoder B = A's scores plus a little noise, on the same pairs
    s, identity = _clustered_scores(rng, n_polyps=20, per=3)
    ps, same, ua, ub = pairs_of(s, identity)
    pa = PairRanking(ps, same, ua, ub)
    pb = PairRanking(ps + rng.normal(0, 0.05, ps.size), same, ua, ub)
    ra, rb, rd = bootstrap_interval(pa, 500), bootstrap_interval(pb, 500), paired_interval(pa, pb, 500)
    assert rd.high - rd.low < 0.5 * min(ra.high - ra.low, rb.high - rb.low)


def test_blocks_of_resamples_do_not_change_the_result():
    rng = np.random.default_rng(13)
    s, identity = _clustered_scores(rng)
    stat = PairRanking(*pairs_of(s, identity), "aupr")
    assert bootstrap_interval(stat, 200, memory_bytes=1) == bootstrap_interval(stat, 200)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same units"):
        paired_interval(MeanOverUnits([1.0, 2.0], ["a", "b"]), MeanOverUnits([1.0, 2.0], ["a", "c"]))
    with pytest.raises(ValueError, match="units: 3 entries for 2 rows"):
        MeanOverUnits([1.0, 2.0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown metric"):
        Classification([0], [0], [0], "recall")
    with pytest.raises(ValueError, match="finite"):
        PairRanking([0.1, np.nan], [True, False], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="level"):
        percentile_interval(0.5, np.ones(3), level=1.5)
    # a resample where the statistic is undefined is counted, not averaged in
    iv = bootstrap_interval(PairRanking([0.9, 0.1], [True, False], [0, 1], [0, 1]), 200)
    assert iv.estimate == 1.0 and 0 < iv.n_undefined < 200
