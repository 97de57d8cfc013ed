"""`polyp-ssl demo`: step orchestration (reuse, resume, settings changes) with stand-in commands,
and the real `demo --quick` end to end (slow)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from polyp_ssl.eval import demo
from polyp_ssl.eval.report import append_results


def test_flags():
    assert demo.flags({"a": 1, "b": True, "c": False, "d": None, "e": [1.0, 2.0]}) == [
        "--a",
        "1",
        "--b",
        "--e",
        "1.0",
        "2.0",
    ]


class FakeCommands:
    """Stands in for `polyp-ssl <cmd>`: writes each step's output, records the calls."""

    def __init__(self, fail: str | None = None):
        self.calls: list[str] = []
        self.stats_calls = 0
        self.fail = fail

    def __call__(self, argv):
        cmd = argv[0]
        if argv[:2] == ["synth", "--stats"]:  # part of the synth step: reads, writes nothing
            self.stats_calls += 1
            return 0
        self.calls.append(cmd)
        if cmd == self.fail:
            return 3
        if cmd == "synth":
            out = Path(argv[1])
            (out / "annotations").mkdir(parents=True)
            (out / "annotations" / "instances_test.json").write_text("{}")
        elif cmd == "ingest":
            (Path(argv[1]) / "catalog").mkdir()
            (Path(argv[1]) / "catalog" / "manifest.json").write_text("{}")
        elif cmd == "train":
            runs = Path(argv[argv.index("--runs_dir") + 1])
            (runs / "demo" / "checkpoints").mkdir(parents=True)
            (runs / "demo" / "checkpoints" / "last.ckpt").write_bytes(b"x")
        elif cmd == "report":
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.md").write_text("# r")
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ")
            append_results(
                out / "results.parquet",
                [
                    {
                        "checkpoint": name,
                        "checkpoint_path": "p",
                        "checkpoint_sha256": None,
                        "task": "retrieval",
                        "metric": "mAP",
                        "value": v,
                        "time_s": 0.1,
                        "created": created,
                    }
                    for name, v in (("demo/last", 0.6), ("init", 0.4))
                ],
            )
        return 0


def test_steps_run_once_then_reused(tmp_path, monkeypatch, capsys):
    fake = FakeCommands()
    monkeypatch.setattr(demo, "_command", fake)
    assert demo.run_demo(tmp_path, quick=True) == 0
    assert fake.calls == ["synth", "ingest", "train", "report"]
    assert fake.stats_calls == 1  # the dataset's properties are printed after it is generated
    out = capsys.readouterr().out
    assert "== [1/4] synth" in out and "| demo/last | 60.0 |" in out and "report.md" in out
    for step in ("synth", "ingest", "train", "report"):
        assert (tmp_path / "steps" / f"{step}.json").is_file()

    fake.calls.clear()
    assert demo.run_demo(tmp_path, quick=True) == 0
    assert fake.calls == []
    assert capsys.readouterr().out.count("done before, reused") == 4


def test_changed_settings_rerun_that_step_and_later(tmp_path, monkeypatch):
    fake = FakeCommands()
    monkeypatch.setattr(demo, "_command", fake)
    assert demo.run_demo(tmp_path, quick=True) == 0
    original = demo.demo_settings

    def more_epochs(quick):
        s = original(quick)
        s.train["max_epochs"] = 99
        return s

    monkeypatch.setattr(demo, "demo_settings", more_epochs)
    fake.calls.clear()
    assert demo.run_demo(tmp_path, quick=True) == 0
    assert fake.calls == ["train", "report"]


def test_failed_step_stops_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_command", FakeCommands(fail="train"))
    assert demo.run_demo(tmp_path, quick=True) == 3
    assert "step train failed (exit 3)" in capsys.readouterr().err
    assert not (tmp_path / "steps" / "train.json").exists()
    fake = FakeCommands()
    monkeypatch.setattr(demo, "_command", fake)
    assert demo.run_demo(tmp_path, quick=True) == 0
    assert fake.calls == ["train", "report"]


def test_output_that_vanished_is_rebuilt(tmp_path, monkeypatch):
    fake = FakeCommands()
    monkeypatch.setattr(demo, "_command", fake)
    assert demo.run_demo(tmp_path, quick=True) == 0
    (tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt").unlink()
    fake.calls.clear()
    assert demo.run_demo(tmp_path, quick=True) == 0
    assert fake.calls == ["train", "report"]


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert demo.main(["--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "demo"), "--quick"]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "demo" / "report"
    assert (report / "report.md").stat().st_size > 0
    rows = pq.read_table(report / "results.parquet").to_pylist()
    subjects = {r["checkpoint"] for r in rows}
    assert subjects == {"demo/last", "init (step-0 weights of demo)", "hand-made descriptor"}
    assert {r["task"] for r in rows} >= {"retrieval", "reid", "count"}
    assert "| demo/last |" in out and str(report / "report.md") in out
    assert list(report.glob("gallery_*.png")) and list(report.glob("projection_*.png"))
    # a second run reuses every step
    assert demo.main(["--out", str(tmp_path / "demo"), "--quick"]) == 0
    assert capsys.readouterr().out.count("done before, reused") == 4
