"""One line, one contract: checkpoint files of every wrong kind, a run folder as `--encoder_ckpt`,
the "no catalog" error of every command that reads a root, and the smaller frictions of a new
user (synth into a missing parent, compare_methods on a host without the device it asks for, the
ingest summary's item counts, split's strata names, a missing RAW folder's advice).

Exit codes (docs/architecture.md, "Exit codes"): 1 = a runtime failure, 2 = bad input or usage.
The commands run through `polyp_ssl.entry.main` (the dispatcher the installed `polyp-ssl` calls:
its one-line error handling included), and once as the real command in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from polyp_ssl.checkpoint import CheckpointError, check_checkpoint_kind, resolve_checkpoint_path
from polyp_ssl.entry import main as entry_main
from tests.embed_factory import make_ckpt, make_tiny_root

REPO = Path(__file__).resolve().parent.parent
INTERNALS = ("Traceback", "IndexError", "KeyError", "weights_only=False", "UnpicklingError")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_tiny_root(tmp_path_factory.mktemp("contract") / "root")


class Payload:
    """A pickled Python object: a weights-only load refuses it."""


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _text(p: Path) -> None:
    p.write_text("model: hmve\nthis is a note, not weights\n")


def _parquet(p: Path) -> None:
    pq.write_table(pa.table({"tracklet_id": ["a"], "vector": [[0.1, 0.2]]}), p)


def _binary(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 4)


def _pickled(p: Path) -> None:
    torch.save({"state_dict": {}, "payload": Payload()}, p)


def _truncated(p: Path) -> None:
    make_ckpt(p)
    p.write_bytes(p.read_bytes()[:300])


# (name, writer, what the message says) for files that are not checkpoints
KINDS = [
    ("empty.ckpt", _empty, "is empty"),
    ("notes.ckpt", _text, "is text, not a checkpoint"),
    ("emb.parquet", _parquet, "is a Parquet file (embeddings?"),
    ("noise.ckpt", _binary, "is not a checkpoint (neither a torch file"),
    ("pickled.ckpt", _pickled, "holds pickled Python objects"),
    ("truncated.ckpt", _truncated, "truncated or damaged"),
]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = entry_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str, prog: str) -> str:
    """The command's one error line (log lines such as `embeddings cache: ...` may come first)."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"polyp-ssl {prog}:")]
    assert len(lines) == 1, err
    return lines[0]


def _eval(root: Path, ckpt: Path | str, out: Path) -> list[str]:
    return ["eval", "--task", "reid", "--dataset_root", str(root), "--encoder_ckpt", str(ckpt),
            "--data_aug_anchorcrop", "--out", str(out)]  # fmt: skip


def _report(root: Path, ckpt: Path | str, out: Path) -> list[str]:
    return ["report", str(ckpt), "--dataset_root", str(root), "--tasks", "reid", "--out", str(out)]


# ----------------------------------------------------------------------- checkpoint kinds


@pytest.mark.parametrize(("name", "write", "says"), KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_wrong_kind_of_checkpoint_is_one_line_exit_2(root, tmp_path, capsys, name, write, says, command):
    bad = tmp_path / name
    write(bad)
    argv = (_eval if command == "eval" else _report)(root, bad, tmp_path / "out")
    code, _, err = _run(capsys, argv)
    line = _error_line(err, command)
    assert code == 2, err
    assert str(bad) in line and says in line, line
    assert not any(s in err for s in INTERNALS), err
    assert not (tmp_path / "out").exists()  # nothing written
    assert not (root / "embeddings").exists() or not any((root / "embeddings").glob(f"{bad.stem}*"))


@pytest.mark.parametrize("command", ["eval", "report", "probe", "count", "embed"])
def test_a_plain_folder_or_a_missing_file_is_named(root, tmp_path, capsys, command):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    for target, says in ((folder, "folder"), (tmp_path / "missing.ckpt", "no such")):
        argv = {
            "eval": _eval(root, target, tmp_path / "o"),
            "report": _report(root, target, tmp_path / "o"),
            "probe": ["probe", "--task", "size", "--dataset_root", str(root), "--encoder_ckpt", str(target),
                      "--data_aug_anchorcrop", "--out", str(tmp_path / "o")],
            "count": ["count", "--dataset_root", str(root), "--encoder_ckpt", str(target),
                      "--data_aug_anchorcrop", "--out", str(tmp_path / "o")],
            "embed": ["embed", "--dataset_root", str(root), "--encoder_ckpt", str(target)],
        }[command]  # fmt: skip
        code, _, err = _run(capsys, argv)
        line = _error_line(err, command)
        assert code == 2 and str(target) in line and says in line, err
        assert not any(s in err for s in INTERNALS), err


def test_the_same_bad_checkpoint_exits_2_from_every_command(root, tmp_path, capsys):
    """The issue's example: one empty file, one message, one exit code, whoever reads it."""
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"")
    runs = {
        "eval": _eval(root, bad, tmp_path / "e"),
        "report": _report(root, bad, tmp_path / "r"),
        "embed": ["embed", "--dataset_root", str(root), "--encoder_ckpt", str(bad)],
        "export": ["export", str(bad), str(tmp_path / "enc.safetensors")],
    }
    messages = set()
    for prog, argv in runs.items():
        code, _, err = _run(capsys, argv)
        assert code == 2, (prog, err)
        line = _error_line(err, prog)
        messages.add(line[line.index(str(bad)) :])
    assert len(messages) == 1, messages  # the same words after the file name


def test_the_real_command_reports_an_empty_checkpoint_in_one_line(root, tmp_path):
    bad = tmp_path / "empty.ckpt"
    bad.write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "polyp_ssl.entry", *_report(root, bad, tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"polyp-ssl report: error: {bad}: is empty" in r.stderr
    assert not any(s in r.stderr for s in INTERNALS), r.stderr


def test_check_checkpoint_kind_accepts_checkpoints_by_content_not_name(tmp_path):
    torch_file = make_ckpt(tmp_path / "weights.parquet")  # a torch zip whatever its name
    assert check_checkpoint_kind(torch_file) == "torch"
    legacy = tmp_path / "legacy.txt"
    torch.save({"a": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)  # a pickle
    assert check_checkpoint_kind(legacy) == "torch"
    from safetensors.torch import save_file

    st = tmp_path / "enc.ckpt"
    save_file({"w": torch.zeros(2)}, st)
    assert check_checkpoint_kind(st) == "safetensors"
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text("encoder_type: hmve\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml: is text.*init:"):
        check_checkpoint_kind(yaml_file)  # points at init:CONFIG, the way to use a config


def test_a_fifo_as_checkpoint_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.ckpt"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="FIFO"):
        check_checkpoint_kind(fifo)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ run folder as --encoder_ckpt


@pytest.fixture
def run_folder(tmp_path) -> Path:
    run = tmp_path / "runs" / "exp"
    (run / "checkpoints").mkdir(parents=True)
    make_ckpt(run / "checkpoints" / "last.ckpt")
    return run


def test_a_run_folder_as_encoder_ckpt_uses_its_last_ckpt(root, tmp_path, run_folder, capsys, caplog):
    caplog.set_level("INFO", logger="polyp_ssl.checkpoint")
    code, out, err = _run(capsys, _eval(root, run_folder, tmp_path / "out"))
    assert code == 0, err
    assert f"{run_folder} is a run folder: using its checkpoints/last.ckpt" in caplog.text
    metrics = json.loads((tmp_path / "out" / "metrics_reid.json").read_text())
    assert "exp_last" in json.dumps(metrics)  # the embeddings of runs/exp/checkpoints/last.ckpt
    # the same as naming the file: the cached embeddings are reused, not computed again
    code, out, err = _run(
        capsys,
        [
            "embed",
            "--dataset_root",
            str(root),
            "--encoder_ckpt",
            str(run_folder / "checkpoints" / "last.ckpt"),
        ],
    )
    assert code == 0 and "reusing" in out, out + err


def test_a_run_folder_without_last_ckpt_is_named(root, tmp_path, capsys):
    run = tmp_path / "runs" / "fresh"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("exp_name: fresh\n")
    code, _, err = _run(capsys, _eval(root, run, tmp_path / "out"))
    assert code == 2 and "is a run folder without checkpoints/last.ckpt" in err, err
    with pytest.raises(CheckpointError, match="run folder without"):
        resolve_checkpoint_path(run)


# ------------------------------------------------------------------------------ no catalog


def test_no_catalog_is_one_message_exit_2_from_every_command(tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    ckpt = make_ckpt(tmp_path / "enc.ckpt")
    runs = {
        "catalog": ["catalog", str(bare), "SELECT 1"],
        "verify": ["verify", str(bare)],
        "train": ["train", "--dataset_root", str(bare), "--runs_dir", str(tmp_path / "runs"),
                  "--exp_name", "x", "--max_steps", "1", "--aug_anchorcrop", "--eval_aug_anchorcrop"],
        "eval": _eval(bare, ckpt, tmp_path / "o"),
        "count": ["count", "--dataset_root", str(bare), "--encoder_ckpt", str(ckpt), "--data_aug_anchorcrop"],
        "embed": ["embed", "--dataset_root", str(bare), "--encoder_ckpt", str(ckpt)],
        "report": _report(bare, ckpt, tmp_path / "r"),
    }  # fmt: skip
    expected = f"error: {bare} has no catalog ({bare}/catalog/manifest.json is missing)"
    for prog, argv in runs.items():
        code, _, err = _run(capsys, argv)
        assert code == 2, (prog, err)
        assert _error_line(err, prog).startswith(f"polyp-ssl {prog}: {expected}"), (prog, err)
    assert not (tmp_path / "runs" / "x").exists()  # train refused before making its run folder
    code, _, err = _run(capsys, ["catalog", str(tmp_path / "never"), "SELECT 1"])
    assert code == 2 and f"{tmp_path / 'never'} has no catalog: no such directory" in err


# ------------------------------------------------------------------ the one exit-code mapping


RERUN = "(rerun with --debug for the traceback)"


class _BadInput(ValueError):
    bad_input = True


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (_BadInput("no  such\nthing"), 2, "polyp-ssl x: error: no such thing"),
        (RuntimeError("boom"), 1, f"polyp-ssl x: error: RuntimeError: boom {RERUN}"),
        (FileNotFoundError(2, "No such file", "/nope"), 1, "polyp-ssl x: /nope: No such file"),
        (KeyboardInterrupt(), 130, "polyp-ssl x: interrupted; rerun"),
    ],
    ids=["bad_input", "other", "oserror", "interrupt"],
)  # fmt: skip
def test_run_reported_maps_each_failure_to_one_line_and_its_code(exc, code, line, capsys, debug_off):
    from polyp_ssl.shards.cli_errors import exit_code, run_reported

    def command():
        raise exc

    assert run_reported("polyp-ssl x", command, "rerun") == code == exit_code(exc)
    assert capsys.readouterr().err.strip() == line


def test_run_reported_lets_the_traceback_through_under_debug(monkeypatch):
    from polyp_ssl.shards.cli_errors import DEBUG_ENV, run_reported

    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="boom"):
        run_reported("polyp-ssl x", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert run_reported("polyp-ssl x", lambda: None) == 0


# ------------------------------------------------------------------------- smaller items


SMALL_SYNTH = ["--videos", "3", "--frames-per-video", "40", "--width", "64", "--height", "64", "--quiet"]


def test_synth_creates_missing_parents(tmp_path, capsys):
    out = tmp_path / "raw" / "deeper" / "X"
    code, _, err = _run(capsys, ["synth", str(out), *SMALL_SYNTH])
    assert code == 0, err
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        "instances_test.json", "instances_train.json", "instances_val.json",
    ]  # fmt: skip
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = _run(capsys, ["synth", str(a_file / "X"), *SMALL_SYNTH])
    assert code == 2 and f"{a_file} (a parent of the output folder" in err and "is not a folder" in err
    assert a_file.read_text() == "x"


def test_convert_and_ingest_create_missing_parents(tmp_path, capsys):
    raw = tmp_path / "raw" / "sun"
    code, _, err = _run(capsys, ["synth", str(raw), "--layout", "sun", *SMALL_SYNTH])
    assert code == 0, err
    conv = tmp_path / "a" / "b" / "sun"
    code, _, err = _run(capsys, ["convert", "sun", str(raw), str(conv), "--no-progress"])
    assert code == 0 and (conv / "annotations").is_dir(), err
    ing = tmp_path / "c" / "d" / "ingested"
    code, _, err = _run(capsys, ["ingest", str(conv), "--out", str(ing), "--no-progress"])
    assert code == 0 and (ing / "catalog" / "manifest.json").is_file(), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without a CUDA device")
@pytest.mark.parametrize("device", ["gpu"])
def test_compare_methods_gpu_on_a_cpu_host_fails_before_any_data(tmp_path, device):
    out = tmp_path / "cmp"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "--synth", "--out", str(out),
         "--device", device, "--seeds", "0", "--max_steps", "1", "--scale", "0.1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"--device {device}: no CUDA device on this host" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()  # nothing generated, nothing ingested
    assert time.monotonic() - t0 < 60


def test_compare_methods_dry_run_may_plan_a_gpu_run_anywhere(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_methods.py"), "--synth", "--out",
         str(tmp_path / "c"), "--device", "gpu", "--seeds", "0", "--arms", "ntssl", "--dry_run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_ingest_summary_counts_items_not_rows(tmp_path, capsys):
    """A converter's report row "N boxes dropped" counts N in ingest's summary (the issue: 1 for 47)."""
    raw = tmp_path / "raw"
    code, _, err = _run(capsys, ["synth", str(raw), "--layout", "ldpolyp", *SMALL_SYNTH])
    assert code == 0, err
    conv = tmp_path / "conv"
    code, _, err = _run(capsys, ["convert", "ldpolyp", str(raw), str(conv), "--no-progress"])
    assert code == 0, err
    report = json.loads((conv / "convert_report.json").read_text())
    dropped = report["boxes"]["dropped"]["extra_box_same_polyp"]
    assert dropped > 1  # the case of the issue: several boxes behind one report row
    code, out, err = _run(capsys, ["ingest", str(conv), "--out", str(tmp_path / "ing"), "--no-progress"])
    assert code == 0, err
    summary = json.loads(out[out.index("{") :])
    assert summary["errors"]["extra_box_same_polyp (dropped)"] == dropped
    assert summary["errors"]["boxes_converted (converted)"] == report["boxes"]["converted"]
    assert summary["errors"]["box_clamped (clamped)"] == report["boxes"]["clamped"]
    rows = pq.read_table(tmp_path / "ing" / "catalog" / "errors.parquet").num_rows
    assert summary["error_rows"] == rows < sum(summary["errors"].values())


def test_split_prints_strata_by_name(tmp_path, capsys):
    data = tmp_path / "data"
    code, _, err = _run(capsys, ["synth", str(data), *SMALL_SYNTH])
    assert code == 0, err
    for stratify, names in (
        ("size", ("diminutive (<= 5 mm)", "larger (> 5 mm)")),
        ("histology", ("adenoma", "non-adenoma", "unknown")),
    ):
        root = tmp_path / stratify
        shutil.copytree(data, root)
        code, out, err = _run(capsys, ["split", str(root), "--fractions", "0.5,0.5", "--stratify", stratify])
        assert code == 0, err
        strata = [ln.split("strata: ", 1)[1] for ln in out.splitlines() if "strata: " in ln]
        assert len(strata) == 2, out
        for text in strata:
            for part in text.split(", "):
                label, n = part.rsplit(" ", 1)
                assert label in names and int(n) > 0, out
        assert "'0'" not in out and "'1'" not in out


def test_a_missing_raw_folder_does_not_advise_on_error_skip(tmp_path, capsys):
    code, _, err = _run(capsys, ["convert", "sun", str(tmp_path / "nothere"), str(tmp_path / "out")])
    assert code == 1 and "raw directory not found" in err, err
    assert "--on-error skip" not in err  # skipping items cannot help a missing folder
    assert not (tmp_path / "out").exists()


def test_an_item_error_still_advises_on_error_skip(tmp_path, capsys):
    from tests.convert_factory import build_raw

    raw = build_raw(tmp_path / "raw", bad=("001-001", 3, "unique_id"))
    code, _, err = _run(capsys, ["convert", "realcolon", str(raw), str(tmp_path / "rc"), "--no-progress"])
    assert code == 1 and "001-001_3.xml" in err and "unique_id" in err, err
    assert "--on-error skip" in err
