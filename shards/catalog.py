"""Read-only SQL over an ingested root: DuckDB in memory, one view per catalog table.

    con = connect(root)                       # views: videos, polyps, tracklets, frames, shards,
                                              # errors, embeddings_{name} (ROOT/embeddings/*.parquet
                                              # and the root's user cache folder: embeddings_cache)
    query(root, "SELECT split, count(*) FROM tracklets GROUP BY 1")   # -> pyarrow.Table

The Parquet files are handed to DuckDB as pyarrow datasets with the pinned schemas of
shards/schema.py, and only then is the connection locked down: no file system access (no COPY
TO, ATTACH, read_csv of arbitrary paths), no extension install or load, configuration locked.
DuckDB itself opens no file, so any number of processes can query while training runs.
Use it in main processes only, never inside a DataLoader worker (DuckDB is not fork-safe).
Reading one table (a column subset, a row filter) needs no SQL: shards/tables.py, which this
module uses for the manifest and schema checks, and which imports no duckdb.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from polyp_ssl.shards.embeddings_cache import cached_files, embeddings_places
from polyp_ssl.shards.schema import TABLES
from polyp_ssl.shards.tables import (  # noqa: F401 - the catalog's reading API, importable from here too
    CATALOG_DIR,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    CatalogError,
    NoCatalogError,
    catalog_dir,
    check_schema,
    open_dataset,
    read_file_schema,
    read_manifest,
    require_catalog,
    table_path,
)
from polyp_ssl.shards.tables import read_catalog_table as read_table  # noqa: F401

EMBEDDINGS_DIR = "embeddings"
INTERRUPT_GRACE_S = 5.0  # how long an interrupted query may take to stop
T = TypeVar("T")

# Settings applied after the views exist. `lock_configuration` comes last: nothing can undo them.
LOCKDOWN = (
    "SET python_enable_replacements = false",
    "SET enable_external_access = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET lock_configuration = true",
)


log = logging.getLogger(__name__)
LEFT_OUT = "left out: embeddings files collide on this name"  # comment of such a view


def embeddings_view_name(stem: str) -> str:
    """`embeddings_{stem}` with every character outside [A-Za-z0-9_] replaced by `_`."""
    return "embeddings_" + re.sub(r"[^A-Za-z0-9_]", "_", stem)


def embeddings_collisions(paths: list[Path]) -> dict[str, list[Path]]:
    """View name -> the embeddings files (two or more) whose names map to it (e.g. `a-b.parquet`
    and `a_b.parquet` both give `embeddings_a_b`)."""
    by_view: dict[str, list[Path]] = {}
    for path in paths:
        by_view.setdefault(embeddings_view_name(path.stem), []).append(path)
    return {view: group for view, group in by_view.items() if len(group) > 1}


def _check_embeddings_schema(path: Path, schema: pa.Schema) -> None:
    idx = schema.get_field_index("vector")
    if idx < 0:
        raise CatalogError(f"{path}: column 'vector' is missing")
    vtype = schema.field(idx).type
    if not pa.types.is_fixed_size_list(vtype):
        raise CatalogError(f"{path}: column 'vector' has type {vtype}, expected a fixed-size float32 list")
    from polyp_ssl.shards.schema import embeddings_schema

    check_schema(path, schema, embeddings_schema(vtype.list_size))


def connect(root: str | Path, cache_dir: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory, locked-down DuckDB connection with one view per catalog table and per
    embeddings file cached for the root, in ROOT/embeddings and in the user cache folder
    (shards.embeddings_cache; `cache_dir` as `--cache_dir`). A missing table file is an error;
    a missing embeddings folder is not."""
    root = Path(root)
    read_manifest(root)
    datasets: dict[str, pads.Dataset] = {}
    for name, schema in TABLES.items():
        datasets[name] = open_dataset(table_path(root, name), schema)
    emb_files = cached_files(embeddings_places(root, cache_dir))
    colliding = embeddings_collisions(emb_files)
    for view, paths in colliding.items():
        log.warning(
            "left out: the embeddings files %s all map to view %r; rename all but one",
            ", ".join(str(p) for p in paths),
            view,
        )
    for path in emb_files:
        view = embeddings_view_name(path.stem)
        if view in colliding:
            continue
        schema = read_file_schema(path)
        _check_embeddings_schema(path, schema)
        datasets[view] = pads.dataset(str(path), format="parquet", schema=schema)
    con = duckdb.connect(":memory:")
    try:
        for view, ds in datasets.items():
            con.register(view, ds)
        for view, paths in colliding.items():
            # a query that names the view fails with this message instead of "does not exist"
            message = (
                (
                    f"view {view} is left out: the embeddings files {', '.join(str(p) for p in paths)} "
                    "all map to it; rename all but one"
                )
                .replace("'", "''")
                .encode("utf-8", "backslashreplace")
                .decode("utf-8")
            )
            con.execute(
                f"CREATE VIEW {view} AS SELECT range AS error FROM range(1) WHERE error('{message}') IS NULL"
            )
            con.execute(f"COMMENT ON VIEW {view} IS '{LEFT_OUT}'")
        for stmt in LOCKDOWN:
            con.execute(stmt)
    except Exception:
        con.close()
        raise
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The connection's views, without the embeddings views left out for a name collision."""
    rows = con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND comment IS DISTINCT FROM ? "
        "ORDER BY view_name",
        [LEFT_OUT],
    ).fetchall()
    return [r[0] for r in rows]


class QueryTimeout(CatalogError):
    """A query ran longer than its time limit and was stopped."""


def run_interruptible(
    con: duckdb.DuckDBPyConnection, work: Callable[[], T], timeout: float | None = None
) -> T:
    """`work()` (which uses `con`) in a helper thread, so that Ctrl-C (KeyboardInterrupt in this
    thread) or `timeout` seconds stop it with `con.interrupt()` instead of waiting for a query
    that may never end. Raises KeyboardInterrupt, QueryTimeout, or what `work` raised."""
    box: dict[str, Any] = {}
    # an Event, not Thread.join: a KeyboardInterrupt inside join() can leave the thread looking
    # finished while it still runs
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # handed to the calling thread
            box["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=target, name="catalog-query", daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    worker.start()
    try:
        while not done.wait(0.05):
            if deadline is not None and time.monotonic() >= deadline:
                con.interrupt()
                done.wait(INTERRUPT_GRACE_S)
                raise QueryTimeout(f"the query was stopped after --timeout {timeout:g} s")
    except KeyboardInterrupt:
        con.interrupt()
        done.wait(INTERRUPT_GRACE_S)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, timeout: float | None = None) -> pa.Table:
    """One SQL statement on `con`, interruptible (see run_interruptible); an Arrow table."""

    def work() -> pa.Table:
        relation = con.sql(sql)
        if relation is None:  # a statement without a result set (SET, CREATE VIEW, ...)
            return pa.table({})
        return relation.to_arrow_table()

    return run_interruptible(con, work, timeout)


def query(root: str | Path, sql: str, timeout: float | None = None) -> pa.Table:
    """Run one SQL statement on a fresh locked-down connection; the result as an Arrow table.
    Ctrl-C stops it; so does `timeout` (seconds, QueryTimeout)."""
    con = connect(root)
    try:
        return run_sql(con, sql, timeout)
    finally:
        close_quietly(con)


def close_quietly(con: duckdb.DuckDBPyConnection) -> None:
    """Close `con`; a query that did not stop in time keeps it busy, and the process ends anyway."""
    with contextlib.suppress(duckdb.Error):
        con.close()


def query_df(root: str | Path, sql: str) -> Any:
    """Like `query`, as a pandas DataFrame."""
    try:
        import pandas  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "query_df needs pandas, which is not installed: `pip install pandas`, or use query() "
            "for a pyarrow Table"
        ) from exc
    return query(root, sql).to_pandas()
