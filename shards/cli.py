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
    p = argparse.ArgumentParser(
        prog="polyp-ssl catalog",
        description="Run SQL on an ingested root's catalog (read-only DuckDB; one view per table: videos, "
        "polyps, tracklets, frames, shards, errors, embeddings_NAME). `polyp-ssl catalog merge OUT` merges "
        "the partial catalogs of `ingest --part I/N` runs.",
        epilog='example: polyp-ssl catalog data/rc "SELECT split, count(*) FROM tracklets GROUP BY 1"',
    )
    p.add_argument("root", help="ingested root (holds catalog/)")
    p.add_argument("sql", nargs="?", help="one SQL statement")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help=f"rows to print (default {DEFAULT_TABLE_ROWS} for table, all for csv/json)",
    )
    p.add_argument(
        "--max-width", type=int, default=DEFAULT_CELL_WIDTH, help="cut table cells longer than this"
    )
    p.add_argument("--tables", action="store_true", help="list the views and their row counts")
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyp-ssl catalog merge",
        description="Combine OUT/catalog/parts/III-of-NNN (from `polyp-ssl ingest --part I/N`) "
        "into OUT/catalog. "
        "Every part must be present and ingested with the same parameters.",
    )
    p.add_argument("out", help="output root shared by the parts")
    return p


def _error(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 1


def _emit(table: pa.Table, fmt: str, max_rows: int | None, width: int) -> None:
    if fmt == "table":
        print(format_table(table, DEFAULT_TABLE_ROWS if max_rows is None else max_rows, width))
        return
    if max_rows is not None:
        table = table.slice(0, max_rows)
    sys.stdout.write(format_csv(table) if fmt == "csv" else format_json(table) + "\n")


def merge_main(argv: list[str]) -> int:
    args = _merge_parser().parse_args(argv)
    from shards.catalog import CatalogError
    from shards.catalog_merge import merge_parts

    try:
        manifest = merge_parts(args.out)
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

    import duckdb

    from shards.catalog import CatalogError, connect, view_names

    try:
        con = connect(args.root)
    except (CatalogError, OSError) as exc:
        return _error("polyp-ssl catalog", exc)
    try:
        if args.tables:
            names = view_names(con)
            counts = [con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names]
            table = pa.table({"view": names, "rows": pa.array(counts, pa.int64())})
        else:
            relation = con.sql(args.sql)
            table = pa.table({}) if relation is None else relation.to_arrow_table()
    except duckdb.Error as exc:
        return _error("polyp-ssl catalog", exc)
    finally:
        con.close()
    _emit(table, args.format, args.max_rows, args.max_width)
    return 0


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyp-ssl verify",
        description="Re-hash every shard listed in the catalog; compare sha256, byte size and sample count; "
        "check every tracklet's sample is in its shard; report shard files the catalog does not list. "
        "Exit 0 only when everything matches.",
    )
    p.add_argument("root", help="ingested root (holds catalog/ and shards/)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--no-progress", action="store_true")
    return p


def verify_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _verify_parser().parse_args(argv)
    from shards.catalog import CatalogError
    from shards.verify import verify_root

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
