"""scripts/compare_methods.py: the paired comparison of training methods.

The dry run (default suite) checks the plan: every arm x seed, equal steps, the seed pairing, the
shared init row as baseline. The end-to-end run (slow) trains 2 arms x 2 seeds for 2 steps on a
tiny synthetic root and checks the JSON, the report and the paired differences.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_methods.py"
# tiny settings, as tests/test_train.py TINY and tests/test_readme.py SIZES["fast"]
TINY_TRAIN = (
    "--num_workers 0 --fragment_length 2 --fragment_stride 2 --min_tracklet_length 4 --hmve_d_model 32 "
    "--hmve_d_feedforward 64 --hmve_n_heads 2 --hmve_n_layers 1 --hmve_dropout 0.0 --d_proj 16 "
    "--eval_batch_size 4 --open_videos 2 --lr 0.001 --log_every_n_steps 1"
)
TINY = [
    "--synth",
    "--scale",
    "0.05",
    "--synth_frames",
    "240",
    "--synth_width",
    "128",
    "--synth_height",
    "112",
    "--store_size",
    "48",
    "--seeds",
    "0",
    "1",
    "--arms",
    "ntssl",
    "tracklet",
    "--max_steps",
    "2",
    "--im_size",
    "32",
    "--batch_size",
    "8",
    "--n_views",
    "2",
    "--train_args",
    TINY_TRAIN,
    "--report_args",
    "--tasks retrieval,reid --ci_resamples 200",
]


def compare(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def test_dry_run_plans_every_arm_and_seed_at_equal_steps(tmp_path):
    r = compare(
        "--synth", "--out", str(tmp_path / "cmp"), "--dry_run", "--seeds", "0", "1", "--max_steps", "7"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["synth_videos"] == {"train": 27, "val": 4, "test": 19}  # the paper's shape
    assert summary["backbone"] == "resnet18"
    trains = [shlex.split(x) for x in lines if " train " in x]
    arms = ["ntssl", "ntssl_fragment_only", "tracklet", "supcon_same_bags", "multipos_labels"]
    names = [c[c.index("--exp_name") + 1] for c in trains]
    assert sorted(names) == sorted(f"{a}_s{s}" for a in arms for s in (0, 1))
    assert summary["ttb_schedule"] == "steps"  # the comparison sweeps the bag temperature
    for c in trains:
        assert c[c.index("--max_steps") + 1] == "7"
        assert c[c.index("--sampler_ttb_schedule") + 1] == "steps"
        assert c[c.index("--seed") + 1] == c[c.index("--exp_name") + 1].rsplit("_s", 1)[1]
        # the arm's own flags come after the shared ones; the last of each flag wins
        name = c[c.index("--exp_name") + 1].rsplit("_s", 1)[0]
        sampler = c[len(c) - 1 - c[::-1].index("--sampler") + 1]
        loss = c[len(c) - 1 - c[::-1].index("--loss_type") + 1]
        expect = {
            "ntssl": ("temporaltemperaturebag", "mil-nce"),
            "ntssl_fragment_only": ("temporaltemperaturebag", "mil-nce"),
            "tracklet": ("tracklet", "mil-nce"),
            "supcon_same_bags": ("temporaltemperaturebag", "supervised"),
            "multipos_labels": ("multipos", "mil-nce"),
        }[name]
        assert (sampler, loss) == expect
        weights = c[c.index("--loss_weights") + 1 : c.index("--loss_weights") + 3]
        assert weights == (["1", "0"] if name == "ntssl_fragment_only" else ["1", "1"])
    report = next(shlex.split(x) for x in lines if " report " in x)
    assert report[report.index("--baseline") + 1] == "ntssl_s0/init"
    ckpts = [x for x in report if x.endswith(".ckpt")]
    assert len(ckpts) == 11 and ckpts[-1].endswith("ntssl_s0/checkpoints/init.ckpt")
    assert not (tmp_path / "cmp").exists()  # a dry run writes nothing


def test_gpu_defaults_to_resnet50(tmp_path):
    r = compare(
        "--synth",
        "--out",
        str(tmp_path / "c"),
        "--dry_run",
        "--device",
        "gpu",
        "--arms",
        "ntssl",
        "--seeds",
        "0",
    )
    assert r.returncode == 0, r.stderr
    train = next(shlex.split(x) for x in r.stdout.splitlines() if " train " in x)
    assert train[train.index("--sfe_backbone_arch") + 1] == "resnet50"
    assert train[train.index("--accelerator") + 1] == "gpu"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baseline", "nope"], "--baseline 'nope'"),
        (["--max_steps", "0"], "--max_steps 0"),
        (["--seeds", "1", "1"], "must not repeat"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, args, message):
    r = compare("--synth", "--out", str(tmp_path / "c"), "--dry_run", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_root_without_catalog_is_refused(tmp_path):
    r = compare("--root", str(tmp_path), "--out", str(tmp_path / "c"), "--dry_run")
    assert r.returncode == 2 and "no catalog/" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_end_to_end_two_arms_two_seeds(tmp_path):
    out = tmp_path / "cmp"
    r = compare("--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out / "report" / "report.md").exists() and (out / "report" / "results.parquet").exists()
    assert summary["steps"] == {f"{a}_s{s}": 2 for a in ("ntssl", "tracklet") for s in (0, 1)}
    assert summary["same_init_per_seed"] == {"0": True, "1": True}
    assert summary["baseline"] == "init (step-0 weights of ntssl_s0)"  # --baseline ntssl_s0/init names it
    for key in ("retrieval/mAP", "reid/AUROC"):
        init = summary["init"][key]
        assert 0 <= init["value"] <= 1 and init["diff_vs_baseline"] is None
        for arm in ("ntssl", "tracklet"):
            m = summary["arms"][arm][key]
            assert set(m["seeds"]) == {"0", "1"}
            values = [m["seeds"][s]["value"] for s in ("0", "1")]
            assert m["mean"] == pytest.approx(sum(values) / 2)
            assert m["min"] == min(values) and m["max"] == max(values)
            for s in ("0", "1"):
                e = m["seeds"][s]
                # paired difference = row minus baseline, inside its own interval
                assert e["diff_vs_baseline"] == pytest.approx(e["value"] - init["value"], abs=1e-9)
                low, high = e["diff_ci"]
                assert low - 1e-9 <= e["diff_vs_baseline"] <= high + 1e-9
    noise = summary["bag_noise"]
    assert noise["tracklet"]["same_tracklet"] == 1.0 and noise["tracklet"]["same_identity"] == 1.0
    assert 0 <= noise["temporal_first_epoch"]["same_identity"] <= 1
    per_epoch = noise["temporal_per_epoch"]
    assert len(per_epoch) == noise["epochs_trained"] and per_epoch[0]["temperature"] == 0.3
    if len(per_epoch) > 1:  # --ttb_schedule steps: the last trained epoch is at the schedule's end
        assert per_epoch[-1]["temperature"] == 12.0
    # pooled over the seeds: the mean of the seeds' paired differences the report gives, in its interval
    pooled = summary["pooled"]
    assert pooled["arm"] == "ntssl" and pooled["seeds"] == [0, 1]
    for key in ("retrieval/mAP", "reid/AUROC"):
        d = pooled["ntssl_minus_tracklet"][key]
        values = {arm: summary["arms"][arm][key]["seeds"] for arm in ("ntssl", "tracklet")}
        want = sum(values["ntssl"][s]["value"] - values["tracklet"][s]["value"] for s in ("0", "1")) / 2
        assert d["estimate"] == pytest.approx(want, abs=1e-9)
        assert d["ci"][0] - 1e-9 <= d["estimate"] <= d["ci"][1] + 1e-9
    assert set(pooled["ntssl_minus_init"]) == {"retrieval/mAP", "reid/AUROC"}  # each seed's step-0 weights
    # a second call reuses the data and the trained runs (same steps) and reports again, here
    # also seed by seed against ntssl
    r2 = compare("--out", str(out), *TINY, "--paired_vs", "ntssl")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "already trained to 2 steps" in r2.stderr
    s2 = json.loads(r2.stdout.strip().splitlines()[-1])
    assert s2["arms"] == summary["arms"]
    for s in ("0", "1"):
        rows = s2["paired_vs"]["seeds"][s]
        init_row = f"init (step-0 weights of ntssl_s{s})"
        assert set(rows) == {f"tracklet_s{s}/last", init_row, "hand-made descriptor"}
        for key in ("retrieval/mAP", "reid/AUROC"):
            d = rows[f"tracklet_s{s}/last"][key]
            want = (
                summary["arms"]["ntssl"][key]["seeds"][s]["value"]
                - summary["arms"]["tracklet"][key]["seeds"][s]["value"]
            )
            assert d["baseline_minus_row"] == pytest.approx(want, abs=1e-9)
            assert d["ci"][0] - 1e-9 <= d["baseline_minus_row"] <= d["ci"][1] + 1e-9
