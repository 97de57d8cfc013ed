"""How the command line reports a failure: one line, unless debugging is on.

`polyp-ssl --debug CMD ...` (or `POLYP_SSL_DEBUG=1`) lets tracebacks through; the flag is passed
to the subcommands as that environment variable, so each can check `debug_enabled()`.
Standard library only: `polyp-ssl catalog` must start without loading torch.
"""

from __future__ import annotations

import errno
import os

DEBUG_ENV = "POLYP_SSL_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _shown(name: object) -> str:
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    # a file name that is not UTF-8 is shown with its escapes instead of failing to print
    return str(name).encode("utf-8", "backslashreplace").decode("utf-8")


def describe_oserror(exc: OSError) -> str:
    """`PATH: cause` (both paths of a rename), e.g. `/data/out/catalog: Read-only file system`."""
    cause = exc.strerror or (errno.errorcode.get(exc.errno, "") if exc.errno else "") or str(exc)
    paths = [_shown(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return _shown(f"{type(exc).__name__}: {cause}" if exc.strerror is None else cause)
    return f"{' -> '.join(paths)}: {cause}"
