"""Damaging a shard and keeping the catalog in step: read and write a shard's members, make the
catalog describe the rewritten shards, and a loader over a root (`--on_shard_error` mode)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from polyp_ssl.stream import BagStream, StreamParams, build_index
from tests.shard_factory import respan_catalog

PARAMS = {
    "batch_size": 8,
    "n_views": 2,
    "fragment_length": 2,
    "fragment_stride": 2,
    "min_tracklet_length": 4,
    "im_size": 32,
    "open_videos": 2,
    "max_epochs": 2,
}
SHARD = "shards/train/train-000000.tar"


def read_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def first_key(root: Path, shard: str = SHARD) -> str:
    return read_members(root / shard)[0][0].split(".", 1)[0]


def catalog_agrees(root: Path) -> None:
    """Make the shards table describe the rewritten shards (else the loader rightly names each
    one `shard_changed` after its samples): for tests of what is inside a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "catalog" / "shards.parquet"
    table = pq.read_table(path)
    rows = [{**r, "n_bytes": (root / r["path"]).stat().st_size} for r in table.to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def make_stream(
    root: Path, mode: str, rank: int = 0, world: int = 1, access: str = "sequential"
) -> BagStream:
    params = StreamParams(**PARAMS, on_shard_error=mode, shard_access=access)
    return BagStream(build_index(root, "train", params), params, rank, world)


def record_spans(root: Path) -> None:
    """Make the catalog describe the rewritten shards (sizes and member spans, where a member of
    that name still exists), so that random access meets the damage inside the shard; a member
    that is gone gets a null span, which reads as not the shard ingest wrote."""
    catalog_agrees(root)
    respan_catalog(root)
