"""The argument parser of every `polyp-ssl` subcommand: one flag spelling rule, no guessing.

- `--dataset_root` and `--dataset-root` name the same option. Each long option is documented (in
  `--help` and in error messages) in the spelling it was added with; the other spelling of its
  `_`/`-` is accepted by rewriting argv to the documented one before argparse reads it, so `--help`
  lists no aliases and argparse's own checks (required options, choices, mutually exclusive
  groups) see one option. The reference code's underscore flags keep working as they are.
- Abbreviations are refused (`allow_abbrev=False`): `--max_epoch 1` is an error, not `--max_epochs`.
- A usage error is one line, `PROG: error: MESSAGE`, exit 2 (no usage dump); an unknown option is
  named with the closest known one ("did you mean --dataset_root?", difflib on the normalised
  spellings).

Sub-parsers made with `add_subparsers` are of the same class (argparse's default `parser_class`),
so they follow the same rules. Standard library only: parsers are built before any stage loads.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


def flag_key(option: str) -> str:
    """The spelling-free key of a long option: `--dataset-root` and `--dataset_root` -> `dataset_root`."""
    return option.lstrip("-").replace("-", "_")


class FlagParser(argparse.ArgumentParser):
    """ArgumentParser with dash/underscore aliases, no abbreviations and one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # no guessing: a prefix of a flag is an unknown flag
        super().__init__(*args, **kwargs)
        self._last_args: list[str] = []

    # ------------------------------------------------------------------ spellings

    def _spellings(self) -> dict[str, str | None]:
        """key -> the documented long option of that key (None: two different options share it)."""
        out: dict[str, str | None] = {}
        owner: dict[str, argparse.Action] = {}
        for option, action in self._option_string_actions.items():
            if not option.startswith("--"):
                continue
            key = flag_key(option)
            if key not in out:
                out[key], owner[key] = option, action
            elif owner[key] is not action:
                out[key] = None
        return out

    def canonical_args(self, args: Sequence[str]) -> list[str]:
        """`args` with each long option (also `--opt=value`) in the spelling this parser documents,
        up to a `--` or a sub-command name (whose parser rewrites the rest itself)."""
        spellings = self._spellings()
        commands = self._subcommands()
        out: list[str] = []
        for i, tok in enumerate(args):
            if tok == "--" or tok in commands:
                return out + list(args[i:])
            out.append(self._canonical(tok, spellings))
        return out

    def _canonical(self, tok: str, spellings: dict[str, str | None]) -> str:
        if not tok.startswith("--") or len(tok) <= 2:
            return tok
        name, eq, value = tok.partition("=")
        if name in self._option_string_actions:
            return tok
        target = spellings.get(flag_key(name))
        return f"{target}{eq}{value}" if target else tok

    def _subcommands(self) -> dict[str, argparse.ArgumentParser]:
        out: dict[str, argparse.ArgumentParser] = {}
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.update(action.choices)
        return out

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = self.canonical_args(sys.argv[1:] if args is None else list(args))
        self._last_args = args
        return super().parse_known_args(args, namespace)

    # ------------------------------------------------------------------ errors

    def _is_unknown_option(self, tok: str) -> bool:
        """Whether argparse takes `tok` for an option it does not know (its `_parse_optional`, with
        abbreviations off): a token with a space, a negative number or a lone '-' is a value."""
        if not tok or tok[0] not in self.prefix_chars or len(tok) == 1:
            return False
        if tok in self._option_string_actions or tok.split("=", 1)[0] in self._option_string_actions:
            return False
        if self._negative_number_matcher.match(tok) and not self._has_negative_number_optionals:
            return False
        return " " not in tok

    def first_unknown_option(self, args: Sequence[str]) -> tuple[FlagParser, str] | None:
        """(parser, option) of the first option in `args` that no parser of the command knows."""
        commands = self._subcommands()
        for i, tok in enumerate(args):
            if tok == "--":
                return None
            sub = commands.get(tok)
            if isinstance(sub, FlagParser):
                return sub.first_unknown_option(sub.canonical_args(args[i + 1 :]))
            if sub is not None:
                return None
            if self._is_unknown_option(tok):
                return self, tok.split("=", 1)[0]
        return None

    def suggestion(self, option: str) -> str | None:
        """The known long option closest to `option`, compared without `-`/`_` or case differences:
        of the options it abbreviates the closest one, else the closest by difflib."""
        known: dict[str, str] = {}
        for name in self._option_string_actions:
            if name.startswith("--"):
                known.setdefault(flag_key(name).lower(), name)
        typed = flag_key(option).lower()
        longer = [k for k in known if typed and k.startswith(typed)]
        close = difflib.get_close_matches(typed, longer or list(known), n=1, cutoff=0.0 if longer else 0.6)
        return known[close[0]] if close else None

    def unknown_option_message(self, option: str) -> str:
        close = self.suggestion(option)
        if close:
            return f"unrecognized option {option} (did you mean {close}?)"
        return f"unrecognized option {option}; `{self.prog} --help` lists the options"

    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit 2. When the arguments hold an unknown option, that is the error
        named (with the closest known option), whatever argparse stumbled on first."""
        prog = self.prog
        found = self.first_unknown_option(self._last_args)
        if found is not None:
            parser, option = found
            prog, message = parser.prog, parser.unknown_option_message(option)
        self.exit(2, f"{prog}: error: {' '.join(message.split())}\n")
