"""The one error wrapper of the eval commands (`embed`, `eval`, `probe`, `count`, `report`,
`curves`): logging set up once, and each error of bad input a command names printed as one line
`polyp-ssl CMD: error: ...` with exit code 2. Anything else goes to the dispatcher
(polyp_ssl.entry), which maps it to its exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def run_cli(prog: str, fn: Callable[[], int], bad_input: tuple[type[BaseException], ...]) -> int:
    """fn()'s exit code; an exception of a `bad_input` type is printed on one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return fn()
    except bad_input as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
