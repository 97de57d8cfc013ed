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

A root may be a URL that fsspec reads (`s3://bkt/root`, shards.remote): the same files are read
through the store's filesystem (pyarrow reads the Parquet footers and the columns asked for by
range reads); paths are then URL strings, and a store that cannot be reached is a
shards.remote.RemoteError (one line, no credentials).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from polyp_ssl.shards import remote
from polyp_ssl.shards.files import check_regular
from polyp_ssl.shards.schema import CATALOG_VERSION, TABLES
from polyp_ssl.shards.textio import TextInputError, load_json, loads_json

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


def table_file(root: str | Path, name: str) -> Any:
    """Where catalog table `name` lies (whether or not it is there): a Path, or a URL string under
    a remote root."""
    url = remote.remote_root(root)
    if url is not None:
        return f"{url}/{CATALOG_DIR}/{name}.parquet"
    return catalog_dir(root) / f"{name}.parquet"


def _remote_info(url: str) -> dict[str, Any] | None:
    """fsspec's info of the object `url`, None when it is not there; RemoteError (one line) for a
    bucket that is not there, missing credentials, a denied or failed request."""
    fs, path = remote.filesystem_for(url)
    try:
        return fs.info(path)
    except Exception as exc:
        failure = remote.remote_failure(url, exc)
        if remote.is_missing(exc) and not failure.bad_input:
            return None
        raise failure from None


def _require_remote(url: str) -> str:
    """The catalog folder URL of an ingested remote root; NoCatalogError otherwise (one line)."""
    manifest = f"{url}/{CATALOG_DIR}/{MANIFEST}"
    if _remote_info(manifest) is not None:
        return f"{url}/{CATALOG_DIR}"
    if _remote_info(url) is None:
        raise NoCatalogError(f"{remote.display_url(url)} has no catalog: no such directory")
    raise NoCatalogError(
        f"{remote.display_url(url)} has no catalog ({remote.display_url(manifest)} is missing): upload a "
        "whole ingested root there (`aws s3 sync ROOT URL`), catalog/ included"
    )


def _require_ingested(root: Path) -> Any:
    url = remote.remote_root(root)
    if url is not None:
        return _require_remote(url)
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


def require_catalog(root: str | Path) -> Any:
    """The catalog folder of an ingested root (a URL string under a remote root); NoCatalogError
    (one message) otherwise."""
    return _require_ingested(_as_root(root))


def _as_root(root: str | Path) -> Any:
    """A local root as a Path; a remote one as its URL string (a Path would lose a slash)."""
    return remote.remote_root(root) or Path(root)


def _read_remote_json(url: str, what: str, max_bytes: int) -> Any:
    info = _remote_info(url)
    if info is None:
        raise FileNotFoundError(url)
    if int(info.get("size") or 0) > max_bytes:
        raise CatalogError(f"{url}: {info.get('size')} bytes of {what}, more than {max_bytes:,}")
    fs, path = remote.filesystem_for(url)
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except Exception as exc:
        raise remote.remote_failure(url, exc) from None
    return loads_json(data, url, max_bytes)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The catalog's manifest.json; checks that it is a catalog of this version."""
    cdir = _require_ingested(_as_root(root))
    path = f"{cdir}/{MANIFEST}" if isinstance(cdir, str) else cdir / MANIFEST
    try:
        if isinstance(path, str):
            manifest = _read_remote_json(path, "manifest", MAX_MANIFEST_BYTES)
        else:
            manifest = load_json(path, "manifest", max_bytes=MAX_MANIFEST_BYTES)
    except TextInputError as exc:  # too large, too deep, not UTF-8 JSON: names file and line
        raise CatalogError(f"unreadable manifest: {exc}") from None
    except remote.RemoteError:
        raise
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


def read_manifest_bytes(root: str | Path) -> bytes:
    """The bytes of an ingested root's catalog/manifest.json (local or remote), at most
    MAX_MANIFEST_BYTES; NoCatalogError for a root without one. What identifies a dataset
    (the sha256 of these bytes) wherever it lies."""
    from polyp_ssl.shards.files import read_regular_bytes

    cdir = _require_ingested(_as_root(root))
    if isinstance(cdir, str):
        url = f"{cdir}/{MANIFEST}"
        if int((_remote_info(url) or {}).get("size") or 0) > MAX_MANIFEST_BYTES:
            raise CatalogError(
                f"{remote.display_url(url)}: more than {MAX_MANIFEST_BYTES:,} bytes of manifest"
            )
        fs, path = remote.filesystem_for(url)
        try:
            return fs.cat_file(path)
        except Exception as exc:
            raise remote.remote_failure(url, exc) from None
    return read_regular_bytes(cdir / MANIFEST, "manifest", limit=MAX_MANIFEST_BYTES)


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


def table_path(root: str | Path, name: str) -> Any:
    """The file of catalog table `name` of an ingested root (a URL string under a remote root);
    CatalogError naming what is missing."""
    root = _as_root(root)
    if name not in TABLES:
        raise CatalogError(f"unknown catalog table {name!r}; tables: {', '.join(TABLES)}")
    cdir = _require_ingested(root)
    if isinstance(cdir, str):
        path = f"{cdir}/{name}.parquet"
        if _remote_info(path) is None:
            raise CatalogError(
                f"{remote.display_url(path)}: catalog table {name!r} is missing; upload it again"
            )
        return path
    path = cdir / f"{name}.parquet"
    if not path.exists():  # a FIFO here is refused by name (open_dataset)
        raise CatalogError(f"{path}: catalog table {name!r} is missing; re-run `polyp-ssl ingest {root}`")
    return path


def _remote_parquet(path: str) -> tuple[Any, str]:
    """(pyarrow-ready fsspec filesystem, path in it) of a catalog file under a remote root."""
    return remote.filesystem_for(path)


def _remote_parquet_error(path: str, exc: BaseException) -> Exception:
    """A failed remote Parquet read: the store's RemoteError, or CatalogError for bytes that are
    not a Parquet file."""
    if isinstance(exc, pa.ArrowInvalid):
        return CatalogError(
            f"{remote.display_url(path)}: not a readable Parquet file: {remote.cause_of(exc)}"
        )
    return remote.remote_failure(path, exc)


def read_file_schema(path: Any) -> pa.Schema:
    """The schema in the footer of a regular Parquet file; CatalogError naming the file otherwise."""
    if isinstance(path, str) and remote.is_remote(path):
        fs, inner = _remote_parquet(path)
        try:
            return pq.read_schema(inner, filesystem=fs)
        except Exception as exc:
            raise _remote_parquet_error(path, exc) from None
    try:
        check_regular(path, "Parquet file")  # pyarrow opens the path itself: never a FIFO or device
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise CatalogError(f"{path}: not a readable Parquet file: {exc}") from exc


def open_dataset(path: Any, expected: pa.Schema | None) -> pads.Dataset:
    """A pyarrow dataset of one Parquet file (a Path, or a URL string under a remote root), its
    schema checked against `expected` (pinned) when given; the schema is read from the footer only,
    no rows."""
    actual = read_file_schema(path)
    if expected is not None:
        check_schema(path, actual, expected)
    if isinstance(path, str) and remote.is_remote(path):
        fs, inner = _remote_parquet(path)
        return pads.dataset(inner, format="parquet", schema=expected or actual, filesystem=fs)
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
    cols = None if columns is None else list(columns)
    url = remote.remote_root(root)
    if url is not None:
        return _read_remote_table(url, name, cols, filter, checked)
    if not checked:
        path = table_file(root, name)
        check_regular(path, f"catalog table {name!r}")  # pyarrow opens the path: never a FIFO or device
        return pq.read_table(path, columns=cols, filters=filter)
    read_manifest(root)
    dataset = open_dataset(table_path(root, name), TABLES[name])
    return dataset.to_table(columns=cols, filter=filter)


def _read_remote_table(
    url: str, name: str, columns: list[str] | None, filter: pads.Expression | None, checked: bool
) -> pa.Table:
    """read_catalog_table under a remote root: the same checks, the file read through fsspec."""
    if checked:
        read_manifest(url)
        path = table_path(url, name)
        dataset = open_dataset(path, TABLES[name])
    else:
        path = table_file(url, name)
        if _remote_info(path) is None:
            _require_ingested(url)  # one line for a root that is not there or has no catalog
            raise CatalogError(f"{remote.display_url(path)}: catalog table {name!r} is missing")
        fs, inner = _remote_parquet(path)
        dataset = pads.dataset(inner, format="parquet", filesystem=fs)
    try:
        return dataset.to_table(columns=columns, filter=filter)
    except Exception as exc:
        raise _remote_parquet_error(path, exc) from None
