"""Bootstrap intervals in the outputs of eval, probe, count and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from polyp_ssl.eval.cli import count_main, eval_main, probe_main
from polyp_ssl.eval.intervals import PairRanking
from polyp_ssl.eval.metrics import reid_from_vectors, reid_pairs
from tests.eval_factory import make_eval_root

CI = ["--ci_resamples", "150"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_eval_root(tmp_path_factory.mktemp("ciroot"), splits={"val": 3, "test": 4}, noise=0.6)


@pytest.fixture(scope="module")
def frag_root(tmp_path_factory) -> Path:
    return make_eval_root(
        tmp_path_factory.mktemp("cifrag"),
        splits={"train": 8, "val": 4},
        polyps_per_video=4,
        fragments_per_tracklet=2,
        tag="frag",
    )


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_ci(got: dict, metrics: list[str]) -> None:
    for m in metrics:
        low, high = got[f"{m}_ci"]
        assert low <= got[m] <= high, m


@pytest.mark.parametrize(
    "task,metrics", [("retrieval", ["mAP", "HR@1", "HR@5"]), ("reid", ["AUROC", "AUPR"])]
)
def test_eval_intervals_seeded_and_unchanged_metrics(root, tmp_path, task, metrics, capsys):
    emb = str(root / "embeddings" / "test.parquet")
    outs = {}
    runs = {"a": CI, "b": CI, "c": [*CI, "--ci_seed", "7"], "off": ["--ci_resamples", "0"]}
    for name, extra in runs.items():
        assert eval_main(["--task", task, "--embeddings", emb, "--out", str(tmp_path / name), *extra]) == 0
        outs[name] = _json(tmp_path / name / f"metrics_{task}.json")
    a, b, c, off = outs["a"], outs["b"], outs["c"], outs["off"]
    _check_ci(a, metrics)
    assert a["ci"] == {"unit": "polyp", "resamples": 150, "seed": 0, "level": 0.95, "n_units": 12}
    for m in metrics:
        assert a[f"{m}_ci"] == b[f"{m}_ci"]  # same seed, same interval
        assert a[m] == off[m] == c[m]  # the metric itself does not depend on the intervals
        assert "ci" not in off and f"{m}_ci" not in off  # --ci_resamples 0: no intervals
    assert any(a[f"{m}_ci"] != c[f"{m}_ci"] for m in metrics)  # another seed, other resamples
    assert "[" in capsys.readouterr().out


def test_eval_video_unit(root, tmp_path):
    emb = str(root / "embeddings" / "test.parquet")
    args = ["--task", "retrieval", "--embeddings", emb, "--out", str(tmp_path), *CI, "--ci_unit", "video"]
    assert eval_main(args) == 0
    got = _json(tmp_path / "metrics_retrieval.json")
    assert got["ci"]["unit"] == "video" and got["ci"]["n_units"] == 4
    _check_ci(got, ["mAP"])


def test_bad_ci_flags_fail_clearly(root, capsys):
    emb = str(root / "embeddings" / "test.parquet")
    assert eval_main(["--task", "reid", "--embeddings", emb, "--ci_resamples", "-1"]) == 2
    assert "--ci_resamples" in capsys.readouterr().err


def test_reid_pairs_give_the_metric_exactly(root):
    from polyp_ssl.eval.embeddings import read_embeddings

    emb = read_embeddings(root / "embeddings" / "test.parquet").tracklet_level()
    res = reid_from_vectors(emb.vectors, emb.identity_id)
    s, same, ua, ub = reid_pairs(emb.vectors, emb.identity_id)
    assert s.size == res.n_pairs and int(same.sum()) == res.n_positive
    ones = np.ones((1, PairRanking(s, same, ua, ub).unit_labels.size), dtype=np.int32)
    assert PairRanking(s, same, ua, ub, "auroc")(ones)[0] == pytest.approx(res.auroc, abs=1e-12)
    assert PairRanking(s, same, ua, ub, "aupr")(ones)[0] == pytest.approx(res.aupr, abs=1e-12)


def test_probe_intervals(frag_root, tmp_path):
    train = str(frag_root / "embeddings" / "train.parquet")
    base = ["--task", "size", "--train_embeddings", train, "--max_epochs", "2"]
    assert probe_main([*base, "--out", str(tmp_path / "a"), *CI]) == 0
    assert probe_main([*base, "--out", str(tmp_path / "b"), *CI]) == 0
    assert probe_main([*base, "--out", str(tmp_path / "off"), "--ci_resamples", "0"]) == 0
    a, b, off = (_json(tmp_path / n / "probe_size.json") for n in ("a", "b", "off"))
    names = ["accuracy", "balanced_accuracy", "macro_f1", "identity_weighted_macro_f1"]
    _check_ci(a["metrics"], names)
    assert a["ci"]["unit"] == "polyp" and a["ci"]["n_units"] == a["n_val_polyps"]
    for m in names:
        assert a["metrics"][f"{m}_ci"] == b["metrics"][f"{m}_ci"]
        assert a["metrics"][m] == off["metrics"][m]
    assert "ci" not in off and not any(k.endswith("_ci") for k in off["metrics"])


def test_count_intervals_resample_videos(root, tmp_path):
    args = [
        "--val_embeddings",
        str(root / "embeddings" / "val.parquet"),
        "--test_embeddings",
        str(root / "embeddings" / "test.parquet"),
    ]
    assert count_main([*args, "--out", str(tmp_path / "a"), *CI]) == 0
    assert count_main([*args, "--out", str(tmp_path / "b"), *CI]) == 0
    assert count_main([*args, "--out", str(tmp_path / "off"), "--ci_resamples", "0"]) == 0
    a, b, off = (_json(tmp_path / n / "count.json") for n in ("a", "b", "off"))
    _check_ci(a, ["test_fragmentation_rate", "test_fpr"])
    assert a["ci"]["unit"] == "video" and a["ci"]["n_units"] == 4
    assert a["test_fragmentation_rate_ci"] == b["test_fragmentation_rate_ci"]
    assert a["test_fragmentation_rate"] == off["test_fragmentation_rate"] and "ci" not in off


# ----------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    from polyp_ssl.eval.report import main
    from tests.embed_factory import make_ckpt, make_tiny_root

    base = tmp_path_factory.mktemp("cireport")
    root = make_tiny_root(base / "root")
    ckpt = make_ckpt(base / "a.ckpt")
    out = base / "out"
    argv = [
        str(ckpt),
        "--dataset_root",
        str(root),
        "--out",
        str(out),
        "--tasks",
        "retrieval,reid,count",
        "--baselines",
        "descriptor",
        "--batch_size",
        "16",
        "--projection",
        "pca",
        "--ci_resamples",
        "100",
    ]
    assert main(argv) == 0
    return root, ckpt, out, argv


def test_report_results_have_intervals_and_differences(report_run):
    _, _, out, _ = report_run
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {"value_ci_low", "value_ci_high", "diff_vs_baseline", "diff_ci_low"} <= set(rows[0])
    for r in rows:
        assert r["value_ci_low"] <= r["value_ci_high"]
        if r["metric"] != "AUPR":  # a percentile interval of AP near its floor may sit above the value
            assert r["value_ci_low"] <= r["value"] <= r["value_ci_high"], r["metric"]
        assert r["ci_unit"] == ("video" if r["task"] == "count" else "polyp")
        assert r["ci_resamples"] == 100
    # no initialisation row: the trained row is compared with the reference row (the descriptor)
    base = [r for r in rows if r["checkpoint"] == "hand-made descriptor"]
    other = [r for r in rows if r["checkpoint"] == "a"]
    assert all(r["diff_vs_baseline"] is None for r in base)  # the baseline row: no difference
    by = {(r["task"], r["metric"]): r["value"] for r in base}
    for r in other:
        assert r["baseline"] == "hand-made descriptor"
        assert r["diff_vs_baseline"] == pytest.approx(r["value"] - by[(r["task"], r["metric"])], abs=1e-9)
        assert r["diff_ci_low"] <= r["diff_vs_baseline"] <= r["diff_ci_high"]
    md = (out / "report.md").read_text()
    assert "## Difference vs hand-made descriptor" in md and "bootstrap interval" in md
    assert md.count(" [") >= 5 and (out / "intervals.png").stat().st_size > 0
    assert "![intervals](intervals.png)" in md


def test_report_paired_difference_with_itself_is_zero(report_run, tmp_path):
    from polyp_ssl.eval.report import main

    root, ckpt, _, argv = report_run
    # the checkpoint against its own embeddings file: two rows with the very same vectors
    emb = sorted((root / "embeddings").glob("a_test_trk_*.parquet"))[0]
    out = tmp_path / "o"
    args = [str(ckpt), "--dataset_root", str(root), "--out", str(out), "--tasks", "retrieval,reid"]
    args += ["--baselines", "none", "--embeddings", str(emb), "--ci_resamples", "50", "--baseline", emb.stem]
    assert main(args) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    diffs = [r for r in rows if r["checkpoint"] == "a"]
    assert diffs and all(r["baseline"] == emb.stem for r in diffs)
    for r in diffs:
        assert (r["diff_vs_baseline"], r["diff_ci_low"], r["diff_ci_high"]) == (0.0, 0.0, 0.0)


def test_report_without_intervals_and_bad_baseline(report_run, tmp_path, capsys):
    from polyp_ssl.eval.report import main

    root, ckpt, _, _ = report_run
    out = tmp_path / "o"
    base = [str(ckpt), "--dataset_root", str(root), "--out", str(out), "--tasks", "retrieval"]
    assert main([*base, "--baselines", "descriptor", "--ci_resamples", "0"]) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert all(r["value_ci_low"] is None and r["diff_vs_baseline"] is None for r in rows)
    md = (out / "report.md").read_text()
    assert "Difference vs" not in md and "bootstrap interval" not in md
    assert main([*base, "--baselines", "descriptor", "--baseline", "nope", "--overwrite"]) == 2
    assert "--baseline 'nope'" in capsys.readouterr().err


def test_old_results_file_still_loads(tmp_path):
    import pyarrow as pa

    from polyp_ssl.eval.report import append_results, results_schema

    path = tmp_path / "results.parquet"
    old_cols = results_schema().names[:12]
    old = {c: [None] for c in old_cols} | {"value": [0.5], "metric": ["mAP"], "task": ["retrieval"]}
    pq.write_table(pa.table(old), path)
    new = {"checkpoint": "x", "task": "retrieval", "metric": "mAP", "value": 0.6}
    append_results(path, [{**new, "value_ci_low": 0.5, "value_ci_high": 0.7}])
    rows = pq.read_table(path).to_pylist()
    assert rows[0]["value_ci_low"] is None and rows[1]["value_ci_high"] == 0.7
