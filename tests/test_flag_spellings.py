"""One flag spelling rule for every `polyp-ssl` subcommand (shards/cli_parser.py): `--dataset_root`
and `--dataset-root` are the same option (one spelling documented in --help, the other accepted),
abbreviations are refused, and a usage error is one line that names an unknown option with the
closest known one."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polyp_ssl.shards.cli_parser import FlagParser, flag_key
from tests.cli_walk import all_parsers, capture_parser

REPO = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "reference_flags.json").read_text())
PARSERS = dict(all_parsers())


def other_spelling(option: str) -> str:
    """`--dataset_root` -> `--dataset-root` and back (the whole name swapped)."""
    body = option[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """The long options of `parser` whose name holds a `_` or a `-`."""
    return [o for o in parser._option_string_actions if o.startswith("--") and re.search(r"[-_]", o[2:])]


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser `polyp-ssl COMMAND` really builds (captured from its main)."""
    name, *first = command.split()
    return capture_parser(name, first or None)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyp_ssl.entry", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------- every subcommand


@pytest.mark.parametrize("command", list(PARSERS))
def test_every_subcommand_parser_follows_the_rule(command):
    parser = PARSERS[command]
    assert isinstance(parser, FlagParser), command
    assert parser.allow_abbrev is False
    # no two different options of one command share a spelling-free name (the alias would be ambiguous)
    owners: dict[str, argparse.Action] = {}
    for option, action in parser._option_string_actions.items():
        if option.startswith("--"):
            assert owners.setdefault(flag_key(option), action) is action, (command, option)
    # the other spelling of every long option is rewritten to the documented one, also as --opt=value
    for option in long_options(parser):
        alias = other_spelling(option)
        assert parser.canonical_args([alias, "v"]) == [option, "v"], (command, alias)
        assert parser.canonical_args([f"{alias}=v"]) == [f"{option}=v"]


@pytest.mark.parametrize("command", list(PARSERS))
def test_help_lists_one_spelling_per_option(command):
    parser = PARSERS[command]
    text = parser.format_help()
    for option in long_options(parser):
        alias = other_spelling(option)
        if alias in parser._option_string_actions:
            continue  # registered under both names on purpose (a reference name)
        assert not re.search(rf"(?<![\w-]){re.escape(alias)}(?![\w-])", text), (command, alias)


# (command, positional arguments, documented option, other spelling, value, dest): one option of
# every subcommand that has a long option with `_` or `-`, parsed both ways by the command's parser
SPELLINGS = [
    ("synth", ["out"], "--frames-per-video", "--frames_per_video", "7", "frames_per_video"),
    ("convert", ["realcolon", "raw", "out"], "--split-file", "--split_file", "s.csv", "split_file"),
    ("convert sun", ["raw", "out"], "--case-info", "--case_info", "c.csv", "case_info"),
    ("convert polypsset", ["raw", "out"], "--on-error", "--on_error", "skip", "on_error"),
    ("convert ldpolyp", ["raw", "out"], "--follow-symlinks", "--follow_symlinks", None, "follow_symlinks"),
    ("convert table", ["t.csv", "out"], "--dataset-id", "--dataset_id", "d1", "dataset_id"),
    ("convert merge", ["a", "b", "out"], "--dataset-ids", "--dataset_ids", "x,y", "dataset_ids"),
    ("ingest", ["raw"], "--store-size", "--store_size", "96", "store_size"),
    ("catalog", ["root"], "--max-rows", "--max_rows", "5", "max_rows"),
    ("verify", ["root"], "--no-progress", "--no_progress", None, "no_progress"),
    ("train", [], "--dataset_root", "--dataset-root", "/data/r", "dataset_root"),
    ("embed", [], "--dataset_root", "--dataset-root", "/data/r", "dataset_root"),
    ("eval", ["--task", "reid"], "--dataset_root", "--dataset-root", "/data/r", "dataset_root"),
    ("probe", [], "--class_mapping", "--class-mapping", "ad_vs_hp", "class_mapping"),
    ("count", [], "--val_embeddings", "--val-embeddings", "v.parquet", "val_embeddings"),
    ("report", [], "--dataset_root", "--dataset-root", "/data/r", "dataset_root"),
]


@pytest.mark.parametrize(
    "command,positional,documented,alias,value,dest", SPELLINGS, ids=[s[0] for s in SPELLINGS]
)
def test_dash_and_underscore_spellings_parse_alike(command, positional, documented, alias, value, dest):
    parser = parser_of(command)
    extra = ["--dataset_root", "/data/r"] if command == "report" and dest != "dataset_root" else []
    values = []
    for spelling in (documented, alias):
        args = [*positional, *extra, spelling] + ([value] if value is not None else [])
        values.append(getattr(parser.parse_args(args), dest))
        if value is not None:  # and as --opt=value
            eq = getattr(parser.parse_args([*positional, *extra, f"{spelling}={value}"]), dest)
            assert str(eq) == str(values[-1])
    assert values[0] == values[1]
    assert str(values[0]) == (value if value is not None else "True")


def test_the_table_covers_every_subcommand_with_a_two_word_option():
    with_two_words = {c for c, p in PARSERS.items() if long_options(p)}
    assert with_two_words == {s[0] for s in SPELLINGS}


@pytest.mark.parametrize(
    "cli_name,flags",
    [(c["polyp_ssl_command"], [f["flag"] for f in c["flags"]]) for c in FIXTURE["clis"].values()],
    ids=list(FIXTURE["clis"]),
)
def test_reference_flags_keep_their_spelling_and_take_the_other(cli_name, flags):
    parser = PARSERS[cli_name.split(" ", 1)[1]]
    for flag in flags:
        assert flag in parser._option_string_actions, flag  # the reference spelling, unchanged
        assert parser.canonical_args([other_spelling(flag)]) == [flag]


def test_train_dataset_dash_root_reaches_the_config():
    from polyp_ssl.train_cli import resolve_config

    anchor = ["--aug_anchorcrop", "--eval_aug_anchorcrop"]
    dash = resolve_config(
        ["--dataset-root", "/data/r", "--max-epochs", "3", "--loss-weights", "1", "0.5", *anchor]
    )
    under = resolve_config(
        ["--dataset_root", "/data/r", "--max_epochs", "3", "--loss_weights", "1", "0.5", *anchor]
    )
    assert dash == under
    assert (dash.dataset_root, dash.max_epochs, dash.loss_milnce_weights) == ("/data/r", 3, [1.0, 0.5])


def test_probe_task_is_inferred_from_either_spelling():
    from polyp_ssl.eval.outputs import infer_probe_task

    assert infer_probe_task(["--class-mapping", "ad_vs_hp"])[0] == "histology"
    assert infer_probe_task(["--gradient-clip-val=1"])[0] == "histology"
    assert infer_probe_task(["--dataset-type", "coco"])[0] == "size"


# ----------------------------------------------------------------- errors: the real command


def one_line_error(out: subprocess.CompletedProcess, prog: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "usage:" not in out.stderr and "Traceback" not in out.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args,typed,meant",
    [
        (["train", "--max_epoch", "1"], "--max_epoch", "--max_epochs"),
        (["eval", "--task", "reid", "--dataset_ro", "r"], "--dataset_ro", "--dataset_root"),
        (["ingest", "raw", "--store-siz", "64"], "--store-siz", "--store-size"),
        (["split", "root", "--frac", "0.5"], "--frac", "--fractions"),
        (["demo", "--qui"], "--qui", "--quick"),
        (["convert", "merge", "a", "b", "--keep", "out"], "--keep", "--keep-splits"),
    ],
    ids=["train", "eval", "ingest", "split", "demo", "convert-merge"],
)
def test_an_abbreviation_is_refused_in_one_line(args, typed, meant):
    prog = "polyp-ssl " + " ".join(args[:2] if args[0] == "convert" else args[:1])
    line = one_line_error(cli(*args), prog)
    assert line == f"{prog}: error: unrecognized option {typed} (did you mean {meant}?)"


@pytest.mark.parametrize(
    "args,typed,meant",
    [
        (["train", "--datset_root", "r"], "--datset_root", "--dataset_root"),
        (["train", "--datset-root=r"], "--datset-root", "--dataset_root"),
        (["eval", "--task", "reid", "--datset-root", "r"], "--datset-root", "--dataset_root"),
        (["ingest", "raw", "--store_sise", "64"], "--store_sise", "--store-size"),
        # an unknown option is named before what argparse finds first (required arguments missing)
        (["eval", "--encoder-chkpt", "x.ckpt"], "--encoder-chkpt", "--encoder_ckpt"),
        (["convert", "sun", "--case-infos", "c.csv"], "--case-infos", "--case-info"),
    ],
    ids=["train", "train-equals", "eval", "ingest", "eval-before-required", "convert-sun-before-required"],
)
def test_an_unknown_option_names_the_closest_one(args, typed, meant):
    prog = "polyp-ssl " + " ".join(args[:2] if args[0] == "convert" else args[:1])
    line = one_line_error(cli(*args), prog)
    assert line == f"{prog}: error: unrecognized option {typed} (did you mean {meant}?)"


def test_an_unknown_option_without_a_close_one_points_at_help():
    line = one_line_error(cli("verify", "root", "--zzzz"), "polyp-ssl verify")
    assert (
        line
        == "polyp-ssl verify: error: unrecognized option --zzzz; `polyp-ssl verify --help` lists the options"
    )


def test_other_usage_errors_are_one_line_too():
    line = one_line_error(cli("eval", "--task", "nope"), "polyp-ssl eval")
    assert "argument --task: invalid choice: 'nope'" in line
    line = one_line_error(cli("catalog"), "polyp-ssl catalog")
    assert "the following arguments are required: root" in line


def test_the_other_spelling_runs_the_command(tmp_path):
    """`--store_size` on ingest (documented `--store-size`) reaches the command: here it stops at
    the missing raw root, after parsing, with the command's own message."""
    out = cli("ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--store_size", "64")
    assert out.returncode != 0
    assert "unrecognized" not in out.stderr and "missing" in out.stderr, out.stderr


# --------------------------------------------------------------------------- the mechanism


def test_subparsers_inherit_the_rule():
    p = FlagParser(prog="tool")
    p.add_argument("--top-level", default=None)
    sub = p.add_subparsers(dest="cmd")
    run = sub.add_parser("run")
    assert isinstance(run, FlagParser) and run.allow_abbrev is False
    run.add_argument("--dataset_root")
    args = p.parse_args(["--top_level", "t", "run", "--dataset-root", "r"])
    assert (args.top_level, args.cmd, args.dataset_root) == ("t", "run", "r")
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["run", "--datset_root", "r"])
    assert exc.value.code == 2


def test_subcommand_unknown_option_is_named_with_its_parser(capsys):
    p = FlagParser(prog="tool")
    run = p.add_subparsers(dest="cmd").add_parser("run")
    run.add_argument("--dataset_root")
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--datset-root", "r"])
    err = capsys.readouterr().err
    assert err == "tool run: error: unrecognized option --datset-root (did you mean --dataset_root?)\n"


def test_values_after_double_dash_and_values_with_spaces_are_left_alone():
    p = FlagParser(prog="tool")
    p.add_argument("--dataset_root")
    p.add_argument("--sql")
    p.add_argument("rest", nargs="*")
    args = p.parse_args(["--dataset-root", "r", "--", "--dataset-root", "--x"])
    assert (args.dataset_root, args.rest) == ("r", ["--dataset-root", "--x"])
    # a value with a space is a value for argparse (an SQL comment, say), not an unknown option
    args = p.parse_args(["--sql", "-- a comment\nSELECT 1"])
    assert args.sql == "-- a comment\nSELECT 1"
    assert p.first_unknown_option(["--sql", "-- a comment", "-5"]) is None


def test_two_options_with_one_spelling_free_name_are_not_guessed(capsys):
    p = FlagParser(prog="tool")
    p.add_argument("--a-b-c", dest="dashed", default=None)
    p.add_argument("--a_b_c", dest="underscored", default=None)
    args = p.parse_args(["--a-b-c", "1", "--a_b_c", "2"])  # each exact spelling is its own option
    assert (args.dashed, args.underscored) == ("1", "2")
    # a third spelling of that name could mean either: not rewritten, refused as unknown
    assert p.canonical_args(["--a_b-c=1"]) == ["--a_b-c=1"]
    with pytest.raises(SystemExit):
        p.parse_args(["--a_b-c", "1"])
    assert capsys.readouterr().err.startswith("tool: error: unrecognized option --a_b-c (did you mean --a")


def test_required_and_exclusive_options_hold_under_the_other_spelling(capsys):
    p = FlagParser(prog="tool")
    p.add_argument("--dataset_root", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep-splits", action="store_true")
    g.add_argument("--split-name")
    assert p.parse_args(["--dataset-root", "r"]).dataset_root == "r"  # required, met by the alias
    with pytest.raises(SystemExit):
        p.parse_args(["--dataset-root", "r", "--keep_splits", "--split_name", "x"])
    err = capsys.readouterr().err
    assert err == "tool: error: argument --split-name: not allowed with argument --keep-splits\n"


def test_abbreviation_of_an_equals_form_is_refused(capsys):
    p = FlagParser(prog="tool")
    p.add_argument("--max_epochs", type=int)
    with pytest.raises(SystemExit):
        p.parse_args(["--max_ep=3"])
    assert (
        capsys.readouterr().err == "tool: error: unrecognized option --max_ep (did you mean --max_epochs?)\n"
    )
