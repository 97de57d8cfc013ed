"""Read-only SQL over an ingested root: DuckDB in memory, one view per catalog table.

    con = connect(root)                       # views: videos, polyps, tracklets, frames, shards,
                                              # errors, embeddings_{name} (ROOT/embeddings/*.parquet)
    query(root, "SELECT split, count(*) FROM tracklets GROUP BY 1")   # -> pyarrow.Table

The Parquet files are handed to DuckDB as pyarrow datasets with the pinned schemas of
shards/schema.py, and only then is the connection locked down: no file system access (no COPY
TO, ATTACH, read_csv of arbitrary paths), no extension install or load, configuration locked.
DuckDB itself opens no file, so any number of processes can query while training runs.
Use it in main processes only, never inside a DataLoader worker (DuckDB is not fork-safe).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from shards.schema import CATALOG_VERSION, TABLES

CATALOG_DIR = "catalog"
EMBEDDINGS_DIR = "embeddings"
MANIFEST = "manifest.json"

# Settings applied after the views exist. `lock_configuration` comes last: nothing can undo them.
LOCKDOWN = (
    "SET python_enable_replacements = false",
    "SET enable_external_access = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET lock_configuration = true",
)


class CatalogError(RuntimeError):
    """A catalog that is missing, of another version, or does not match the pinned schema."""


def catalog_dir(root: str | Path) -> Path:
    return Path(root) / CATALOG_DIR


def _require_ingested(root: Path) -> Path:
    cdir = catalog_dir(root)
    if not (cdir / MANIFEST).is_file():
        if not root.exists():
            raise CatalogError(f"{root}: no such directory")
        raise CatalogError(
            f"{root} has no catalog ({cdir / MANIFEST} is missing): run `polyp-ssl ingest {root}` first "
            f"(or `polyp-ssl catalog merge {root}` after `ingest --part I/N` runs)"
        )
    return cdir


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The catalog's manifest.json; checks that it is a catalog of this version."""
    path = _require_ingested(Path(root)) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CatalogError(f"{path}: manifest is not a JSON object")
    version = manifest.get("version")
    if version != CATALOG_VERSION:
        raise CatalogError(
            f"{path}: field 'version' is {version!r}, this reader knows catalog version {CATALOG_VERSION}; "
            "re-run `polyp-ssl ingest` with this version"
        )
    return manifest


def check_schema(path: Path, actual: pa.Schema, expected: pa.Schema) -> None:
    """Raise CatalogError naming the file and the first column that differs from `expected`."""
    for f in expected:
        idx = actual.get_field_index(f.name)
        if idx < 0:
            raise CatalogError(f"{path}: column {f.name!r} is missing (expected {f.type})")
        got = actual.field(idx).type
        if got != f.type:
            raise CatalogError(f"{path}: column {f.name!r} has type {got}, expected {f.type}")
    extra = [n for n in actual.names if expected.get_field_index(n) < 0]
    if extra:
        raise CatalogError(
            f"{path}: unexpected column {extra[0]!r} (not in catalog version {CATALOG_VERSION})"
        )


def _table_path(root: Path, name: str) -> Path:
    if name not in TABLES:
        raise CatalogError(f"unknown catalog table {name!r}; tables: {', '.join(TABLES)}")
    path = _require_ingested(root) / f"{name}.parquet"
    if not path.is_file():
        raise CatalogError(f"{path}: catalog table {name!r} is missing; re-run `polyp-ssl ingest {root}`")
    return path


def _dataset(path: Path, expected: pa.Schema | None) -> pads.Dataset:
    try:
        actual = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise CatalogError(f"{path}: not a readable Parquet file: {exc}") from exc
    if expected is not None:
        check_schema(path, actual, expected)
    return pads.dataset(str(path), format="parquet", schema=expected or actual)


def read_table(root: str | Path, name: str) -> pa.Table:
    """One catalog table, read with its pinned schema."""
    root = Path(root)
    read_manifest(root)
    return _dataset(_table_path(root, name), TABLES[name]).to_table()


def embeddings_view_name(stem: str) -> str:
    """`embeddings_{stem}` with every character outside [A-Za-z0-9_] replaced by `_`."""
    return "embeddings_" + re.sub(r"[^A-Za-z0-9_]", "_", stem)


def _check_embeddings_schema(path: Path, schema: pa.Schema) -> None:
    idx = schema.get_field_index("vector")
    if idx < 0:
        raise CatalogError(f"{path}: column 'vector' is missing")
    vtype = schema.field(idx).type
    if not pa.types.is_fixed_size_list(vtype):
        raise CatalogError(f"{path}: column 'vector' has type {vtype}, expected a fixed-size float32 list")
    from shards.schema import embeddings_schema

    check_schema(path, schema, embeddings_schema(vtype.list_size))


def connect(root: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory, locked-down DuckDB connection with one view per catalog table and per
    embeddings file. A missing table file is an error; a missing embeddings folder is not."""
    root = Path(root)
    read_manifest(root)
    datasets: dict[str, pads.Dataset] = {}
    for name, schema in TABLES.items():
        datasets[name] = _dataset(_table_path(root, name), schema)
    emb_dir = root / EMBEDDINGS_DIR
    if emb_dir.is_dir():
        for path in sorted(emb_dir.glob("*.parquet")):
            view = embeddings_view_name(path.stem)
            if view in datasets:
                raise CatalogError(f"{path}: view name {view!r} collides with another embeddings file")
            try:
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException) as exc:
                raise CatalogError(f"{path}: not a readable Parquet file: {exc}") from exc
            _check_embeddings_schema(path, schema)
            datasets[view] = pads.dataset(str(path), format="parquet", schema=schema)
    con = duckdb.connect(":memory:")
    try:
        for view, ds in datasets.items():
            con.register(view, ds)
        for stmt in LOCKDOWN:
            con.execute(stmt)
    except Exception:
        con.close()
        raise
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name"
    ).fetchall()
    return [r[0] for r in rows]


def query(root: str | Path, sql: str) -> pa.Table:
    """Run one SQL statement on a fresh locked-down connection; the result as an Arrow table."""
    con = connect(root)
    try:
        relation = con.sql(sql)
        if relation is None:  # a statement without a result set (SET, CREATE VIEW, ...)
            return pa.table({})
        return relation.to_arrow_table()
    finally:
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
