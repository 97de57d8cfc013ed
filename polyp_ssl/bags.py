"""Bag samplers over the fragments of one video (docs/method.md): pure numpy, a Generator in, no I/O.

A bag is `n_views` fragment indices, the anchor first. All samplers take the same arrays (one
entry per fragment of the video) and return the bags plus counts of anchors that got none.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SAMPLERS = ("temporaltemperaturebag", "temporalknnbag", "multipos", "tracklet")


# how the temperature schedule's length is chosen: "epochs" = --max_epochs (the paper's; a run stopped
# early by --max_steps sees only the start of it), "steps" = the epochs the run trains (from --max_steps),
# so that a short run sweeps the whole range and its last epoch is at t_max
TTB_SCHEDULES = ("epochs", "steps")


def temporal_temperature(epoch: int, max_epochs: int, t_min: float, t_max: float) -> float:
    """Cosine schedule T(c) = t_min + (1 - cos(pi c)) / 2 (t_max - t_min), c = epoch / max_epochs."""
    c = min(max(epoch / max(max_epochs, 1), 0.0), 1.0)
    return t_min + (1.0 - math.cos(math.pi * c)) / 2.0 * (t_max - t_min)


@dataclass(frozen=True)
class TemperatureSchedule:
    """The temporal temperature of each epoch: the cosine schedule from t_min to t_max over `span`
    epochs (c = epoch / span, capped at 1)."""

    t_min: float
    t_max: float
    span: int

    def at(self, epoch: int) -> float:
        return temporal_temperature(epoch, self.span, self.t_min, self.t_max)


def epochs_trained(max_epochs: int, max_steps: int, batches_per_epoch: int) -> int:
    """The epochs a run trains: --max_epochs, or fewer when --max_steps (> 0) ends it first."""
    if max_steps <= 0 or batches_per_epoch <= 0:
        return max_epochs
    return max(1, min(max_epochs, -(-max_steps // batches_per_epoch)))


def temperature_schedule(
    mode: str, t_min: float, t_max: float, max_epochs: int, max_steps: int = -1, batches_per_epoch: int = 0
) -> TemperatureSchedule:
    """--sampler_ttb_schedule `mode`: "epochs" spans --max_epochs (the paper's: epoch e is at
    c = e / max_epochs); "steps" spans the epochs trained, first at t_min and last at t_max
    (c = e / (epochs_trained - 1)); a run of one epoch stays at t_min."""
    if mode not in TTB_SCHEDULES:
        raise ValueError(f"--sampler_ttb_schedule {mode!r}: choose one of {', '.join(TTB_SCHEDULES)}")
    if mode == "epochs":
        return TemperatureSchedule(t_min, t_max, max_epochs)
    trained = epochs_trained(max_epochs, max_steps, batches_per_epoch)
    return TemperatureSchedule(t_min, t_max, max(trained - 1, 1))


def temporal_ranks(positions: np.ndarray, anchor: int) -> np.ndarray:
    """order[r] = fragment index of rank r by |position difference| to the anchor; order[0] = anchor
    (ties broken by fragment index)."""
    dist = np.abs(positions - positions[anchor])
    not_anchor = np.arange(len(positions)) != anchor
    return np.lexsort((np.arange(len(positions)), not_anchor, dist))


def gumbel_top_k_ranks(n_others: int, k: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """k distinct ranks from 1..n_others drawn without replacement with P(r) ∝ exp(-r / T)."""
    ranks = np.arange(1, n_others + 1)
    keys = -ranks / temperature + rng.gumbel(size=n_others)
    top = np.argpartition(-keys, k - 1)[:k] if k < n_others else np.arange(n_others)
    top = top[np.argsort(-keys[top])]
    return ranks[top]


@dataclass
class BagResult:
    bags: np.ndarray  # int64 [n_bags, n_views], column 0 = anchor
    skipped: Counter = field(default_factory=Counter)  # reason -> anchors (or videos) without a bag


def eligible_anchors(sampler: str, tracklets: np.ndarray, identities: np.ndarray, n_views: int) -> np.ndarray:
    """Boolean mask of the fragments that can anchor a bag of n_views distinct fragments."""
    n = len(tracklets)
    if sampler in ("temporaltemperaturebag", "temporalknnbag"):
        return np.full(n, n >= n_views)
    groups = identities if sampler == "multipos" else tracklets
    known = groups >= 0 if sampler == "multipos" else np.ones(n, dtype=bool)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return known & (counts[inverse] >= n_views)


def sample_bags(
    sampler: str,
    positions: np.ndarray,
    tracklets: np.ndarray,
    identities: np.ndarray,
    anchors: np.ndarray,
    n_views: int,
    rng: np.random.Generator,
    temperature: float = 1.0,
) -> BagResult:
    """Bags for the given anchors (fragment indices) of one video.

    temporaltemperaturebag: the others ranked by |position difference|, K = n_views - 1 ranks drawn
    by Gumbel top-k with P(r) ∝ exp(-r / T); temporalknnbag: the K nearest in time; multipos: K other
    fragments of the same identity (identity -1 = unknown, never grouped); tracklet: K other
    fragments of the same tracklet. Anchors that cannot get K distinct others are skipped, counted.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    k = n_views - 1
    skipped: Counter = Counter()
    if n < n_views:
        skipped["video_too_few_fragments"] += len(anchors)
        return BagResult(np.zeros((0, n_views), dtype=np.int64), skipped)
    ok = eligible_anchors(sampler, np.asarray(tracklets), np.asarray(identities), n_views)
    bags = []
    for a in np.asarray(anchors, dtype=np.int64):
        if not ok[a]:
            skipped[f"{sampler}_group_too_small"] += 1
            continue
        if sampler == "temporaltemperaturebag":
            order = temporal_ranks(positions, a)
            others = order[gumbel_top_k_ranks(n - 1, k, temperature, rng)]
        elif sampler == "temporalknnbag":
            others = temporal_ranks(positions, a)[1 : k + 1]
        else:
            groups = identities if sampler == "multipos" else tracklets
            pool = np.flatnonzero((np.asarray(groups) == groups[a]) & (np.arange(n) != a))
            others = rng.choice(pool, size=k, replace=False)
        bags.append(np.concatenate([[a], others]))
    arr = np.asarray(bags, dtype=np.int64).reshape(-1, n_views)
    return BagResult(arr, skipped)


def epoch_anchors(eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The anchors of one pass over a video: every eligible fragment exactly once, shuffled
    (docs/method.md: "for each fragment, taken as the anchor ... a bag is the anchor and K more
    fragments")."""
    return rng.permutation(np.flatnonzero(np.asarray(eligible, dtype=bool)))
