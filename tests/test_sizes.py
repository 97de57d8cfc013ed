"""Rooms of a size one can read: in the four stage folders no function over 120 lines, no class
over 400 and no module over 900 (docs/architecture.md, "Inside the stages"). Read with `ast`,
nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "shards", "polyp_ssl", "eval")
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 120, 400, 900


def oversized(path: Path, base: Path = REPO) -> list[str]:
    """`path:name lines` for each function, class or the module itself over its limit."""
    src = path.read_text()
    rel = path.relative_to(base)
    out = []
    if len(src.splitlines()) > MAX_MODULE:
        out.append(f"{rel} {len(src.splitlines())} lines (module)")
    for node in ast.walk(ast.parse(src, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if n > limit:
                out.append(f"{rel}:{node.name} {n} lines")
    return out


def test_no_function_class_or_module_over_its_limit():
    files = [p for stage in STAGES for p in sorted((REPO / stage).rglob("*.py"))]
    assert len(files) > 100  # the folders were found (polyp_ssl/{ingest,shards,eval} links not followed)
    bad = [line for p in files for line in oversized(p)]
    assert not bad, bad


def test_the_check_sees_an_oversized_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    path = tmp_path / "probe.py"
    path.write_text(f"def long():\n{body}\n")
    assert oversized(path, tmp_path) == [f"probe.py:long {MAX_FUNCTION + 1} lines"]
    path.write_text(f"def short():\n{body[: body.rindex(chr(10))]}\n")
    assert oversized(path, tmp_path) == []
