"""Installed import names live under one namespace: the repository keeps the pipeline's folders
at the top (ingest/, shards/, polyp_ssl/, eval/), installed as polyp_ssl, polyp_ssl.ingest,
polyp_ssl.shards and polyp_ssl.eval, so `pip install .` adds no top-level `eval`, `ingest` or
`shards` module that could collide with another package."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "polyp_ssl": "polyp_ssl",
    "polyp_ssl.ingest": "ingest",
    "polyp_ssl.shards": "shards",
    "polyp_ssl.eval": "eval",
}


def setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_installed_package_is_under_polyp_ssl():
    cfg = setuptools_config()
    assert all(p == "polyp_ssl" or p.startswith("polyp_ssl.") for p in cfg["packages"]), cfg["packages"]
    assert cfg["package-dir"] == STAGES


def test_every_package_folder_is_installed():
    """A new subpackage (a folder with __init__.py) must be listed, or `pip install .` drops it."""
    listed = set(setuptools_config()["packages"])
    found = set()
    for name, folder in STAGES.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed, (sorted(found - listed), sorted(listed - found))


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
