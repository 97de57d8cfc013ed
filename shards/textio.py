"""Strict, bounded readers of the text formats data arrives in: CSV, line files, JSON and YAML.

Every stage reads its CSV tables, box TXT files, JSON documents and YAML configs through here, so
each inherits the same guarantees:

- a file is opened only when it is a regular file (`files.open_regular`), and its size, its line
  lengths and its nesting depth are bounded before it is held or parsed: a 200 MB line, a JSON
  document nested 100,000 levels deep or a 374-byte YAML alias bomb costs a scan, not gigabytes
  or a RecursionError;
- CSV is strict: a quote left open (which would swallow the rest of the file into one field), a
  row with more or fewer fields than the header, a NUL, a control character in a field are errors;
- YAML is read with the safe loader, aliases refused (an alias is how a few bytes expand into a
  billion-element tree), python tags refused naming the file;
- every error is one TextInputError (a ValueError) whose message is one line naming the file and,
  where there is one, the line and the field; values are shown truncated (`shown`).

Standard library and PyYAML only (PyYAML imported when YAML is read): `polyp-ssl catalog` and
the converters use this without loading torch.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from polyp_ssl.shards.files import open_regular
from polyp_ssl.shards.ids import text_problem, text_problem_but_tab

MAX_LINE_BYTES = 1 << 20  # a CSV row or box line longer than this is not a table row
MAX_JSON_BYTES = 256 << 20  # manifests, reports, configs, metadata: KBs to a few MB
# COCO annotation files grow with the dataset (REAL-Colon's 2.7 M frames: about 1 GB); their
# bound is the memory a parse of that size takes, not a format limit
MAX_ANNOTATION_BYTES = 4 << 30
MAX_JSON_DEPTH = 64  # COCO nests 4 levels; manifests, configs and reports a few more
MAX_YAML_BYTES = 1 << 20  # a training config is a few KB
MAX_YAML_DEPTH = 32
SHOWN_CHARS = 80  # values rendered in a message are cut to this many characters

_STRINGS = re.compile(rb'"[^"]*"')
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))
_REPR = reprlib.Repr()
_REPR.maxstring = SHOWN_CHARS
_REPR.maxother = SHOWN_CHARS
_REPR.maxlevel = 2
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _name, 4)


class TextInputError(ValueError):
    """A text input that cannot be read as its format: one line naming the file, and the line and
    field where there is one. `reason` is a short machine-readable cause (`bad_csv`, `ragged_row`,
    `line_too_long`, `bad_json`, `too_deep`, `yaml_alias`, ...); `bad_input` tells the command-line
    dispatcher that this is bad input (exit 2)."""

    bad_input = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        reason: str,
        detail: str,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.reason, self.detail = os.fspath(path), reason, detail
        self.line, self.field = line, field
        where = self.path
        if line is not None:
            where += f": line {line}"
        if field is not None:
            where += f": field {shown(field)}"
        super().__init__(one_line(f"{where}: {detail}"))


def one_line(text: str) -> str:
    """`text` as one printable line: control characters (newlines, terminal escapes), invisible
    controls and text that is not UTF-8 are shown escaped (`\\x1b`, `\\n`), so a name read from
    data cannot break the line or drive the terminal."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    if all(ch.isprintable() or ch == " " for ch in text):
        return text
    return "".join(repr(ch)[1:-1] if text_problem(ch) is not None or ch in "\t" else ch for ch in text)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for a message, bounded whatever the value (a string of a gigabyte, a list of
    millions, a deeply nested mapping): at most `limit` characters, with `...` where it was cut."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- lines and CSV


def _lines(
    f: BinaryIO, path: str | os.PathLike[str], max_line: int, encoding: str = "utf-8-sig"
) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of an open binary file, decoded line by line (so a byte
    that is not UTF-8 is named by its line); a line longer than `max_line` bytes (its ending
    included) is refused when `max_line` bytes of it have been read, never held whole. Lines end
    at `\\n` (a `\\r\\n` ending is kept whole)."""
    codec = "utf-8" if encoding.replace("_", "-").lower() in ("utf-8-sig", "utf8-sig") else encoding
    for lineno in itertools.count(1):
        data = f.readline(max_line)
        if not data:
            return
        if len(data) >= max_line and not data.endswith(b"\n"):
            raise TextInputError(
                path, "line_too_long", f"longer than {max_line:,} bytes; not a line of this format", lineno
            )
        if lineno == 1 and codec != encoding and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # the UTF-8 byte order mark
        try:
            line = data.decode(codec)
        except UnicodeDecodeError as exc:
            raise TextInputError(
                path,
                "bad_encoding",
                f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {exc.start + 1})",
                lineno,
            ) from None
        yield lineno, line


def read_lines(
    path: str | os.PathLike[str], what: str = "", max_line: int = MAX_LINE_BYTES, encoding: str = "utf-8-sig"
) -> Iterator[tuple[int, str]]:
    """(line number, line without its ending) of a UTF-8 text file such as a box TXT file, each line
    bounded (`max_line` bytes) and free of control characters; TextInputError naming the file and
    line otherwise."""
    with open_regular(path, what) as f:
        for lineno, line in _lines(f, path, max_line, encoding):
            text = line.rstrip("\r\n")
            problem = _field_problem(text)
            if problem is not None:
                raise TextInputError(path, "control_character", problem, lineno)
            yield lineno, text


def _field_problem(text: str) -> str | None:
    """Why a CSV field or text line is not plain text (tabs allowed), or None."""
    return text_problem_but_tab(text)


def csv_rows(
    path: str | os.PathLike[str],
    what: str = "",
    max_line: int = MAX_LINE_BYTES,
    max_rows: int | None = None,
    encoding: str = "utf-8-sig",
    columns: list[str] | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank row of a CSV file, strictly: a row is one physical
    line (a quoted field that does not close on its line is an unterminated quote, refused at the
    next line instead of swallowing the rest of the file), each line at most `max_line`
    bytes, at most `max_rows` rows, no NUL or control character in a field (csv's own
    errors, in strict mode, included). TextInputError naming the file and line otherwise.
    `columns`, when the caller fills it with the header, names the field of a message."""
    with open_regular(path, what) as f:
        pending: list[int] = []  # the physical line the row being parsed started on

        def source() -> Iterator[str]:
            for lineno, line in _lines(f, path, max_line, encoding):
                if pending:
                    raise TextInputError(
                        path,
                        "bad_csv",
                        "a quoted field is not closed on its line (unterminated quote)",
                        pending[0],
                    )
                pending.append(lineno)
                yield line

        reader = csv.reader(source(), strict=True)
        n = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                if pending:  # csv in strict mode raises at the end of data; kept for safety
                    raise TextInputError(path, "bad_csv", "unterminated quote", pending[0]) from None
                return
            except csv.Error as exc:
                line = pending[0] if pending else reader.line_num
                raise TextInputError(path, "bad_csv", f"not valid CSV: {exc}", line) from None
            lineno = pending.pop()
            if not row:
                continue
            for i, value in enumerate(row):
                problem = _field_problem(value)
                if problem is not None:
                    name = columns[i] if columns and i < len(columns) else f"column {i + 1}"
                    raise TextInputError(path, "control_character", problem, lineno, name)
            n += 1
            if max_rows is not None and n > max_rows:
                raise TextInputError(
                    path, "too_many_rows", f"more than {max_rows:,} rows, the most one file may hold", lineno
                )
            yield lineno, row


def read_csv_table(
    path: str | os.PathLike[str],
    what: str = "",
    required: tuple[str, ...] = (),
    max_line: int = MAX_LINE_BYTES,
    max_rows: int | None = None,
    strip: bool = True,
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and rows (line number, column -> value) of a CSV table with a header line; every row
    has exactly the header's number of fields; values stripped of surrounding blanks (`strip`).
    TextInputError naming the file, the line and what is wrong: no header, a header column twice or
    empty, a missing `required` column, a ragged row, and everything `csv_rows` refuses."""
    columns: list[str] = []
    rows = csv_rows(path, what, max_line, None if max_rows is None else max_rows + 1, columns=columns)
    first = next(rows, None)
    if first is None:
        raise TextInputError(path, "empty_file", "empty CSV (no header)")
    head_line, raw_header = first
    header = [h.strip() for h in raw_header] if strip else list(raw_header)
    columns += header
    for i, name in enumerate(header):
        if not name:
            raise TextInputError(path, "bad_header", f"column {i + 1} of the header has no name", head_line)
        if name in header[:i]:
            raise TextInputError(path, "bad_header", f"column {shown(name)} appears twice", head_line, name)
    missing = [c for c in required if c not in header]
    if missing:
        raise TextInputError(
            path,
            "missing_field",
            f"no column {shown(missing[0])} (header: {shown(header)})",
            head_line,
            missing[0],
        )
    out = []
    for lineno, row in rows:
        if len(row) != len(header):
            more = "more" if len(row) > len(header) else "fewer"
            raise TextInputError(
                path,
                "ragged_row",
                f"{len(row)} fields, {more} than the {len(header)} of the header",
                lineno,
            )
        values = [v.strip() for v in row] if strip else row
        out.append((lineno, dict(zip(header, values, strict=True))))
    return header, out


# ---------------------------------------------------------------- JSON


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, counted without parsing it (so a
    document nested 200,000 levels deep costs one linear scan, not a RecursionError)."""
    # drop escaped backslashes, then escaped quotes (left to right, as a JSON reader pairs them),
    # then whole strings: what is left has brackets only where the document nests
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in data else data
    text = _STRINGS.sub(b"", text).translate(None, _NOT_BRACKET)
    if not text:
        return 0
    steps = memoryview(text.translate(_BRACKET_STEP)).cast("b")
    return max(itertools.accumulate(steps))


def loads_json(
    data: bytes | str,
    name: str | os.PathLike[str],
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    **kwargs: Any,
) -> Any:
    """The parsed JSON text `data` (from `name`, for messages): size and nesting bounded before
    parsing; TextInputError naming `name` (and line and column of a syntax error) otherwise.
    `kwargs` go to json.loads (object_pairs_hook, parse_constant)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise TextInputError(name, "too_large", f"{len(raw):,} bytes of JSON, more than {max_bytes:,}")
    depth = json_depth(raw)
    if depth > max_depth:
        raise TextInputError(name, "too_deep", f"JSON nested {depth:,} levels deep, more than {max_depth}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # "'utf-8' codec can't decode byte 0xff in position 7: ..."
        raise TextInputError(name, "bad_encoding", f"not valid JSON: not UTF-8 text ({exc})") from None
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise TextInputError(
            name, "bad_json", f"not valid JSON: {exc.msg} (column {exc.colno})", exc.lineno
        ) from None
    except (ValueError, RecursionError) as exc:  # 4300+ digit numbers; the depth bound makes recursion rare
        raise TextInputError(name, "bad_json", f"not valid JSON: {exc}") from None


def load_json(
    path: str | os.PathLike[str],
    what: str = "",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    **kwargs: Any,
) -> Any:
    """The parsed JSON file `path` (a regular file, its size checked before it is read; see
    `loads_json`)."""
    return loads_json(read_bounded(path, what, max_bytes, "JSON"), path, max_bytes, max_depth, **kwargs)


def read_bounded(path: str | os.PathLike[str], what: str, max_bytes: int, kind: str = "data") -> bytes:
    """The bytes of the regular file `path`, refused (TextInputError naming it) when it holds more
    than `max_bytes`: checked on the open descriptor before reading, and again while reading."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise TextInputError(path, "too_large", f"{size:,} bytes of {kind}, more than {max_bytes:,}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while read
        raise TextInputError(path, "too_large", f"more than {max_bytes:,} bytes of {kind}")
    return data


# ---------------------------------------------------------------- YAML


def _yaml_where(exc: Any) -> int | None:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return None if mark is None else mark.line + 1


def _check_yaml_events(text: str, name: str | os.PathLike[str], max_depth: int) -> None:
    """Walk the YAML events (no tree is built): refuse aliases, python tags and nesting deeper than
    `max_depth` before anything is composed (composing recurses, and aliases expand)."""
    import yaml

    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0
    for event in yaml.parse(text, Loader=loader_cls):
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.AliasEvent):
            raise TextInputError(
                name,
                "yaml_alias",
                f"YAML alias *{shown(event.anchor)} refused (aliases are not allowed: they can expand a few "
                "bytes into gigabytes); write the value out",
                line,
            )
        tag = getattr(event, "tag", None)
        if isinstance(tag, str) and tag.startswith(("tag:yaml.org,2002:python/", "!!python/")):
            raise TextInputError(
                name, "yaml_tag", f"YAML tag {shown(tag)} refused (a config holds plain values only)", line
            )
        if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            depth += 1
            if depth > max_depth:
                raise TextInputError(name, "too_deep", f"YAML nested more than {max_depth} levels deep", line)
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1


def loads_yaml(
    data: bytes | str,
    name: str | os.PathLike[str],
    max_bytes: int = MAX_YAML_BYTES,
    max_depth: int = MAX_YAML_DEPTH,
) -> Any:
    """The value of the YAML text `data` (from `name`, for messages) by the safe loader, with
    aliases and python tags refused and size and depth bounded before anything is built;
    TextInputError naming `name` and the line otherwise."""
    import yaml

    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise TextInputError(name, "too_large", f"{len(raw):,} bytes of YAML, more than {max_bytes:,}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextInputError(name, "bad_encoding", f"not valid YAML: not UTF-8 text ({exc})") from None
    try:
        _check_yaml_events(text, name, max_depth)
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise TextInputError(name, "bad_yaml", f"not valid YAML: {problem}", _yaml_where(exc)) from None
    except RecursionError:
        raise TextInputError(name, "too_deep", "YAML nested too deep") from None


def load_yaml(
    path: str | os.PathLike[str],
    what: str = "",
    max_bytes: int = MAX_YAML_BYTES,
    max_depth: int = MAX_YAML_DEPTH,
) -> Any:
    """The value of the YAML file `path` (a regular file, its size checked before it is read; see
    `loads_yaml`)."""
    return loads_yaml(read_bounded(path, what, max_bytes, "YAML"), path, max_bytes, max_depth)


def load_config_file(path: str | os.PathLike[str], what: str = "config") -> Any:
    """A config file by its suffix: `.json` as JSON, anything else as YAML (bounded like a YAML config)."""
    if Path(path).suffix.lower() == ".json":
        return load_json(path, what, max_bytes=MAX_YAML_BYTES, max_depth=MAX_YAML_DEPTH)
    return load_yaml(path, what)


__all__ = [
    "MAX_ANNOTATION_BYTES",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_LINE_BYTES",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "TextInputError",
    "csv_rows",
    "json_depth",
    "load_config_file",
    "load_json",
    "load_yaml",
    "loads_json",
    "loads_yaml",
    "one_line",
    "read_bounded",
    "read_csv_table",
    "read_lines",
    "shown",
]
