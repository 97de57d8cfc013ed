"""The SQL examples of the docs run and return rows on the demo's data, and README's demo table
has the header and row names that `polyp-ssl demo` prints.

SQL examples are found, not listed: every ```sql block of docs/*.md and README.md, and every
`polyp-ssl catalog ROOT "SQL"` command in their fenced blocks. They run through the `catalog`
command on the data of `polyp-ssl demo --quick` (the demo's own synth and ingest settings, from
eval.demo), with `embeddings_{name}` views made by `polyp-ssl embed --name NAME` from a tiny
checkpoint (the tracklets a view holds depend on the evaluation protocol, not on the weights).
The only rewrites are the root's path and the explicit SUBSTITUTIONS below.
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

from polyp_ssl.entry import main as entry_main
from polyp_ssl.eval.demo import demo_settings, flags, report_inputs, summary_table
from tests.embed_factory import make_ckpt
from tests.readme_helpers import split_commands

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ROOT_NAMES = ("ROOT", "demo/data", "data/synth")  # how the docs name the root
# README's catalog example queries a tracklet of README's own (larger) dataset; the demo's data
# has this one (a test tracklet of at least 30 frames). A substitution that matches nothing fails.
SUBSTITUTIONS = [("README.md", "a.tracklet_id = '001-010_0#0'", "a.tracklet_id = '001-005_1#1'")]
# examples that may return no rows on clean synthetic data (no table of results shown for them)
MAY_BE_EMPTY = ("FROM errors",)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, dedented (a block may sit in a list item)."""
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        indent = len(m.group(1))
        body = "".join(
            line[indent:] if line[:indent].isspace() else line
            for line in m.group(3).splitlines(keepends=True)
        )
        out.append((m.group(2), body))
    return out


def sql_examples() -> list[tuple[str, str]]:
    """(where, SQL) of every example in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for lang, body in fenced_blocks(text):
            if lang == "sql":
                found.append((doc.name, body.strip()))
                continue
            if "polyp-ssl catalog" not in body:
                continue  # not a shell block of ours (layouts, Python, output)
            for cmd in split_commands(body):
                words = shlex.split(cmd, comments=True)
                if words[:2] != ["polyp-ssl", "catalog"] or len(words) < 4 or words[2] == "merge":
                    continue
                if words[2] in ROOT_NAMES and words[3] != "SQL" and not words[3].startswith("-"):
                    found.append((doc.name, words[3]))
    return found


EXAMPLES = sql_examples()


def test_the_docs_have_sql_examples():
    where = {w for w, _ in EXAMPLES}
    assert {"README.md", "catalog.md", "report.md"} <= where, where
    assert len(EXAMPLES) >= 10


def _substituted(where: str, sql: str) -> str:
    for doc, old, new in SUBSTITUTIONS:
        if doc == where and old in sql:
            sql = sql.replace(old, new)
    return sql


def test_every_substitution_matches_an_example():
    for doc, old, _ in SUBSTITUTIONS:
        assert any(w == doc and old in sql for w, sql in EXAMPLES), (doc, old)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """The `--quick` demo's dataset (its synth and ingest settings), with the embeddings views
    that the examples query."""
    base = tmp_path_factory.mktemp("docs")
    root = base / "data"
    settings = demo_settings(quick=True)
    assert entry_main(["synth", str(root), *flags(settings.synth), "--quiet"]) == 0
    assert entry_main(["ingest", str(root), *flags(settings.ingest), "--no-progress"]) == 0
    ckpt = report_inputs(base)[0][0]  # where the demo's run keeps it (docs: demo/runs/demo/...)
    ckpt.parent.mkdir(parents=True)
    make_ckpt(ckpt)
    views = {v for _, sql in EXAMPLES for v in re.findall(r"\bembeddings_(\w+)", sql)}
    for view in sorted(views):
        argv = ["embed", "--encoder_ckpt", str(ckpt), "--dataset_root", str(root), "--name", view,
                "--split", "test", "--batch_size", "64"]  # fmt: skip
        assert entry_main(argv) == 0, view
    return root


@pytest.mark.parametrize(("where", "sql"), EXAMPLES, ids=[f"{w}:{i}" for i, (w, _) in enumerate(EXAMPLES)])
def test_a_docs_sql_example_returns_rows_on_the_demo_data(demo_root, capsys, where, sql):
    capsys.readouterr()
    code = entry_main(["catalog", str(demo_root), _substituted(where, sql), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, f"{where}: {sql}\n{err}"
    rows = json.loads(out)
    if not any(marker in sql for marker in MAY_BE_EMPTY):
        assert rows, f"{where}: no rows on the demo data: {sql}"


# -------------------------------------------------------------------------- README's demo table


def readme_demo_table() -> tuple[list[str], list[str]]:
    """(header cells, row names) of the table under README's "What `make demo` prints"."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## What `make demo` prints") :]
    section = section[: section.index("\n## ", 1)]
    return table_names([ln for ln in section.splitlines() if ln.startswith("|")])


def table_names(lines: list[str]) -> tuple[list[str], list[str]]:
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    assert len(lines) >= 3, lines
    return cells(lines[0]), [cells(ln)[0] for ln in lines[2:]]


def test_readme_demo_table_names_are_the_demo_printout(tmp_path):
    """README's header is what demo.summary_table prints for every task's columns, and its rows
    are the report's names for what the demo compares (report_inputs: the run's last.ckpt and
    init.ckpt, and the baselines), as eval.report names them. To regenerate README's table, run
    `polyp-ssl demo` and paste the table it prints."""
    from polyp_ssl.eval.report import COLUMNS, build_subjects, resolve_checkpoints

    ckpts, baselines = report_inputs(tmp_path)
    ckpts[0].parent.mkdir(parents=True)
    for seed, c in enumerate(ckpts):
        make_ckpt(c, seed=seed + 1)  # trained and step-0 weights differ
    names = [s.label for s in build_subjects(resolve_checkpoints(ckpts), baselines)]
    rows = [{"checkpoint": n, "task": t, "metric": m, "value": 0.5} for n in names for t, m in COLUMNS]
    header, row_names = table_names(summary_table(rows))
    assert readme_demo_table() == (header, row_names)


@pytest.mark.slow
def test_readme_demo_table_matches_what_demo_quick_prints(tmp_path):
    """The real thing: `polyp-ssl demo --quick` (about 2.5 min on 2 loaded cores) prints a table
    whose header and row names are README's."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "polyp_ssl.entry", "demo", "--quick", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    # the last table: the demo's summary (the report it runs prints its own table, with notes, first)
    start = max(i for i, ln in enumerate(lines) if ln.startswith("| encoder |"))
    table = [ln for ln in lines[start:] if ln.startswith("|")]
    assert readme_demo_table() == table_names(table)
