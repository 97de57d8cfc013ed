"""Reading an ingested root's catalog tables with pyarrow: no SQL engine, any column subset.

    read_manifest(root)                                        # the checked manifest.json
    read_catalog_table(root, "tracklets", ["tracklet_id", "shard"])   # -> pyarrow.Table
    read_catalog_table(root, "shards", filter=pc.field("split") == "train")

A checked read (the default) is the one every catalog reader shares: the root has a manifest of
this catalog version, the table's file is there and is a regular file (pyarrow opens the path
itself: never a FIFO or device), and the file's schema is the pinned one of shards/schema.py;
the columns are then read with that schema. `checked=False` reads a table whose reader checks
the root and the columns it needs itself, and names its own errors.

Every failure is a CatalogError naming the file (NoCatalogError, bad input, for a root that was
never ingested). The SQL views over the same files are shards/catalog.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from polyp_ssl.shards.files import check_regular
from polyp_ssl.shards.schema import CATALOG_VERSION, TABLES
from polyp_ssl.shards.textio import TextInputError, load_json

CATALOG_DIR = "catalog"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB (parameters, counts, part checksums)


class CatalogError(RuntimeError):
    """A catalog that is missing, of another version, or does not match the pinned schema."""


class NoCatalogError(CatalogError):
    """A root that has no catalog (never ingested, or not there): bad input, exit 2, one message
    for every command that reads a root (catalog, verify, train, embed, eval, ...)."""

    bad_input = True


def catalog_dir(root: str | Path) -> Path:
    return Path(root) / CATALOG_DIR


def table_file(root: str | Path, name: str) -> Path:
    """Where catalog table `name` lies (whether or not it is there)."""
    return catalog_dir(root) / f"{name}.parquet"


def _require_ingested(root: Path) -> Path:
    cdir = catalog_dir(root)
    if not (cdir / MANIFEST).exists():  # a FIFO here is refused by name when read
        if not root.exists():
            raise NoCatalogError(f"{root} has no catalog: no such directory")
        if (root / ".ingest-staging" / "all" / ".swap.json").is_file():  # written by ingest/run.py
            raise CatalogError(
                f"{root}: an `ingest --overwrite` was stopped while it swapped its complete new output "
                "in; run that ingest again (e.g. with --resume) to finish the swap"
            )
        raise NoCatalogError(
            f"{root} has no catalog ({cdir / MANIFEST} is missing): run `polyp-ssl ingest {root}` first "
            f"(or `polyp-ssl catalog merge {root}` after `ingest --part I/N` runs)"
        )
    return cdir


def require_catalog(root: str | Path) -> Path:
    """The catalog folder of an ingested root; NoCatalogError (one message) otherwise."""
    return _require_ingested(Path(root))


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The catalog's manifest.json; checks that it is a catalog of this version."""
    path = _require_ingested(Path(root)) / MANIFEST
    try:
        manifest = load_json(path, "manifest", max_bytes=MAX_MANIFEST_BYTES)
    except TextInputError as exc:  # too large, too deep, not UTF-8 JSON: names file and line
        raise CatalogError(f"unreadable manifest: {exc}") from None
    except OSError as exc:
        raise CatalogError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CatalogError(f"{path}: manifest is not a JSON object")
    version = manifest.get("version")
    if version != CATALOG_VERSION:
        raise CatalogError(
            f"{path}: field 'version' is {version!r}, this reader knows catalog version {CATALOG_VERSION}; "
            "re-ingest it with this version: `polyp-ssl ingest RAW_ROOT --out ROOT --overwrite`"
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


def table_path(root: str | Path, name: str) -> Path:
    """The file of catalog table `name` of an ingested root; CatalogError naming what is missing."""
    root = Path(root)
    if name not in TABLES:
        raise CatalogError(f"unknown catalog table {name!r}; tables: {', '.join(TABLES)}")
    path = _require_ingested(root) / f"{name}.parquet"
    if not path.exists():  # a FIFO here is refused by name (open_dataset)
        raise CatalogError(f"{path}: catalog table {name!r} is missing; re-run `polyp-ssl ingest {root}`")
    return path


def read_file_schema(path: Path) -> pa.Schema:
    """The schema in the footer of a regular Parquet file; CatalogError naming the file otherwise."""
    try:
        check_regular(path, "Parquet file")  # pyarrow opens the path itself: never a FIFO or device
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise CatalogError(f"{path}: not a readable Parquet file: {exc}") from exc


def open_dataset(path: Path, expected: pa.Schema | None) -> pads.Dataset:
    """A pyarrow dataset of one Parquet file, its schema checked against `expected` (pinned) when
    given; the schema is read from the footer only, no rows."""
    actual = read_file_schema(path)
    if expected is not None:
        check_schema(path, actual, expected)
    return pads.dataset(str(path), format="parquet", schema=expected or actual)


def read_catalog_table(
    root: str | Path,
    name: str,
    columns: Sequence[str] | None = None,
    *,
    filter: pads.Expression | None = None,
    checked: bool = True,
) -> pa.Table:
    """Catalog table `name` of `root`: `columns` (all when None) of the rows `filter` keeps.

    checked (default): the manifest, the table's presence and its pinned schema are checked first
    (see the module docstring), CatalogError otherwise. checked=False: only that the file is a
    regular file; its own columns and types, as written."""
    if not checked:
        path = table_file(root, name)
        check_regular(path, f"catalog table {name!r}")  # pyarrow opens the path: never a FIFO or device
        cols = None if columns is None else list(columns)
        return pq.read_table(path, columns=cols, filters=filter)
    read_manifest(root)
    dataset = open_dataset(table_path(root, name), TABLES[name])
    return dataset.to_table(columns=None if columns is None else list(columns), filter=filter)
