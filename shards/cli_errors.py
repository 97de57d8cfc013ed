"""How the command line reports a failure: one line and an exit code, unless debugging is on.

The mapping from an exception to its exit code and line lives here, once (`exit_code`,
`failure_line`, `run_reported`; the dispatcher runs every subcommand through `run_reported`):

    bad input (an exception with `bad_input = True`) -> 2    `polyp-ssl CMD: error: MESSAGE`
    any other exception                              -> 1    `polyp-ssl CMD: error: TYPE: MESSAGE (rerun ...)`
    an OSError                                       -> 2 or 1 as above, `polyp-ssl CMD: PATH: cause`
    KeyboardInterrupt (Ctrl-C)                       -> 130  `polyp-ssl CMD: interrupted[; hint]`
    BrokenPipeError (the reader of stdout went away) -> 141  nothing printed

`polyp-ssl --debug CMD ...` (or `POLYP_SSL_DEBUG=1`) lets tracebacks through; the flag is passed
to the subcommands as that environment variable, so each can check `debug_enabled()`.
Standard library only: `polyp-ssl catalog` must start without loading torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable

DEBUG_ENV = "POLYP_SSL_DEBUG"
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
MAX_MESSAGE_CHARS = 500


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


def failure_code(exc: BaseException) -> int:
    """2 for bad input (an exception class with `bad_input = True`: a bad file, flag or root), else 1."""
    return EXIT_BAD_INPUT if getattr(exc, "bad_input", False) else EXIT_FAILURE


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that ended with `exc` (see the module docstring)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    return failure_code(exc)


def failure_line(prog: str, exc: BaseException, interrupt_hint: str | None = None) -> str:
    """The one line on stderr for a command `prog` that ended with `exc`."""
    if isinstance(exc, KeyboardInterrupt):
        return f"{prog}: interrupted" + (f"; {interrupt_hint}" if interrupt_hint else "")
    if isinstance(exc, OSError):  # a FIFO given as input, a read-only folder: `PATH: cause`
        return f"{prog}: {describe_oserror(exc)}"
    text = " ".join(str(exc).split())[:MAX_MESSAGE_CHARS] or "(no message)"
    if getattr(exc, "bad_input", False):  # a bad file or flag (CheckpointError, ...)
        return f"{prog}: error: {text}"
    return f"{prog}: error: {type(exc).__name__}: {text} (rerun with --debug for the traceback)"


def run_reported(prog: str, command: Callable[[], int | None], interrupt_hint: str | None = None) -> int:
    """`command()`'s exit code; a failure it does not report itself becomes `failure_line` on stderr
    and `exit_code`, or goes through with its traceback when debugging is on (a broken pipe never
    does: the reader of our output went away, `| head`, which is not an error of the command)."""
    try:
        return int(command() or 0)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (KeyboardInterrupt, Exception) as exc:
        if debug_enabled():
            raise
        print(failure_line(prog, exc, interrupt_hint), file=sys.stderr)
        return exit_code(exc)
