"""Build the catalog from the shards' stats files, in one process, at the end of a run.

Tables follow shards.schema exactly (explicit schema, never inferred); each Parquet file is
written to a temporary name and renamed; manifest.json is written last, so a catalog folder
with a manifest is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from polyp_ssl.ingest.faults import crash_point
from polyp_ssl.ingest.write import STATS_VERSION
from polyp_ssl.shards.schema import CATALOG_VERSION, TABLES
from polyp_ssl.shards.writer import TMP_SUFFIX, write_atomic

MANIFEST = "manifest.json"


def polyp_rows(tracklets: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per identity, aggregated from its tracklets (size and histology: the first known)."""
    polyps: dict[str, dict[str, Any]] = {}
    for t in tracklets:
        p = polyps.get(t["identity_id"])
        if p is None:
            p = polyps[t["identity_id"]] = {
                "identity_id": t["identity_id"],
                "video_id": t["video_id"],
                "dataset_id": t["dataset_id"],
                "split": t["split"],
                "size_mm": None,
                "histology": None,
                "n_tracklets": 0,
                "n_frames": 0,
            }
        if p["size_mm"] is None:
            p["size_mm"] = t["size_mm"]
        if p["histology"] is None:
            p["histology"] = t["histology"]
        p["n_tracklets"] += 1
        p["n_frames"] += t["n_frames"]
    return sorted(polyps.values(), key=lambda p: (p["split"], p["video_id"], p["identity_id"]))


def shard_row(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": stats["shard"],
        "split": stats["split"],
        "n_samples": stats["n_samples"],
        "n_bytes": stats["n_bytes"],
        "sha256": stats["sha256"],
        "first_video": stats["videos"][0] if stats["videos"] else None,
        "last_video": stats["videos"][-1] if stats["videos"] else None,
    }


def catalog_tables(
    stats_list: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    empty_videos: list[dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Rows of every table: shards in plan order, their rows in shard order; `errors` found
    before the shards (annotation checks) come first; videos without samples are added. A stats
    file of another version is refused: its rows may lack columns (e.g. the member spans) that
    would otherwise come out null."""
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    tables["errors"] = list(errors)
    for st in stats_list:
        if st.get("version") != STATS_VERSION:
            raise ValueError(
                f"stats file of shard {st.get('shard')!r} is of version {st.get('version')!r}, "
                f"this ingest writes {STATS_VERSION}: run the ingest again (--resume redoes that shard)"
            )
        rows = st["rows"]
        tables["tracklets"] += rows["tracklets"]
        tables["frames"] += rows["frames"]
        tables["videos"] += rows["videos"]
        tables["errors"] += rows["errors"]
        tables["shards"].append(shard_row(st))
    tables["videos"] = sorted(
        tables["videos"] + list(empty_videos), key=lambda v: (v["split"], v["video_id"])
    )
    tables["polyps"] = polyp_rows(tables["tracklets"])
    return tables


def write_table(path: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path + TMP_SUFFIX
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_catalog(
    catalog_dir: str, tables: dict[str, list[dict[str, Any]]], manifest: dict[str, Any]
) -> dict:
    """Write every table, then the manifest (with counts and catalog_version added); returns it."""
    os.makedirs(catalog_dir, exist_ok=True)
    manifest_path = os.path.join(catalog_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the catalog is incomplete until the new manifest is written
    for name, schema in TABLES.items():
        write_table(os.path.join(catalog_dir, f"{name}.parquet"), tables[name], schema)
        crash_point("catalog_table")
    crash_point("before_manifest")
    manifest = {
        "version": CATALOG_VERSION,
        **manifest,
        "counts": {name: len(tables[name]) for name in TABLES},
    }
    write_atomic(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return manifest
