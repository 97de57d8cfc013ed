"""The split's fragments and where each frame's JPEG lies, for reading batches at offsets.

Built once in the main process (before loader workers start, which inherit it): the catalog's
byte spans (shards.members) of every training tracklet's JSON and frames, each tracklet's JSON
read at its span and validated (shards.sample.parse_sample, then against the catalog), and from
the JSONs the fragments with their positions (polyp_ssl.fragments.cut_tracklet, as the
sequential reader cuts them). Everything per frame is kept in flat numpy arrays (about 64 bytes
a frame), so a worker's copy stays small and shared after fork.

Shards are local plain `.tar` files (read with shards.members.SpanReader) or objects under a
remote root or --shard_base (shards.object_store.ObjectStoreReader: range requests, the JSONs
hinted a window ahead so they arrive many at a time); `member_reader` picks the one the loader's
workers use too.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from polyp_ssl.damage import DamagePolicy
from polyp_ssl.epoch_plan import SplitFragments
from polyp_ssl.fragments import cut_tracklet
from polyp_ssl.loader_errors import DataConfigError, ShardError
from polyp_ssl.shards.files import check_regular
from polyp_ssl.shards.members import (
    MemberError,
    MemberReader,
    MemberRequest,
    MemberSpan,
    SpanReader,
    local_shard_path,
    max_jpeg_bytes,
    overlapping_spans,
)
from polyp_ssl.shards.remote import is_remote
from polyp_ssl.shards.sample import MAX_JSON_BYTES, TrackletSample
from polyp_ssl.shards.samples import SampleDamage, check_frame_count, check_json
from polyp_ssl.shards.tables import read_catalog_table, read_file_schema, table_file
from polyp_ssl.stream_index import as_root

log = logging.getLogger(__name__)

TRACKLET_SPAN_COLUMNS = ("json_offset", "json_size", "json_crc32")
FRAME_SPAN_COLUMNS = ("jpeg_offset", "jpeg_size", "jpeg_crc32")
ROW = "__row__"  # a row's position in its catalog table, for messages
JSON_HINT = 256  # tracklet JSONs hinted ahead to a remote reader while the index is built


@dataclass
class FrameMeta:
    """What decoding a tracklet's frames needs from its JSON (the attributes of
    shards.sample.TrackletSample that the decode helpers read)."""

    key: str
    crop_sizes: list[list[int]]
    boxes_in_crop: list[list[float]]
    params: dict[str, Any]


@dataclass
class SpanTable:
    """Per training tracklet (a slot) its sample key, shard and frames' spans and crop geometry;
    per-frame rows of tracklet t are `frame_start[t]:frame_start[t + 1]`."""

    keys: list[str]
    shard: list[str]  # catalog shard value (relative path)
    path: dict[str, str]  # shard value -> local file to pread, or the object's URL
    shard_bytes: dict[str, int]  # shard value -> size from the catalog's shards table
    frame_start: np.ndarray  # int64 [T + 1]
    jpeg: np.ndarray  # int64 [N, 3]: offset, size, crc32
    crop_sizes: np.ndarray  # int32 [N, 2]
    boxes_in_crop: np.ndarray  # float64 [N, 4]
    crop_scale: np.ndarray  # float64 [T], nan when the sample records none
    skipped: Counter = field(default_factory=Counter)

    @property
    def nbytes(self) -> int:
        arrays = (self.frame_start, self.jpeg, self.crop_sizes, self.boxes_in_crop, self.crop_scale)
        return int(sum(a.nbytes for a in arrays))

    def span(self, slot: int, i: int) -> MemberSpan:
        off, size, crc = self.jpeg[int(self.frame_start[slot]) + i]
        return MemberSpan(int(off), int(size), int(crc))

    def meta(self, slot: int) -> FrameMeta:
        lo, hi = int(self.frame_start[slot]), int(self.frame_start[slot + 1])
        scale = float(self.crop_scale[slot])
        return FrameMeta(
            self.keys[slot],
            self.crop_sizes[lo:hi].tolist(),
            self.boxes_in_crop[lo:hi].tolist(),
            {} if np.isnan(scale) else {"crop_scale": scale},
        )


def local_paths(index: Any) -> dict[str, str] | None:
    """Shard value -> local file for every shard of the index, or None when one of them cannot
    be read at offsets (a `pipe:` or remote --shard_base, a compressed shard)."""
    out = {}
    for rel in dict.fromkeys(index.video_shard):
        path = local_shard_path(index.shard_url(rel))
        if path is None:
            return None
        out[rel] = path
    return out


def remote_object(url: str) -> str | None:
    """The URL of a remote plain `.tar` shard, which can be read at offsets by range requests; None
    for anything else (local, `pipe:`, compressed)."""
    return url if is_remote(url) and url.split("?", 1)[0].endswith(".tar") else None


def member_locations(index: Any) -> dict[str, str] | None:
    """Shard value -> where its members are read at their spans (a local file, or a remote
    object's URL), or None when one shard cannot be read at offsets (a `pipe:` base, a compressed
    shard, a scheme no filesystem reads) or the shards are not all of one kind."""
    local = local_paths(index)
    if local is not None:
        return local
    out = {}
    for rel in dict.fromkeys(index.video_shard):
        url = remote_object(index.shard_url(rel))
        if url is None:
            return None
        out[rel] = url
    return out


def member_reader(index: Any) -> Callable[[], MemberReader]:
    """What makes a process's member reader for the index's shards: SpanReader for local files,
    an ObjectStoreReader (with the index's read options) for remote objects."""
    if local_paths(index) is not None:
        return SpanReader
    from polyp_ssl.shards.object_store import ObjectReadOptions, open_object_reader

    return open_object_reader(index.read_options or ObjectReadOptions())


def _read_columns(root: Any, table: str, columns: tuple[str, ...], keep: tuple[str, set[str]]) -> dict:
    path = table_file(root, table)
    if isinstance(path, Path):
        check_regular(path, f"catalog table {table!r}")  # pyarrow opens the path: never a FIFO or device
        names = pq.read_schema(path).names
    else:
        names = read_file_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataConfigError(
            f"{path}: no column {missing[0]!r}: this catalog was written by an older polyp-ssl and "
            "records no byte spans; re-ingest it (`polyp-ssl ingest RAW_ROOT --out ROOT --overwrite`) "
            "or read shards sequentially with --shard_access sequential"
        )
    t = read_catalog_table(root, table, columns, checked=False)
    for c in columns:  # a null span reads as -1, which SpanReader refuses by name
        if pa.types.is_integer(t[c].type):
            t = t.set_column(t.schema.get_field_index(c), c, pc.fill_null(t[c], -1))
    t = t.append_column(ROW, pa.array(np.arange(t.num_rows, dtype=np.int64)))
    col, values = keep
    t = t.filter(pc.is_in(t[col], value_set=pa.array(sorted(values), type=t[col].type)))
    return t.to_pydict()


def build_span_index(
    index: Any, params: Any, damage: DamagePolicy | None = None
) -> tuple[SpanTable, SplitFragments]:
    """The span table and split fragments of a StreamIndex (see the module docstring).

    A tracklet whose JSON cannot be read or does not match the catalog is handed to `damage`
    (polyp_ssl.damage.DamagePolicy; None: fail): ShardError under `fail`; under `warn` it is left
    out, counted by the policy and in `SpanTable.skipped` (a shard whose size or bytes differ from
    ingest's is left out whole, as `shard_changed`)."""
    warn = damage is not None and damage.warn
    root = as_root(index.root)
    paths = member_locations(index)
    if paths is None:
        raise DataConfigError("these shards cannot be read at offsets (pipe:, remote or compressed)")
    keys = set(index.samples)
    trk = _read_columns(
        root,
        "tracklets",
        ("sample_key", "tracklet_id", "shard", *TRACKLET_SPAN_COLUMNS),
        ("sample_key", keys),
    )
    tids = set(trk["tracklet_id"])
    frames = _read_columns(
        root, "frames", ("tracklet_id", "frame_index", *FRAME_SPAN_COLUMNS), ("tracklet_id", tids)
    )
    tid_arr = np.asarray(frames["tracklet_id"], dtype=object)
    fidx = np.asarray(frames["frame_index"], dtype=np.int64)
    order = np.lexsort((fidx, tid_arr.astype(str))) if len(fidx) else np.zeros(0, np.int64)
    spans_all = np.stack([np.asarray(frames[c], dtype=np.int64) for c in FRAME_SPAN_COLUMNS], axis=1)
    rows_of: dict[str, np.ndarray] = {}
    if len(order):
        sorted_tid = tid_arr[order]
        cut = np.flatnonzero(sorted_tid[1:] != sorted_tid[:-1]) + 1
        for grp in np.split(order, cut):
            rows_of[str(tid_arr[grp[0]])] = grp
    by_key = {
        k: (tid, shard, MemberSpan(int(o), int(s), int(c)))
        for k, tid, shard, o, s, c in zip(
            trk["sample_key"],
            trk["tracklet_id"],
            trk["shard"],
            *(trk[c] for c in TRACKLET_SPAN_COLUMNS),
            strict=True,
        )
    }
    _check_json_spans(root, trk)
    _check_no_overlap(root, by_key, tid_arr, spans_all)
    frame_row = np.asarray(frames[ROW], dtype=np.int64)
    # the tracklets of each video in catalog (shard) order, as the sequential reader meets them
    per_video: dict[int, list[str]] = {}
    for k, (v, _, _) in index.samples.items():
        per_video.setdefault(v, []).append(k)
    reader = member_reader(index)()
    prefetch = None if isinstance(reader, SpanReader) else getattr(reader, "prefetch", None)
    hints = _json_hints(index, per_video, by_key, paths, prefetch)
    skipped: Counter = Counter()
    bad_shards: set[str] = set()
    L = params.fragment_length
    got: dict[str, _Tracklet] = {}
    try:
        for v in range(len(index.video_ids)):
            for key in per_video.get(v, []):
                tid, rel, jspan = by_key[key]
                hints.send(key)
                if rel in bad_shards:
                    continue
                url = index.shard_url(rel)
                try:
                    meta = _read_meta(reader, paths[rel], jspan, index.shard_identity[rel].n_bytes, key)
                    rows = rows_of.get(tid, np.zeros(0, np.int64))
                    _check_rows(meta, index.sample_frames.get(key), fidx[rows])
                    _check_frame_spans(root, tid, meta.crop_sizes, spans_all[rows, 1], frame_row[rows])
                except (SampleDamage, MemberError) as bad:
                    err = ShardError.at(url, key, bad.reason, str(bad))
                    if not warn:
                        raise err from None
                    _skip(damage, skipped, err)
                    if bad.reason == "shard_changed":
                        bad_shards.add(rel)
                    continue
                except OSError as exc:
                    err = ShardError.at(url, None, "unreadable_shard", f"cannot open ({exc})")
                    if not warn:
                        raise err from exc
                    _skip(damage, skipped, err)
                    bad_shards.add(rel)
                    continue
                cs = meta.params.get("crop_scale")
                frags = cut_tracklet(
                    meta.frame_ids,
                    meta.video_first_frame,
                    meta.video_last_frame,
                    L,
                    params.fragment_stride,
                    params.fragment_drop_last,
                    params.min_tracklet_length,
                )
                got[key] = _Tracklet(
                    rel,
                    spans_all[rows],
                    np.asarray(meta.crop_sizes, dtype=np.int32).reshape(-1, 2),
                    np.asarray(meta.boxes_in_crop, dtype=np.float64).reshape(-1, 4),
                    float(cs) if isinstance(cs, int | float) and not isinstance(cs, bool) else float("nan"),
                    [f.frame_indices for f in frags],
                    [f.position for f in frags],
                )
    finally:
        hints.close()
        reader.close()
    return _assemble(index, per_video, got, bad_shards, paths, max(L, 1), skipped)


def _json_hints(
    index: Any, per_video: dict, by_key: dict, paths: dict[str, str], prefetch: Callable | None
) -> Generator[None, str, None]:
    """A primed coroutine told (`send`) each tracklet key as its JSON is about to be read: every
    JSON_HINT keys it hands `prefetch` (a remote reader's; None: nothing to do) the JSON spans of
    the next JSON_HINT, so they are fetched together instead of one round trip each."""

    def run() -> Generator[None, str, None]:
        order = [k for v in range(len(index.video_ids)) for k in per_video.get(v, [])]
        position = {k: i for i, k in enumerate(order)}
        while True:
            i = position.get((yield), -1)
            if prefetch is not None and i % JSON_HINT == 0:
                window = []
                for k in order[i : i + JSON_HINT]:
                    _, rel, span = by_key[k]
                    window.append(
                        MemberRequest(paths[rel], span, index.shard_identity[rel].n_bytes, f"{k}.json")
                    )
                prefetch(window)

    gen = run()
    next(gen)
    return gen


def _skip(damage: Any, skipped: Counter, err: ShardError) -> None:
    """A tracklet left out under warn: counted once by the policy, kept in the table's counts."""
    skipped[err.reason] += 1
    damage.count(err.reason)
    log.warning("skipped (%s): %s", err.reason, err)


@dataclass
class _Tracklet:
    shard: str
    jpeg: np.ndarray
    crop_sizes: np.ndarray
    boxes_in_crop: np.ndarray
    crop_scale: float
    fragment_frames: list[tuple[int, ...]]
    fragment_positions: list[float]


def _assemble(
    index: Any,
    per_video: dict[int, list[str]],
    got: dict[str, _Tracklet],
    bad_shards: set[str],
    paths: dict[str, str],
    length: int,
    skipped: Counter,
) -> tuple[SpanTable, SplitFragments]:
    """Flat arrays from the tracklets read, in video order; a changed shard's tracklets read
    before the change was found are left out too."""
    keys: list[str] = []
    shards: list[str] = []
    parts: list[_Tracklet] = []
    f_slot, f_frames, f_pos, f_trk, f_ide = [], [], [], [], []
    video_start = [0]
    for v in range(len(index.video_ids)):
        for key in per_video.get(v, []):
            t = got.get(key)
            if t is None:
                continue
            if t.shard in bad_shards:
                skipped["shard_changed_tracklets_dropped"] += 1
                continue
            slot = len(keys)
            keys.append(key)
            shards.append(t.shard)
            parts.append(t)
            _, t_code, i_code = index.samples[key]
            f_slot += [slot] * len(t.fragment_frames)
            f_frames += t.fragment_frames
            f_pos += t.fragment_positions
            f_trk += [t_code] * len(t.fragment_frames)
            f_ide += [i_code] * len(t.fragment_frames)
        video_start.append(len(f_slot))
    counts = [len(t.jpeg) for t in parts]
    table = SpanTable(
        keys,
        shards,
        paths,
        {rel: index.shard_identity[rel].n_bytes for rel in paths},
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        np.concatenate([t.jpeg for t in parts]) if parts else np.zeros((0, 3), np.int64),
        np.concatenate([t.crop_sizes for t in parts]) if parts else np.zeros((0, 2), np.int32),
        np.concatenate([t.boxes_in_crop for t in parts]) if parts else np.zeros((0, 4), np.float64),
        np.asarray([t.crop_scale for t in parts], dtype=np.float64),
        skipped,
    )
    frags = SplitFragments(
        np.asarray(video_start, dtype=np.int64),
        np.asarray(index.video_codes, dtype=np.int64),
        np.asarray(f_slot, dtype=np.int64),
        np.asarray(f_frames, dtype=np.int32).reshape(-1, length),
        np.asarray(f_pos, dtype=np.float64),
        np.asarray(f_trk, dtype=np.int64),
        np.asarray(f_ide, dtype=np.int64),
    )
    return table, frags


def _check_no_overlap(root: Any, by_key: dict, frame_tids: np.ndarray, frame_spans: np.ndarray) -> None:
    """DataConfigError when two catalog spans of one shard overlap (shards.members.overlapping_spans),
    naming the catalog table, the tracklet and the field."""
    shard_of = {tid: shard for tid, shard, _ in by_key.values()}
    # per shard: (table, offset column, tracklet id, offset, size)
    per_shard: dict[str, list[tuple[str, str, str, int, int]]] = {}
    for tid, shard, span in by_key.values():
        per_shard.setdefault(shard, []).append(("tracklets", "json_offset", tid, span.offset, span.size))
    for tid, (off, size, _) in zip(frame_tids, frame_spans, strict=True):
        per_shard.setdefault(shard_of[tid], []).append(("frames", "jpeg_offset", tid, int(off), int(size)))
    for shard, spans in per_shard.items():
        pair = overlapping_spans(np.array([s[3] for s in spans]), np.array([s[4] for s in spans]))
        if pair is not None:
            (_, _, tid_a, off_a, size_a), (table, column, tid, off, size) = spans[pair[0]], spans[pair[1]]
            raise DataConfigError(
                f"{table_file(root, table)}: tracklet {tid!r}: field {column!r}: the span "
                f"{off}+{size} in {shard} overlaps one of tracklet {tid_a!r} at {off_a}+{size_a}; members "
                "of a tar never overlap (not ingest's catalog; `polyp-ssl verify ROOT` checks every span)"
            )


def _check_json_spans(root: Any, trk: dict) -> None:
    """DataConfigError for a tracklets row whose JSON span is longer than a sample JSON may be
    (shards.sample.MAX_JSON_BYTES), naming the table, the row and the field, before any read."""
    for row, tid, size in zip(trk[ROW], trk["tracklet_id"], trk["json_size"], strict=True):
        if size > MAX_JSON_BYTES:
            raise DataConfigError(
                f"{table_file(root, 'tracklets')}: row {row} (tracklet {tid!r}): field "
                f"'json_size': {size} bytes, more than the {MAX_JSON_BYTES} a sample JSON may have; "
                "not ingest's catalog (`polyp-ssl verify ROOT` checks every span)"
            )


def _check_frame_spans(
    root: Any, tid: str, crop_sizes: list, sizes: np.ndarray, table_rows: np.ndarray
) -> None:
    """DataConfigError for a frames row whose JPEG span is longer than a JPEG of its crop (the
    sample JSON's crop_sizes) can be (shards.members.max_jpeg_bytes), naming the table, the row
    and the field: a catalog cannot make a batch of small crops read gigabytes."""
    for i, (size, (w, h)) in enumerate(zip(sizes.tolist(), crop_sizes, strict=False)):
        bound = max_jpeg_bytes(w, h)
        if size > bound:
            raise DataConfigError(
                f"{table_file(root, 'frames')}: row {int(table_rows[i])} (tracklet {tid!r} "
                f"frame {i}): field 'jpeg_size': {size} bytes, more than a JPEG of its {w}x{h} crop "
                f"can take ({bound}); not ingest's catalog (`polyp-ssl verify ROOT` checks every span)"
            )


def _check_rows(meta: Any, catalog_frames: int | None, frame_index: np.ndarray) -> None:
    check_frame_count(meta, catalog_frames)
    if not np.array_equal(frame_index, np.arange(meta.n_frames)):
        raise SampleDamage(
            "json_mismatch",
            f"JSON has {meta.n_frames} frames, frames.parquet {len(frame_index)} rows (frame_index 0..n-1)",
        )


def _read_meta(reader: MemberReader, path: str, span: MemberSpan, n_bytes: int, key: str) -> TrackletSample:
    """A tracklet's JSON read at its span and checked (shards.samples.check_json)."""
    data = reader.read(path, span, n_bytes, f"{key}.json")
    return check_json(data, key, "the catalog's sample_key")
