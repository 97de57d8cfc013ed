"""Honest reports (issue 20, items 6 and 7): probes that learn nothing are flagged (probe output,
report.md, results.parquet); a one-class training side names --min_tracklet_frames and the counts;
`report` gives one row per distinct checkpoint, one initialisation row per run with its provenance,
differences against the initialisation by default or the row named with --baseline; a report with
nothing to compare is one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from polyp_ssl.eval.cli import probe_main
from polyp_ssl.eval.embeddings import KEY_COLUMNS, read_embeddings, write_embeddings
from polyp_ssl.eval.intervals import Interval
from polyp_ssl.eval.probe import degenerate_reason, protocol_hint
from polyp_ssl.eval.report import (
    Subject,
    SubjectResult,
    TaskOutcome,
    build_subjects,
    checkpoint_subjects,
    choose_references,
    difference_table,
    main,
)
from tests.embed_factory import make_ckpt, make_tiny_root
from tests.eval_factory import make_eval_root

POLYP_SSL = str(Path(sys.executable).with_name("polyp-ssl"))
TIMEOUT = 120  # seconds; each command here takes a few


def cli(*args: object) -> subprocess.CompletedProcess:
    """`polyp-ssl ARGS` as a user runs it; TimeoutExpired (a test failure) if it hangs."""
    return subprocess.run(
        [POLYP_SSL, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without log lines (INFO/WARNING) and progress bars: what a failure prints."""
    return [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith(("INFO ", "WARNING ", "DEBUG ")) and "\r" not in line
    ]


def rewrite(src: Path, dst: Path, vectors: np.ndarray | None = None, **meta) -> Path:
    """A copy of an embeddings file with other vectors and/or metadata fields."""
    emb = read_embeddings(src)
    cols = {c: getattr(emb, c).tolist() for c in KEY_COLUMNS}
    info = {**emb.meta, **meta}
    info.pop("n_rows", None)
    info.pop("dim", None)
    return write_embeddings(dst, cols, emb.vectors if vectors is None else vectors, info)


def table_labels(md: str, heading: str = "## Results") -> list[str]:
    """Row names of the table under `heading` in report.md (header row left out)."""
    section = md.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [line.split("|")[1].strip() for line in rows[1:]]


# ----------------------------------------------------------------------------- probes


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory) -> Path:
    """val fragments of 12 polyps (sizes 3, 5, 7 mm: classes 0, 0, 1), plus a copy of its vectors
    made constant: no probe can tell one row from another there."""
    root = make_eval_root(
        tmp_path_factory.mktemp("honest_probe"), splits={"val": 4}, fragments_per_tracklet=2, tag="probe"
    )
    val = root / "embeddings" / "val.parquet"
    const = np.ones_like(read_embeddings(val).vectors)
    rewrite(val, root / "embeddings" / "const.parquet", vectors=const)
    return root


@pytest.fixture(scope="module")
def one_class_root(tmp_path_factory) -> Path:
    """Every polyp diminutive (3 and 5 mm: size class 0), as left by a strict protocol: the
    metadata says 27 tracklets were shorter than --min_tracklet_frames 30."""
    root = make_eval_root(
        tmp_path_factory.mktemp("honest_one"),
        splits={"test": 3},
        polyps_per_video=2,
        fragments_per_tracklet=2,
        tag="one",
    )
    val = root / "embeddings" / "test.parquet"
    params = {**read_embeddings(val).meta["params"], "min_tracklet_frames": 30}
    rewrite(val, root / "embeddings" / "kept.parquet", params=params, n_tracklets_below_min=27)
    return root


def test_degenerate_reason_cases():
    y = np.array([0, 1, 0, 1])
    assert degenerate_reason(y, np.array([0, 1, 1, 1])) is None
    assert degenerate_reason(y, np.zeros(4, int)) == "majority class only: predicts class 0 for all 4 rows"
    both = degenerate_reason(np.ones(3, int), np.ones(3, int))
    assert both.startswith("validation rows hold one class only ([1])") and "majority class only" in both
    assert (
        degenerate_reason(np.ones(3, int), np.array([1, 0, 1])) == "validation rows hold one class only ([1])"
    )


def test_protocol_hint_names_the_flag_and_the_counts(one_class_root):
    kept = read_embeddings(one_class_root / "embeddings" / "kept.parquet")
    text = protocol_hint([kept])
    # 3 videos x 2 polyps x 3 tracklets kept, 27 left out; 2 fragments each
    assert text.startswith("the protocol kept 18 of 45 tracklets (27 shorter than --min_tracklet_frames 30)")
    assert "36 fragments" in text and "lower --min_tracklet_frames" in text
    # nothing left out by the protocol: it does not send the user to the flag for nothing
    plain = protocol_hint([read_embeddings(one_class_root / "embeddings" / "test.parquet")])
    assert "18 of 18 tracklets" in plain and "lower" not in plain and "hold one class" in plain


def test_majority_class_probe_is_flagged_in_the_probe_output(probe_root, tmp_path):
    out = tmp_path / "p"
    r = cli(
        "probe",
        "--task",
        "size",
        "--train_embeddings",
        probe_root / "embeddings" / "const.parquet",
        "--dataset_root",
        probe_root,
        "--out",
        out,
        "--ci_resamples",
        "0",
        "--max_epochs",
        "2",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DEGENERATE" in r.stdout and "majority class only: predicts class" in r.stdout
    assert "warning: degenerate probe" in r.stdout
    result = json.loads((out / "probe_size.json").read_text())
    assert result["degenerate"].startswith("majority class only")
    # the same probe on vectors that separate the polyps is not flagged: see the report test below


def test_one_class_validation_side_is_flagged(probe_root, one_class_root, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["--task", "size", "--train_embeddings", str(probe_root / "embeddings" / "val.parquet")]
    args += ["--val_embeddings", str(one_class_root / "embeddings" / "test.parquet")]
    args += ["--dataset_root", str(probe_root), "--val_dataset_root", str(one_class_root)]
    args += ["--out", str(out), "--ci_resamples", "0", "--max_epochs", "2"]
    assert probe_main(args) == 0
    stdout = capsys.readouterr().out
    assert "validation rows hold one class only ([0])" in stdout and "DEGENERATE" in stdout
    assert (
        "validation rows hold one class only"
        in json.loads((out / "probe_size.json").read_text())["degenerate"]
    )


def test_one_class_training_side_names_min_tracklet_frames_and_counts(one_class_root, tmp_path):
    r = cli(
        "probe",
        "--task",
        "size",
        "--train_embeddings",
        one_class_root / "embeddings" / "kept.parquet",
        "--dataset_root",
        one_class_root,
        "--out",
        tmp_path / "p",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = error_lines(r)
    assert len(lines) == 1, lines
    assert "training rows hold one class only ([0])" in lines[0] and "kept.parquet" in lines[0]
    assert "the protocol kept 18 of 45 tracklets (27 shorter than --min_tracklet_frames 30)" in lines[0]
    assert not (tmp_path / "p").exists()


def test_one_class_report_task_names_min_tracklet_frames(one_class_root, tmp_path, capsys):
    emb = one_class_root / "embeddings" / "kept.parquet"
    args = ["--embeddings", str(emb), "--baselines", "none", "--dataset_root", str(one_class_root)]
    args += ["--out", str(tmp_path / "r"), "--tasks", "size", "--probe_splits", "test"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "task size cannot run: every labelled test polyp has the same size class (0)" in err[0]
    )
    assert "kept 18 of 45 tracklets (27 shorter than --min_tracklet_frames 30), 36 fragments" in err[0]
    assert not (tmp_path / "r" / "report.md").exists()


def test_majority_class_probe_is_flagged_in_report_and_results(probe_root, tmp_path):
    const, real = (probe_root / "embeddings" / f"{n}.parquet" for n in ("const", "val"))
    out = tmp_path / "r"
    args = ["--embeddings", str(real), str(const), "--baselines", "none", "--dataset_root", str(probe_root)]
    args += ["--out", str(out), "--tasks", "size", "--probe_splits", "val", "--ci_resamples", "50"]
    args += ["--projection", "pca"]
    assert main(args) == 0
    md = (out / "report.md").read_text()
    results = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in results.splitlines() if line.startswith("| ")}
    assert "| flags |" in rows["encoder"]
    assert "majority class only" in rows["const"] and "(!)" in rows["const"]
    assert "majority class only" not in rows["val"] and "(!)" not in rows["val"]
    assert "**degenerate probe**: majority class only" in md  # and in the notes
    t = pq.read_table(out / "results.parquet").to_pylist()
    flags = {r["checkpoint"]: r["probe_degenerate"] for r in t}
    assert flags["const"].startswith("majority class only") and flags["val"] is None
    assert {r["kind"] for r in t} == {"embeddings"}


# ----------------------------------------------------------------------------- report rows


@pytest.fixture(scope="module")
def run_report(tmp_path_factory):
    """A run folder whose best checkpoint has the bytes of last.ckpt, and its own init.ckpt; one
    report with the default baselines (init, descriptor)."""
    base = tmp_path_factory.mktemp("honest_report")
    root = make_tiny_root(base / "root")
    ckpts = base / "runs" / "tiny" / "checkpoints"
    ckpts.mkdir(parents=True)
    make_ckpt(ckpts / "last.ckpt")
    shutil.copyfile(ckpts / "last.ckpt", ckpts / "epoch=1-step=2.ckpt")
    make_ckpt(ckpts / "init.ckpt", seed=2)
    common = ["--dataset_root", str(root), "--tasks", "retrieval,reid", "--ci_resamples", "50"]
    common += ["--projection", "pca", "--gallery_queries", "1", "--batch_size", "16"]
    out = base / "default"
    assert main([str(ckpts.parent), *common, "--out", str(out)]) == 0
    return ckpts, common, out


TRAINED = "tiny/last = tiny/epoch=1-step=2"
RUN_INIT = "init (step-0 weights of tiny)"


def test_one_row_per_distinct_checkpoint_and_the_run_init(run_report):
    _, _, out = run_report
    md = (out / "report.md").read_text()
    # same bytes = one row listing both names; the run's own step-0 weights, no fresh init row
    assert table_labels(md) == [TRAINED, RUN_INIT, "hand-made descriptor"]
    assert "fresh init" not in md
    assert "the run's step-0 weights (checkpoints/init.ckpt)" in md  # the encoders' provenance
    rows = pq.read_table(out / "results.parquet").to_pylist()
    by = {r["checkpoint"]: r for r in rows}
    assert by[TRAINED]["checkpoint_names"] == ["tiny/last", "tiny/epoch=1-step=2"]
    assert (by[TRAINED]["kind"], by[RUN_INIT]["kind"]) == ("checkpoint", "run_init")
    assert by[RUN_INIT]["checkpoint_names"] == ["tiny/init"]
    assert by[RUN_INIT]["provenance"].startswith("the run's step-0 weights")
    assert by[TRAINED]["checkpoint_sha256"] != by[RUN_INIT]["checkpoint_sha256"]


def test_differences_default_to_the_initialisation(run_report):
    _, _, out = run_report
    rows = pq.read_table(out / "results.parquet").to_pylist()
    init = {(r["task"], r["metric"]): r["value"] for r in rows if r["checkpoint"] == RUN_INIT}
    assert all(r["diff_vs_baseline"] is None for r in rows if r["checkpoint"] == RUN_INIT)
    for label in (TRAINED, "hand-made descriptor"):
        mine = [r for r in rows if r["checkpoint"] == label]
        assert mine and all(r["baseline"] == RUN_INIT for r in mine)
        for r in mine:  # row minus init: positive where the row is higher
            assert r["diff_vs_baseline"] == pytest.approx(
                r["value"] - init[(r["task"], r["metric"])], abs=1e-9
            )
    md = (out / "report.md").read_text()
    assert f"## Difference vs {RUN_INIT}" in md
    assert table_labels(md, f"## Difference vs {RUN_INIT}") == [TRAINED, "hand-made descriptor"]


def test_differences_follow_baseline_by_label_or_checkpoint_name(run_report, tmp_path):
    ckpts, common, _ = run_report
    out = tmp_path / "vs_best"
    # a checkpoint name the row lists (not its label) picks the row
    assert main([str(ckpts.parent), *common, "--out", str(out), "--baseline", "tiny/epoch=1-step=2"]) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    trained = {(r["task"], r["metric"]): r["value"] for r in rows if r["checkpoint"] == TRAINED}
    assert all(r["diff_vs_baseline"] is None for r in rows if r["checkpoint"] == TRAINED)
    others = [r for r in rows if r["checkpoint"] != TRAINED]
    assert {r["checkpoint"] for r in others} == {RUN_INIT, "hand-made descriptor"}
    for r in others:
        assert r["baseline"] == TRAINED
        assert r["diff_vs_baseline"] == pytest.approx(
            r["value"] - trained[(r["task"], r["metric"])], abs=1e-9
        )
    assert f"## Difference vs {TRAINED}" in (out / "report.md").read_text()


def test_a_loose_last_ckpt_finds_its_runs_init(run_report, tmp_path):
    ckpts, common, _ = run_report
    out = tmp_path / "last_only"
    assert main([str(ckpts / "last.ckpt"), *common, "--out", str(out), "--baselines", "init"]) == 0
    md = (out / "report.md").read_text()
    assert table_labels(md) == ["tiny/last", RUN_INIT]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["baseline"] for r in rows if r["checkpoint"] == "tiny/last"} == {RUN_INIT}


def test_init_provenance_fresh_init_named_apart(run_report, tmp_path):
    ckpts, _, _ = run_report
    loose = shutil.copyfile(ckpts / "last.ckpt", tmp_path / "loose.ckpt")
    subjects = build_subjects([loose], ["init"])
    assert [(s.label, s.kind) for s in subjects] == [
        ("loose", "checkpoint"),
        ("fresh init (hmve_resnet18, seed 0)", "init"),
    ]
    assert subjects[0].reference == "fresh init (hmve_resnet18, seed 0)"
    assert "fresh random init" in subjects[1].provenance
    # both asked for: the run's own init stays the trained row's reference, the fresh one is named apart
    both = build_subjects([ckpts / "last.ckpt"], ["init", "fresh_init"])
    assert [s.label for s in both] == ["tiny/last", RUN_INIT, "fresh init (hmve_resnet18, seed 0)"]
    assert both[0].reference == RUN_INIT


def test_same_bytes_across_runs_are_one_row(tmp_path):
    """Arms that share their step-0 weights: one init row naming both runs; a trained checkpoint
    with the bytes of its init.ckpt (no step taken) is one row that says so."""
    for run in ("a", "b"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "init.ckpt").write_bytes(b"step 0")
    (tmp_path / "a" / "checkpoints" / "last.ckpt").write_bytes(b"step 0")
    (tmp_path / "b" / "checkpoints" / "last.ckpt").write_bytes(b"step 9")
    paths = [tmp_path / r / "checkpoints" / n for r in ("a", "b") for n in ("last.ckpt", "init.ckpt")]
    subjects = checkpoint_subjects(paths)
    assert [(s.label, s.kind) for s in subjects] == [
        ("a/last = a/init = b/init", "checkpoint"),
        ("b/last", "checkpoint"),
    ]
    inits = checkpoint_subjects([tmp_path / r / "checkpoints" / "init.ckpt" for r in ("a", "b")])
    assert [(s.label, s.kind, s.names) for s in inits] == [
        ("init (step-0 weights of a = b)", "run_init", ["a/init", "b/init"])
    ]


def test_two_runs_each_compared_with_their_own_init():
    def row(label: str, kind: str, names: list[str], reference: str | None = None) -> SubjectResult:
        outcomes = [TaskOutcome("retrieval", {"mAP": 0.5}, 0.0)]
        return SubjectResult(Subject(label, kind, label, None, names, reference), outcomes)

    rows = [
        row("a/last", "checkpoint", ["a/last"], "init (a)"),
        row("b/last", "checkpoint", ["b/last"], "init (b)"),
        row("init (a)", "run_init", ["a/init"]),
        row("init (b)", "run_init", ["b/init"]),
        row("hand-made descriptor", "descriptor", []),
    ]
    refs = choose_references(rows, None)
    assert {k: v.subject.label for k, v in refs.items()} == {
        "a/last": "init (a)",
        "b/last": "init (b)",
        "hand-made descriptor": "init (a)",
    }
    # --baseline by a checkpoint name the row lists: every other row against that row
    named = choose_references(rows, "b/init")
    assert set(named) == {"a/last", "b/last", "init (a)", "hand-made descriptor"}
    assert {v.subject.label for v in named.values()} == {"init (b)"}
    # several references: the difference table names each row's in a `minus` column
    diffs = {label: {("retrieval", "mAP"): Interval(0.1, 0.0, 0.2, 0.95, 10, 100)} for label in refs}
    table = difference_table(rows, refs, diffs).splitlines()
    assert table[0] == "| encoder | minus | retrieval mAP |"
    assert "| b/last | init (b) | +10.0 [0.0, +20.0] |" in table and len(table) == 5


@pytest.mark.parametrize("baselines", ["descriptor", "none", "init,fresh_init"])
def test_baselines_alone_are_nothing_to_compare(tmp_path, capsys, baselines):
    root = make_eval_root(tmp_path / "root", tag="alone")
    argv = ["--dataset_root", str(root), "--out", str(tmp_path / "r"), "--baselines", baselines]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to compare" in err[0] and "--embeddings" in err[0]
    assert not (tmp_path / "r").exists()


def test_report_with_nothing_to_compare_is_one_line(tmp_path):
    root = make_eval_root(tmp_path / "root", tag="nothing")
    out = tmp_path / "r"
    r = cli("report", "--dataset_root", root, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and "nothing to compare" in lines[0], lines
    assert not out.exists()
