"""Bootstrap intervals of each evaluation task's metrics (the wiring of eval/intervals.py).

Each task turns its per-unit results into statistics of unit multiplicities (a dict metric ->
statistic); :func:`intervals` bootstraps them, :func:`paired` bootstraps the difference of two
encoders' statistics on the same resamples. The unit is the polyp by default (tracklets and
fragments of one polyp are near-duplicates, not independent samples) or the video; counting
clusters within a video, so its unit is always the video.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polyp_ssl.eval.intervals import (
    Classification,
    Interval,
    MeanOverUnits,
    PairRanking,
    RatioOverUnits,
    UnitStatistic,
    bootstrap_interval,
    paired_interval,
)

log = logging.getLogger(__name__)

CI_UNITS = ("polyp", "video")
DEFAULT_CI_RESAMPLES = 1000
Stats = dict[str, UnitStatistic]


@dataclass(frozen=True)
class CiOptions:
    """What the intervals resample: `unit` (polyp | video), `resamples` (0: no intervals), `seed`."""

    unit: str = "polyp"
    resamples: int = DEFAULT_CI_RESAMPLES
    seed: int = 0
    level: float = 0.95

    @property
    def enabled(self) -> bool:
        return self.resamples > 0

    def validate(self) -> None:
        if self.unit not in CI_UNITS:
            raise ValueError(f"--ci_unit must be one of {', '.join(CI_UNITS)}, got {self.unit!r}")
        if self.resamples < 0:
            raise ValueError(f"--ci_resamples must be >= 0 (0 disables the intervals), got {self.resamples}")

    def as_dict(self) -> dict[str, object]:
        return {"unit": self.unit, "resamples": self.resamples, "seed": self.seed, "level": self.level}


def add_ci_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("confidence intervals (bootstrap over units)")
    g.add_argument(
        "--ci_unit",
        choices=CI_UNITS,
        default="polyp",
        help="what a bootstrap resample draws with replacement (counting always resamples videos)",
    )
    g.add_argument(
        "--ci_resamples",
        type=int,
        default=DEFAULT_CI_RESAMPLES,
        help="bootstrap resamples of the 95%% intervals; 0 disables them",
    )
    g.add_argument("--ci_seed", type=int, default=0, help="seed of the resamples (same seed, same intervals)")


def ci_options(args: argparse.Namespace) -> CiOptions:
    opts = CiOptions(unit=args.ci_unit, resamples=args.ci_resamples, seed=args.ci_seed)
    opts.validate()
    return opts


def _units(unit: str, identity: Sequence, video: Sequence | None) -> np.ndarray:
    if unit == "video":
        if video is None:
            raise ValueError("--ci_unit video needs each row's video")
        return np.asarray(video).astype(str)
    return np.asarray(identity).astype(str)


def retrieval_stats(
    ap: np.ndarray,
    hits: dict[int, np.ndarray],
    valid: np.ndarray,
    identity: Sequence,
    video: Sequence | None,
    unit: str,
) -> Stats:
    """mAP and HR@k as means over the queries with a positive, weighted by their unit's draws."""
    units = _units(unit, identity, video)
    stats: Stats = {"mAP": MeanOverUnits(ap, units)}
    for k, h in hits.items():
        stats[f"HR@{k}"] = MeanOverUnits(np.where(valid, h.astype(np.float64), np.nan), units)
    return stats


def reid_stats(vectors: np.ndarray, identity: Sequence, video: Sequence | None, unit: str) -> Stats:
    """AUROC and AUPR over every pair, a pair weighing the product of its two units' draws."""
    from polyp_ssl.eval.metrics import reid_pairs

    scores, same, ua, ub = reid_pairs(vectors, identity, _units(unit, identity, video))
    return {
        "AUROC": PairRanking(scores, same, ua, ub, "auroc"),
        "AUPR": PairRanking(scores, same, ua, ub, "aupr"),
    }


def probe_stats(
    y_true: np.ndarray, y_pred: np.ndarray, identity: Sequence, video: Sequence | None, unit: str
) -> Stats:
    """The probe's val metrics (eval.probe.probe_metrics) over resampled val units."""
    from polyp_ssl.eval.probe import identity_weights

    units = _units(unit, identity, video)
    stats: Stats = {m: Classification(y_true, y_pred, units, m) for m in ("accuracy", "balanced_accuracy")}
    stats["macro_f1"] = Classification(y_true, y_pred, units, "macro_f1")
    stats["identity_weighted_macro_f1"] = Classification(
        y_true, y_pred, units, "macro_f1", weights=identity_weights(np.asarray(identity).astype(str))
    )
    return stats


def count_stats(per_video: Sequence[dict]) -> Stats:
    """Fragmentation rate (mean over videos) and pooled test FPR, resampling videos."""
    vids = [str(r["video_id"]) for r in per_video]
    stats: Stats = {"fragmentation_rate": MeanOverUnits([r["fragmentation"] for r in per_video], vids)}
    if sum(r["different_pairs"] for r in per_video) > 0:  # else the FPR is 0 by definition: no interval
        stats["FPR"] = RatioOverUnits(
            [r["false_merges"] for r in per_video], [r["different_pairs"] for r in per_video], vids
        )
    return stats


def intervals(stats: Stats, opts: CiOptions) -> dict[str, Interval]:
    """Each statistic's interval with the same resamples (the seed); {} when disabled."""
    if not opts.enabled:
        return {}
    t0 = time.perf_counter()
    out = {name: bootstrap_interval(s, opts.resamples, opts.seed, opts.level) for name, s in stats.items()}
    log.info(
        "%d bootstrap resamples over %ss for %s: %.2f s",
        opts.resamples,
        opts.unit,
        ", ".join(stats),
        time.perf_counter() - t0,
    )
    return out


def paired(stats_a: Stats, stats_b: Stats, opts: CiOptions) -> dict[str, Interval]:
    """Interval of a - b per metric both have, on the same resamples; a metric whose two statistics
    have different units (e.g. another split) is left out with a warning."""
    if not opts.enabled:
        return {}
    out = {}
    for name in stats_a.keys() & stats_b.keys():
        try:
            out[name] = paired_interval(stats_a[name], stats_b[name], opts.resamples, opts.seed, opts.level)
        except ValueError as e:
            log.warning("%s: no paired difference: %s", name, e)
    return out
