"""README.md's commands work as written on a fresh clone.

The ```bash blocks of README's "The pipeline" section (the pipeline itself and the catalog
example under it) are extracted in order, split into commands and run one by one with `bash -e`
from a fresh temporary working directory, with the virtualenv's `bin` first on PATH (what
`source .venv/bin/activate` does). Only what must change for a small, fast run is rewritten, by
the explicit substitutions in SUBSTITUTIONS (sizes from SIZES); everything else runs exactly as a
reader would type it. Each command must exit 0 and print what README promises (a table with the
query's column names, "checkpoints in ...", the files it says it wrote).

Only the installed `polyp-ssl` command is used: nothing of the project is imported here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme_helpers import split_commands

README = Path(__file__).resolve().parent.parent / "README.md"
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests: .venv/bin under `make test`

# The small-size knobs, in one place. "fast" runs in the default suite; "slow" keeps README's own
# synthetic dataset (12 videos of 660 frames at 384x320) and its im_size, and only caps training.
# `tracklet` is the catalog example's query tracklet: a test tracklet of at least 30 frames in
# that dataset (README's own exists only in README's dataset).
SIZES: dict[str, dict[str, str]] = {
    "fast": {
        "synth": "--videos 6 --frames-per-video 660 --width 128 --height 112",
        "im_size": "32",
        "max_steps": "1",
        "tracklet": "001-005_1#1",
    },
    "slow": {"synth": "", "im_size": "96", "max_steps": "2", "tracklet": "001-010_0#0"},
}

# (README text, replacement): every difference between README and what runs. `{synth}`,
# `{im_size}`, `{max_steps}` and `{tracklet}` are filled from SIZES. A substitution that no longer matches
# README fails the test, so this list cannot silently go stale.
SUBSTITUTIONS: list[tuple[str, str]] = [
    # needs a raw REAL-Colon copy, which a clone does not have (tests/test_convert.py covers it)
    ("polyp-ssl convert realcolon RAW/ data/realcolon", ": skipped convert realcolon"),
    # smaller synthetic videos
    ("polyp-ssl synth data/synth", "polyp-ssl synth data/synth {synth}"),
    # smaller crops and a few steps instead of README's epochs
    ("--im_size=96", "--im_size={im_size} --max_steps={max_steps}"),
    # the catalog example's query tracklet, one that the smaller dataset has
    ("a.tracklet_id = '001-010_0#0'", "a.tracklet_id = '{tracklet}'"),
]


def pipeline_section(text: str) -> str:
    start = text.index("\n## The pipeline\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def bash_blocks(text: str) -> list[str]:
    """The ```bash fenced blocks of `text`, in order, dedented (a block may sit in a list item)."""
    blocks = []
    for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.S | re.M):
        indent = len(m.group(1))
        blocks.append(
            "".join(
                line[indent:] if line[:indent].isspace() else line
                for line in m.group(2).splitlines(keepends=True)
            )
        )
    return blocks


def readme_commands(sizes: dict[str, str]) -> list[str]:
    section = pipeline_section(README.read_text(encoding="utf-8"))
    for old, _ in SUBSTITUTIONS:
        assert old in section, f"README no longer contains {old!r}: update SUBSTITUTIONS"
    commands = []
    for block in bash_blocks(section):
        for command in split_commands(block):
            for old, new in SUBSTITUTIONS:
                command = command.replace(old, new.format(**sizes))
            commands.append(command)
    return commands


def select_columns(sql: str) -> list[str]:
    """The output column names of `SELECT a, f(b) AS c, t.d FROM ...`: alias or last identifier."""
    m = re.search(r"SELECT\s+(.*?)\s+FROM\s", sql, re.S | re.I)
    assert m, sql
    items, depth, cur = [], 0, ""
    for ch in m.group(1):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    names = []
    for item in items:
        alias = re.search(r"\bAS\s+(\w+)\s*$", item.strip(), re.I)
        names.append(alias.group(1) if alias else re.findall(r"\w+", item)[-1])
    return names


def check_output(command: str, out: str, cwd: Path) -> None:
    """What each subcommand promises to print (and write), beyond exit code 0."""
    words = shlex.split(command, comments=True)
    if not words or words[0] != "polyp-ssl":
        return
    sub = words[1]
    if sub == "synth":
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["videos"] > 0 and summary["frames"] > 0, out
    elif sub == "ingest":
        summary = json.loads(out[out.index("{") :])
        assert summary["tracklets"] > 0 and summary["errors"] == {}, out
    elif sub == "catalog" and len(words) > 3 and "SELECT" in words[3].upper():
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines[0].split() == select_columns(words[3]), out
        n_rows = int(re.fullmatch(r"\((\d+) rows?\)", lines[-1]).group(1))
        assert n_rows >= 1, f"{command}: no rows\n{out}"
    elif sub == "verify":
        assert out.rstrip().endswith("OK"), out
    elif sub == "train":
        exp = next(w.split("=", 1)[1] for w in words if w.startswith("--exp_name="))
        assert f"checkpoints in runs/{exp}/checkpoints" in out, out
        assert (cwd / "runs" / exp / "checkpoints" / "last.ckpt").is_file()
    elif sub == "report":
        out_dir = words[words.index("--out") + 1]
        assert f"report: {out_dir}/report.md" in out, out
        assert (cwd / out_dir / "report.md").is_file()
    elif sub in ("eval", "probe", "count", "embed"):
        written = re.findall(r"^wrote (?:\d+ x \d+ embeddings to )?(\S+)", out, re.M)
        assert written, out
        assert all((cwd / w).exists() for w in written), written


def run_readme(tmp_path: Path, sizes: dict[str, str]) -> list[str]:
    assert (VENV_BIN / "polyp-ssl").is_file(), f"no polyp-ssl in {VENV_BIN}: install the project first"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYP_SSL")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        MPLBACKEND="Agg",
    )
    work = tmp_path / "clone"  # a fresh working directory: nothing in it, not even data/
    work.mkdir()
    commands = readme_commands(sizes)
    for command in commands:
        proc = subprocess.run(
            ["bash", "-e", "-c", command],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, (
            f"README command failed (exit {proc.returncode}):\n{command}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
        check_output(command, proc.stdout, work)
    return commands


def test_readme_commands_parse_as_expected() -> None:
    commands = readme_commands(SIZES["fast"])
    subs = [shlex.split(c, comments=True)[1] for c in commands if c.startswith("polyp-ssl")]
    # the pipeline in README's order, then the catalog example
    assert subs == [
        "synth",
        "ingest",
        "catalog",
        "verify",
        "train",
        "report",
        "eval",
        "probe",
        "count",
        "embed",
        "catalog",
    ], subs
    assert commands[0] == "mkdir -p data"


def test_readme_subcommands_exist() -> None:
    """Every `polyp-ssl X` README names, anywhere, is a real subcommand (`--help` needs no torch)."""
    listed = subprocess.run([VENV_BIN / "polyp-ssl", "--help"], capture_output=True, text=True, check=True)
    known = set(re.findall(r"^  (\w+)  ", listed.stdout, re.M))
    text = README.read_text(encoding="utf-8")
    code = bash_blocks(text) + re.findall(r"`([^`\n]+)`", text)
    used = {m for snippet in code for m in re.findall(r"(?:^|\s)polyp-ssl (\w[\w-]*)", snippet, re.M)}
    assert used <= known, used - known


def test_readme_says_how_to_reach_the_command() -> None:
    """Right after `make demo`/`make test`, README says where `polyp-ssl` is (the venv)."""
    first = bash_blocks(README.read_text(encoding="utf-8"))[0]
    assert "make demo" in first and "make test" in first
    assert "source .venv/bin/activate" in first


def test_readme_pipeline_runs_as_written(tmp_path: Path) -> None:
    run_readme(tmp_path, SIZES["fast"])


@pytest.mark.slow
def test_readme_pipeline_runs_at_readme_sizes(tmp_path: Path) -> None:
    run_readme(tmp_path, SIZES["slow"])
