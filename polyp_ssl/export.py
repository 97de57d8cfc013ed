"""`polyp-ssl export CKPT OUT`: write the encoder of a checkpoint as one plain safetensors file.

CKPT is any file `--encoder_ckpt` accepts: a `polyp-ssl train` checkpoint, the NT-SSL reference
training's checkpoint (the paper's released model), or an exported encoder (either version). OUT
holds the encoder weights and, in its safetensors metadata, the run config as JSON; it loads without
Lightning, and every `--encoder_ckpt` accepts it. The layout is in `docs/model.md` ("Checkpoints").

Torch is imported only after the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl export",
        description="Write the tracklet encoder of a checkpoint to a plain safetensors file "
        "(weights + config JSON in its metadata), loadable without Lightning.",
    )
    p.add_argument(
        "ckpt", help="a training checkpoint, an NT-SSL reference checkpoint, or an exported encoder"
    )
    p.add_argument("out", help="output file, e.g. encoder.safetensors (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (as POLYP_SSL_DEBUG=1)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from polyp_ssl.checkpoint import CheckpointError, export_encoder
    from polyp_ssl.shards.cli_errors import debug_enabled

    debug = args.debug or debug_enabled()
    try:
        out = export_encoder(args.ckpt, args.out, overwrite=args.overwrite)
    except CheckpointError as e:
        if debug:
            raise
        print(f"polyp-ssl export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied: nothing is left under OUT's name
        if debug:
            raise
        print(f"polyp-ssl export: error: {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
