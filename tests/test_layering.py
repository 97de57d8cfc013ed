"""The stage import rules of docs/architecture.md ("Import rules"), read from the source with `ast`:
every import of every module in ingest/, shards/, polyp_ssl/ and eval/ (absolute and relative, at
module level and inside functions). Nothing is imported, so the check is fast and sees lazy imports."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# folder -> the package it is installed as (polyp_ssl/{ingest,shards,eval} link to the folders).
FOLDERS = {
    "ingest": "polyp_ssl.ingest",
    "shards": "polyp_ssl.shards",
    "polyp_ssl": "polyp_ssl",
    "eval": "polyp_ssl.eval",
}
# stage -> the other stages it may import.
ALLOWED: dict[str, frozenset[str]] = {
    "shards": frozenset(),
    "ingest": frozenset({"shards"}),
    "train": frozenset({"shards"}),
    "eval": frozenset({"train", "shards"}),
}
# (importing module, imported module or a prefix of it): the narrow exceptions the doc names.
EXCEPTIONS = {("polyp_ssl.eval.embed", "polyp_ssl.ingest.synth.descriptor")}
DISPATCHER = "polyp_ssl.entry"


def stage_of(name: str) -> str | None:
    """The stage a dotted module (or module.attribute) name belongs to; None outside the project."""
    for stage in ("ingest", "shards", "eval"):
        pkg = f"polyp_ssl.{stage}"
        if name == pkg or name.startswith(pkg + "."):
            return stage
    if name == "polyp_ssl" or name.startswith("polyp_ssl."):
        return "train"
    return None


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # `from a.b import c` -> "a.b.c"; `import a.b` -> "a.b"
    module_level: bool  # runs when the module is imported (not inside a function)


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in `source`, the source of `module`, relative ones resolved."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, a.name, not in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            for a in node.names:
                target = prefix if a.name == "*" else f"{prefix}.{a.name}"
                found.append(Import(node.lineno, target, not in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def violations(module: str, found: list[Import]) -> list[str]:
    """The imports of `module` that break the stage rules."""
    own = stage_of(module)
    assert own is not None, module
    bad = []
    for imp in found:
        other = stage_of(imp.target)
        if other is None or other == own or other in ALLOWED[own]:
            continue
        if any(
            module == src and (imp.target == dst or imp.target.startswith(dst + "."))
            for src, dst in EXCEPTIONS
        ):
            continue
        bad.append(f"{module}:{imp.line} ({own}) imports {imp.target} ({other})")
    if module == DISPATCHER:
        bad += [
            f"{module}:{imp.line} (the dispatcher) imports {imp.target} at module level"
            for imp in found
            if imp.module_level and stage_of(imp.target) is not None
        ]
    return bad


def stage_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__) for every module of the four folders;
    polyp_ssl/ is the training stage only (its subpackages come from the other folders)."""
    out: dict[str, tuple[Path, bool]] = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = (path, is_package)
    return out


def test_every_stage_keeps_the_import_rules():
    modules = stage_modules()
    bad: list[str] = []
    seen: set[tuple[str, str]] = set()
    for module, (path, is_package) in modules.items():
        found = imports_of(path.read_text(), module, is_package)
        bad += violations(module, found)
        seen |= {(stage_of(module), stage_of(i.target)) for i in found if stage_of(i.target)}
    assert not bad, "\n".join(bad)
    # Not vacuous: every stage was read, and the allowed edges are really there.
    assert {stage_of(m) for m in modules} == set(ALLOWED)
    assert {("ingest", "shards"), ("train", "shards"), ("eval", "train"), ("eval", "shards")} <= seen
    assert DISPATCHER in modules


def test_the_rules_flag_a_violation():
    """Each rule fails on a synthetic import that breaks it; the exception stays narrow."""

    def bad(module: str, source: str, is_package: bool = False) -> list[str]:
        return violations(module, imports_of(source, module, is_package))

    assert bad("polyp_ssl.shards.reader", "import polyp_ssl.stream")
    assert bad("polyp_ssl.shards.reader", "def f():\n    from polyp_ssl.ingest import run\n")
    assert bad("polyp_ssl.ingest.run", "from polyp_ssl.module import TemporalModule")
    assert bad("polyp_ssl.ingest.run", "from polyp_ssl import stream")
    assert bad("polyp_ssl.stream", "def f():\n    from polyp_ssl.eval.metrics import l2_normalize\n")
    assert bad("polyp_ssl.stream", "from .ingest import run")  # relative: polyp_ssl.ingest.run
    assert bad("polyp_ssl.eval.cli", "from ..ingest.synth import descriptor")  # relative, not embed
    assert bad("polyp_ssl.eval.report", "from polyp_ssl.ingest.synth.descriptor import describe_tracklet")
    assert bad("polyp_ssl.eval.embed", "from polyp_ssl.ingest import run")  # outside the exception
    assert bad("polyp_ssl.ingest.synth", "from ...eval import metrics", is_package=True)
    assert bad(DISPATCHER, "from polyp_ssl.shards.cli_errors import DEBUG_ENV")  # module level
    # What the rules allow.
    assert not bad("polyp_ssl.eval.embed", "from polyp_ssl.ingest.synth import descriptor as desc")
    assert not bad("polyp_ssl.eval.cli", "from polyp_ssl.module import TemporalModule\nimport numpy")
    assert not bad("polyp_ssl.ingest.run", "from ..shards.writer import ShardWriter\nfrom .plan import x")
    assert not bad("polyp_ssl.stream", "from polyp_ssl.shards import reader\nfrom . import epoch_plan")
    assert not bad(DISPATCHER, "import importlib\ndef f():\n    from polyp_ssl.shards import cli_errors\n")


def test_relative_imports_resolve_to_their_package():
    found = imports_of("from . import a\nfrom ..shards.reader import open_shard", "polyp_ssl.ingest.run")
    assert [i.target for i in found] == ["polyp_ssl.ingest.a", "polyp_ssl.shards.reader.open_shard"]
    found = imports_of("from .convert import cli", "polyp_ssl.ingest", is_package=True)
    assert [i.target for i in found] == ["polyp_ssl.ingest.convert.cli"]
