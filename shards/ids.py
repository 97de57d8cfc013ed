"""Ids that become part of a file path or of another id: the one check they all go through.

Split names (`shards/{split}/{split}-NNNNNN.tar`), dataset and sequence ids (`video_id` =
`{dataset_id}/{sequence_id}`, `{videos_dir}/{sequence_id}.mp4`) and embeddings names
(`embeddings/{name}.parquet`) come from data or from the command line. Each must be one
non-empty path component: no `/` or `\\` (a separator would turn one component into two, and
would let `a/b` + `c` and `a` + `b/c` give one video id), not `.` or `..`, no NUL, no control
characters, at most MAX_ID_BYTES bytes of UTF-8. The check refuses instead of rewriting, so an
accepted id is used exactly as given (ordinary ids keep their names) and two distinct ids never
map to one path. Ids that are not path components (identity ids) are plain text all the same
(`text_problem`): no control character, so a terminal escape in a table never reaches a message.
"""

from __future__ import annotations

import re
import unicodedata

MAX_ID_BYTES = 200  # below the 255-byte file name limit, with room for a prefix and suffixes


class UnsafeIdError(ValueError):
    """An id that cannot be used as one path component; the message names the id and why."""


# bidirectional overrides and isolates: they reorder what a terminal shows ("Trojan source")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# every character text_problem refuses (Cc, Cs, Zl, Zp, the bidi controls), found by one scan in
# C; what it is is then told by unicodedata, for the one character found
_REFUSED = r"\x0a-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(rf"[\x00-\x09{_REFUSED}]")
_UNSAFE_BUT_TAB = re.compile(rf"[\x00-\x08{_REFUSED}]")


def text_problem(value: str) -> str | None:
    """Why `value` is not plain text that can be shown in a message or a table, or None: a NUL, a
    control character (a terminal escape `\\x1b`, a newline, ...), a line or paragraph separator, a
    bidirectional override, a lone surrogate. Every id read from data (path component or not)
    goes through this check."""
    return _problem_of(_UNSAFE.search(value))


def text_problem_but_tab(value: str) -> str | None:
    """`text_problem` with tabs allowed (a field of a table or a line of a text file)."""
    return _problem_of(_UNSAFE_BUT_TAB.search(value))


def _problem_of(match: re.Match[str] | None) -> str | None:
    """What the first refused character found by a scan is, in words (None: none found)."""
    if match is None:
        return None
    for ch in match.group():
        if ch == "\0":
            return "contains a NUL character"
        category = unicodedata.category(ch)
        if category == "Cc":
            return f"contains the control character {ch!r}"
        if category == "Cs":
            return "contains a lone surrogate (not text)"
        if category in ("Zl", "Zp") or ch in _BIDI_CONTROLS:
            return f"contains the invisible control character {ch!r}"
    return None


def id_problem(value: object) -> str | None:
    """Why `value` cannot be one path component, or None when it can."""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if value in (".", ".."):
        return "is a relative folder name ('.' or '..')"
    if "/" in value or "\\" in value:
        return "contains a path separator ('/' or '\\')"
    problem = text_problem(value)
    if problem is not None:
        return problem
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def path_component(value: object, what: str) -> str:
    """`value` itself when it is safe as one path component; UnsafeIdError naming `what`
    (e.g. "split", "--name") otherwise."""
    problem = id_problem(value)
    if problem is not None:
        raise UnsafeIdError(f"{what} {value!r} {problem}; it must be one plain file or folder name")
    return value  # type: ignore[return-value]
