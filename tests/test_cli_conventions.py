"""Conventions every `polyp-ssl` subcommand keeps: help text and default for every option, a fast
`--help` that loads no torch, `--version`, one line per log message, the catalog's statements and
view names, and a YAML `--config` checked as the command line is (a run's own config.yaml included)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from polyp_ssl.config import TrainConfig, default_num_workers
from polyp_ssl.entry import COMMANDS
from polyp_ssl.entry import main as entry_main
from polyp_ssl.shards.schema import embeddings_schema
from tests.cli_walk import NESTED, all_parsers, capture_parser, problems
from tests.shard_factory import make_root

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------- help texts


@pytest.mark.parametrize(
    "name,first",
    [(n, None) for n in COMMANDS] + [(n, f) for n, f in NESTED],
    ids=list(COMMANDS) + [f"{n}-{f}" for n, f in NESTED],
)
def test_every_option_has_help_and_shows_its_default(name, first):
    parser = capture_parser(name, [first] if first else None)
    assert problems(parser) == []
    # the formatted help really carries the defaults (not only the parser's attributes)
    text = parser.format_help()
    flat = " ".join(text.split())
    for action in parser._actions:
        default = action.default
        if action.option_strings and isinstance(default, str | int | float) and not isinstance(default, bool):
            if default not in ("", "==SUPPRESS==") and "%(default)" not in (action.help or "x"):
                continue  # the help explains the default in words
            if default not in ("", "==SUPPRESS=="):
                assert str(default) in flat, (name, action.dest)


def test_the_walk_covers_every_subcommand():
    names = {n.split()[0] for n, _ in all_parsers()}
    assert names == set(COMMANDS)


def test_a_flag_without_help_is_found():
    import argparse

    from polyp_ssl.shards.cli_help import DefaultsHelpFormatter

    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    p.add_argument("--quiet_one", type=int, default=3)
    p.add_argument("--documented", type=int, default=4, help="a number")
    assert problems(p) == ["--quiet_one: no help text"]
    assert "a number (default: 4)" in p.format_help()
    plain = argparse.ArgumentParser()
    plain.add_argument("--documented", type=int, default=4, help="a number")
    assert problems(plain) == ["--documented: default 4 not shown"]


_HELP_PROBE = """
import sys, time
from polyp_ssl.entry import main
t = time.perf_counter()
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "lightning", "torchvision", "sklearn", "matplotlib") if m in sys.modules)
print("PROBE", code, round(time.perf_counter() - t, 3), ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_is_fast_and_loads_no_torch(name):
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    wall = time.perf_counter() - t0
    probe = [line for line in out.stderr.splitlines() if line.startswith("PROBE")]
    assert probe, out.stderr[-2000:]
    _, code, seconds, heavy = (probe[-1].split(" ") + [""])[:4]
    assert code in ("0", "None"), out.stderr[-2000:]
    assert "usage: polyp-ssl" in out.stdout
    assert heavy == "", f"`polyp-ssl {name} --help` imported {heavy}"
    # printing help is well under a second (a 2-core shared machine: generous bound on the whole process)
    assert float(seconds) < 1.0, seconds
    assert wall < 5.0, wall


def test_version(capsys):
    from importlib.metadata import version

    assert entry_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"polyp-ssl {version('polyp-ssl')}"
    assert "--version" in __import__("polyp_ssl.entry").entry.usage()


# ---------------------------------------------------------------------------------- catalog


@pytest.fixture(scope="module")
def catalog_root(tmp_path_factory):
    root = make_root(tmp_path_factory.mktemp("catalog"), videos={"train": 2, "val": 1})
    from polyp_ssl.shards.catalog import query

    ids = query(
        root, "SELECT tracklet_id, sample_key, split, video_id, identity_id, start_frame FROM tracklets"
    )
    rows = [dict(r, fragment_index=-1, vector=[float(i), 1.0, 0.5]) for i, r in enumerate(ids.to_pylist())]
    (root / "embeddings").mkdir()
    long_name = "hmve_resnet50_im232_batch60_fragments8_seed42_epoch49"
    pq.write_table(
        pa.Table.from_pylist(rows, schema=embeddings_schema(3)), root / "embeddings" / f"{long_name}.parquet"
    )
    return root


def _catalog(argv, capsys, stdin: str | None = None, monkeypatch=None):
    from polyp_ssl.shards.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_catalog_tables_prints_full_view_names(catalog_root, capsys):
    code, out, _ = _catalog([str(catalog_root), "--tables"], capsys)
    assert code == 0
    view = "embeddings_hmve_resnet50_im232_batch60_fragments8_seed42_epoch49"
    assert len(view) > 40  # longer than the default cell width
    assert view in out.split()
    # the printed name is pasted into a query and works
    code, out, _ = _catalog(
        [str(catalog_root), f'SELECT count(*) AS n FROM "{view}"', "--format", "json"], capsys
    )
    assert code == 0 and json.loads(out)[0]["n"] > 0


def test_catalog_prints_every_statement_under_a_header(catalog_root, capsys):
    sql = "SELECT count(*) AS n_tracklets FROM tracklets; SELECT 'a;b' AS s; SELECT 7 AS seven"
    code, out, _ = _catalog([str(catalog_root), sql], capsys)
    assert code == 0
    assert "-- statement 1/3: SELECT count(*) AS n_tracklets FROM tracklets" in out
    assert "-- statement 2/3: SELECT 'a;b' AS s" in out  # a ';' inside a string does not split
    assert "-- statement 3/3: SELECT 7 AS seven" in out
    assert out.index("n_tracklets") < out.index("a;b") < out.index("seven")
    assert out.count("(1 row)") == 3


def test_catalog_one_statement_has_no_header(catalog_root, capsys):
    code, out, _ = _catalog([str(catalog_root), "SELECT 1 AS one;"], capsys)
    assert code == 0 and "-- statement" not in out and "one" in out


def test_catalog_refuses_several_statements_as_csv_or_json(catalog_root, capsys):
    for fmt in ("csv", "json"):
        code, out, err = _catalog([str(catalog_root), "SELECT 1; SELECT 2", "--format", fmt], capsys)
        assert code == 2 and out == ""
        assert err.strip() == (
            f"polyp-ssl catalog: error: --format {fmt} takes one statement, got 2 "
            "(run them one by one, or use --format table)"
        )


def test_catalog_reads_sql_from_stdin(catalog_root, capsys, monkeypatch):
    code, out, _ = _catalog(
        [str(catalog_root), "-", "--format", "json"], capsys, "SELECT 42 AS answer;\n", monkeypatch
    )
    assert code == 0 and json.loads(out) == [{"answer": 42}]
    code, out, err = _catalog([str(catalog_root), "-"], capsys, "  \n", monkeypatch)
    assert code == 2 and err.strip() == "polyp-ssl catalog: error: no SQL statement on stdin"


def test_catalog_names_the_failing_statement(catalog_root, capsys):
    code, out, err = _catalog([str(catalog_root), "SELECT 1 AS ok; SELECT * FROM no_such_view"], capsys)
    assert code == 1
    assert "ok" in out  # the first result was printed
    assert err.startswith("polyp-ssl catalog: error: statement 2/2: ") and "no_such_view" in err
    assert len(err.strip().splitlines()) == 1


# -------------------------------------------------------------------------------- train config


def test_num_workers_default_is_bounded_by_the_cpus():
    assert default_num_workers(2) == 2
    assert default_num_workers(1) == 1
    assert default_num_workers(64) == 8
    assert TrainConfig().num_workers == min(8, len(os.sched_getaffinity(0)))


def _yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("batch_size", "sixty", "batch_size: invalid int value: 'sixty' (expected int, got str)"),
        ("lr", "fast", "lr: invalid float value: 'fast' (expected float, got str)"),
        ("aug_hflip", "yes please", "aug_hflip: invalid bool value: 'yes please' (expected bool, got str)"),
        ("im_size", True, "im_size: invalid int value: True (expected int, got bool)"),
        ("loss_milnce_weights", ["a"], "loss_milnce_weights: invalid list[float] value: ['a']"),
        ("batch_size", None, "batch_size: invalid int value: None (a value is required)"),
    ],
)
def test_yaml_wrong_type_is_one_line_naming_key_value_and_type(tmp_path, capsys, key, value, expected):
    from polyp_ssl.train_cli import main

    cfg = _yaml(tmp_path, {"dataset_root": str(tmp_path), key: value})
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"polyp-ssl train: error: --config {cfg}: {expected}")


def test_yaml_unknown_key_suggests_the_close_setting(tmp_path, capsys):
    from polyp_ssl.train_cli import main

    cfg = _yaml(tmp_path, {"dataset_root": str(tmp_path), "batch_szie": 60})
    assert main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"polyp-ssl train: error: --config {cfg}: unknown setting 'batch_szie' (did you mean 'batch_size'?)"
    )
    cfg = _yaml(tmp_path, {"dataset_root": str(tmp_path), "zzz": 1})
    assert main(["--config", str(cfg)]) == 2
    assert "unknown setting 'zzz' (`polyp-ssl train --help` lists the settings)" in capsys.readouterr().err


def test_yaml_values_read_as_numbers_keep_the_command_line_type(tmp_path):
    from polyp_ssl.train_cli import resolve_config

    root = make_root(tmp_path / "root", videos={"train": 1, "val": 1})
    cfg = _yaml(
        tmp_path,
        {
            "dataset_root": str(root),
            "precision": 32,  # YAML reads an int; the flag is a string
            "devices": 1,
            "lr": 1,  # an int for a float
            "loss_milnce_weights": [1, 2],
            "aug_anchorcrop": True,
            "eval_aug_anchorcrop": True,
        },
    )
    c = resolve_config(["--config", str(cfg)])
    assert (c.precision, c.devices, c.lr, c.loss_milnce_weights) == ("32", "1", 1.0, [1.0, 2.0])
    assert isinstance(c.lr, float)


TINY = [
    "--aug_anchorcrop", "--eval_aug_anchorcrop", "--num_workers", "0", "--batch_size", "4",
    "--n_views", "2", "--fragment_length", "2", "--fragment_stride", "2", "--min_tracklet_length", "4",
    "--im_size", "32", "--sfe_backbone_arch", "resnet18", "--hmve_d_model", "32",
    "--hmve_d_feedforward", "64", "--hmve_n_heads", "2", "--hmve_n_layers", "1", "--d_proj", "16",
    "--accelerator", "cpu", "--devices", "1", "--eval_batch_size", "4", "--max_steps", "2",
    "--max_epochs", "1", "--limit_val_batches", "1", "--open_videos", "2", "--log_every_n_steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the real command in a subprocess: its stderr and its run folder."""
    base = tmp_path_factory.mktemp("run")
    root = make_root(base / "root", videos={"train": 2, "val": 1})
    runs = base / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "polyp_ssl.entry", "train", "--dataset_root", str(root),
         "--runs_dir", str(runs), "--exp_name", "first", *TINY],
        cwd=base, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return root, runs, out.stderr


def test_each_lightning_log_line_is_printed_once(tiny_run):
    _, _, stderr = tiny_run
    lines = [line for line in stderr.splitlines() if "GPU available:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("INFO lightning.pytorch")  # our format, from the root handler


def test_a_runs_config_yaml_is_accepted_back_and_resolves_the_same(tiny_run, capsys):
    from polyp_ssl.train_cli import main, resolve_config

    root, runs, _ = tiny_run
    saved = runs / "first" / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    assert "resolved_monitor" in data  # a result the run wrote, accepted back and ignored
    again = resolve_config(["--config", str(saved), "--exp_name", "second"])
    first = {k: v for k, v in data.items() if k != "resolved_monitor"}
    assert {**first, "exp_name": "second"} == again.to_dict()
    # and it trains
    assert main(["--config", str(saved), "--exp_name", "second"]) == 0
    assert (runs / "second" / "checkpoints" / "last.ckpt").is_file()
    second = yaml.safe_load((runs / "second" / "config.yaml").read_text())
    assert {k: v for k, v in second.items() if k != "exp_name"} == {
        k: v for k, v in data.items() if k != "exp_name"
    }


# --------------------------------------------------------------------------- device flags


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--accelerator", "gpu"], "--accelerator gpu: no CUDA GPU is visible on this machine"),
        (["--accelerator", "cuda", "--devices", "2"], "--accelerator cuda: no CUDA GPU is visible"),
        (["--accelerator", "cpu", "--precision", "16-mixed"], "--precision 16-mixed needs a GPU"),
    ],
)
def test_gpu_flags_on_a_machine_without_one_get_one_line_exit_2(
    tmp_path, capsys, monkeypatch, flags, expected
):
    import polyp_ssl.memory as memory
    from polyp_ssl.train_cli import main

    monkeypatch.setattr(memory, "_cuda_count", lambda: 0)
    root = make_root(tmp_path / "root", videos={"train": 1, "val": 1})
    argv = [a for a in TINY if a not in ("--accelerator", "cpu")]
    argv = ["--dataset_root", str(root), "--runs_dir", str(tmp_path / "runs"), *argv, *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("polyp-ssl train: error: ") and expected in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_device_problem_rules():
    from polyp_ssl.memory import device_problem

    assert device_problem("auto", "auto", "32", 0) is None
    assert device_problem("cpu", "2", "bf16-mixed", 0) is None  # two CPU processes: fine
    assert device_problem("gpu", "1", "32", 1) is None
    assert device_problem("gpu", "4", "32", 2) == "--devices 4: this machine has 2 CUDA GPU(s)"
    assert device_problem("gpu", "0,3", "32", 2) == "--devices 0,3: GPU ids go from 0 to 1 on this machine"
    assert device_problem("auto", "auto", "16-mixed", 0).startswith("--precision 16-mixed needs a GPU")
    assert device_problem("auto", "auto", "16-mixed", 1) is None
