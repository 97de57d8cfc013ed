"""Capture the argparse parser of every `polyp-ssl` subcommand (for the CLI conventions tests)."""

from __future__ import annotations

import argparse
import importlib
from unittest import mock

from polyp_ssl.entry import COMMANDS
from polyp_ssl.shards.cli_help import shows_default

# subcommands with sub-parsers of their own: (command, first argument)
NESTED: list[tuple[str, str]] = [
    ("catalog", "merge"),
    ("convert", "sun"),
    ("convert", "polypsset"),
    ("convert", "ldpolyp"),
    ("convert", "table"),
    ("convert", "merge"),
]


class Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def capture_parser(name: str, first: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser `polyp-ssl NAME [FIRST] --help` would print, without running anything."""
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab):
        try:
            func([*(first or []), "--help"])
        except Captured as exc:
            return exc.parser
    raise AssertionError(f"polyp-ssl {name} parsed no arguments")


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(name, capture_parser(name)) for name in COMMANDS]
    out += [(f"{name} {first}", capture_parser(name, [first])) for name, first in NESTED]
    return out


def problems(parser: argparse.ArgumentParser) -> list[str]:
    """Options without help text, and options with a default their help does not show."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if action.help == argparse.SUPPRESS:
            continue
        if not (action.help or "").strip():
            out.append(f"{name}: no help text")
            continue
        default = action.default
        if (
            action.option_strings
            and default not in (None, argparse.SUPPRESS, False)
            and not shows_default(parser.formatter_class, action)
        ):
            out.append(f"{name}: default {default!r} not shown")
    return out
