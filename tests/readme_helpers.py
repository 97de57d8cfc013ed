"""Splitting a README bash block into its shell commands."""

from __future__ import annotations

import shlex


def split_commands(block: str) -> list[str]:
    """One string per shell command: continuation lines (trailing backslash) and quoted strings
    over several lines stay with their command; comment lines are dropped."""
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        commands.append(pending.rstrip("\n"))
        pending = ""
    assert not pending, f"README: unterminated command {pending!r}"
    return commands
