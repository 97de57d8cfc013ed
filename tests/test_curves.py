"""`polyp-ssl curves`: a run's CSV logs stitched across resumed versions, drawn to PNG."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from polyp_ssl.eval.curves import CurvesError, main, read_metrics_csv, run_curves, run_of_checkpoint, stitch

# the columns of a real `polyp-ssl train --logger csv` log (Lightning's CSVLogger)
HEADER = [
    "epoch", "step", "train/fragments_per_s", "train/frames_per_s", "train/loss_cross_frame_epoch",
    "train/loss_cross_frame_step", "train/loss_epoch", "train/loss_frag_epoch", "train/loss_frag_step",
    "train/loss_step", "train/lr", "train/videos_per_batch_epoch", "train/videos_per_batch_step", "val/map",
]  # fmt: skip


def loss_at(step: int, version: int) -> float:
    return 5.0 / (1 + step) + 0.001 * version  # the version shows in the value: who won a step


def write_version(run: Path, version: int, steps: range, epoch_every: int = 5) -> None:
    d = run / "logs" / f"version_{version}"
    d.mkdir(parents=True)
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for s in steps:
            row = dict.fromkeys(HEADER, "")
            loss = loss_at(s, version)
            row.update(
                {
                    "epoch": s // epoch_every,
                    "step": s,
                    "train/loss_step": loss,
                    "train/loss_frag_step": 0.6 * loss,
                    "train/loss_cross_frame_step": 0.4 * loss,
                    "train/lr": 1e-3 * (0.9**s),
                    "train/videos_per_batch_step": 2.0,
                }
            )
            if s > steps.start:  # no rate at a version's first step (no step time yet)
                row["train/fragments_per_s"] = 10.0 + version
                row["train/frames_per_s"] = 80.0
            w.writerow([row[h] for h in HEADER])
            if s % epoch_every == epoch_every - 1:  # the epoch row: aggregates and val, same step
                agg = dict.fromkeys(HEADER, "")
                agg.update({"epoch": s // epoch_every, "step": s, "train/loss_epoch": 9.9, "val/map": 0.5})
                w.writerow([agg[h] for h in HEADER])


@pytest.fixture
def resumed_run(tmp_path) -> Path:
    run = tmp_path / "runs" / "exp"
    write_version(run, 0, range(0, 12))  # logged to step 11, last checkpoint at step 8
    write_version(run, 1, range(8, 20))  # resumed from step 8: steps 8..11 again
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run


def test_resumed_run_is_stitched_by_step(resumed_run):
    curves = run_curves(resumed_run)
    assert [p.parent.name for p in curves.versions] == ["version_0", "version_1"]
    assert curves.resumed_at == [8]
    steps, values = curves.series["train/loss"]
    assert steps == list(range(20))  # strictly increasing, none twice
    # steps 0..7 from version 0, 8..19 from the resumed version 1
    assert values == pytest.approx([loss_at(s, 0 if s < 8 else 1) for s in range(20)])
    assert set(curves.series) >= {"train/loss_frag", "train/loss_cross_frame", "train/lr", "val/map"}
    assert not any(m.endswith(("_epoch", "_step")) for m in curves.series)
    # the rate has no value at a version's first step
    rate_steps, rates = curves.series["train/fragments_per_s"]
    assert rate_steps == [s for s in range(1, 20) if s != 8] and rates[-1] == 11.0
    assert curves.series["val/map"][0] == [4, 9, 14, 19]
    for name, (st, _) in curves.series.items():
        assert all(a < b for a, b in zip(st, st[1:], strict=False)), name


def test_stitch_rule_later_version_owns_its_steps():
    v0 = {"a": {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, "b": {3: 7.0}}
    v1 = {"a": {2: 2.0, 3: 2.0, 4: 2.0}}
    got = stitch([v0, v1])
    assert got["a"] == ([0, 1, 2, 3, 4], [1.0, 1.0, 2.0, 2.0, 2.0])
    assert "b" not in got  # logged only at a step the resumed version took over (and did not log)
    assert stitch([v0])["b"] == ([3], [7.0])


def test_curves_cli_writes_png_and_csv(resumed_run, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main([str(resumed_run), "--out", str(out)]) == 0
    png = out / "curves_exp.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    rows = list(csv.DictReader((out / "curves_exp.csv").read_text().splitlines()))
    loss = [int(r["step"]) for r in rows if r["metric"] == "train/loss"]
    assert loss == list(range(20))
    assert "2 version(s)" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries
    # default output: the run's own folder
    assert main([str(resumed_run)]) == 0 and (resumed_run / "curves_exp.png").stat().st_size > 10_000
    assert run_of_checkpoint(resumed_run / "checkpoints" / "last.ckpt") == resumed_run


def test_curves_bad_input_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no " in err and "version_*/metrics.csv" in err and len(err.strip().splitlines()) == 1
    run = tmp_path / "bad"
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "logs" / "version_0" / "metrics.csv").write_text("epoch,step,train/loss_step\n0,0,1.0\n0,1,abc\n")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "line 3, field 'train/loss_step': 'abc' is not a number" in err and "metrics.csv" in err
    assert not list(run.glob("curves_*"))  # nothing written for a log that failed
    (run / "logs" / "version_0" / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CurvesError, match="no `step` column"):
        read_metrics_csv(run / "logs" / "version_0" / "metrics.csv")


def test_curves_help_does_not_import_torch():
    code = (
        "import sys; from polyp_ssl.entry import main\n"
        "try:\n    main(['curves', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, 'imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "polyp-ssl curves" in r.stdout


def test_report_draws_the_curves_of_the_runs_it_evaluates(resumed_run, tmp_path):
    from polyp_ssl.eval.report import ReportOptions, Subject, SubjectResult, training_curves, write_report_md
    from tests.eval_factory import make_eval_root

    ckpt = resumed_run / "checkpoints" / "last.ckpt"
    other = tmp_path / "loose.ckpt"  # a checkpoint outside a run folder: no curves, no error
    other.write_bytes(b"x")
    results = [
        SubjectResult(Subject("exp/last", "checkpoint", str(ckpt))),
        SubjectResult(Subject("exp/best", "checkpoint", str(resumed_run))),  # the same run: drawn once
        SubjectResult(Subject("loose", "checkpoint", str(other))),
        SubjectResult(Subject("descriptor", "descriptor", "descriptor")),
    ]
    out = tmp_path / "report"
    paths = training_curves(results, out)
    assert [p.name for p in paths] == ["curves_exp.png"] and paths[0].stat().st_size > 10_000
    root = make_eval_root(tmp_path / "root")
    opts = ReportOptions(root=root, out=out)
    md = write_report_md(out / "report.md", results, {"training curves": paths}, opts, "now", "c")
    md = md.read_text()
    assert "### training curves: curves_exp" in md and "![curves_exp](curves_exp.png)" in md
