"""report's differences pooled over training seeds (eval.report_pooled): rows whose runs differ
only by seed form an arm; an arm's pooled difference equals eval.intervals.pooled_paired_interval
of its seeds against the matching references (each seed's init, or another arm seed by seed)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from polyp_ssl.eval.intervals import MeanOverUnits, pooled_paired_interval
from polyp_ssl.eval.report_pooled import (
    arm_name,
    method_key,
    pooled_differences,
    pooled_json,
    pooled_table,
    run_settings,
    seed_arms,
)
from polyp_ssl.eval.report_subjects import Subject
from polyp_ssl.eval.report_tasks import SubjectResult, TaskOutcome
from polyp_ssl.eval.task_intervals import CiOptions

CI = CiOptions(resamples=200, seed=3)
UNITS = np.repeat(np.arange(12), 2)


def result(label: str, kind: str, spec: str, scores: np.ndarray) -> SubjectResult:
    stat = MeanOverUnits(scores, UNITS)
    outcome = TaskOutcome("retrieval", {"mAP": float(scores.mean())}, 0.0, stats={"mAP": stat})
    return SubjectResult(Subject(label, kind, spec), [outcome])


def make_run(tmp_path, name: str, seed: int, sampler: str):
    run = tmp_path / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"seed": seed, "sampler": sampler, "exp_name": name, "runs_dir": str(tmp_path), "lr": 1e-5}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture
def two_arms(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random(UNITS.size)  # the test polyps' difficulty, shared by every arm and seed
    rows, settings = [], {}
    for arm, sampler, shift in (("ntssl", "temporaltemperaturebag", 0.1), ("supcon", "supcon", 0.0)):
        for seed in (0, 1, 2):
            ckpt = make_run(tmp_path, f"{arm}_s{seed}", seed, sampler)
            r = result(
                f"{arm}_s{seed}/last", "checkpoint", str(ckpt), base + shift + 0.05 * rng.random(UNITS.size)
            )
            rows.append(r)
            settings[r.subject.label] = run_settings(r)
    inits = {
        s: result(f"init_s{s}", "run_init", "x", base + 0.05 * rng.random(UNITS.size)) for s in (0, 1, 2)
    }
    return rows, settings, inits


def test_runs_that_differ_only_by_seed_and_names_form_one_arm(two_arms):
    rows, settings, _ = two_arms
    assert settings["ntssl_s1/last"]["seed"] == 1  # read from the run's config.yaml
    arms = seed_arms(rows, settings)
    assert sorted(a.name for a in arms) == ["ntssl", "supcon"]
    assert all(sorted(a.rows) == [0, 1, 2] for a in arms)
    base = {"seed": 0, "sampler": "x", "exp_name": "a", "lr": 1.0}
    assert method_key(base) == method_key({**base, "seed": 5, "exp_name": "b", "runs_dir": "/r"})
    assert method_key(base) != method_key({**base, "lr": 2.0})
    assert arm_name(["ntssl_s0/last", "ntssl_s1/last"]) == "ntssl"
    assert arm_name(["a/last", "b/last"]) == "a"


def test_each_arm_against_each_seeds_init_equals_the_pooled_interval(two_arms):
    rows, settings, inits = two_arms
    refs = {r.subject.label: inits[settings[r.subject.label]["seed"]] for r in rows}
    diffs = pooled_differences(rows, refs, settings, CI)
    assert {d.arm for d in diffs} == {"ntssl", "supcon"}
    d = next(d for d in diffs if d.arm == "ntssl")
    assert d.versus == "each seed's initialisation" and d.seeds == [0, 1, 2]
    nt = [r for r in rows if r.subject.label.startswith("ntssl")]
    want = pooled_paired_interval(
        [r.outcomes[0].stats["mAP"] for r in nt],
        [inits[s].outcomes[0].stats["mAP"] for s in (0, 1, 2)],
        n_resamples=CI.resamples,
        seed=CI.seed,
    )
    got = d.intervals[("retrieval", "mAP")]
    assert (got.estimate, got.low, got.high) == pytest.approx((want.estimate, want.low, want.high))


def test_a_baseline_row_of_another_arm_pairs_the_arms_seed_by_seed(two_arms):
    rows, settings, _ = two_arms
    supcon0 = next(r for r in rows if r.subject.label == "supcon_s0/last")
    refs = {r.subject.label: supcon0 for r in rows if r is not supcon0}
    diffs = pooled_differences(rows, refs, settings, CI)
    assert [d.arm for d in diffs] == ["ntssl"]  # supcon against its own seed 0 is not a comparison
    d = diffs[0]
    assert d.versus == "supcon"
    ntssl = {settings[r.subject.label]["seed"]: r for r in rows if r.subject.label.startswith("ntssl")}
    sup = {settings[r.subject.label]["seed"]: r for r in rows if r.subject.label.startswith("supcon")}
    per_seed = [ntssl[s].outcomes[0].metrics["mAP"] - sup[s].outcomes[0].metrics["mAP"] for s in (0, 1, 2)]
    assert d.intervals[("retrieval", "mAP")].estimate == pytest.approx(np.mean(per_seed))
    # the true shift is +0.1: the pooled interval of three seeds sees it
    assert d.intervals[("retrieval", "mAP")].low > 0
    table = pooled_table(diffs, [("retrieval", "mAP")])
    assert "| ntssl | supcon | 0, 1, 2 |" in table
    record = pooled_json(diffs)[0]
    assert set(record) == {"arm", "minus", "seeds", "metrics"} and "retrieval/mAP" in record["metrics"]


def test_a_single_seed_or_unknown_settings_pools_nothing(tmp_path):
    rng = np.random.default_rng(1)
    ckpt = make_run(tmp_path, "only_s0", 0, "x")
    r = result("only_s0/last", "checkpoint", str(ckpt), rng.random(UNITS.size))
    loose = result("loose", "checkpoint", str(tmp_path / "loose.ckpt"), rng.random(UNITS.size))
    assert run_settings(loose) is None
    settings = {"only_s0/last": run_settings(r)}
    assert seed_arms([r, loose], settings) == []
    assert pooled_differences([r, loose], {}, settings, CI) == []
    assert pooled_table([], [("retrieval", "mAP")]) == ""
