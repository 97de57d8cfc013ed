"""The one `polyp-ssl` command: a table of subcommands, each imported only when used.

Nothing here imports a stage, so `polyp-ssl catalog ...` starts without loading torch.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function", one-line help). Each function takes argv (a list) and
# returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ingest.synth.cli:main", "generate a synthetic colonoscopy dataset in the seed's COCO layout"),
    "convert": ("ingest.convert.cli:main", "convert a raw dataset layout (REAL-Colon) to the seed's layout"),
    "ingest": ("ingest.cli:main", "build WebDataset shards and the Parquet catalog from a dataset root"),
    "catalog": ("shards.cli:main", "query the catalog with SQL (DuckDB), or merge ingest parts"),
    "verify": ("shards.cli:verify_main", "check every shard against the catalog's checksums and counts"),
    "train": ("polyp_ssl.cli:main", "streaming contrastive training (Lightning, one or many GPUs)"),
    "embed": ("eval.cli:embed_main", "embed tracklets or fragments with a frozen encoder into Parquet"),
    "eval": ("eval.cli:eval_main", "retrieval and re-identification metrics"),
    "probe": ("eval.cli:probe_main", "size and histology probes on frozen embeddings"),
    "count": ("eval.cli:count_main", "polyp counting by clustering tracklet embeddings"),
    "report": ("eval.cli:report_main", "batch evaluation of checkpoints: every task, one report"),
    "demo": ("eval.demo:main", "synthetic data -> ingest -> train -> report, end to end on CPU"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: polyp-ssl <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`polyp-ssl <command> --help` explains a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"polyp-ssl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
