"""One import namespace and one lookup rule: `polyp_ssl.a.b` is the file polyp_ssl/a/b.py. The
pipeline's folders stay at the top of the repository (ingest/, shards/, eval/) and
polyp_ssl/{ingest,shards,eval} are symbolic links to them, so `pip install .` adds no top-level
`eval`, `ingest` or `shards` module, and tools that do not run setuptools' import hooks (jedi,
Pylance, mypy) find every module by the plain rule."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "shards", "eval")


def test_stage_folders_are_linked_into_the_package():
    for stage in STAGES:
        link = REPO / "polyp_ssl" / stage
        assert link.is_symlink(), f"polyp_ssl/{stage} must be a link to ../{stage}"
        assert os.readlink(link) == f"../{stage}"
        assert link.resolve() == (REPO / stage).resolve()


def test_installed_packages_are_the_folders_under_polyp_ssl():
    """Package discovery (what `pip install .` installs) finds exactly the folders with an
    __init__.py under polyp_ssl/, links followed, and nothing at the top level."""
    from setuptools import find_packages

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(find_packages(str(REPO), **cfg["packages"]["find"]))
    expected = {"polyp_ssl"}
    for stage in STAGES:
        for init in (REPO / stage).rglob("__init__.py"):
            expected.add(".".join(("polyp_ssl", stage, *init.parent.relative_to(REPO / stage).parts)))
    assert found == expected, (sorted(found - expected), sorted(expected - found))
    assert "package-dir" not in cfg, "one lookup rule: no package-dir mapping"


def test_no_module_imports_a_stage_by_its_old_top_level_name():
    bad = []
    for folder in ("polyp_ssl", "ingest", "shards", "eval", "scripts", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                bad += [
                    f"{path.relative_to(REPO)}:{node.lineno} {n}"
                    for n in names
                    if n.split(".")[0] in ("ingest", "shards", "eval")
                ]
    assert not bad, bad


GOTO = {
    "polyp_ssl.shards.reader": ("open_shard", "shards/reader.py"),
    "polyp_ssl.eval.metrics": ("l2_normalize", "eval/metrics.py"),
    "polyp_ssl.ingest.tracklets": ("build_tracklets", "ingest/tracklets.py"),
    "polyp_ssl.epoch_plan": ("EpochPlan", "polyp_ssl/epoch_plan.py"),
}


JEDI_SCRIPT = """
import json, sys
import jedi
lines = json.loads(sys.argv[1])
env = jedi.create_environment(sys.prefix, safe=False)
script = jedi.Script("\\n".join(lines) + "\\n", path=sys.argv[2], environment=env)
found = []
for i, line in enumerate(lines, start=1):
    name = line.rsplit(" ", 1)[1]
    defs = script.goto(i, line.rindex(name), follow_imports=True)
    found.append([str(defs[0].module_path), defs[0].name] if defs else None)
print(json.dumps(found))
"""


def test_jedi_goes_to_the_definition_from_outside_the_repository(tmp_path):
    """An editor's go-to-definition (jedi, as in VS Code's Jedi server and many others) in a user's
    file outside the clone, with this environment's interpreter: each import lands on its file.
    Run in a child process: jedi's helper process must not be inherited by forked test workers."""
    pytest.importorskip("jedi")
    lines = [f"from {module} import {name}" for module, (name, _) in GOTO.items()]
    out = subprocess.run(
        [sys.executable, "-c", JEDI_SCRIPT, json.dumps(lines), str(tmp_path / "user_code.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for (name, rel), hit in zip(GOTO.values(), found, strict=True):
        assert hit, f"jedi found no definition of {name}"
        assert Path(hit[0]).resolve() == (REPO / rel).resolve(), (name, hit[0])
        assert hit[1] == name


def test_mypy_finds_every_module(tmp_path):
    """`mypy -p polyp_ssl`, run at the root of the clone as a project's type check is, sees every
    module of the four stages (type errors are not the point here)."""
    pytest.importorskip("mypy")
    report = tmp_path / "lines"
    cmd = [sys.executable, "-m", "mypy", "-p", "polyp_ssl", "--ignore-missing-imports"]
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--linecount-report", str(report)]
    subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    seen = {line.split()[-1] for line in (report / "linecount.txt").read_text().splitlines()[1:]}
    expected = set()
    for folder, package in [("polyp_ssl", "polyp_ssl")] + [(s, f"polyp_ssl.{s}") for s in STAGES]:
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            expected.add(".".join((package, *parts)))
    assert expected <= seen, sorted(expected - seen)
