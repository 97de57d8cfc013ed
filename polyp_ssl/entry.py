"""The one `polyp-ssl` command: a table of subcommands, each imported only when used.

Nothing here imports a stage, so `polyp-ssl catalog ...` starts without loading torch.
Every failure a subcommand does not report itself ends as one line and an exit code
(`run_command`, through shards.cli_errors.run_reported, where exceptions are mapped to exit codes
once); `--debug` or POLYP_SSL_DEBUG=1 lets the traceback through.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> ("module:function", one-line help). Each function takes argv (a list) and
# returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": (
        "polyp_ssl.ingest.synth.cli:main",
        "generate a synthetic colonoscopy dataset in the seed's COCO layout",
    ),
    "convert": (
        "polyp_ssl.ingest.convert.cli:main",
        "raw layouts (REAL-Colon, SUN, PolypsSet, LDPolypVideo, box tables) to the seed's layout",
    ),
    "split": ("polyp_ssl.ingest.split:main", "split a dataset root by polyp (no polyp in two splits)"),
    "ingest": (
        "polyp_ssl.ingest.cli:main",
        "build WebDataset shards and the Parquet catalog from a dataset root",
    ),
    "catalog": ("polyp_ssl.shards.cli:main", "query the catalog with SQL (DuckDB), or merge ingest parts"),
    "verify": (
        "polyp_ssl.shards.cli:verify_main",
        "check every shard against the catalog's checksums and counts",
    ),
    "train": ("polyp_ssl.train_cli:main", "streaming contrastive training (Lightning, one or many GPUs)"),
    "embed": (
        "polyp_ssl.eval.cli:embed_main",
        "embed tracklets or fragments with a frozen encoder into Parquet",
    ),
    "eval": ("polyp_ssl.eval.cli:eval_main", "retrieval and re-identification metrics"),
    "probe": ("polyp_ssl.eval.cli:probe_main", "size and histology probes on frozen embeddings"),
    "count": ("polyp_ssl.eval.cli:count_main", "polyp counting by clustering tracklet embeddings"),
    "report": ("polyp_ssl.eval.cli:report_main", "batch evaluation of checkpoints: every task, one report"),
    "curves": (
        "polyp_ssl.eval.curves:main",
        "training curves (loss terms, lr, throughput) from a run's CSV logs",
    ),
    "demo": ("polyp_ssl.eval.demo:main", "synthetic data -> ingest -> train -> report, end to end on CPU"),
    "reproduce": (
        "polyp_ssl.eval.reproduce:main",
        "the paper's table from the raw downloads: convert, split, ingest, train, report (resumable)",
    ),
    "export": ("polyp_ssl.export:main", "write a checkpoint's encoder as a plain safetensors file"),
}


def version() -> str:
    """The installed package's version (package metadata), or "unknown" for an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("polyp-ssl")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: polyp-ssl [--debug] [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`polyp-ssl <command> --help` explains a command's options."]
    lines += ["`polyp-ssl --debug <command> ...` (or POLYP_SSL_DEBUG=1) shows the traceback of a failure."]
    return "\n".join(lines)


# Subcommands whose interruption leaves something to finish, and how.
INTERRUPT_HINTS: dict[str, str] = {"ingest": "rerun with --resume"}


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove the global `--debug` (before the command, or among a command's options before a
    `--`); `train` keeps it, since it has its own `--debug` too."""
    debug = False
    while argv and argv[0] == "--debug":
        argv, debug = argv[1:], True
    if not argv:
        return argv, debug
    name, rest = argv[0], argv[1:]
    end = rest.index("--") if "--" in rest else len(rest)
    if "--debug" in rest[:end]:
        debug = True
        if name != "train":
            rest = [a for a in rest[:end] if a != "--debug"] + rest[end:]
    return [name, *rest], debug


def run_command(name: str, rest: list[str]) -> int:
    """Run one subcommand; every failure it does not report itself becomes one line on stderr
    and an exit code (shards.cli_errors.run_reported: the one mapping of errors to exit codes),
    unless debugging is on, when the traceback goes through."""
    from polyp_ssl.shards.cli_errors import run_reported

    def command() -> int | None:
        module_name, func_name = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), func_name)(rest)

    return run_reported(f"polyp-ssl {name}", command, INTERRUPT_HINTS.get(name))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, debug = split_debug(argv)
    if debug:
        from polyp_ssl.shards.cli_errors import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"  # seen by the subcommand (train has its own --debug too)
    if argv and argv[0] in ("-V", "--version"):
        print(f"polyp-ssl {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"polyp-ssl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "train" and "--debug" not in rest:
        from polyp_ssl.shards.cli_errors import debug_enabled

        if debug_enabled():  # train reads its own --debug flag
            rest = ["--debug", *rest]
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
