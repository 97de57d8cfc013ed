"""`polyp-ssl reproduce` and `polyp-ssl synth --layout realcolon`.

Default run: the REAL-Colon layout and the paper's split through `convert realcolon`, bad inputs
(one line, exit 2, nothing written), the lock on OUT, a run with every input omitted (every cell
not run; the same command again skips), the stage records' reasons.

Slow (`make test-all`): `reproduce` on synthetic downloads of all four datasets with a tiny
budget (`--settings`), as a user runs it (the CLI in a child process): the paper's datasets, the
results and the table, the same command again in seconds, a SIGKILL of the process group during
training and a rerun giving the same table, an omitted input and a changed option.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from polyp_ssl.eval.reproduce_stages import why_rerun
from polyp_ssl.eval.reproduce_table import PAPER
from polyp_ssl.ingest.convert.realcolon import LESION_FIELDS
from polyp_ssl.ingest.synth.generate import SynthConfig
from polyp_ssl.ingest.synth.layouts import write_layout
from polyp_ssl.shards.lock import output_lock

STAGES = [
    "convert_realcolon",
    "convert_sun",
    "convert_polypsset",
    "convert_polypsize",
    "data_rc27",
    "data_rc19",
    "data_rsp",
    "data_rspp",
    "train_s0",
    "report_rc19",
    "report_rsp",
    "report_rspp",
    "table",
]
# a budget for tests: a tiny encoder trained 4 steps (a checkpoint each), short tracklets kept
TINY = {
    "ingest": {"store-size": 48},
    "train": {
        "max_steps": 4,
        "ckpt_every_n_steps": 1,
        "batch_size": 8,
        "im_size": 32,
        "num_workers": 0,
        "hmve_d_model": 32,
        "hmve_d_feedforward": 64,
        "d_proj": 16,
    },
    "report": {"ci_resamples": 200, "min_tracklet_frames": 16, "batch_size": 32},
}


def cli(*args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyp_ssl", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


def stage_lines(stdout: str) -> dict[str, str]:
    """`[i/n] NAME: what` lines as {NAME: what}."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[") and "] " in line and ": " in line:
            name, what = line.split("] ", 1)[1].split(": ", 1)
            out[name] = what
    return out


# ---------------------------------------------------------------- the REAL-Colon layout


def expected_paper_split(raw: Path) -> dict[str, str]:
    """The paper's split computed from the raw files alone: per site, videos 001-008 with a lesion
    in lesion_info.csv are train, 009-010 val, 011-015 test."""
    with open(raw / "lesion_info.csv", newline="") as f:
        with_lesion = {r["unique_video_name"] for r in csv.DictReader(f)}
    out = {}
    for d in raw.glob("*_frames"):
        video = d.name[: -len("_frames")]
        n = int(video.split("-")[1])
        if video in with_lesion:
            out[video] = "train" if n <= 8 else "val" if n <= 10 else "test"
    return out


def test_synth_realcolon_layout_converts_with_the_paper_split(tmp_path):
    raw, conv = tmp_path / "raw", tmp_path / "rc"
    r = cli(
        "synth", str(raw), "--layout", "realcolon", "--videos", "32", "--frames-per-video", "16",
        "--width", "64", "--height", "64", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    videos = sorted(d.name[: -len("_frames")] for d in raw.glob("*_frames"))
    # 15 videos per site, the last site holding what is left
    assert videos[:15] == [f"001-{n:03d}" for n in range(1, 16)]
    assert videos[15:30] == [f"002-{n:03d}" for n in range(1, 16)] and videos[30:] == ["003-001", "003-002"]
    for v in videos:  # one VOC file per frame, also for frames without boxes
        frames = sorted(p.stem for p in (raw / f"{v}_frames").glob("*.jpg"))
        assert sorted(p.stem for p in (raw / f"{v}_annotations").glob("*.xml")) == frames
        assert len(frames) == 16
    with open(raw / "lesion_info.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(LESION_FIELDS) <= set(rows[0]) and {"site", "histology_extended"} <= set(rows[0])
    with open(raw / "video_info.csv", newline="") as f:
        info = list(csv.DictReader(f))
    assert [r["unique_video_name"] for r in info] == videos
    assert {"age", "sex", "endoscope_brand", "fps", "num_frames", "num_lesions", "bbps"} <= set(info[0])
    # each listed lesion's boxes carry its unique_id in its own video's XML files
    xml_ids = defaultdict(set)
    for xml in raw.glob("*_annotations/*.xml"):
        text = xml.read_text()
        for part in text.split("<unique_id>")[1:]:
            xml_ids[xml.parent.name[: -len("_annotations")]].add(part.split("</unique_id>")[0])
    by_video = defaultdict(set)
    for row in rows:
        by_video[row["unique_video_name"]].add(row["unique_object_id"])
    assert dict(by_video) == dict(xml_ids)
    expected = expected_paper_split(raw)
    no_lesion = sorted(set(videos) - set(expected))
    assert {"001-004", "001-013", "002-004"} <= set(no_lesion)  # and any whose polyps never show
    assert json.loads((raw / "synth_layout.json").read_text())["no_lesion"] == no_lesion

    r = cli(
        "convert", "realcolon", str(raw), str(conv), "--split-file", "paper", "--no-progress", timeout=300
    )
    assert r.returncode == 0, r.stderr
    got = {}
    for split in ("train", "val", "test"):
        coco = json.loads((conv / "annotations" / f"instances_{split}.json").read_text())
        got.update({img["sequence_id"]: split for img in coco["images"]})
    assert got == expected
    report = json.loads((conv / "convert_report.json").read_text())
    assert report["videos_not_in_split_file"] == no_lesion


# ---------------------------------------------------------------- bad input, lock, no input


def test_bad_inputs_are_one_line_and_exit_2(tmp_path):
    sun = tmp_path / "sun"
    write_layout("sun", SynthConfig(videos=2, frames_per_video=16, width=64, height=64), sun)
    out = tmp_path / "out"
    bad_settings = tmp_path / "s.json"
    bad_settings.write_text(json.dumps({"training": {"max_steps": 1}}))
    cases = [
        (["--realcolon", str(tmp_path / "nowhere")], "--realcolon", "does not exist"),
        (["--realcolon", str(sun)], "--realcolon", "not realcolon's download layout"),
        (["--sun", str(sun / "annotation_txt")], "--sun", "not sun's download layout"),
        (["--polypsize", str(sun)], "--polypsize", "not polypsize's download layout"),
        (["--sun", str(sun), "--settings", str(bad_settings)], "--settings", "'training'"),
        (["--sun", str(sun), "--baselines", "zoo:x"], "--baselines", "zoo:NAME=PATH"),
        (["--sun", str(sun), "--seeds", "0"], "--seeds", ">= 1"),
        (["--sun", str(sun), "--out", str(sun / "out")], "--sun", "inside --sun"),
    ]
    for args, names, says in cases:
        r = cli("reproduce", "--out", str(out), *args, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and names in lines[0] and says in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert not out.exists() and not (sun / "out").exists()  # nothing written


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out, "polyp-ssl reproduce"):
        r = cli("reproduce", "--out", str(out), timeout=120)
    assert r.returncode == 2
    assert "polyp-ssl reproduce" in r.stderr and str(os.getpid()) in r.stderr
    assert not (out / "stages").exists()


def test_every_input_omitted_marks_every_cell_not_run_and_again_skips(tmp_path):
    out = tmp_path / "out"
    r = cli("reproduce", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = stage_lines(r.stdout)
    assert list(lines) == STAGES
    assert lines["convert_sun"] == "not run (needs --sun)"
    assert lines["data_rspp"] == "not run (needs --realcolon, --sun, --polypsize, --polypsset)"
    assert lines["train_s0"] == "not run (needs --realcolon)"
    table = (out / "table.md").read_text()
    assert "| paper (published) | 63.13 | 94.17 | 70.24 | 82.38 |" in table
    assert "not run (needs --realcolon, --sun, --polypsize, --polypsset)" in table
    assert pq.read_table(out / "results.parquet").num_rows == 0
    again = cli("reproduce", "--out", str(out), timeout=120)
    assert stage_lines(again.stdout)["table"] == "unchanged, skipped"
    assert (out / "table.md").read_text() == table


def test_a_failing_command_names_its_stage_and_log_and_a_fixed_input_reruns(tmp_path):
    raw, out = tmp_path / "realcolon", tmp_path / "out"
    write_layout("realcolon", SynthConfig(videos=3, frames_per_video=16, width=64, height=64), raw)
    xml = raw / "001-002_annotations" / "001-002_5.xml"
    good = xml.read_text()
    xml.write_text(good.replace("</annotation>", ""))  # not well-formed
    r = cli("reproduce", "--realcolon", str(raw), "--out", str(out), timeout=300)
    assert r.returncode in (1, 2), r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "stage convert_realcolon: polyp-ssl convert exited" in line[0], r.stderr
    assert "001-002_5.xml" in line[0] and str(out / "logs" / "convert_realcolon.log") in line[0]
    assert not (out / "converted" / "realcolon").exists()  # nothing that looks complete
    xml.write_text(good)
    r = cli(
        "reproduce", "--realcolon", str(raw), "--out", str(out), "--settings", str(tmp_path / "none.json")
    )
    assert r.returncode == 2 and "--settings" in r.stderr  # (a missing settings file: refused first)
    (tmp_path / "stop.json").write_text(json.dumps({"ingest": {"store-size": "x"}}))
    r = cli(
        "reproduce", "--realcolon", str(raw), "--out", str(out), "--settings", str(tmp_path / "stop.json")
    )
    lines = stage_lines(r.stdout)
    assert lines["convert_realcolon"] == "running (input files changed: realcolon)"
    assert (out / "converted" / "realcolon" / "annotations" / "instances_train.json").is_file()
    assert r.returncode == 2 and "stage data_rc27: polyp-ssl ingest exited 2" in r.stderr  # bad option: 2


def test_why_a_stage_runs_again(tmp_path):
    out_file = tmp_path / "x"
    out_file.write_text("1")
    from polyp_ssl.eval.reproduce_stages import fingerprint

    ident = {"command": ["train", "--max_steps", "3"], "upstream": {"data_rc27": "a"}}
    done = {"state": "done", "identity": ident, "fingerprint": fingerprint([out_file], tmp_path)}
    assert why_rerun(None, ident, [out_file], tmp_path) == "not run before"
    assert why_rerun(done, ident, [out_file], tmp_path) is None
    changed = {**ident, "command": ["train", "--max_steps", "4"]}
    assert why_rerun(done, changed, [out_file], tmp_path) == "options changed: command (--max_steps 3 -> 4)"
    upstream = {**ident, "upstream": {"data_rc27": "b"}}
    assert why_rerun(done, upstream, [out_file], tmp_path) == "ran again before it: data_rc27"
    assert why_rerun({"state": "started", "identity": ident}, ident, [out_file], tmp_path) is None
    out_file.write_text("22")
    assert why_rerun(done, ident, [out_file], tmp_path) == "its output changed or is missing"


# ---------------------------------------------------------------- end to end (slow)


def make_downloads(root: Path) -> dict[str, Path]:
    """Synthetic downloads of the four datasets in their raw layouts."""
    size = {"frames_per_video": 160, "width": 64, "height": 64}
    write_layout("realcolon", SynthConfig(videos=30, seed=0, **size), root / "realcolon", workers=2)
    write_layout("sun", SynthConfig(videos=4, seed=1, **size), root / "sun", workers=2)
    write_layout("polypsset", SynthConfig(videos=8, seed=2, **size), root / "polypsset", workers=2)
    write_layout("table", SynthConfig(videos=4, seed=3, **size), root / "polypsize", workers=2)
    return {
        "realcolon": root / "realcolon",
        "sun": root / "sun",
        "polypsset": root / "polypsset",
        "polypsize": root / "polypsize" / "boxes.csv",
    }


def reproduce_args(raw: dict[str, Path], out: Path, settings: Path, omit: tuple[str, ...] = ()) -> list[str]:
    args = ["reproduce"]
    for name, path in raw.items():
        if name not in omit:
            args += [f"--{name}", str(path)]
    return [*args, "--out", str(out), "--settings", str(settings)]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    raw = make_downloads(root / "raw")
    settings = root / "tiny.json"
    settings.write_text(json.dumps(TINY))
    out = root / "out"
    r = cli(*reproduce_args(raw, out, settings), timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {
        "raw": raw,
        "out": out,
        "settings": settings,
        "stdout": r.stdout,
        "table": (out / "table.md").read_text(),
    }


def catalog(root: Path, table: str) -> list[dict]:
    return pq.read_table(root / "catalog" / f"{table}.parquet").to_pylist()


def videos(root: Path) -> set[str]:
    return {r["video_id"] for r in catalog(root, "videos")}


@pytest.mark.slow
def test_reproduce_builds_the_paper_datasets(reproduced):
    raw, data = reproduced["raw"], reproduced["out"] / "data"
    assert list(stage_lines(reproduced["stdout"])) == STAGES
    split = expected_paper_split(raw["realcolon"])
    rc27 = {f"realcolon/{v}" for v, s in split.items() if s == "train"}
    rc19 = {f"realcolon/{v}" for v, s in split.items() if s != "train"}
    assert videos(data / "rc27") == rc27 and len(rc27) == 14
    assert videos(data / "rc19") == rc19 and len(rc19) == 13
    folders = {n: raw[n] if n != "polypsize" else raw[n].parent for n in raw}
    layout = {n: json.loads((folders[n] / "synth_layout.json").read_text()) for n in raw}
    sun = {f"sun/{c}" for c in layout["sun"]["polyps"]}
    polypsset = {f"polypsset/{c}" for c in layout["polypsset"]["polyps"]}
    with open(raw["polypsize"], newline="") as f:
        polypsize = {f"polypsize/{r['video']}" for r in csv.DictReader(f) if r["identity"]}
    assert videos(data / "rsp") == rc19 | sun | polypsize
    assert videos(data / "rspp") == rc19 | sun | polypsize | polypsset
    for d in ("rsp", "rspp"):  # 70/30 by polyp: no polyp in both splits
        splits = defaultdict(set)
        for row in catalog(data / d, "polyps"):
            splits[row["identity_id"]].add(row["split"])
        assert all(len(s) == 1 for s in splits.values()), d
        n_train = sum(s == {"train"} for s in splits.values())
        assert abs(n_train / len(splits) - 0.7) < 0.15, (d, n_train, len(splits))


@pytest.mark.slow
def test_results_and_table_hold_the_headline_metrics(reproduced):
    out = reproduced["out"]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    cell = {(r["checkpoint"], r["task"], r["metric"]): r for r in rows}
    table = reproduced["table"]
    assert "| paper (published) | 63.13 | 94.17 | 70.24 | 82.38 |" in table
    headline = [("retrieval", "mAP", "rc19"), ("reid", "AUROC", "rc19"), ("size", "F1", "rsp"),
                ("histology", "accuracy", "rspp")]  # fmt: skip
    labels = {r["checkpoint"] for r in rows}
    assert "ntssl_s0/last" in labels and any("init" in x for x in labels) and len(labels) == 3
    for label in labels:
        texts = []
        for task, metric, dataset in headline:
            r = cell[(label, task, metric)]
            assert r["dataset_root"] == str((out / "data" / dataset).resolve())
            assert r["value_ci_low"] <= r["value"] <= r["value_ci_high"]
            assert r["ci_level"] == 0.95
            texts.append(
                f"{100 * r['value']:.2f} [{100 * r['value_ci_low']:.2f}, {100 * r['value_ci_high']:.2f}]"
            )
        assert f"| {label} | " + " | ".join(texts) + " |" in table
    assert PAPER == {"retrieval": 63.13, "reid": 94.17, "size": 70.24, "histology": 82.38}
    page = out / "reports" / "rc19" / "report.html"
    if page.exists():  # written by report (html on by default): the rc19 page is OUT's
        assert (out / "report.html").read_bytes() == page.read_bytes()


@pytest.mark.slow
def test_the_same_command_again_skips_every_stage_in_seconds(reproduced):
    t0 = time.perf_counter()
    r = cli(*reproduce_args(reproduced["raw"], reproduced["out"], reproduced["settings"]))
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert stage_lines(r.stdout) == dict.fromkeys(STAGES, "unchanged, skipped")
    assert elapsed < 20, elapsed
    assert (reproduced["out"] / "table.md").read_text() == reproduced["table"]


@pytest.mark.slow
def test_a_kill_during_training_and_a_rerun_give_the_same_table(reproduced, tmp_path):
    out = tmp_path / "out"
    skip = ("runs", "reports", "results.parquet", "table.md", "report.html")
    top = reproduced["out"]
    shutil.copytree(top, out, ignore=lambda d, names: [n for n in names if Path(d) == top and n in skip])
    for name in ("train_s0", "report_rc19", "report_rsp", "report_rspp", "table"):
        (out / "stages" / f"{name}.json").unlink()
        (out / "logs" / f"{name}.log").unlink(missing_ok=True)
    args = reproduce_args(reproduced["raw"], out, reproduced["settings"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyp_ssl", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    last = out / "runs" / "ntssl_s0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 900
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "training ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: reproduce and its training child
    proc.wait(timeout=60)
    record = json.loads((out / "stages" / "train_s0.json").read_text())
    assert record["state"] == "started"
    r = cli(*args, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:]
    lines = stage_lines(r.stdout)
    assert lines["data_rc27"] == "unchanged, skipped"
    assert lines["train_s0"] == "continuing an interrupted run"
    log = (out / "logs" / "train_s0.log").read_text()
    assert log.count("$ polyp-ssl train") == 2 and log.strip().splitlines()[-1]  # two invocations
    assert [line for line in log.splitlines() if line.startswith("$ polyp-ssl train")][1].endswith("--resume")
    assert (out / "table.md").read_text() == reproduced["table"]


@pytest.mark.slow
def test_an_omitted_input_marks_its_rows_not_run(reproduced):
    raw, out, settings = reproduced["raw"], reproduced["out"], reproduced["settings"]
    r = cli(*reproduce_args(raw, out, settings, omit=("polypsset",)))
    assert r.returncode == 0, r.stderr
    lines = stage_lines(r.stdout)
    assert lines["convert_polypsset"] == "not run (needs --polypsset)"
    assert lines["data_rspp"] == lines["report_rspp"] == "not run (needs --polypsset)"
    assert lines["report_rsp"] == "unchanged, skipped" and lines["train_s0"] == "unchanged, skipped"
    table = (out / "table.md").read_text()
    row = next(x for x in table.splitlines() if x.startswith("| ntssl_s0/last |"))
    assert row.split(" | ")[-1] == "not run (needs --polypsset) |"
    old = next(x for x in reproduced["table"].splitlines() if x.startswith("| ntssl_s0/last |"))
    assert row.split(" | ")[:-1] == old.split(" | ")[:-1]  # the other cells as before
    assert "histology" not in {r["task"] for r in pq.read_table(out / "results.parquet").to_pylist()}
    # given again: its stages' records still stand, only the table is made again
    r = cli(*reproduce_args(raw, out, settings))
    lines = stage_lines(r.stdout)
    assert [s for s, what in lines.items() if what != "unchanged, skipped"] == ["table"]
    assert (out / "table.md").read_text() == reproduced["table"]


@pytest.mark.slow
def test_a_changed_option_reruns_its_stage_and_those_after(reproduced, tmp_path):
    settings = tmp_path / "seed7.json"
    settings.write_text(json.dumps({**TINY, "split": {"seed": 7}}))
    r = cli(*reproduce_args(reproduced["raw"], reproduced["out"], settings), timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:]
    lines = stage_lines(r.stdout)
    unchanged = [s for s, what in lines.items() if what == "unchanged, skipped"]
    assert unchanged == STAGES[:6] + ["train_s0", "report_rc19"]
    assert lines["data_rsp"] == lines["data_rspp"] == "running (options changed: commands (--seed 42 -> 7))"
    assert lines["report_rsp"] == "running (ran again before it: data_rsp)"
    assert lines["table"] == "running (ran again before it: report_rsp, report_rspp)"
