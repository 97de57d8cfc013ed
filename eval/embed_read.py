"""Reading a split for embedding: its shards in catalog order (sizes and sha256 checked against
the catalog), each sample's metadata and JPEG headers checked before anything is decoded, and the
items (whole tracklets or fragments) cut from them and batched by frame count."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval.embed_params import EmbedError, EmbedParams
from polyp_ssl.fragments import even_subsample, fragment_index_lists
from polyp_ssl.shards.files import check_regular
from polyp_ssl.shards.locations import UnsafeLocation, check_shard_value, shard_location
from polyp_ssl.shards.remote import remote_root
from polyp_ssl.shards.sample import (
    JpegSizeError,
    SampleError,
    TrackletSample,
    check_jpeg,
    frame_ext,
    sample_meta,
)


def frame_plan(
    n_frames: int, fragment_length: int, stride: int, max_frames: int | None, drop_last: bool = True
) -> list[tuple[int, list[int]]]:
    """(fragment_index, frame indices) of the items cut from a tracklet of n_frames frames
    (polyp_ssl.fragments); a whole tracklet (-1) is evenly subsampled to max_frames when longer."""
    try:
        lists = fragment_index_lists(n_frames, fragment_length, stride, drop_last)
    except ValueError as e:
        raise EmbedError(str(e)) from e
    if fragment_length == -1:
        return [(-1, even_subsample(idx, max_frames) if max_frames else list(idx)) for idx in lists]
    return list(enumerate(lists))


def decode_rgb(jpeg: bytes, expected: Sequence[int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] of a stored JPEG with PIL, its size checked from the header first
    (shards.sample.check_jpeg; PIL's own MAX_IMAGE_PIXELS guard is 179 M pixels) and again from
    what PIL reads before it decodes (JpegSizeError, a ValueError)."""
    from PIL import Image

    w, h = check_jpeg(jpeg, expected)
    with Image.open(io.BytesIO(jpeg)) as img:
        if img.size != (w, h):
            got = f"{img.size[0]}x{img.size[1]}"
            raise JpegSizeError(f"a JPEG PIL reads as {got}, its header says {w}x{h}", "mismatch")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


SHARD_KEY = "__shard__"  # the shard a sample was read from, set by checked_samples


def checked_meta(sample: dict[str, Any], seen: dict[str, str]) -> TrackletSample:
    """The validated TrackletSample of a sample (shards.sample.parse_sample), with every frame's
    JPEG header checked against the JSON's crop_sizes before anything is decoded, and its key not
    seen before in the split (`seen`: key -> shard). EmbedError names the shard, the key and the
    field."""
    shard, key = sample.get(SHARD_KEY, "?"), sample.get("__key__")
    where = f"{shard}: sample {key!r}"
    try:
        meta = sample_meta(sample)
    except SampleError as e:
        raise EmbedError(f"{where}: {e}") from None
    if meta.key != key:
        raise EmbedError(f"{where}: field 'key': {meta.key!r} differs from the member key")
    if key in seen:
        raise EmbedError(f"{where}: appears twice in the split (also in {seen[key]})")
    seen[key] = shard
    for i in range(meta.n_frames):
        data = sample.get(frame_ext(i))
        if data is None:
            raise EmbedError(f"{where}: has no member .{frame_ext(i)}")
        try:
            check_jpeg(data, meta.crop_sizes[i])
        except JpegSizeError as e:
            raise EmbedError(f"{where}: field 'crop_sizes[{i}]': frame {i} is {e}") from None
    return meta


def anchor_frames(
    sample: dict[str, Any], meta: TrackletSample, indices: Sequence[int], scale: float, im_size: int
) -> np.ndarray:
    """uint8 [S, 3, im_size, im_size]: the deterministic anchor crop of each listed frame, from the
    stored JPEGs (polyp_ssl.transforms.load_frames); a repeated frame is decoded once."""
    from polyp_ssl.transforms import load_frames

    uniq = list(dict.fromkeys(indices))
    jpegs = []
    for i in uniq:
        ext = frame_ext(i)
        if ext not in sample:
            raise EmbedError(f"sample {meta.key!r} ({meta.tracklet_id}) has no member .{ext}")
        jpegs.append(sample[ext])
    boxes, sizes = [meta.boxes_in_crop[i] for i in uniq], [meta.crop_sizes[i] for i in uniq]
    frames = load_frames(jpegs, boxes, im_size, scale, sizes=sizes).numpy()
    pos = {i: k for k, i in enumerate(uniq)}
    return frames[[pos[i] for i in indices]]


@dataclass
class Item:
    meta: TrackletSample
    fragment_index: int
    indices: list[int]
    frames: np.ndarray | None = None  # uint8 [S, 3, H, W] for encoders
    raw: dict[int, bytes] | None = None  # frame index -> stored JPEG, for the descriptor
    sample: dict[str, Any] | None = None  # kept (not decoded) for a tracklet longer than the frame budget


def split_shards(root: str | Path, split: str) -> list[Any]:
    """The split's shard files, in catalog order (the catalog's `shards` table): Paths, or the
    objects' URLs under a remote root (shards.remote)."""
    from polyp_ssl.shards.tables import read_catalog_table

    url = remote_root(root)
    if url is not None:
        return _remote_split_shards(url, split)
    root = Path(root)
    table_path = root / "catalog" / "shards.parquet"
    if not table_path.is_file():
        raise EmbedError(f"{table_path}: missing; {root} is not an ingested root (run `polyp-ssl ingest`)")
    columns = ["path", "split", "n_samples", "n_bytes"]
    rows = read_catalog_table(root, "shards", columns, checked=False).to_pylist()
    known = sorted({r["split"] for r in rows})
    rows = [r for r in rows if r["split"] == split]
    if not rows or sum(int(r["n_samples"]) for r in rows) == 0:
        raise EmbedError(
            f"{table_path}: split {split!r} has no tracklets (splits with data: {', '.join(known) or 'none'})"
        )
    rows = sorted(rows, key=lambda r: str(r["path"]))
    try:
        paths = []
        for r in rows:
            rel = check_shard_value(r["path"], table_path, f"shard {r['path']!r}", "path")
            paths.append(Path(shard_location(rel, root)))
    except UnsafeLocation as exc:
        raise EmbedError(str(exc)) from None
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise EmbedError(f"shards named in {table_path} are missing: {missing[:3]}")
    for r, p in zip(rows, paths, strict=True):
        size = check_regular(p, "shard").st_size  # a FIFO or device in place of a shard: refused by name
        if r["n_bytes"] is not None and size != r["n_bytes"]:
            raise EmbedError(
                f"{p}: {size} bytes, {table_path} says {r['n_bytes']}: not the shard the catalog describes "
                "(changed or replaced since ingest; `polyp-ssl verify` checks every shard)"
            )
    return paths


def split_tracklet_count(root: str | Path, split: str) -> int:
    from polyp_ssl.shards.tables import read_catalog_table

    path = Path(root) / "catalog" / "tracklets.parquet"
    if remote_root(root) is None and not path.is_file():
        return 0
    t = read_catalog_table(root, "tracklets", ["split"], checked=False).column("split").to_pylist()
    return sum(1 for s in t if s == split)


def _remote_split_shards(url: str, split: str) -> list[str]:
    """split_shards under a remote root: the objects' URLs, each object's size checked against
    the catalog's (one HEAD each); RemoteError (one line) for a store that cannot be read."""
    from polyp_ssl.shards.remote import filesystem_for, remote_failure
    from polyp_ssl.shards.tables import read_catalog_table, table_file

    table_path = table_file(url, "shards")
    columns = ["path", "split", "n_samples", "n_bytes"]
    rows = read_catalog_table(url, "shards", columns, checked=False).to_pylist()
    known = sorted({r["split"] for r in rows})
    rows = sorted((r for r in rows if r["split"] == split), key=lambda r: str(r["path"]))
    if not rows or sum(int(r["n_samples"]) for r in rows) == 0:
        raise EmbedError(
            f"{table_path}: split {split!r} has no tracklets (splits with data: {', '.join(known) or 'none'})"
        )
    try:
        urls = [
            shard_location(check_shard_value(r["path"], table_path, f"shard {r['path']!r}", "path"), url)
            for r in rows
        ]
    except UnsafeLocation as exc:
        raise EmbedError(str(exc)) from None
    fs, _ = filesystem_for(url)
    for r, u in zip(rows, urls, strict=True):
        try:
            size = int(fs.info(filesystem_for(u)[1])["size"])
        except FileNotFoundError:
            raise EmbedError(f"shards named in {table_path} are missing: {u}") from None
        except Exception as exc:
            raise remote_failure(u, exc) from None
        if r["n_bytes"] is not None and size != r["n_bytes"]:
            raise EmbedError(
                f"{u}: {size} bytes, {table_path} says {r['n_bytes']}: not the shard the catalog describes "
                "(changed or replaced since upload; `polyp-ssl verify` on the local copy checks every shard)"
            )
    return urls


def checked_samples(root: str | Path, paths: list[Any]) -> Iterator[dict[str, Any]]:
    """The samples of `paths` in order; each shard's bytes are hashed while they are read and
    compared with the catalog's size and sha256 after its last sample, so a changed or replaced
    shard stops the run (naming it) before any embeddings file is written."""
    from polyp_ssl.shards.locations import ShardIdentity
    from polyp_ssl.shards.reader import iter_samples
    from polyp_ssl.shards.tables import read_catalog_table

    url = remote_root(root)
    root = Path(root)
    t = read_catalog_table(url or root, "shards", ["path", "n_bytes", "sha256"], checked=False).to_pydict()
    recorded = {
        (shard_location(p, url) if url is not None else str(root / p)): ShardIdentity(int(n), h)
        for p, n, h in zip(t["path"], t["n_bytes"], t["sha256"], strict=True)
        if h
    }
    for path in paths:
        try:
            for sample in iter_samples([path], recorded):
                sample[SHARD_KEY] = str(path)
                yield sample
        except (ValueError, tarfile.TarError, OSError) as e:  # a damaged tar, a repeated key, a changed shard
            text = str(e)
            raise EmbedError(text if text.startswith(str(path)) else f"{path}: {text}") from None


def iter_items(
    root: str | Path,
    params: EmbedParams,
    decode: bool,
    too_short: list[str] | None = None,
    below_min: list[str] | None = None,
    decode_max: int | None = None,
) -> Iterator[Item]:
    """Items of the split in shard order; ids of tracklets too short for one fragment are
    appended to `too_short`, those under `params.min_tracklet_frames` to `below_min` (counted and
    reported, never dropped silently). An item of more than `decode_max` frames is not decoded here
    (its `sample` is kept, to be decoded in chunks)."""
    seen: dict[str, str] = {}
    for sample in checked_samples(root, split_shards(root, params.split)):
        meta = checked_meta(sample, seen)
        if meta.split != params.split:
            raise EmbedError(f"sample {meta.key!r} says split {meta.split!r}, read as {params.split!r}")
        if meta.n_frames < params.min_tracklet_frames:
            if below_min is not None:
                below_min.append(meta.tracklet_id)
            continue
        plan = frame_plan(
            meta.n_frames,
            params.fragment_length,
            params.fragment_stride,
            params.max_frames,
            params.fragment_drop_last,
        )
        if not plan and too_short is not None:
            too_short.append(meta.tracklet_id)
        for frag, indices in plan:
            item = Item(meta, frag, indices)
            if decode and decode_max is not None and len(indices) > decode_max:
                item.sample = sample
            elif decode:
                item.frames = anchor_frames(sample, meta, indices, params.bbox_scale_factor, params.im_size)
            else:
                item.frames = None
                item.raw = {i: sample[frame_ext(i)] for i in set(indices)}
            yield item


def batched(items: Iterator[Item], batch_size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for it in items:
        batch.append(it)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def batched_by_frames(items: Iterator[Item], batch_size: int, frame_budget: int) -> Iterator[list[Item]]:
    """Batches of at most `batch_size` items whose padded size (items x longest) stays within
    `frame_budget` frames; an item longer than the budget is a batch of its own."""
    batch: list[Item] = []
    longest = 0
    for it in items:
        n = len(it.indices)
        if batch and (len(batch) == batch_size or (len(batch) + 1) * max(longest, n) > frame_budget):
            yield batch
            batch, longest = [], 0
        batch.append(it)
        longest = max(longest, n)
    if batch:
        yield batch


def pad_batch(frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length [S_i, 3, H, W] -> (uint8 [B, S_max, 3, H, W], bool mask [B, S_max])."""
    s_max = max(f.shape[0] for f in frames)
    b = len(frames)
    out = np.zeros((b, s_max, *frames[0].shape[1:]), dtype=np.uint8)
    mask = np.zeros((b, s_max), dtype=bool)
    for i, f in enumerate(frames):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return out, mask
