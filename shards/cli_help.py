"""The help formatter of every `polyp-ssl` subcommand: each option's help ends with its default.

Argparse's ArgumentDefaultsHelpFormatter prints "(default: None)" for options without a default
and repeats a default the help text already explains; this one adds "(default: X)" only when
there is a default to show and the help does not speak of it already. Nothing heavy is imported
here: parsers are built before any stage is loaded, so `--help` stays fast.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """HelpFormatter that appends " (default: %(default)s)" where the help does not name one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, argparse.SUPPRESS, [], "")
            and "%(default)" not in text
            and "default" not in text.lower()
            and "(default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def shows_default(formatter_class: type, action: argparse.Action) -> bool:
    """Whether `polyp-ssl SUB --help` shows the default of `action` (used by the tests)."""
    text = action.help or ""
    if "%(default)" in text or "default" in text.lower():
        return True
    return isinstance(formatter_class, type) and issubclass(
        formatter_class, DefaultsHelpFormatter | argparse.ArgumentDefaultsHelpFormatter
    )
