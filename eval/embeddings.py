"""The embeddings file: ROOT/embeddings/{name}.parquet, one row per tracklet or fragment.

Columns: `shards.schema.embeddings_schema(dim)` (catalog keys + a fixed-size float32 `vector`).
The Parquet schema metadata key b"polyp_ssl" holds a JSON object; the keys this module reads:
`manifest_sha256` (sha256 of the root's catalog/manifest.json: which dataset), `dataset_root`,
`params` (with `split`, `fragment_length`, ...), `checkpoint_sha256`, `created`.

Labels (size, histology, end frames) are not stored here: they live in the catalog and are joined
by identity_id / tracklet_id (`polyp_labels`, `tracklet_spans`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from polyp_ssl.shards.files import NotRegularFileError, check_regular
from polyp_ssl.shards.hashing import file_sha256
from polyp_ssl.shards.schema import embeddings_schema
from polyp_ssl.shards.tables import read_catalog_table
from polyp_ssl.shards.textio import TextInputError, loads_json

META_KEY = b"polyp_ssl"
_LEGACY_META_KEY = b"polyp_ssl.embeddings"
KEY_COLUMNS = (
    "tracklet_id",
    "sample_key",
    "split",
    "video_id",
    "identity_id",
    "fragment_index",
    "start_frame",
)


class EmbeddingsError(ValueError):
    """A file that cannot serve as embeddings for the asked task; the message names file and field."""


# What reading a file may allocate, from the rows and dimensions its Parquet footer declares:
# float32 vectors plus about ROW_OVERHEAD_BYTES a row for the key columns (string columns are read
# dictionary-encoded, so a row costs a pointer whatever its strings). A file may declare at most
# EXPANSION times its own size, or MIN_DECLARED_BYTES: float vectors barely compress, so only a
# collapsed (constant) set or a bomb declares much more than it holds.
ROW_OVERHEAD_BYTES = 96
MIN_DECLARED_BYTES = 512 << 20
EXPANSION = 64
STRING_COLUMNS = KEY_COLUMNS[:5]


def declared_bytes(rows: int, dim: int) -> int:
    """Bytes `read_embeddings` allocates for `rows` rows of `dim`-dimensional vectors."""
    return int(rows) * (int(dim) * 4 + ROW_OVERHEAD_BYTES)


def check_declared_size(path: Path, dim: int) -> int:
    """The row count of the Parquet footer of `path`, once rows x dim is known to fit the bound
    (`declared_bytes` at most max(MIN_DECLARED_BYTES, EXPANSION x the file's size)); checked
    before any data is read, so a small file declaring millions of vectors is refused by name."""
    try:
        md = pq.read_metadata(path)
    except Exception as e:
        raise EmbeddingsError(f"{path}: not a Parquet file ({type(e).__name__}: {e})") from e
    rows = sum(md.row_group(i).num_rows for i in range(md.num_row_groups))
    if rows != md.num_rows or rows < 0:
        raise EmbeddingsError(f"{path}: the footer declares {md.num_rows} rows, its row groups {rows}")
    size = path.stat().st_size
    need, bound = declared_bytes(rows, dim), max(MIN_DECLARED_BYTES, EXPANSION * size)
    if need > bound:
        raise EmbeddingsError(
            f"{path}: field 'vector': the file declares {rows} rows x {dim} dimensions ({need / 2**30:.1f} "
            f"GiB to read) in {size} bytes, more than {EXPANSION}x its size (at least "
            f"{MIN_DECLARED_BYTES >> 20} MiB) that embeddings may expand to; refused before reading"
        )
    return rows


def _object_column(column: pa.ChunkedArray) -> np.ndarray:
    """A string column read dictionary-encoded as an object array whose rows share the
    dictionary's str objects (None for null): memory per row is a pointer."""
    parts = []
    for chunk in column.chunks:
        if not pa.types.is_dictionary(chunk.type):
            parts.append(np.asarray(chunk.to_pylist(), dtype=object))
            continue
        values = np.empty(len(chunk.dictionary) + 1, dtype=object)
        values[:-1] = chunk.dictionary.to_pylist()
        idx = chunk.indices.fill_null(len(values) - 1).to_numpy(zero_copy_only=False)
        parts.append(values[idx])
    return np.concatenate(parts) if parts else np.empty(0, dtype=object)


def check_finite_vectors(path: Path, vectors: np.ndarray, tracklet_id: np.ndarray) -> None:
    """EmbeddingsError naming the file, the first row (and its tracklet) and the field when a
    vector holds a NaN or an infinity (every task compares vectors: one NaN spoils them all)."""
    finite = np.isfinite(vectors).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    raise EmbeddingsError(
        f"{path}: row {int(bad[0])} (tracklet {tracklet_id[bad[0]]!r}): field 'vector' has a non-finite "
        f"value ({bad.size} of {finite.size} rows do); re-embed with a checkpoint whose weights are finite"
    )


@dataclass
class Embeddings:
    path: Path
    tracklet_id: np.ndarray  # str (object) [N]
    sample_key: np.ndarray
    split: np.ndarray
    video_id: np.ndarray
    identity_id: np.ndarray  # object [N], None where unknown
    fragment_index: np.ndarray  # int32 [N], -1 = whole tracklet
    start_frame: np.ndarray  # int64 [N]
    vectors: np.ndarray  # float32 [N, D]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def subset(self, mask: np.ndarray) -> Embeddings:
        keep = np.asarray(mask)
        return Embeddings(
            self.path,
            *(getattr(self, c)[keep] for c in KEY_COLUMNS),
            vectors=self.vectors[keep],
            meta=self.meta,
        )

    def tracklet_level(self) -> Embeddings:
        """One row per tracklet: the file's whole-tracklet rows, or else the mean of each
        tracklet's L2-normalised fragment vectors (start_frame = its first fragment's)."""
        whole = self.fragment_index < 0
        if whole.any():
            return self.subset(whole)
        tids, first, inverse = np.unique(self.tracklet_id.astype(str), return_index=True, return_inverse=True)
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        unit = self.vectors / np.where(norms == 0, 1, norms)
        sums = np.zeros((tids.size, self.dim), dtype=np.float64)
        np.add.at(sums, inverse.reshape(-1), unit)
        counts = np.bincount(inverse.reshape(-1), minlength=tids.size)[:, None]
        starts = np.full(tids.size, np.iinfo(np.int64).max)
        np.minimum.at(starts, inverse.reshape(-1), self.start_frame)
        order = np.argsort(first, kind="stable")  # keep file order
        out = Embeddings(
            self.path,
            *(getattr(self, c)[first] for c in KEY_COLUMNS),
            vectors=(sums / counts).astype(np.float32),
            meta=self.meta,
        )
        out.fragment_index = np.full(tids.size, -1, dtype=np.int32)
        out.start_frame = starts
        return out.subset(order)


def write_embeddings(
    path: str | Path, columns: Mapping[str, Sequence], vectors: np.ndarray, meta: Mapping[str, Any]
) -> Path:
    """Write atomically (temporary name, then rename). `columns` holds every key column."""
    path = Path(path)
    vec = np.ascontiguousarray(vectors, dtype=np.float32)
    if vec.ndim != 2 or vec.shape[1] < 1:
        raise EmbeddingsError(f"{path}: vectors must be [N, D] with D >= 1, got shape {vec.shape}")
    missing = [c for c in KEY_COLUMNS if c not in columns]
    if missing:
        raise EmbeddingsError(f"{path}: columns {missing} missing")
    for c in KEY_COLUMNS:
        if len(columns[c]) != vec.shape[0]:
            raise EmbeddingsError(
                f"{path}: column {c!r} has {len(columns[c])} rows for {vec.shape[0]} vectors"
            )
    if not np.isfinite(vec).all():
        raise EmbeddingsError(f"{path}: vectors hold non-finite values")
    dim = int(vec.shape[1])
    info = dict(meta)
    info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    info.setdefault("dim", dim)
    info.setdefault("n_rows", int(vec.shape[0]))
    schema = embeddings_schema(dim).with_metadata({META_KEY: json.dumps(info, sort_keys=True, default=str)})
    arrays = [pa.array(list(columns[f.name]), type=f.type) for f in schema if f.name != "vector"]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1), type=pa.float32()), dim))
    table = pa.Table.from_arrays(arrays, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The file's embedding metadata; {} when it has none."""
    check_regular(path, "embeddings file")  # pyarrow opens the path: never a FIFO or device
    raw = pq.read_schema(path).metadata or {}
    blob = raw.get(META_KEY) or raw.get(_LEGACY_META_KEY)
    if not blob:
        return {}
    try:  # size and nesting bounded before parsing: a deep blob is a named error, not a RecursionError
        meta = loads_json(blob, f"{path}: metadata {META_KEY.decode()}", max_bytes=16 << 20)
    except TextInputError as e:
        raise EmbeddingsError(str(e)) from None
    if not isinstance(meta, dict):
        raise EmbeddingsError(f"{path}: metadata {META_KEY.decode()} is not a JSON object")
    return meta


def read_embeddings(path: str | Path, split: str | None = None, root: str | Path | None = None) -> Embeddings:
    """Read and check an embeddings file; `split` keeps that split's rows (none is an error),
    `root` checks the file was made from that ingested root's catalog."""
    path = Path(path)
    if not path.exists():
        raise EmbeddingsError(f"{path}: no such embeddings file")
    try:
        check_regular(path, "embeddings file")  # pyarrow opens the path: never a FIFO or device
    except NotRegularFileError as e:
        raise EmbeddingsError(str(e)) from None
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise EmbeddingsError(f"{path}: not a Parquet file ({type(e).__name__}: {e})") from e
    vfield = schema.field("vector") if "vector" in schema.names else None
    if vfield is None or not pa.types.is_fixed_size_list(vfield.type):
        raise EmbeddingsError(f"{path}: not an embeddings file (no fixed-size list column 'vector')")
    dim = vfield.type.list_size
    expected = embeddings_schema(dim)
    for f in expected:
        if f.name not in schema.names or not schema.field(f.name).type.equals(f.type):
            got = schema.field(f.name).type if f.name in schema.names else "missing"
            raise EmbeddingsError(
                f"{path}: not an embeddings file: column {f.name!r} is {got}, expected {f.type}"
            )
    declared = check_declared_size(path, dim)
    meta = read_metadata(path)
    if not meta:
        raise EmbeddingsError(f"{path}: not an embeddings file (no {META_KEY.decode()} metadata)")
    if root is not None:
        check_dataset(path, meta, root)
    try:
        table = pq.ParquetFile(path, read_dictionary=list(STRING_COLUMNS)).read(columns=expected.names)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise EmbeddingsError(f"{path}: cannot read its rows ({type(e).__name__}: {e})") from e
    n = table.num_rows
    if n != declared:
        raise EmbeddingsError(f"{path}: {n} rows read, the footer declares {declared}")
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat, dtype=np.float32).reshape(n, dim)
    cols = {c: _object_column(table.column(c)) for c in STRING_COLUMNS}
    check_finite_vectors(path, vectors, cols["tracklet_id"])
    emb = Embeddings(
        path,
        **cols,
        fragment_index=np.asarray(
            table.column("fragment_index").to_numpy(zero_copy_only=False), dtype=np.int32
        ),
        start_frame=np.asarray(
            table.column("start_frame").fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64
        ),
        vectors=vectors,
        meta=meta,
    )
    if split is not None:
        keep = emb.split == split
        if not keep.any():
            present = sorted({str(s) for s in emb.split})
            raise EmbeddingsError(
                f"{path}: split {split!r} is empty (rows hold splits: {', '.join(present) or 'none'})"
            )
        emb = emb.subset(keep)
    elif n == 0:
        raise EmbeddingsError(f"{path}: the file holds no rows")
    return emb


def manifest_sha256(root: str | Path) -> str:
    from polyp_ssl.shards.remote import remote_root

    if remote_root(root) is not None:  # a root in an object store (shards.remote)
        import hashlib

        from polyp_ssl.shards.tables import read_manifest_bytes

        return hashlib.sha256(read_manifest_bytes(root)).hexdigest()
    path = Path(root) / "catalog" / "manifest.json"
    if not path.is_file():
        raise EmbeddingsError(
            f"{path}: missing; {root} is not an ingested root (run `polyp-ssl ingest` first)"
        )
    return file_sha256(path, what="manifest")


def check_dataset(path: str | Path, meta: Mapping[str, Any], root: str | Path) -> None:
    """The file's manifest hash must equal the root's: embeddings of another dataset (or of an
    older ingest of this one) would join the wrong labels."""
    want = manifest_sha256(root)
    got = meta.get("manifest_sha256") or (meta.get("dataset") or {}).get("manifest_sha256")
    if got is None:
        raise EmbeddingsError(f"{path}: metadata has no manifest_sha256; cannot tell which dataset it embeds")
    if got != want:
        raise EmbeddingsError(
            f"{path}: embeddings of another dataset: manifest_sha256 {got[:12]}... "
            f"(made from {meta.get('dataset_root', '?')}) but {Path(root) / 'catalog' / 'manifest.json'} "
            f"has {want[:12]}..."
        )


def infer_root(path: str | Path, meta: Mapping[str, Any]) -> Path | None:
    """The ingested root of an embeddings file: ROOT/embeddings/x.parquet, else the metadata's."""
    p = Path(path).resolve()
    if p.parent.name == "embeddings" and (p.parent.parent / "catalog" / "manifest.json").is_file():
        return p.parent.parent
    r = meta.get("dataset_root")
    if r and (Path(r) / "catalog" / "manifest.json").is_file():
        return Path(r)
    return None


@dataclass
class PolypLabels:
    size_mm: dict[str, float | None]
    histology: dict[str, str | None]
    dataset_id: dict[str, str | None]


def _in_store(root: str | Path) -> bool:
    """A root in an object store (shards.remote), whose files are not on this machine."""
    from polyp_ssl.shards.remote import remote_root

    return remote_root(root) is not None


def polyp_labels(root: str | Path) -> PolypLabels:
    """identity_id -> size_mm, histology, dataset_id from ROOT/catalog/polyps.parquet."""
    path = Path(root) / "catalog" / "polyps.parquet"
    if not _in_store(root) and not path.is_file():  # a root in an object store: read_catalog_table says
        raise EmbeddingsError(
            f"{path}: missing; {root} is not an ingested root (run `polyp-ssl ingest` first)"
        )
    columns = ["identity_id", "size_mm", "histology", "dataset_id"]
    t = read_catalog_table(root, "polyps", columns, checked=False).to_pydict()
    ids = t["identity_id"]
    return PolypLabels(
        dict(zip(ids, t["size_mm"], strict=True)),
        dict(zip(ids, t["histology"], strict=True)),
        dict(zip(ids, t["dataset_id"], strict=True)),
    )


def tracklet_spans(root: str | Path) -> dict[str, tuple[int, int]]:
    """tracklet_id -> (start_frame, end_frame) from ROOT/catalog/tracklets.parquet."""
    path = Path(root) / "catalog" / "tracklets.parquet"
    if not _in_store(root) and not path.is_file():  # a root in an object store: read_catalog_table says
        raise EmbeddingsError(
            f"{path}: missing; {root} is not an ingested root (run `polyp-ssl ingest` first)"
        )
    columns = ["tracklet_id", "start_frame", "end_frame"]
    t = read_catalog_table(root, "tracklets", columns, checked=False).to_pydict()
    return {
        k: (int(a), int(b))
        for k, a, b in zip(t["tracklet_id"], t["start_frame"], t["end_frame"], strict=True)
    }


def require_identities(emb: Embeddings) -> None:
    """Identity labels are the ground truth of retrieval, re-id and counting."""
    missing = np.array([i is None or i == "" for i in emb.identity_id], dtype=bool)
    if missing.all():
        raise EmbeddingsError(f"{emb.path}: split has no identity labels (identity_id is null in every row)")
    if missing.any():
        first = emb.tracklet_id[np.flatnonzero(missing)[0]]
        raise EmbeddingsError(
            f"{emb.path}: {int(missing.sum())} rows lack identity_id (first: tracklet {first!r})"
        )
