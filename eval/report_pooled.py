"""Paired differences pooled over training seeds, for `report` rows that are the same method
trained with several seeds.

An *arm* is the set of trained rows whose runs have the same settings except the seed (their
config.yaml compared without `seed` and the per-invocation keys: run name, runs folder, resume,
logging). When an arm holds two or more seeds, its difference to a reference is pooled: the mean
over seeds of the paired difference (seed s of the arm minus the reference of seed s), with a
two-level bootstrap interval (seeds drawn with replacement, then the test units, the same draws
for both sides; eval.intervals.pooled_paired_interval). The reference of a seed is the row the
per-row differences use (its own initialisation by default, or the `--baseline` row); when the
`--baseline` row belongs to another arm, seed s is compared with that arm's seed s.

A single seed's interval says how much the test polyps move the number; the pooled interval also
says how much a retrain with another seed does, which is what a comparison of methods needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.eval.intervals import Interval, pooled_paired_interval
from polyp_ssl.eval.report_tasks import SubjectResult
from polyp_ssl.eval.task_intervals import CiOptions

# settings of a run's config.yaml that do not make another method: the seed (what an arm pools
# over) and the invocation's own keys (names, folders, logging, resuming, checkpoint cadence)
NOT_METHOD = (
    "seed",
    "exp_name",
    "exp_id",
    "runs_dir",
    "resume",
    "data_log",
    "logger",
    "wandb_project",
    "log_every_n_steps",
    "ckpt_every_n_steps",
    "skip_memory_check",
    "num_workers",
    "devices",
)
_SEED_SUFFIX = re.compile(r"[_-]?(?:s|seed)?\d+$")


@dataclass
class Arm:
    """Trained rows of one method, by training seed."""

    name: str
    key: str
    rows: dict[int, SubjectResult] = field(default_factory=dict)


@dataclass
class PooledDifference:
    """`arm` minus `versus`, pooled over `seeds`: (task, metric) -> interval."""

    arm: str
    versus: str
    seeds: list[int]
    intervals: dict[tuple[str, str], Interval]


def run_settings(result: SubjectResult) -> dict[str, Any] | None:
    """The settings of the run a trained row's checkpoint comes from (RUN/checkpoints/x.ckpt ->
    RUN/config.yaml), or None for rows without one (baselines, loose checkpoints, embeddings)."""
    from polyp_ssl.shards.textio import TextInputError, load_yaml

    s = result.subject
    if s.kind != "checkpoint":
        return None
    config = Path(s.spec).parent.parent / "config.yaml"
    if not config.is_file():
        return None
    try:
        loaded = load_yaml(config, "run config")
    except (TextInputError, OSError):
        return None
    return loaded if isinstance(loaded, dict) else None


def method_key(settings: dict[str, Any]) -> str:
    """The settings that make the method (all but NOT_METHOD), hashed: equal keys, one arm."""
    kept = {k: v for k, v in sorted(settings.items()) if k not in NOT_METHOD}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arm_name(labels: Sequence[str]) -> str:
    """The rows' run names without their seed suffix (`ntssl_s0`, `ntssl_s1` -> `ntssl`), or the
    first label when they do not share one."""
    runs = [label.split("/")[0] for label in labels]
    stems = {_SEED_SUFFIX.sub("", r) or r for r in runs}
    return stems.pop() if len(stems) == 1 else runs[0]


def seed_arms(results: Sequence[SubjectResult], settings: dict[str, dict[str, Any]]) -> list[Arm]:
    """Arms of two or more seeds from the trained rows with known settings (`settings`: row label ->
    its run's settings). Two rows of one arm with the same seed (last and best of one run) keep the
    first, which is the order `report` lists them in (last before best)."""
    arms: dict[str, Arm] = {}
    for r in results:
        cfg = settings.get(r.subject.label)
        if cfg is None or not isinstance(cfg.get("seed"), int):
            continue
        key = method_key(cfg)
        arm = arms.setdefault(key, Arm("", key))
        arm.rows.setdefault(int(cfg["seed"]), r)
    out = [a for a in arms.values() if len(a.rows) >= 2]
    for a in out:
        a.name = arm_name([a.rows[s].subject.label for s in sorted(a.rows)])
    return out


def _stats(r: SubjectResult) -> dict[tuple[str, str], Any]:
    return {(o.task, m): st for o in r.outcomes for m, st in o.stats.items()}


def pooled_vs(
    arm: Arm, refs: dict[int, SubjectResult], versus: str, ci: CiOptions
) -> PooledDifference | None:
    """`arm` minus its per-seed references `refs`, pooled over the seeds both have; None when fewer
    than two seeds pair up or no metric has bootstrap statistics on both sides. Counting resamples
    videos (as its per-row intervals do); metrics of other units are left out."""
    seeds = sorted(s for s in arm.rows if s in refs)
    if len(seeds) < 2:
        return None
    a = [_stats(arm.rows[s]) for s in seeds]
    b = [_stats(refs[s]) for s in seeds]
    shared = set.intersection(*(set(x) for x in a + b))
    intervals: dict[tuple[str, str], Interval] = {}
    for task, metric in sorted(shared):
        try:
            intervals[(task, metric)] = pooled_paired_interval(
                [x[(task, metric)] for x in a],
                [x[(task, metric)] for x in b],
                n_resamples=ci.resamples,
                seed=ci.seed,
                level=ci.level,
            )
        except ValueError:  # the seeds were evaluated on different units: no pooled interval
            continue
    if not intervals:
        return None
    return PooledDifference(arm.name, versus, seeds, intervals)


def pooled_differences(
    results: Sequence[SubjectResult],
    refs: dict[str, SubjectResult],
    settings: dict[str, dict[str, Any]],
    ci: CiOptions,
) -> list[PooledDifference]:
    """Every arm of two or more seeds against its references (`refs`: row label -> the row its
    per-row difference is taken against). When every seed's reference is a row of one other arm
    (`--baseline` naming a row of that arm), the arm is compared seed by seed with that arm."""
    arms = seed_arms(results, settings)
    arm_of = {id(r): a for a in arms for r in a.rows.values()}
    out = []
    for arm in arms:
        per_seed = {s: refs[r.subject.label] for s, r in arm.rows.items() if r.subject.label in refs}
        ref_arms = {id(arm_of.get(id(ref))) for ref in per_seed.values()}
        other = arm_of.get(id(next(iter(per_seed.values())))) if per_seed else None
        if other is arm and ref_arms == {id(arm)}:
            continue  # its references are its own seeds (the --baseline row is one of them)
        if other is not None and ref_arms == {id(other)}:
            diff = pooled_vs(arm, other.rows, other.name, ci)
        else:
            names = sorted({ref.subject.label for ref in per_seed.values()})
            versus = "each seed's initialisation" if len(names) > 1 else (names[0] if names else "-")
            diff = pooled_vs(arm, per_seed, versus, ci)
        if diff is not None:
            out.append(diff)
    return out


def report_pooled(
    results: Sequence[SubjectResult], refs: dict[str, SubjectResult], ci: CiOptions
) -> list[PooledDifference]:
    """The report's pooled differences: arms read from the rows' run folders (config.yaml); none
    with intervals disabled."""
    if not ci.enabled:
        return []
    settings = {r.subject.label: cfg for r in results if (cfg := run_settings(r)) is not None}
    return pooled_differences(results, refs, settings, ci)


def pooled_table(diffs: Sequence[PooledDifference], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown: one line per pooled difference, `+3.1 [0.5, 5.8]` per metric (percentage points)."""
    from polyp_ssl.eval.report_tables import LOWER_IS_BETTER, format_interval

    if not diffs:
        return ""
    cols = [c for c in columns if any(c in d.intervals for d in diffs)]
    names = [f"{t} {m}" + (" (lower is better)" if (t, m) in LOWER_IS_BETTER else "") for t, m in cols]
    head = "| arm | minus | seeds | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * 3 + "---:|" * len(cols)]
    for d in diffs:
        cells = []
        for c in cols:
            iv = d.intervals.get(c)
            cells.append(format_interval(c[1], iv.estimate, iv, signed=True) if iv else "-")
        seeds = ", ".join(map(str, d.seeds))
        lines.append(f"| {d.arm} | {d.versus} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pooled_json(diffs: Sequence[PooledDifference]) -> list[dict[str, Any]]:
    """The pooled differences as JSON-ready records (report's pooled.json)."""
    return [
        {
            "arm": d.arm,
            "minus": d.versus,
            "seeds": d.seeds,
            "metrics": {f"{t}/{m}": iv.as_dict() for (t, m), iv in sorted(d.intervals.items())},
        }
        for d in diffs
    ]
