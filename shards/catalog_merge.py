"""Merge the partial catalogs of `polyp-ssl ingest --part I/N` runs into one catalog.

Layout read:  OUT/catalog/parts/{I:03d}-of-{N:03d}/{videos,...,errors}.parquet + manifest.json
Layout written: OUT/catalog/{table}.parquet (temporary names, renamed when complete), then
OUT/catalog/manifest.json last, so a reader never sees a half-merged catalog as complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from polyp_ssl.shards.lock import output_lock
from polyp_ssl.shards.schema import CATALOG_VERSION, TABLES
from polyp_ssl.shards.tables import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    CatalogError,
    catalog_dir,
    check_schema,
    read_file_schema,
)
from polyp_ssl.shards.textio import TextInputError, loads_json, read_bounded

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
# Manifest fields that hold per-part amounts: summed over the parts (numbers, recursively in dicts).
SUMMED_FIELDS = ("counts", "annotations_in")
_PART_RE = re.compile(r"^(\d{3,})-of-(\d{3,})$")

# Deterministic row order of each merged table.
SORT_KEYS: dict[str, list[str]] = {
    "videos": ["split", "video_id"],
    "polyps": ["split", "video_id", "identity_id"],
    "tracklets": ["split", "video_id", "start_frame", "tracklet_id"],
    "frames": ["tracklet_id", "frame_index"],
    "shards": ["path"],
    "errors": ["source", "id", "field", "reason", "detail", "action"],
}
# Columns that must be unique over the merged catalog (parts hold disjoint videos).
UNIQUE_KEYS: dict[str, list[str]] = {
    "videos": ["video_id"],
    "tracklets": ["tracklet_id"],
    "shards": ["path"],
    "frames": ["tracklet_id", "frame_index"],
}


@dataclass
class Part:
    index: int
    total: int
    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str


def part_dir_name(index: int, total: int) -> str:
    return f"{index:03d}-of-{total:03d}"


def _read_part(path: Path, index: int, total: int) -> Part:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CatalogError(
            f"{path}: part {index}/{total} is incomplete (no {MANIFEST}); re-run "
            f"`polyp-ssl ingest ROOT --part {index}/{total} --resume`"
        )
    try:
        raw = read_bounded(mpath, "manifest", MAX_MANIFEST_BYTES)
        manifest = loads_json(raw, mpath, MAX_MANIFEST_BYTES)
    except TextInputError as exc:  # too large, too deep, not UTF-8 JSON: names file and line
        raise CatalogError(f"unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise CatalogError(f"{mpath}: manifest is not a JSON object")
    if manifest.get("version") != CATALOG_VERSION:
        raise CatalogError(
            f"{mpath}: field 'version' is {manifest.get('version')!r}, "
            f"expected catalog version {CATALOG_VERSION}; re-ingest that part with this version: "
            f"`polyp-ssl ingest RAW_ROOT --out OUT --part {index}/{total} --overwrite`"
        )
    if manifest.get("part") != [index, total]:
        raise CatalogError(
            f"{mpath}: field 'part' is {manifest.get('part')!r} but the folder name says [{index}, {total}]"
        )
    if "parameters" not in manifest:
        raise CatalogError(f"{mpath}: field 'parameters' is missing")
    return Part(index, total, path, manifest, hashlib.sha256(raw).hexdigest())


def find_parts(out: str | Path) -> list[Part]:
    """Every part of OUT, checked complete (all N present, one N) and consistent (same parameters)."""
    pdir = catalog_dir(out) / PARTS_DIR
    if not pdir.is_dir():
        raise CatalogError(
            f"{pdir}: no partial catalogs to merge (written by `polyp-ssl ingest ROOT --part I/N`)"
        )
    found: dict[int, tuple[int, Path]] = {}
    totals: set[int] = set()
    for child in sorted(pdir.iterdir()):
        m = _PART_RE.match(child.name)
        if not child.is_dir() or not m:
            log.warning("catalog merge: ignoring %s (not a part folder NNN-of-NNN)", child)
            continue
        index, total = int(m.group(1)), int(m.group(2))
        found[index] = (total, child)
        totals.add(total)
    if not found:
        raise CatalogError(f"{pdir}: no part folders (NNN-of-NNN) to merge")
    if len(totals) > 1:
        raise CatalogError(
            f"{pdir}: parts of different totals N {sorted(totals)}; merge one ingest at a time"
        )
    total = totals.pop()
    present = set(found)
    # Parts count from 0 (`--part 0/N` .. `--part N-1/N`); 1-based numbering is accepted too.
    expected = set(range(1, total + 1)) if total in present else set(range(total))
    if present != expected:
        missing = sorted(expected - present)
        extra = sorted(present - expected)
        msg = f"{pdir}: {total} parts expected, found {len(present)} ({sorted(present)})"
        if missing:
            msg += f"; missing: {', '.join(part_dir_name(i, total) for i in missing)}"
        if extra:
            msg += f"; out of range: {', '.join(part_dir_name(i, total) for i in extra)}"
        raise CatalogError(msg)
    parts = [_read_part(found[i][1], i, total) for i in sorted(found)]
    first = parts[0]
    for part in parts[1:]:
        a, b = first.manifest["parameters"], part.manifest["parameters"]
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) else []
            what = (
                f"parameter {keys[0]!r}: {a.get(keys[0])!r} vs {b.get(keys[0])!r}" if keys else "parameters"
            )
            raise CatalogError(
                f"parts {first.path.name} and {part.path.name} were ingested with different {what}; "
                "re-run the odd part with the same options"
            )
    return parts


def _read_part_table(part: Part, name: str) -> pa.Table:
    path = part.path / f"{name}.parquet"
    if not path.is_file():
        raise CatalogError(f"{path}: table {name!r} of part {part.path.name} is missing")
    check_schema(path, read_file_schema(path), TABLES[name])
    return pq.read_table(path, schema=TABLES[name])


def _check_unique(name: str, table: pa.Table, keys: list[str]) -> None:
    if table.num_rows == 0:
        return
    counts = table.group_by(keys).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts["count_all"], 1))
    if dup.num_rows:
        row = dup.slice(0, 1).to_pylist()[0]
        key = {k: row[k] for k in keys}
        raise CatalogError(
            f"catalog merge: table {name!r} has {key} in more than one part ({dup.num_rows} duplicates)"
        )


def _sum_counts(values: list[Any]) -> Any:
    if all(isinstance(v, dict) for v in values):
        keys = sorted({k for v in values for k in v})
        return {k: _sum_counts([v[k] for v in values if k in v]) for k in keys}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sum(values)
    return values[0] if all(v == values[0] for v in values) else values


def merged_manifest(parts: list[Part], rows: dict[str, int]) -> dict[str, Any]:
    manifest = copy.deepcopy(parts[0].manifest)
    manifest["part"] = None
    for key in SUMMED_FIELDS:
        if any(key in p.manifest for p in parts):
            manifest[key] = _sum_counts([p.manifest[key] for p in parts if key in p.manifest])
    differing = {}
    for key in sorted(
        {k for p in parts for k in p.manifest} - {"part", "parameters", "version", *SUMMED_FIELDS}
    ):
        values = [p.manifest.get(key) for p in parts]
        if any(v != values[0] for v in values):
            differing[key] = values
            manifest.pop(key, None)
    manifest["version"] = CATALOG_VERSION
    manifest["rows"] = rows
    manifest["merged_from"] = [
        {
            "part": [p.index, p.total],
            "path": p.path.relative_to(p.path.parents[2]).as_posix(),
            "manifest_sha256": p.manifest_sha256,
        }
        for p in parts
    ]
    if differing:
        manifest["per_part"] = differing
    return manifest


def _write_atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def merge_parts(out: str | Path) -> dict[str, Any]:
    """Merge OUT's parts into OUT/catalog; returns the merged manifest. Holds OUT's write lock
    (`shards.lock`): refused (LockHeld) while an ingest, a part of one, or another merge runs."""
    out = Path(out)
    if not out.is_dir():
        raise CatalogError(f"{out}: no such directory")
    with output_lock(out, "polyp-ssl catalog merge"):
        return _merge_locked(out)


def _merge_locked(out: Path) -> dict[str, Any]:
    parts = find_parts(out)
    tables: dict[str, pa.Table] = {}
    for name, schema in TABLES.items():
        table = (
            pa.concat_tables([_read_part_table(p, name) for p in parts]) if parts else schema.empty_table()
        )
        if name in UNIQUE_KEYS:
            _check_unique(name, table, UNIQUE_KEYS[name])
        tables[name] = table.sort_by([(k, "ascending") for k in SORT_KEYS[name]])
    cdir = catalog_dir(out)
    final_manifest = cdir / MANIFEST
    final_manifest.unlink(missing_ok=True)  # the catalog reads as absent until the merge completes
    for name, table in tables.items():
        _write_atomic_parquet(table, cdir / f"{name}.parquet")
    manifest = merged_manifest(parts, {n: t.num_rows for n, t in tables.items()})
    tmp = final_manifest.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, final_manifest)
    log.info("merged %d parts into %s: %s", len(parts), cdir, manifest["rows"])
    return manifest
