"""Bootstrap confidence intervals for evaluation metrics, resampling whole units (polyps or videos).

Tracklets of one polyp (and polyps of one video) are not independent samples, so the bootstrap
draws *units* with replacement, not rows: a resample is a vector of unit multiplicities
``counts[u]`` (how often unit u was drawn; they sum to the number of units), and every statistic
here is a pure, vectorised function of those multiplicities. A row of unit u weighs ``counts[u]``;
a pair of rows of units a != b weighs ``counts[a] * counts[b]`` (every drawn copy of a meets every
drawn copy of b), a pair within one unit weighs ``counts[a]`` (each copy brings its own pairs; two
copies of one polyp are not paired with each other). So no row or pair list is rebuilt per resample:
re-identification over many pairs is one weighted AUROC / AP per resample, computed for a block of
resamples at once from the pairs sorted once.

Intervals are percentile intervals of the resampled statistic (default 95%, 2000 resamples), around
the statistic on the original data (all multiplicities 1), which equals what ``eval/metrics.py``
reports. The resamples are a function of (number of units, n_resamples, seed) only, so
:func:`paired_interval` gives two encoders evaluated on the same units the SAME resamples and
bootstraps their difference: when the encoders' per-unit results are correlated, the interval of
the difference is much narrower than the two separate intervals suggest.

Units are given as labels per row (or per pair end); statistics built on the same set of unit
labels share one coding (sorted labels), which is what makes two of them pairable.

Wiring (not done here): an evaluation task that has per-unit data — per-query APs with their polyp
ids (``RetrievalResult.ap``), pair scores/labels with the pairs' polyp ids, per-polyp probe
predictions, per-video fragmentation — builds the statistic and calls :func:`bootstrap_interval`
(or :func:`paired_interval` for encoder A vs B on the same split) and stores ``Interval.as_dict()``
next to the metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_MEMORY_BYTES = 256 * 2**20  # working set of one block of resamples


@dataclass(frozen=True)
class Interval:
    """A statistic on the original data and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float
    n_units: int
    n_resamples: int
    n_undefined: int = 0  # resamples where the statistic was undefined (left out of the percentiles)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "n_units": self.n_units,
            "n_resamples": self.n_resamples,
            "n_undefined": self.n_undefined,
        }

    def __iter__(self):  # estimate, low, high = interval
        return iter((self.estimate, self.low, self.high))


class UnitStatistic(Protocol):
    """A statistic of unit multiplicities: ``stat(counts [B, U]) -> values [B]`` (NaN = undefined)."""

    unit_labels: np.ndarray  # sorted distinct unit labels; column u of counts is unit_labels[u]

    def __call__(self, counts: np.ndarray) -> np.ndarray: ...


def _unit_codes(*unit_arrays: np.ndarray | Sequence) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted distinct labels over all arrays, and each array as codes into them."""
    arrays = [np.asarray(a) for a in unit_arrays]
    for a in arrays:
        if a.ndim != 1:
            raise ValueError(f"unit ids must be one-dimensional, got shape {a.shape}")
    labels, inverse = np.unique(np.concatenate(arrays), return_inverse=True)
    codes, start = [], 0
    for a in arrays:
        codes.append(inverse[start : start + a.size].astype(np.int64))
        start += a.size
    if labels.size == 0:
        raise ValueError("no units: a bootstrap needs at least one unit")
    return labels, codes


def _check_len(name: str, a: np.ndarray, n: int) -> None:
    if a.shape[0] != n:
        raise ValueError(f"{name}: {a.shape[0]} entries for {n} rows")


def resample_counts(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """int32 ``[n_resamples, n_units]``: how often each unit is drawn in each resample (n_units draws
    with replacement). A function of its arguments only: the same seed gives the same resamples."""
    if n_units < 1 or n_resamples < 1:
        raise ValueError(f"need n_units >= 1 and n_resamples >= 1, got {n_units}, {n_resamples}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    out = np.empty((n_resamples, n_units), dtype=np.int32)
    for r in range(n_resamples):  # one row at a time: memory O(n_units) beyond the result
        out[r] = np.bincount(rng.integers(0, n_units, size=n_units), minlength=n_units)
    return out


def percentile_interval(
    estimate: float, replicates: np.ndarray, level: float = 0.95, n_units: int = 0
) -> Interval:
    """The (1 - level) / 2 and (1 + level) / 2 percentiles of the defined replicates."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reps = np.asarray(replicates, dtype=np.float64)
    ok = np.isfinite(reps)
    alpha = (1.0 - level) / 2.0
    if ok.any():
        low, high = np.quantile(reps[ok], [alpha, 1.0 - alpha])
    else:
        low = high = math.nan
    return Interval(float(estimate), float(low), float(high), level, n_units, reps.size, int((~ok).sum()))


def _replicates(
    stat: UnitStatistic, counts: np.ndarray, per_resample_bytes: int, memory_bytes: int
) -> np.ndarray:
    """`stat` on every row of `counts`, a block of rows at a time within `memory_bytes`."""
    n = counts.shape[0]
    step = max(1, min(n, memory_bytes // max(1, per_resample_bytes)))
    out = np.empty(n, dtype=np.float64)
    for b0 in range(0, n, step):
        out[b0 : b0 + step] = stat(counts[b0 : b0 + step])
    return out


def _per_resample_bytes(stat: UnitStatistic) -> int:
    return int(getattr(stat, "bytes_per_resample", 8 * stat.unit_labels.size))


def _estimate(stat: UnitStatistic) -> float:
    return float(stat(np.ones((1, stat.unit_labels.size), dtype=np.int32))[0])


def bootstrap_interval(
    stat: UnitStatistic,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> Interval:
    """(estimate, low, high) of `stat`: its value on the data, and the percentile interval over
    `n_resamples` unit resamples drawn with `seed`."""
    n_units = stat.unit_labels.size
    counts = resample_counts(n_units, n_resamples, seed)
    reps = _replicates(stat, counts, _per_resample_bytes(stat), memory_bytes)
    return percentile_interval(_estimate(stat), reps, level, n_units)


def paired_interval(
    stat_a: UnitStatistic,
    stat_b: UnitStatistic,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> Interval:
    """Interval of the difference ``stat_a - stat_b`` of two encoders on the same units, both
    evaluated on the SAME resamples. ValueError when the two statistics have different units."""
    if not np.array_equal(stat_a.unit_labels, stat_b.unit_labels):
        raise ValueError(
            f"paired bootstrap needs the same units for both encoders: {stat_a.unit_labels.size} vs "
            f"{stat_b.unit_labels.size} units, or different unit ids"
        )
    n_units = stat_a.unit_labels.size
    counts = resample_counts(n_units, n_resamples, seed)
    per = _per_resample_bytes(stat_a) + _per_resample_bytes(stat_b)
    rep_a = _replicates(stat_a, counts, per, memory_bytes)
    rep_b = _replicates(stat_b, counts, per, memory_bytes)
    return percentile_interval(_estimate(stat_a) - _estimate(stat_b), rep_a - rep_b, level, n_units)


def seed_counts(n_seeds: int, n_resamples: int, seed: int) -> np.ndarray:
    """int32 ``[n_resamples, n_seeds]``: how often each training seed is drawn in each resample
    (n_seeds draws with replacement); independent of the unit resamples of the same `seed`."""
    if n_seeds < 1 or n_resamples < 1:
        raise ValueError(f"need n_seeds >= 1 and n_resamples >= 1, got {n_seeds}, {n_resamples}")
    rng = np.random.default_rng([int(seed), 0x5EED, 1])
    draws = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    return np.stack([np.bincount(row, minlength=n_seeds) for row in draws]).astype(np.int32)


def pooled_paired_interval(
    stats_a: Sequence[UnitStatistic],
    stats_b: Sequence[UnitStatistic],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> Interval:
    """The mean over training seeds of ``stat_a - stat_b`` (arm A vs arm B, seed s trained with
    the same seed in both arms), with a two-level bootstrap interval: each resample draws the seeds
    with replacement, then the test units; the estimate is the mean of the drawn seeds' paired
    differences. Every seed is evaluated on the same test units (one split), so a resample's unit
    multiplicities are shared by all its seeds and by both arms: a polyp that is hard for every
    seed stays one source of variance, not S independent ones (drawing units anew per seed would
    shrink the interval by up to sqrt(S)). ValueError when the seeds or arms have different units."""
    if len(stats_a) != len(stats_b) or not stats_a:
        raise ValueError(
            f"pooled interval needs the same seeds in both arms: {len(stats_a)} vs {len(stats_b)}"
        )
    labels = stats_a[0].unit_labels
    for stat in (*stats_a, *stats_b):
        if not np.array_equal(stat.unit_labels, labels):
            raise ValueError("pooled interval needs every seed and arm evaluated on the same test units")
    n_seeds, n_units = len(stats_a), labels.size
    units = resample_counts(n_units, n_resamples, seed)
    seeds = seed_counts(n_seeds, n_resamples, seed).astype(np.float64)
    per = _per_resample_bytes(stats_a[0]) + _per_resample_bytes(stats_b[0])
    diffs = np.stack(
        [
            _replicates(a, units, per, memory_bytes) - _replicates(b, units, per, memory_bytes)
            for a, b in zip(stats_a, stats_b, strict=True)
        ],
        axis=1,
    )  # [n_resamples, n_seeds]
    with np.errstate(invalid="ignore"):
        reps = (seeds * diffs).sum(axis=1) / n_seeds
    estimate = float(np.mean([_estimate(a) - _estimate(b) for a, b in zip(stats_a, stats_b, strict=True)]))
    return percentile_interval(estimate, reps, level, n_units)


# --------------------------------------------------------------------------------- statistics


class MeanOverUnits:
    """Weighted mean of per-row values, rows weighted by their unit's multiplicity (times an optional
    per-row weight): mAP over queries (rows = queries, units = their polyps), a rate over per-polyp
    successes, the fragmentation rate (rows = videos, units = videos). NaN rows (queries without a
    positive) are left out, as the metrics do."""

    def __init__(
        self,
        values: np.ndarray | Sequence[float],
        units: np.ndarray | Sequence,
        weights: np.ndarray | None = None,
    ) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        units = np.asarray(units).reshape(-1)
        _check_len("units", units, v.size)
        w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        _check_len("weights", w, v.size)
        keep = np.isfinite(v)
        self.unit_labels, (codes,) = _unit_codes(units[keep])
        n = self.unit_labels.size
        self.sum = np.bincount(codes, weights=(w * v)[keep], minlength=n)
        self.weight = np.bincount(codes, weights=w[keep], minlength=n)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        c = counts.astype(np.float64)
        den = c @ self.weight
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (c @ self.sum) / np.where(den > 0, den, 1.0), np.nan)


class RatioOverUnits:
    """``sum(numerator) / sum(denominator)`` over rows, rows weighted by their unit's multiplicity
    (a pooled rate, e.g. false-positive pairs over negative pairs counted per video)."""

    def __init__(
        self,
        numerator: np.ndarray | Sequence[float],
        denominator: np.ndarray | Sequence[float],
        units: np.ndarray | Sequence,
    ) -> None:
        num = np.asarray(numerator, dtype=np.float64).reshape(-1)
        den = np.asarray(denominator, dtype=np.float64).reshape(-1)
        units = np.asarray(units).reshape(-1)
        _check_len("denominator", den, num.size)
        _check_len("units", units, num.size)
        self.unit_labels, (codes,) = _unit_codes(units)
        n = self.unit_labels.size
        self.num = np.bincount(codes, weights=num, minlength=n)
        self.den = np.bincount(codes, weights=den, minlength=n)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        c = counts.astype(np.float64)
        d = c @ self.den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, (c @ self.num) / np.where(d > 0, d, 1.0), np.nan)


CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "balanced_accuracy")


class Classification:
    """Accuracy, macro-F1 (over the labels present in truth or prediction of the resample, 0 for a
    label never predicted nor true-positive, as scikit-learn's ``zero_division=0``) or balanced
    accuracy of per-row predictions (e.g. one row per polyp), rows weighted by their unit's
    multiplicity (times an optional per-row weight, e.g. ``eval.probe.identity_weights`` for the
    identity-weighted macro-F1). Computed from per-unit confusion matrices, so a resample costs one
    matrix product."""

    def __init__(
        self,
        y_true: np.ndarray | Sequence,
        y_pred: np.ndarray | Sequence,
        units: np.ndarray | Sequence,
        metric: str = "accuracy",
        weights: np.ndarray | Sequence[float] | None = None,
    ) -> None:
        if metric not in CLASSIFICATION_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {CLASSIFICATION_METRICS}")
        t, p = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
        units = np.asarray(units).reshape(-1)
        _check_len("y_pred", p, t.size)
        _check_len("units", units, t.size)
        self.metric = metric
        self.unit_labels, (codes,) = _unit_codes(units)
        _, (tc, pc) = _unit_codes(t, p)
        k = int(max(tc.max(), pc.max())) + 1
        self.n_classes = k
        w = np.ones(t.size) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        _check_len("weights", w, t.size)
        conf = np.zeros((self.unit_labels.size, k, k), dtype=np.float64)
        np.add.at(conf, (codes, tc, pc), w)
        self.conf = conf.reshape(self.unit_labels.size, k * k)
        self.bytes_per_resample = 8 * (self.unit_labels.size + 4 * k * k)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        k = self.n_classes
        m = (counts.astype(np.float64) @ self.conf).reshape(-1, k, k)  # [B, true, pred]
        total = m.sum(axis=(1, 2))
        tp = np.diagonal(m, axis1=1, axis2=2)
        true_n, pred_n = m.sum(axis=2), m.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.metric == "accuracy":
                return np.where(total > 0, tp.sum(axis=1) / total, np.nan)
            if self.metric == "balanced_accuracy":
                present = true_n > 0
                recall = np.where(present, tp / np.where(present, true_n, 1.0), 0.0)
                n_present = present.sum(axis=1)
                return np.where(n_present > 0, recall.sum(axis=1) / np.maximum(n_present, 1), np.nan)
            present = (true_n > 0) | (pred_n > 0)
            denom = true_n + pred_n
            f1 = np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), 0.0)
            n_present = present.sum(axis=1)
            return np.where(n_present > 0, (f1 * present).sum(axis=1) / np.maximum(n_present, 1), np.nan)


PAIR_METRICS = ("auroc", "aupr")


class PairRanking:
    """Re-identification AUROC or AUPR over scored pairs (label = same polyp), each pair weighted
    by its units' multiplicities (``counts[a] * counts[b]``, or ``counts[a]`` within one unit).

    On the original data it equals ``eval.metrics.reid_metrics`` (and scikit-learn's
    ``roc_auc_score`` / ``average_precision_score``, ties included). The pairs are sorted and
    grouped by distinct score once; a block of resamples is then a few [block, pairs] array passes.
    AUROC is the weighted Mann-Whitney statistic (ties count one half); AP sums, over the distinct
    scores holding positives, the positive weight there times the weighted precision at or above.
    """

    def __init__(
        self,
        scores: np.ndarray | Sequence[float],
        same: np.ndarray | Sequence[bool],
        unit_a: np.ndarray | Sequence,
        unit_b: np.ndarray | Sequence,
        metric: str = "auroc",
    ) -> None:
        if metric not in PAIR_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {PAIR_METRICS}")
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        y = np.asarray(same, dtype=bool).reshape(-1)
        ua, ub = np.asarray(unit_a).reshape(-1), np.asarray(unit_b).reshape(-1)
        for name, a in (("same", y), ("unit_a", ua), ("unit_b", ub)):
            _check_len(name, a, s.size)
        if not np.isfinite(s).all():
            raise ValueError("pair scores must be finite")
        self.metric = metric
        self.unit_labels, (ca, cb) = _unit_codes(ua, ub)
        order = np.argsort(s, kind="stable")  # ascending
        s, y, ca, cb = s[order], y[order], ca[order], cb[order]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # distinct-score groups
        self.same, self.ca, self.cb = y, ca, cb
        self.within = ca == cb
        self.bytes_per_resample = 8 * (4 * s.size + 6 * self.starts.size)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        c = counts.astype(np.float64)
        w = np.where(self.within, c[:, self.ca], c[:, self.ca] * c[:, self.cb])  # [B, P]
        wp = np.add.reduceat(np.where(self.same, w, 0.0), self.starts, axis=1)  # [B, G] ascending
        wn = np.add.reduceat(np.where(self.same, 0.0, w), self.starts, axis=1)
        pos, neg = wp.sum(axis=1), wn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.metric == "auroc":
                below = np.cumsum(wn, axis=1) - wn
                u = (wp * (below + 0.5 * wn)).sum(axis=1)
                return np.where((pos > 0) & (neg > 0), u / (pos * neg), np.nan)
            tp_ge = np.cumsum(wp[:, ::-1], axis=1)[:, ::-1]
            all_ge = np.cumsum((wp + wn)[:, ::-1], axis=1)[:, ::-1]
            precision = np.where(all_ge > 0, tp_ge / np.where(all_ge > 0, all_ge, 1.0), 0.0)
            return np.where(pos > 0, (wp * precision).sum(axis=1) / np.where(pos > 0, pos, 1.0), np.nan)


def pairs_of(
    scores: np.ndarray, identity: np.ndarray | Sequence, unit: np.ndarray | Sequence | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All unordered pairs i < j of a square score matrix: (scores, same identity, unit of i, unit of
    j), units defaulting to the identities (resampling polyps). For small N (tests, per-video
    evaluation); large N should collect pair scores blockwise as ``eval.metrics`` does."""
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"scores must be a square matrix, got shape {s.shape}")
    ident = np.asarray(identity).reshape(-1)
    _check_len("identity", ident, s.shape[0])
    units = ident if unit is None else np.asarray(unit).reshape(-1)
    _check_len("unit", units, s.shape[0])
    i, j = np.triu_indices(s.shape[0], k=1)
    return s[i, j], ident[i] == ident[j], units[i], units[j]


def interval_entries(intervals: dict[str, Interval]) -> dict[str, list[float]]:
    """``{metric_ci: [low, high]}`` for metrics' intervals, the form every metrics JSON uses next to
    ``{metric: value}``."""
    return {f"{name}_ci": [iv.low, iv.high] for name, iv in intervals.items()}


__all__ = [
    "CLASSIFICATION_METRICS",
    "PAIR_METRICS",
    "Classification",
    "Interval",
    "MeanOverUnits",
    "PairRanking",
    "RatioOverUnits",
    "UnitStatistic",
    "bootstrap_interval",
    "interval_entries",
    "pairs_of",
    "paired_interval",
    "percentile_interval",
    "resample_counts",
]
