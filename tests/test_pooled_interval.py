"""The pooled paired difference over training seeds (eval.intervals.pooled_paired_interval): its
estimate is the mean of the seeds' paired differences, its two-level bootstrap interval covers the
true difference at about the nominal rate on simulated metrics, and it refuses unpaired inputs."""

from __future__ import annotations

import numpy as np
import pytest

from polyp_ssl.eval.intervals import (
    MeanOverUnits,
    paired_interval,
    pooled_paired_interval,
    resample_counts,
    seed_counts,
)


def simulate(rng: np.random.Generator, n_seeds: int, n_units: int, delta: float):
    """Per seed, per-query scores of arms A and B on the same test polyps (1-3 queries each): a
    polyp's difficulty is shared by both arms and every seed, its effect on the difference by every
    seed; each seed adds its own offset; queries add noise. The true mean difference is `delta`."""
    per_unit = rng.integers(1, 4, size=n_units)
    units = np.repeat(np.arange(n_units), per_unit)
    difficulty = rng.normal(0.6, 0.15, n_units)[units]
    unit_effect = rng.normal(0.0, 0.08, n_units)[units]
    stats_a, stats_b = [], []
    for _ in range(n_seeds):
        offset = rng.normal(0.0, 0.02)
        base = difficulty + rng.normal(0.0, 0.05, units.size)
        a = base + delta + unit_effect + offset + rng.normal(0.0, 0.03, units.size)
        stats_a.append(MeanOverUnits(a, units))
        stats_b.append(MeanOverUnits(base, units))
    return stats_a, stats_b


def test_the_estimate_is_the_mean_of_the_seeds_paired_differences():
    rng = np.random.default_rng(0)
    a, b = simulate(rng, 3, 30, 0.05)
    iv = pooled_paired_interval(a, b, n_resamples=300, seed=1)
    ones = np.ones((1, a[0].unit_labels.size), dtype=np.int32)
    per_seed = [float(x(ones)[0] - y(ones)[0]) for x, y in zip(a, b, strict=True)]
    assert iv.estimate == pytest.approx(np.mean(per_seed))
    assert iv.low < iv.estimate < iv.high
    assert iv.n_units == 30 and iv.n_resamples == 300
    # one seed: the seed draw is that seed every time, so it is the per-seed paired interval
    one = pooled_paired_interval(a[:1], b[:1], n_resamples=300, seed=1)
    same = paired_interval(a[0], b[0], n_resamples=300, seed=1)
    assert (one.estimate, one.low, one.high) == pytest.approx((same.estimate, same.low, same.high))


def test_seed_draws_are_reproducible_and_sum_to_the_seeds():
    c = seed_counts(4, 50, 7)
    assert c.shape == (50, 4) and (c.sum(axis=1) == 4).all()
    assert np.array_equal(c, seed_counts(4, 50, 7)) and not np.array_equal(c, seed_counts(4, 50, 8))
    assert not np.array_equal(resample_counts(4, 50, 7), c)


@pytest.mark.parametrize("n_seeds", [5, 10])
def test_the_interval_covers_the_true_difference_at_about_the_nominal_rate(n_seeds):
    rng = np.random.default_rng(n_seeds)
    delta, reps, covered, widths = 0.04, 200, 0, []
    for r in range(reps):
        a, b = simulate(rng, n_seeds, 40, delta)
        iv = pooled_paired_interval(a, b, n_resamples=400, seed=r)
        covered += iv.low <= delta <= iv.high
        widths.append(iv.high - iv.low)
    rate = covered / reps
    # nominal 0.95; a percentile bootstrap over few seeds runs a little narrow (about (S-1)/S of
    # the seed variance), so a few points below 0.95 is expected, far below or at 1.0 is a bug
    assert 0.86 <= rate <= 0.99, rate
    assert np.median(widths) > 0


def test_independent_unit_draws_per_seed_would_cover_too_rarely():
    """The design choice the docstring states: sharing a resample's units across seeds is what
    keeps the coverage; the same data with each seed's units drawn independently undercovers."""
    rng = np.random.default_rng(3)
    delta, reps, shared, independent = 0.04, 150, 0, 0
    for r in range(reps):
        a, b = simulate(rng, 8, 40, delta)
        iv = pooled_paired_interval(a, b, n_resamples=300, seed=r)
        shared += iv.low <= delta <= iv.high
        seeds = seed_counts(8, 300, r).astype(float)
        diffs = np.stack(
            [
                x(resample_counts(40, 300, 1000 * r + s)) - y(resample_counts(40, 300, 1000 * r + s))
                for s, (x, y) in enumerate(zip(a, b, strict=True))
            ],
            axis=1,
        )
        lo, hi = np.quantile((seeds * diffs).sum(axis=1) / 8, [0.025, 0.975])
        independent += lo <= delta <= hi
    assert shared / reps > independent / reps + 0.1, (shared, independent)


def test_unpaired_inputs_are_refused():
    rng = np.random.default_rng(0)
    a, b = simulate(rng, 3, 20, 0.0)
    with pytest.raises(ValueError, match="same seeds"):
        pooled_paired_interval(a, b[:2])
    other = MeanOverUnits(np.ones(5), np.arange(5))
    with pytest.raises(ValueError, match="same test units"):
        pooled_paired_interval([*a[:2], other], b)
