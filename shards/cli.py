"""`polyp-ssl catalog` (SQL over the catalog, or `merge`) and `polyp-ssl verify`.

Imports only duckdb/pyarrow (never torch or webdataset), so the commands start fast.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from typing import Any

import pyarrow as pa

from polyp_ssl.shards.cli_errors import failure_code
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

log = logging.getLogger(__name__)

DEFAULT_TABLE_ROWS = 50
DEFAULT_CELL_WIDTH = 40


def _cell_text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_cell_text(v) for v in value) + "]"
    return str(value)


def _truncate(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def format_table(table: pa.Table, max_rows: int | None, cell_width: int = DEFAULT_CELL_WIDTH) -> str:
    """An aligned text table; numbers right-aligned, long cells cut, a note of rows left out."""
    shown = table if max_rows is None else table.slice(0, max_rows)
    names = table.column_names
    rows = [[_truncate(_cell_text(v), cell_width) for v in row.values()] for row in shown.to_pylist()]
    numeric = [
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        for t in table.schema.types
    ]
    heads = [_truncate(n, cell_width) for n in names]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)
        )

    out = [line(heads).rstrip(), "  ".join("-" * w for w in widths)]
    out += [line(r).rstrip() for r in rows]
    left_out = table.num_rows - shown.num_rows
    note = f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}"
    note += f", {left_out} not shown: --max-rows to see more)" if left_out else ")"
    out.append(note)
    return "\n".join(out)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


def format_json(table: pa.Table) -> str:
    return json.dumps([_json_safe(r) for r in table.to_pylist()], indent=1, default=str, ensure_ascii=False)


def format_csv(table: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow(
            ["" if v is None else json.dumps(v) if isinstance(v, list | dict) else v for v in row.values()]
        )
    return buf.getvalue()


def _query_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl catalog",
        description="Run SQL on an ingested root's catalog (read-only DuckDB; one view per table: videos, "
        "polyps, tracklets, frames, shards, errors, and embeddings_NAME for each embeddings file cached for "
        "the root in ROOT/embeddings or the user cache folder). `polyp-ssl catalog merge OUT` merges "
        "the partial catalogs of `ingest --part I/N` runs.",
        epilog='example: polyp-ssl catalog data/rc "SELECT split, count(*) FROM tracklets GROUP BY 1"',
    )
    p.add_argument("root", help="ingested root (holds catalog/)")
    p.add_argument(
        "sql",
        nargs="?",
        help="SQL: one statement, or several separated by ';' (table format: each result under a line "
        "naming its statement); '-' reads the SQL from stdin",
    )
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (csv and json take one statement) (default: %(default)s)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help=f"rows to print (default {DEFAULT_TABLE_ROWS} for table, all for csv/json)",
    )
    p.add_argument(
        "--max-width",
        type=int,
        default=DEFAULT_CELL_WIDTH,
        help="cut table cells longer than this (default: %(default)s)",
    )
    p.add_argument("--tables", action="store_true", help="list the views (full names) and their row counts")
    p.add_argument(
        "--cache_dir",
        default=None,
        metavar="DIR",
        help="also list the root's embeddings cached under DIR (as given to embed/eval/report "
        "--cache_dir); default: POLYP_SSL_CACHE, else $XDG_CACHE_HOME/polyp-ssl or ~/.cache/polyp-ssl. "
        "ROOT/embeddings is always listed",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="stop the query after this many seconds (exit 1); default: no limit (Ctrl-C stops it)",
    )
    return p


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"--timeout must be a positive number of seconds, got {text!r}")
    return value


def _merge_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl catalog merge",
        description="Combine OUT/catalog/parts/III-of-NNN (from `polyp-ssl ingest --part I/N`) "
        "into OUT/catalog. "
        "Every part must be present and ingested with the same parameters.",
    )
    p.add_argument("out", help="output root shared by the parts")
    return p


def split_statements(sql: str) -> list[str]:
    """The statements of `sql` (DuckDB's own parser: a ';' inside a string or comment does not split),
    without their trailing ';'. ValueError for SQL that does not parse into statements."""
    import duckdb

    try:
        parts = [st.query.strip().rstrip(";").strip() for st in duckdb.extract_statements(sql)]
    except duckdb.Error as exc:
        raise ValueError(" ".join(str(exc).split())) from None
    return [p for p in parts if p]


def statement_header(index: int, total: int, statement: str, width: int = 100) -> str:
    """The line above a statement's result when several run: its number and its text (one line)."""
    text = " ".join(statement.split())
    return f"-- statement {index}/{total}: {_truncate(text, width)}"


def _error(prog: str, exc: BaseException) -> int:
    """One line; exit 2 for bad input (a root without a catalog: NoCatalogError), else 1."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return failure_code(exc)


def _emit(table: pa.Table, fmt: str, max_rows: int | None, width: int) -> None:
    if fmt == "table":
        print(format_table(table, DEFAULT_TABLE_ROWS if max_rows is None else max_rows, width))
        return
    if max_rows is not None:
        table = table.slice(0, max_rows)
    sys.stdout.write(format_csv(table) if fmt == "csv" else format_json(table) + "\n")


def merge_main(argv: list[str]) -> int:
    args = _merge_parser().parse_args(argv)
    from polyp_ssl.shards.catalog_merge import merge_parts
    from polyp_ssl.shards.lock import LockHeld
    from polyp_ssl.shards.tables import CatalogError

    try:
        manifest = merge_parts(args.out)
    except LockHeld as exc:
        print(f"polyp-ssl catalog merge: {exc}", file=sys.stderr)
        return 2
    except (CatalogError, OSError) as exc:
        return _error("polyp-ssl catalog merge", exc)
    rows = ", ".join(f"{k} {v}" for k, v in manifest["rows"].items())
    print(f"merged {len(manifest['merged_from'])} parts into {args.out}/catalog: {rows}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    parser = _query_parser()
    args = parser.parse_args(argv)
    if not args.tables and not args.sql:
        parser.error("give an SQL statement, or --tables")
    if args.max_rows is not None and args.max_rows < 0:
        parser.error("--max-rows must be >= 0")
    prog = "polyp-ssl catalog"
    statements: list[str] = []
    if not args.tables:
        sql = sys.stdin.read() if args.sql == "-" else args.sql
        try:
            statements = split_statements(sql)
        except ValueError as exc:
            return _error(prog, exc)
        if not statements:
            where = " on stdin" if args.sql == "-" else ""
            print(f"{prog}: error: no SQL statement{where}", file=sys.stderr)
            return 2
        if len(statements) > 1 and args.format != "table":
            print(
                f"{prog}: error: --format {args.format} takes one statement, got {len(statements)} "
                "(run them one by one, or use --format table)",
                file=sys.stderr,
            )
            return 2

    import time

    import duckdb

    from polyp_ssl.shards.catalog import (
        CatalogError,
        QueryTimeout,
        close_quietly,
        connect,
        run_interruptible,
        run_sql,
        view_names,
    )
    from polyp_ssl.shards.embeddings_cache import embeddings_places

    try:
        con = connect(args.root, args.cache_dir)
    except (CatalogError, OSError) as exc:
        return _error(prog, exc)
    try:
        if args.tables:

            def count_views() -> pa.Table:
                names = view_names(con)
                counts = [con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names]
                where = [sources.get(n, "catalog") for n in names]
                return pa.table({"view": names, "rows": pa.array(counts, pa.int64()), "source": where})

            sources = embeddings_sources(args.root, args.cache_dir)

            table = run_interruptible(con, count_views, args.timeout)
            # full view names: they are pasted into queries
            width = max([args.max_width, *(len(n) for n in table.column("view").to_pylist())])
            _emit(table, args.format, args.max_rows, width)
            if args.format == "table" and "user cache" in sources.values():
                print(f"user cache: {embeddings_places(args.root, args.cache_dir)[1]}")
            return 0
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        for i, statement in enumerate(statements, 1):
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
            # in a helper thread: Ctrl-C and --timeout stop a query that would run for ever
            table = run_sql(con, statement, left)
            if len(statements) > 1:
                print(("\n" if i > 1 else "") + statement_header(i, len(statements), statement))
            _emit(table, args.format, args.max_rows, args.max_width)
    except QueryTimeout:
        return _error(prog, f"the query was stopped after --timeout {args.timeout:g} s")
    except duckdb.Error as exc:
        where = f"statement {i}/{len(statements)}: " if not args.tables and len(statements) > 1 else ""
        return _error(prog, f"{where}{' '.join(str(exc).split())}")  # DuckDB's message on one line
    finally:
        close_quietly(con)
    return 0


def embeddings_sources(root: str, cache_dir: str | None) -> dict[str, str]:
    """Embeddings view name -> where its file is: "ROOT/embeddings" or "user cache"."""
    from polyp_ssl.shards.catalog import embeddings_view_name
    from polyp_ssl.shards.embeddings_cache import cached_files, embeddings_places

    in_root, user = embeddings_places(root, cache_dir)
    out = {embeddings_view_name(p.stem): "user cache" for p in cached_files((user,))}
    out.update({embeddings_view_name(p.stem): "ROOT/embeddings" for p in cached_files((in_root,))})
    return out


def _verify_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl verify",
        description="Re-hash every shard listed in the catalog; compare sha256, byte size and sample count; "
        "check every tracklet's sample is in its shard and every catalog byte span (offset, size, CRC-32) "
        "is its member's; report shard files the catalog does not list. "
        "Exit 0 only when everything matches.",
    )
    p.add_argument("root", help="ingested root (holds catalog/ and shards/)")
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="report format (default: %(default)s)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)"
    )
    return p


def verify_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _verify_parser().parse_args(argv)
    from polyp_ssl.shards.tables import CatalogError
    from polyp_ssl.shards.verify import verify_root

    try:
        report = verify_root(args.root, progress=not args.no_progress and args.format == "text")
    except (CatalogError, OSError) as exc:
        return _error("polyp-ssl verify", exc)
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=1, sort_keys=True))
    else:
        for p in report.problems:
            print(f"{p.kind}: {p.shard}: {p.detail}")
        status = "OK" if report.ok else f"{len(report.problems)} problems " + json.dumps(report.counts())
        print(
            f"verify {args.root}: {report.shards_checked}/{report.shards_in_catalog} shards checked, "
            f"{report.samples_checked} samples, {report.bytes_hashed} bytes hashed: {status}"
        )
    return 0 if report.ok else 1
