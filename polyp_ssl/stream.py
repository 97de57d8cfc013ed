"""The streaming bag loader: shards -> videos -> fragments -> bags -> finished batches.

Layout of the work:
- main process: `build_index` reads the catalog once (pyarrow over OUT/catalog/*.parquet, split and
  min_tracklet_length applied there) into a small picklable `StreamIndex`; it also fixes the epoch
  length (batches per worker), so every rank runs the same number of steps by construction.
- each stream (rank x worker) gets, per epoch, a disjoint part of the training videos
  (`assign_videos`, the same computation on every rank), reads its shards sequentially, groups a
  video's samples, cuts fragments, forms bags, keeps `open_videos` videos open and interleaves
  their bags, and decodes only the JPEGs of the frames a batch uses. A stream that runs out of
  videos starts another pass over them (new bag draws) until it has yielded its batch count.
- `StreamLoader`, a DataLoader whose state {epoch, batches_seen, seed} Lightning stores in the
  checkpoint: a resumed run replays bag formation (no decoding) to skip the consumed batches.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import tarfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polyp_ssl.bags import eligible_anchors, epoch_anchors, sample_bags, temporal_temperature
from polyp_ssl.config import DECODE_ON, SHARD_ACCESS
from polyp_ssl.device_decode import DevicePrefetcher, pack_jpegs
from polyp_ssl.epoch_plan import EpochPlan, SplitFragments, plan_epoch, stream_batches
from polyp_ssl.fragments import count_fragments, cut_tracklet, even_subsample, fragment_index_lists
from polyp_ssl.loader_errors import ON_SHARD_ERROR, SKIP_REASONS, DataConfigError, ShardError
from polyp_ssl.shards.locations import (
    HashingReader,
    ShardChanged,
    ShardIdentity,
    UnsafeLocation,
    check_shard_value,
    local_size,
    shard_location,
)
from polyp_ssl.shards.members import MemberError, SpanReader
from polyp_ssl.shards.reader import DecompressionBomb, open_shard, read_members, safe_member_name
from polyp_ssl.shards.sample import (
    JpegSizeError,
    SampleError,
    TrackletSample,
    check_jpeg,
    frame_jpeg,
    jpeg_size,
    sample_meta,
)
from polyp_ssl.shards.schema import SHARDS, TRACKLETS, VIDEOS
from polyp_ssl.span_index import FrameMeta, SpanTable, build_span_index, local_paths
from polyp_ssl.transforms import (
    Augment,
    CropParams,
    anchor_crop,
    apply_flips,
    crop_resize,
    crop_window,
    decode_jpeg_bytes,
    draw_crop_params,
)

log = logging.getLogger(__name__)

__all__ = ["ON_SHARD_ERROR", "SKIP_REASONS", "DataConfigError", "ShardError"]


@dataclass(frozen=True)
class StreamParams:
    batch_size: int = 60
    n_views: int = 5
    fragment_length: int = 8
    fragment_stride: int = 4
    fragment_drop_last: bool = False
    min_tracklet_length: int = 30
    bbox_scale_factor: float = 5.0
    im_size: int = 232
    aug_anchorcrop: bool = False  # the reference's flag: the deterministic anchor crop (always used here)
    aug_random_scale: bool = False  # opt-in random augmentations (polyp_ssl.transforms.Augment)
    aug_jitter: bool = False
    aug_hflip: bool = False
    aug_vflip: bool = False
    sampler: str = "temporaltemperaturebag"
    sampler_ttb_tmin: float = 0.3
    sampler_ttb_tmax: float = 12.0
    max_epochs: int = 50
    open_videos: int = 4
    seed: int = 42
    data_log: str | None = None
    on_shard_error: str = "fail"
    decode_on: str = "workers"  # or "device": workers ship JPEG bytes, the training process decodes
    shard_access: str = "auto"  # polyp_ssl.config.SHARD_ACCESS

    @property
    def n_bags(self) -> int:
        return self.batch_size // self.n_views

    @classmethod
    def from_config(cls, cfg: Any) -> StreamParams:
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


@dataclass
class StreamIndex:
    """What the streams need from the catalog, picklable and small (arrays and plain lists)."""

    root: str
    shard_base: str | None
    split: str
    video_ids: list[str]  # the split's usable videos, catalog order
    video_codes: np.ndarray  # int64, stable codes over the whole catalog
    video_shard: list[str]  # shard path (relative to root) of each video
    video_fragments: np.ndarray  # int64, training fragments per video
    video_eligible: np.ndarray  # int64, fragments that can anchor a bag
    samples: dict[str, tuple[int, int, int]]  # sample_key -> (video index, tracklet code, identity code)
    excluded: Counter = field(default_factory=Counter)  # reason -> count, from the catalog query
    sample_frames: dict[str, int] = field(default_factory=dict)  # sample_key -> catalog n_frames
    shard_urls: dict[str, str] = field(default_factory=dict)  # shard path -> checked location to open
    shard_identity: dict[str, ShardIdentity] = field(default_factory=dict)  # shard path -> size, sha256
    # per video, the identity codes (>= 0) of its fragments that can anchor a bag (multipos batches
    # hold each identity at most once, so a stream needs at least n_bags of them)
    video_identities: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def total_fragments(self) -> int:
        return int(self.video_fragments.sum())

    @property
    def total_anchors(self) -> int:
        """Fragments that anchor a bag once per epoch (all of them for the temporal samplers)."""
        return int(self.video_eligible.sum())

    def shard_url(self, rel: str) -> str:
        """Where to open the catalog's shard `rel`: under the root, or under --shard_base
        (shards.locations.shard_location; checked once in build_index)."""
        url = self.shard_urls.get(rel)
        return url if url is not None else shard_location(rel, self.root, self.shard_base)


def _read_table(root: Path, name: str, schema) -> Any:
    path = root / "catalog" / f"{name}.parquet"
    if not path.exists():
        raise DataConfigError(
            f"{root}: no catalog table {path.name} (this root was never ingested?); "
            f"run `polyp-ssl ingest {root}` first"
        )
    table = pq.read_table(path)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DataConfigError(f"{path}: catalog table lacks columns {missing}")
    return table.select([f.name for f in schema]).to_pydict()


def dataset_codes(root: str | Path) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Integer codes for video, tracklet and identity ids, stable for the dataset (sorted over
    every split of the catalog)."""
    root = Path(root)
    trk = _read_table(root, "tracklets", TRACKLETS)
    vids = _read_table(root, "videos", VIDEOS)
    video = {v: i for i, v in enumerate(sorted(set(vids["video_id"]) | set(trk["video_id"])))}
    tracklet = {t: i for i, t in enumerate(sorted(set(trk["tracklet_id"])))}
    identity = {d: i for i, d in enumerate(sorted({d for d in trk["identity_id"] if d}))}
    return video, tracklet, identity


def _shard_identities(root: Path, trk: dict[str, list]) -> dict[str, ShardIdentity]:
    """Check every shard value of the catalog (tracklets' `shard`, the shards table's `path`) once,
    here at the boundary, and return each shard's size and sha256 from the shards table.

    DataConfigError naming the catalog file, the row and the field for a value that is not a
    plain path relative to the root (a `pipe:` command, a URL, an absolute or climbing path), or
    a tracklet whose shard the shards table does not list."""
    shards = _read_table(root, "shards", SHARDS)
    shards_path = root / "catalog" / "shards.parquet"
    trk_path = root / "catalog" / "tracklets.parquet"
    out: dict[str, ShardIdentity] = {}
    try:
        for rel, n_bytes, sha in zip(shards["path"], shards["n_bytes"], shards["sha256"], strict=True):
            check_shard_value(rel, shards_path, f"shard {rel!r}", "path")
            out[rel] = ShardIdentity(int(n_bytes if n_bytes is not None else -1), sha or "")
        checked: set[str] = set()
        for tid, rel in zip(trk["tracklet_id"], trk["shard"], strict=True):
            if rel in checked:
                continue
            check_shard_value(rel, trk_path, f"tracklet {tid!r}")
            if rel not in out:
                raise DataConfigError(
                    f"{trk_path}: tracklet {tid!r}: field 'shard': shard {rel!r} is not listed in "
                    f"{shards_path} (re-run `polyp-ssl ingest`)"
                )
            checked.add(rel)
    except UnsafeLocation as exc:
        raise DataConfigError(str(exc)) from None
    return out


def build_index(
    root: str | Path,
    split: str,
    params: StreamParams,
    shard_base: str | None = None,
    min_tracklet_length: int | None = None,
    require_bags: bool = True,
) -> StreamIndex:
    """Read the catalog once (main process) and keep the split's usable tracklets.

    Tracklets shorter than min_tracklet_length and, with require_bags, videos whose fragments
    cannot form a single bag with the chosen sampler are left out and counted in `excluded`.
    """
    root = Path(root)
    min_len = params.min_tracklet_length if min_tracklet_length is None else min_tracklet_length
    trk = _read_table(root, "tracklets", TRACKLETS)
    identities = _shard_identities(root, trk)
    video_code, tracklet_code, identity_code = dataset_codes(root)
    excluded: Counter = Counter()
    per_video: dict[str, list[int]] = {}
    n_split = 0
    for i, (s, n) in enumerate(zip(trk["split"], trk["n_frames"], strict=False)):
        if s != split:
            continue
        n_split += 1
        if n < min_len:
            excluded["tracklet_shorter_than_min_tracklet_length"] += 1
            continue
        per_video.setdefault(trk["video_id"][i], []).append(i)
    if n_split == 0:
        raise DataConfigError(f"{root}: the catalog has no tracklets in split {split!r}")
    if not per_video:
        raise DataConfigError(
            f"{root}: none of the {n_split} {split!r} tracklets reaches --min_tracklet_length {min_len}; "
            "lower it"
        )
    flen = params.fragment_length
    index = StreamIndex(
        str(root),
        shard_base,
        split,
        [],
        np.zeros(0, np.int64),
        [],
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        {},
        excluded,
    )
    codes, frags, elig = [], [], []
    for vid, rows in per_video.items():
        shards = {trk["shard"][i] for i in rows}
        if len(shards) != 1:
            raise DataConfigError(f"{root}: video {vid!r} is split across shards {sorted(shards)}")
        counts = [
            count_fragments(trk["n_frames"][i], flen, params.fragment_stride, params.fragment_drop_last)
            for i in rows
        ]
        t_codes = np.repeat([tracklet_code[trk["tracklet_id"][i]] for i in rows], counts)
        i_codes = np.repeat([identity_code.get(trk["identity_id"][i] or "", -1) for i in rows], counts)
        n_frag = int(sum(counts))
        ok = eligible_anchors(params.sampler, t_codes, i_codes, params.n_views) if n_frag else None
        n_elig = int(ok.sum()) if ok is not None else 0
        if require_bags and n_elig == 0:
            excluded["video_without_a_bag"] += 1
            continue
        v = len(index.video_ids)
        index.video_ids.append(vid)
        index.video_shard.append(next(iter(shards)))
        codes.append(video_code[vid])
        frags.append(n_frag)
        elig.append(n_elig)
        anchor_ids = np.unique(i_codes[ok]) if ok is not None else np.zeros(0, np.int64)
        index.video_identities.append(tuple(int(x) for x in anchor_ids if x >= 0))
        for i in rows:
            index.sample_frames[trk["sample_key"][i]] = int(trk["n_frames"][i])
            index.samples[trk["sample_key"][i]] = (
                v,
                tracklet_code[trk["tracklet_id"][i]],
                identity_code.get(trk["identity_id"][i] or "", -1),
            )
    if not index.video_ids:
        raise DataConfigError(
            f"{root}: no {split!r} video has {params.n_views} (--n_views) fragments that the sampler "
            f"{params.sampler!r} can put in one bag; lower --n_views or --min_tracklet_length, or use "
            "shorter --fragment_length"
        )
    for rel in dict.fromkeys(index.video_shard):
        try:
            index.shard_urls[rel] = shard_location(rel, root, shard_base)
        except UnsafeLocation as exc:
            raise DataConfigError(f"{root / 'catalog' / 'tracklets.parquet'}: {exc}") from None
        index.shard_identity[rel] = identities[rel]
    index.video_codes = np.asarray(codes, dtype=np.int64)
    index.video_fragments = np.asarray(frags, dtype=np.int64)
    index.video_eligible = np.asarray(elig, dtype=np.int64)
    if excluded:
        log.info("%s split %r: left out %s", root, split, dict(excluded))
    return index


# ---------------------------------------------------------------- epoch arithmetic and partition


def epoch_batches(
    total_anchors: int, bags_per_batch: int, world_size: int, num_workers: int
) -> tuple[int, int]:
    """(batches per worker stream, batches per rank = the loader's length).

    One epoch = every training fragment anchors one bag: global = total_anchors // bags_per_batch
    (bags_per_batch = batch_size // n_views); per rank = ceil(global / world); per worker =
    ceil(per rank / workers); a rank's length is per worker x workers.
    """
    global_batches = total_anchors // bags_per_batch
    if global_batches == 0:
        raise DataConfigError(
            f"{total_anchors} training fragments (bag anchors) make no batch of {bags_per_batch} bags "
            "(--batch_size / --n_views); lower --batch_size or --min_tracklet_length, or add data"
        )
    per_rank = math.ceil(global_batches / world_size)
    workers = max(num_workers, 1)
    per_worker = math.ceil(per_rank / workers)
    return per_worker, per_worker * workers


def assign_videos(index: StreamIndex, n_streams: int, seed: int, epoch: int) -> list[list[int]]:
    """Video indices of each stream for one epoch: disjoint, balanced by fragment count.

    Whole shards go to streams when there are at least as many shards as streams; else single
    videos (a stream then reads a shared shard and skips the other streams' samples). With fewer
    videos than streams, the streams left empty get videos of others (resampling).
    """
    rng = np.random.default_rng([seed, epoch, 7])
    shards = sorted(set(index.video_shard))
    by_shard: dict[str, list[int]] = {s: [] for s in shards}
    for v, s in enumerate(index.video_shard):
        by_shard[s].append(v)
    if len(shards) >= n_streams:
        units = [by_shard[s] for s in shards]
    else:
        units = [[v] for v in range(len(index.video_ids))]
    loads = np.array([index.video_fragments[u].sum() for u in units], dtype=np.float64)
    perm = rng.permutation(len(units))
    order = perm[np.argsort(-loads[perm], kind="stable")]
    stream_load = np.zeros(n_streams)
    out: list[list[int]] = [[] for _ in range(n_streams)]
    for u in order:
        s = int(np.argmin(stream_load))
        out[s].extend(units[u])
        stream_load[s] += loads[u]
    n_videos = len(index.video_ids)
    for s in range(n_streams):
        if not out[s]:
            out[s] = [int(rng.integers(n_videos))]
    for s in range(n_streams):
        # read shards in a per-stream random order; a shard's videos in catalog (= shard) order
        srng = np.random.default_rng([seed, epoch, s, 11])
        shard_rank = {
            sh: r for r, sh in enumerate(srng.permutation(sorted({index.video_shard[v] for v in out[s]})))
        }
        out[s].sort(key=lambda v: (shard_rank[index.video_shard[v]], v))
    return out


# ---------------------------------------------------------------- reading shards


def _wanted_member(name: str) -> bool:
    """Read a member only if it is a sample's `.json` or a `.jpg` frame under a safe name."""
    ext = name.rpartition("/")[2].partition(".")[2]
    return (ext == "json" or ext.endswith(".jpg")) and safe_member_name(name)


def iter_tar_samples(
    url: str, stats: Counter | None = None, expect: ShardIdentity | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__` plus member suffix -> bytes) of one tar, in order. `url` is a
    location from polyp_ssl.shards.locations.shard_location: a local path, or under the user's --shard_base
    a `pipe:` command, a URL webdataset.gopen opens (http, https, gs, ...) or any other URL that
    fsspec opens (s3://, gcs://, az://, ...; shards.reader.open_shard).

    Only `.json` and `.jpg` members are read; any other member (`.pyd`, `.pickle`, ...) and any
    member whose name is absolute or climbs with `..` is left unread and counted in `stats`.
    A tar that cannot be opened or ends mid-member raises ShardError naming the last sample key;
    the incomplete sample is not yielded.

    With `expect` (the catalog's size and sha256 of this shard) every byte read is counted and
    hashed; after the last sample a shard of another size (known at open for a local file) or
    another sha256 raises ShardError `shard_changed`. It comes last, so a damaged sample is still
    named by its own reason first.
    """
    stats = stats if stats is not None else Counter()
    current: dict[str, Any] | None = None
    try:
        stream = open_shard(url)
    except (OSError, ValueError, ImportError) as exc:
        raise ShardError.at(url, None, "unreadable_shard", f"cannot open ({exc})") from exc
    reader: Any = stream
    changed: str | None = None
    if expect is not None:
        size = local_size(stream)
        if size is not None and expect.n_bytes >= 0 and size != expect.n_bytes:
            changed = f"{size} bytes, the catalog says {expect.n_bytes}"  # no need to hash it
        else:
            reader = HashingReader(stream, expect)
    try:
        for name, data in read_members(reader, _wanted_member):
            if data is None:
                stats["member_not_decoded" if safe_member_name(name) else "member_unsafe_name"] += 1
                continue
            key, _, ext = name.rpartition("/")[2].partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current
        if isinstance(reader, HashingReader):
            try:
                reader.finish()
            except ShardChanged as exc:
                changed = str(exc)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        key = current["__key__"] if current is not None else None
        if isinstance(exc, DecompressionBomb):
            raise ShardError.at(url, key, "decompression_bomb", f"not read further: {exc}") from exc
        raise ShardError.at(
            url, key, "truncated_shard", f"truncated or unreadable tar from here on ({exc})"
        ) from exc
    finally:
        stream.close()
    if changed is not None:
        raise ShardError(
            f"{url}: after its last sample: {changed}: not the shard the catalog's shards table "
            "describes (changed or replaced since ingest; `polyp-ssl verify ROOT` checks every shard) "
            "[shard_changed]",
            "shard_changed",
        )


class SampleDamage(ValueError):
    """A sample that cannot be used as the catalog describes it; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


PARSED_META = "__meta__"  # a checked sample carries its parsed TrackletSample under this key
# decoded frames a worker keeps for reuse within one batch (a 256 x 256 batch of 480 frames is 31 M);
# past it frames are decoded again, so memory stays bounded whatever sizes the JSON declares
DECODE_CACHE_PIXELS = 64 << 20


def check_sample(sample: dict[str, Any], catalog_frames: int | None) -> TrackletSample:
    """The sample's metadata, after checking it against the catalog; raises SampleDamage.

    The JSON is validated as data (shards.sample.parse_sample: `bad_json`, or `json_mismatch`
    when its per-frame lists disagree in length). JPEGs get a cheap structural check here (start
    and end markers) and their header's size is compared with the JSON's crop_sizes before any
    decoding (`json_mismatch`); a JPEG that passes but does not decode, or whose header cannot be
    read, is named when its batch is decoded, where it is never handed to a decoder.
    """
    key = sample["__key__"]
    try:
        meta = sample_meta(sample)
    except SampleError as exc:
        reason = "json_mismatch" if exc.kind == "length" else "bad_json"
        raise SampleDamage(reason, f"JSON member: {exc}") from exc
    if meta.key != key:
        raise SampleDamage("json_mismatch", f"JSON key {meta.key!r} differs from the member key")
    if catalog_frames is not None and meta.n_frames != catalog_frames:
        raise SampleDamage("json_mismatch", f"JSON has {meta.n_frames} frames, the catalog {catalog_frames}")
    for i in range(meta.n_frames):
        name = f"{i:04d}.jpg"
        data = sample.get(name)
        if data is None:
            raise SampleDamage("jpeg_missing", f"no member .{name}")
        if not data.startswith(b"\xff\xd8") or b"\xff\xd9" not in data[-64:]:
            raise SampleDamage("corrupt_jpeg", f"member .{name} is not a complete JPEG ({len(data)} bytes)")
        try:
            w, h = jpeg_size(data)
        except ValueError:
            continue  # never decoded: named by check_frame when its batch is made
        if [w, h] != list(meta.crop_sizes[i]):
            raise SampleDamage(
                "json_mismatch",
                f"member .{name} is a {w}x{h} JPEG, the JSON's crop_sizes say "
                f"{meta.crop_sizes[i][0]}x{meta.crop_sizes[i][1]}",
            )
    return meta


def check_frame(data: bytes, meta: TrackletSample, i: int, shard: str) -> tuple[int, int]:
    """Frame i's JPEG header against the JSON's crop_sizes (and shards.sample.MAX_FRAME_PIXELS),
    before anything decodes it: ShardError `corrupt_jpeg` when it has no readable header,
    `json_mismatch` when its size differs."""
    try:
        return check_jpeg(data, meta.crop_sizes[i])
    except JpegSizeError as exc:
        if exc.kind == "no_header":
            detail = f"frame {i} does not decode ({exc})"
            raise ShardError.at(shard, meta.key, "corrupt_jpeg", detail) from None
        raise ShardError.at(shard, meta.key, "json_mismatch", f"frame {i} is {exc}") from None


def decode_frame(
    data: bytes, meta: TrackletSample, i: int, shard: str, decode: Callable[[bytes], torch.Tensor]
) -> torch.Tensor:
    """Frame i decoded, its header checked first (check_frame) and its decoded size after."""
    check_frame(data, meta, i, shard)
    try:
        img = decode(data)
    except (RuntimeError, ValueError) as exc:
        raise ShardError.at(shard, meta.key, "corrupt_jpeg", f"frame {i} does not decode ({exc})") from exc
    check_size(img.shape[-1], img.shape[-2], meta, i, shard)
    return img


# ---------------------------------------------------------------- videos, fragments, bags


@dataclass
class _FragRef:
    key: str
    frames: tuple[int, ...]
    position: float
    tracklet: int
    identity: int


@dataclass
class _OpenVideo:
    index: int
    code: int
    samples: dict[str, dict[str, Any]]
    metas: dict[str, TrackletSample]
    frags: list[_FragRef]
    bags: list[np.ndarray]  # remaining bags, in drawn (shuffled) order


def video_fragments(
    samples: list[dict[str, Any]], metas: list[TrackletSample], codes: list[tuple[int, int]], p: StreamParams
) -> list[_FragRef]:
    out = []
    for s, meta, (t_code, i_code) in zip(samples, metas, codes, strict=False):
        for f in cut_tracklet(
            meta.frame_ids,
            meta.video_first_frame,
            meta.video_last_frame,
            p.fragment_length,
            p.fragment_stride,
            p.fragment_drop_last,
            p.min_tracklet_length,
        ):
            out.append(_FragRef(s["__key__"], f.frame_indices, f.position, t_code, i_code))
    return out


def open_video(
    v: int,
    code: int,
    samples: list[dict[str, Any]],
    codes: list[tuple[int, int]],
    p: StreamParams,
    rng: np.random.Generator,
    temperature: float,
    stats: Counter,
) -> _OpenVideo:
    metas = [s.pop(PARSED_META, None) or sample_meta(s) for s in samples]
    frags = video_fragments(samples, metas, codes, p)
    pos = np.array([f.position for f in frags])
    trk = np.array([f.tracklet for f in frags], dtype=np.int64)
    ide = np.array([f.identity for f in frags], dtype=np.int64)
    bags: list[np.ndarray] = []
    if len(frags) >= p.n_views:
        anchors = epoch_anchors(eligible_anchors(p.sampler, trk, ide, p.n_views), rng)
        result = sample_bags(p.sampler, pos, trk, ide, anchors, p.n_views, rng, temperature)
        stats.update(result.skipped)
        bags = list(result.bags)
    else:
        stats["video_too_few_fragments"] += 1
    drop_unused_jpegs(samples, frags, bags)
    return _OpenVideo(v, code, {s["__key__"]: s for s in samples}, {m.key: m for m in metas}, frags, bags)


def drop_unused_jpegs(samples: list[dict[str, Any]], frags: list[_FragRef], bags: list[np.ndarray]) -> None:
    """Free the JPEG bytes no bag uses (frames between strides, fragments not drawn): an open
    video then holds only what its batches will decode."""
    used: dict[str, set[int]] = {}
    for bag in bags:
        for m in bag:
            fr = frags[int(m)]
            used.setdefault(fr.key, set()).update(fr.frames)
    for sample in samples:
        keep = used.get(sample["__key__"], set())
        for ext in [e for e in sample if e.endswith(".jpg")]:
            if int(ext.split(".", 1)[0]) not in keep:
                del sample[ext]


def bag_identity(ov: _OpenVideo, bag: np.ndarray) -> int:
    """The identity code of a bag: its anchor's (a multipos bag is one identity)."""
    return ov.frags[int(bag[0])].identity


def pool_identities(pool: list[_OpenVideo]) -> set[int]:
    """The distinct identities of the bags left in the pool."""
    return {bag_identity(ov, b) for ov in pool for b in ov.bags}


def can_fill(pool: list[_OpenVideo], n_bags: int, distinct_identities: bool = False) -> bool:
    """Whether take_batch can form a full batch of n_bags from the pool now."""
    if distinct_identities:
        return len(pool_identities(pool)) >= n_bags
    return sum(len(o.bags) for o in pool) >= n_bags


def take_batch(
    pool: list[_OpenVideo], n_bags: int, rng: np.random.Generator, distinct_identities: bool = False
) -> list[tuple[_OpenVideo, np.ndarray]]:
    """n_bags bags from the open videos, one per video in a random video order, round after round,
    so a batch spans as many videos as the pool holds. Exhausted videos leave the pool.

    With distinct_identities (the multipos sampler), no two bags of the batch share an identity: each
    video gives its latest-drawn bag of an identity not yet in the batch, or none this round. The
    rounds stop when no bag left has a new identity, so the batch is full whenever
    ``can_fill(pool, n_bags, True)`` held; otherwise it is short (callers check can_fill first)."""
    chosen: list[tuple[_OpenVideo, np.ndarray]] = []
    used: set[int] = set()
    while len(chosen) < n_bags:
        live = [ov for ov in pool if ov.bags]
        if not live:
            break
        progress = False
        for j in rng.permutation(len(live)):
            if len(chosen) == n_bags:
                break
            ov = live[j]
            if not distinct_identities:
                chosen.append((ov, ov.bags.pop()))
                progress = True
                continue
            fresh = (i for i in range(len(ov.bags) - 1, -1, -1) if bag_identity(ov, ov.bags[i]) not in used)
            pick = next(fresh, None)
            if pick is None:
                continue
            bag = ov.bags.pop(pick)
            used.add(bag_identity(ov, bag))
            chosen.append((ov, bag))
            progress = True
        if not progress:
            break
    pool[:] = [ov for ov in pool if ov.bags]
    return chosen


@dataclass
class Row:
    """One fragment of a batch, whichever path read it: its bag, codes, the JSON fields decoding
    needs (a TrackletSample or polyp_ssl.span_index.FrameMeta), its frame indices and their JPEGs."""

    bag: int
    video: int  # video code
    video_index: int  # index in the StreamIndex
    tracklet: int
    identity: int
    position: float
    meta: Any
    frames: tuple[int, ...]
    jpegs: dict[int, bytes]
    shard: str  # where the JPEGs were read (for messages)
    crop: Any = None  # CropParams, drawn when the batch is made


# ---------------------------------------------------------------- the dataset


class SharedState:
    """Counters shared with persistent workers (created in the loader's multiprocessing context):
    the epoch, and the batches to skip in one epoch when resuming."""

    def __init__(self, ctx: Any = None) -> None:
        make = ctx.Value if ctx is not None else mp.Value
        self.epoch = make("q", 0)
        self.skip_epoch = make("q", -1)
        self.skip_batches = make("q", 0)
        self.skips = (ctx.Array if ctx is not None else mp.Array)("q", len(SKIP_REASONS))

    def add_skip(self, reason: str, n: int = 1) -> None:
        with self.skips.get_lock():
            self.skips[SKIP_REASONS.index(reason)] += n

    def skip_counts(self) -> dict[str, int]:
        """Samples (or shard remainders) skipped so far, by reason, over all of this rank's streams."""
        with self.skips.get_lock():
            return {r: int(n) for r, n in zip(SKIP_REASONS, self.skips[:], strict=True) if n}


META_CACHE = 4096  # tracklets whose crop geometry a worker keeps as lists (a few KB each)


def resolve_access(mode: str, index: StreamIndex) -> str:
    """`random` or `sequential` for --shard_access `mode` (polyp_ssl.config.SHARD_ACCESS): auto is
    random when every shard is a local plain tar file, else sequential (said once in the log)."""
    if mode not in SHARD_ACCESS:
        raise DataConfigError(f"--shard_access {mode!r}: choose one of {SHARD_ACCESS}")
    if mode == "sequential":
        return mode
    if local_paths(index) is not None:
        return "random"
    where = index.shard_base or index.root
    if mode == "random":
        raise DataConfigError(
            f"--shard_access random: the shards under {where} are not local plain .tar files (a pipe:, "
            "remote or compressed location has no offsets to read at); use --shard_access sequential"
        )
    log.info(
        "shards under %s are not local .tar files: reading them sequentially (batches come from the "
        "few videos each stream holds open; see --shard_access)",
        where,
    )
    return "sequential"


class BagStream(IterableDataset):
    """Finished training batches (docs/architecture.md "Batches"), batching inside the dataset."""

    def __init__(
        self,
        index: StreamIndex,
        params: StreamParams,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shared: SharedState | None = None,
        batches_per_worker: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if params.decode_on not in DECODE_ON:
            raise DataConfigError(f"--decode_on {params.decode_on!r}: choose one of {DECODE_ON}")
        if params.fragment_length < 1:
            raise DataConfigError("training needs a fixed --fragment_length (>= 1)")
        if params.batch_size < params.n_views:
            raise DataConfigError(f"--batch_size {params.batch_size} < --n_views {params.n_views}")
        if params.batch_size % params.n_views:
            raise DataConfigError(
                f"--batch_size {params.batch_size} is not a multiple of --n_views {params.n_views}"
            )
        self.index = index
        self.params = params
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shared = shared or SharedState()
        if batches_per_worker is not None:  # a fixed epoch length instead of one pass over the data
            self.per_worker, self.length = batches_per_worker, batches_per_worker * max(num_workers, 1)
        else:
            self.per_worker, self.length = epoch_batches(
                index.total_anchors, params.n_bags, world_size, num_workers
            )
        self.stats: Counter = Counter()
        self.decode = decode_jpeg_bytes
        self.distinct_identities = params.sampler == "multipos"
        self.access = resolve_access(params.shard_access, index)
        self.spans: SpanTable | None = None
        self.frags: SplitFragments | None = None
        if self.access == "random":
            # built here, in the main process: workers inherit it, and a damaged JSON fails early
            self.spans, self.frags = build_span_index(index, params, params.on_shard_error)
            self.slot_of = {k: i for i, k in enumerate(self.spans.keys)}
            for reason, n in self.build_skips.items():
                if reason in SKIP_REASONS:
                    self.stats[f"skipped_{reason}"] += n
                    self.shared.add_skip(reason, n)
            self.bad_slots: set[int] = set()
            self.bad_shards: set[str] = set()
            self._reader: SpanReader | None = None
            self._reader_pid = -1
            self._metas: OrderedDict[int, FrameMeta] = OrderedDict()
            if self.distinct_identities:
                self.check_split_identities()
        elif self.distinct_identities:  # fail here, in the main process, rather than in a worker
            self.check_stream_identities(0)

    def check_split_identities(self) -> None:
        """multipos with random access: DataConfigError when the split holds fewer identities that
        anchor a bag than the bags of a batch (every stream draws from the whole split)."""
        p = self.params
        every = {i for ids in self.index.video_identities for i in ids}
        if len(every) < p.n_bags:
            raise DataConfigError(
                f"--sampler multipos: the split {self.index.split!r} has {len(every)} distinct identities "
                f"(polyps) with a bag, fewer than the {p.n_bags} bags of a batch (--batch_size "
                f"{p.batch_size} / --n_views {p.n_views}), and a batch holds each identity at most once; "
                "lower --batch_size"
            )

    @property
    def build_skips(self) -> Counter:
        """Samples left out while the span index was built (--on_shard_error warn), by reason."""
        return self.spans.skipped if self.spans is not None else Counter()

    def check_stream_identities(self, epoch: int) -> None:
        """multipos: DataConfigError when a stream's videos hold fewer distinct identities that
        anchor a bag than the bags of a batch (a batch holds each identity at most once)."""
        if not self.distinct_identities or not self.index.video_identities:
            return
        p = self.params
        every = {i for ids in self.index.video_identities for i in ids}
        parts = assign_videos(self.index, self.n_streams, p.seed, epoch)
        for stream, videos in enumerate(parts):
            have = {i for v in videos for i in self.index.video_identities[v]}
            if len(have) < p.n_bags:
                scope = (
                    f"the split {self.index.split!r} has"
                    if len(every) < p.n_bags
                    else f"stream {stream} of {self.n_streams} (ranks x workers) gets videos with"
                )
                raise DataConfigError(
                    f"--sampler multipos: {scope} {len(have)} distinct identities (polyps) with a bag, "
                    f"fewer than the {p.n_bags} bags of a batch (--batch_size {p.batch_size} / --n_views "
                    f"{p.n_views}), and a batch holds each identity at most once; lower --batch_size, or "
                    "use fewer devices or --num_workers"
                )

    def __len__(self) -> int:
        return self.length

    @property
    def n_streams(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != max(self.num_workers, 1):
            raise RuntimeError(f"BagStream built for {self.num_workers} workers runs under {nw}")
        epoch = int(self.shared.epoch.value)
        skip = int(self.shared.skip_batches.value) if int(self.shared.skip_epoch.value) == epoch else 0
        # the DataLoader takes batches from workers round-robin starting at worker 0; after skipping
        # `skip` batches the next one is logical worker skip % nw's, so rotate the roles
        logical = (wid + skip) % nw
        skip_mine = max(0, math.ceil((skip - logical) / nw))
        yield from self.iter_stream(epoch, self.rank * nw + logical, skip_mine)

    def damaged(self, err: ShardError) -> None:
        """--on_shard_error: `fail` raises `err`; `warn` counts it and logs it (rate-limited)."""
        if self.params.on_shard_error != "warn":
            raise err
        self.stats[f"skipped_{err.reason}"] += 1
        self.shared.add_skip(err.reason)
        n = self.stats[f"skipped_{err.reason}"]
        if n <= 5 or math.log10(n).is_integer():
            log.warning("rank %d: skipped (%s, %d so far in this stream): %s", self.rank, err.reason, n, err)

    def _iter_videos(self, videos: list[int]) -> Iterator[tuple[int, list[dict], list[tuple[int, int]]]]:
        wanted = set(videos)
        ix = self.index
        by_shard: dict[str, None] = dict.fromkeys(ix.video_shard[v] for v in videos)
        expected: dict[str, list[str]] = {}
        for k, (v, _, _) in ix.samples.items():
            if v in wanted:
                expected.setdefault(ix.video_shard[v], []).append(k)
        for rel in by_shard:
            url = ix.shard_url(rel)
            cur_v, cur, cur_codes = -1, [], []
            seen: set[str] = set()
            samples = iter_tar_samples(url, self.stats, ix.shard_identity.get(rel))
            changed: ShardError | None = None  # reported after the samples' own reasons
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    break
                except ShardError as err:
                    if err.reason == "shard_changed":
                        changed = err
                    else:
                        self.damaged(err)
                    break
                key = sample["__key__"]
                entry = ix.samples.get(key)
                if entry is None:
                    self.stats["sample_not_in_index"] += 1
                    continue
                v, t_code, i_code = entry
                if v not in wanted:
                    self.stats["sample_of_other_stream"] += 1
                    continue
                if key in seen:  # a second sample with this key would train twice
                    self.damaged(ShardError.at(url, key, "duplicate_sample", "appears twice in the shard"))
                    continue
                seen.add(key)
                try:
                    sample[PARSED_META] = check_sample(sample, ix.sample_frames.get(key))
                except SampleDamage as bad:
                    self.damaged(ShardError.at(url, key, bad.reason, str(bad)))
                    continue
                if v != cur_v and cur:
                    yield cur_v, cur, cur_codes
                    cur, cur_codes = [], []
                cur_v = v
                cur.append(sample)
                cur_codes.append((t_code, i_code))
            missing = [k for k in expected.get(rel, []) if k not in seen]
            for k in missing:
                self.damaged(
                    ShardError.at(
                        url,
                        k,
                        "sample_missing_from_shard",
                        f"listed in the catalog but not in the shard ({len(missing)} such samples)",
                    )
                )
            if changed is not None:
                self.damaged(changed)
                cur = []  # warn: what is left of a changed shard is not used
            if cur:
                yield cur_v, cur, cur_codes

    def iter_stream(self, epoch: int, stream: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Exactly `per_worker` batches of stream `stream` in `epoch`; the first `skip` are formed
        (bags drawn) but not decoded nor yielded."""
        if self.access == "random":
            yield from self.iter_planned(epoch, stream, skip)
            return
        p = self.params
        videos = assign_videos(self.index, self.n_streams, p.seed, epoch)[stream]
        temperature = temporal_temperature(epoch, p.max_epochs, p.sampler_ttb_tmin, p.sampler_ttb_tmax)
        distinct = self.distinct_identities
        if distinct and epoch:
            self.check_stream_identities(epoch)
        pool: list[_OpenVideo] = []
        done = 0
        n_pass = 0
        while done < self.per_worker:
            added = 0
            done_before = done
            for v, samples, codes in self._iter_videos(videos):
                code = int(self.index.video_codes[v])
                rng = np.random.default_rng([p.seed, epoch, stream, n_pass, code])
                ov = open_video(v, code, samples, codes, p, rng, temperature, self.stats)
                if not ov.bags:
                    continue
                rng.shuffle(ov.bags)
                if distinct:
                    # a video's new pass replaces what is left of its previous one: the pool holds at
                    # most one entry per video, whatever the identities' imbalance
                    old = [o for o in pool if o.index == v]
                    if old:
                        self.stats["multipos_bags_replaced_by_next_pass"] += sum(len(o.bags) for o in old)
                        pool[:] = [o for o in pool if o.index != v]
                pool.append(ov)
                added += len(ov.bags)
                while (
                    done < self.per_worker
                    and len(pool) >= p.open_videos
                    and can_fill(pool, p.n_bags, distinct)
                ):
                    yield from self._emit(pool, epoch, stream, done, skip)
                    done += 1
                if done >= self.per_worker:
                    break
            n_pass += 1
            if added == 0:
                raise RuntimeError(
                    f"stream {stream} (rank {self.rank}): its videos "
                    f"{[self.index.video_ids[v] for v in videos][:5]} gave no bag; "
                    "shards and catalog disagree?"
                )
            # end of a pass: fewer open videos than open_videos is all this stream has; and when the
            # bags left finish the epoch, use them rather than start a pass that repeats anchors
            while (
                done < self.per_worker
                and pool
                and can_fill(pool, p.n_bags, distinct)
                and (
                    distinct  # the pool holds at most one entry per video: it cannot grow by waiting
                    or len(pool) >= min(p.open_videos, len(videos))
                    or (self.per_worker - done) * p.n_bags <= sum(len(o.bags) for o in pool)
                )
            ):
                yield from self._emit(pool, epoch, stream, done, skip)
                done += 1
            if distinct and done == done_before and done < self.per_worker:
                # a whole pass re-opened every video and still no batch of distinct identities:
                # another pass cannot do better (samples skipped as damaged, or catalog disagreement)
                raise DataConfigError(
                    f"--sampler multipos: stream {stream} (rank {self.rank}): its readable videos give bags "
                    f"of only {len(pool_identities(pool))} distinct identities, fewer than the {p.n_bags} "
                    "bags of a batch; lower --batch_size"
                )
        if pool:
            self.stats["bags_left_at_epoch_end"] += sum(len(o.bags) for o in pool)

    # ------------------------------------------------------------ random access: the epoch plan

    def iter_planned(self, epoch: int, stream: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Exactly `per_worker` batches of stream `stream` in `epoch`, taken from the epoch's global
        plan (polyp_ssl.epoch_plan: every bag of the split shuffled together), each frame read at
        its catalog span; the first `skip` are not read at all (resuming costs nothing)."""
        p = self.params
        assert self.frags is not None
        temperature = temporal_temperature(epoch, p.max_epochs, p.sampler_ttb_tmin, p.sampler_ttb_tmax)
        plan = plan_epoch(self.frags, p.sampler, p.n_views, p.n_bags, p.seed, epoch, temperature)
        if plan.n_batches == 0:
            raise DataConfigError(
                f"epoch {epoch}: the {len(plan.bags)} bags of split {self.index.split!r} make no batch of "
                f"{p.n_bags} bags (--batch_size / --n_views); lower --batch_size"
            )
        self.stats.update(plan.skipped)
        nw = max(self.num_workers, 1)
        ids = stream_batches(
            plan.n_batches,
            self.rank,
            self.world_size,
            stream - self.rank * nw,
            self.num_workers,
            self.per_worker,
        )
        for k, g in enumerate(ids):
            if k < skip:
                continue
            yield self.planned_batch(plan, int(g), epoch, stream, k)

    def planned_batch(self, plan: EpochPlan, g: int, epoch: int, stream: int, batch_i: int) -> dict:
        """Global batch g of the plan. Under --on_shard_error warn a bag with a damaged frame is
        replaced by the next readable bag of the plan (its identity new to the batch for multipos),
        so batches stay full; under fail the damage is raised."""
        p = self.params
        bags = [int(b) for b in plan.batches[g]]
        for _ in range(8 * p.n_bags + 8):
            bags = self.replace_unusable(plan, g, bags)
            rng = np.random.default_rng([p.seed, epoch, g, 3])
            try:
                batch = self.batch_from_rows(self.planned_rows(plan, bags), rng)
            except ShardError as err:
                self.damaged(err)  # raises under fail
                self.mark_bad(err)
                continue
            if p.data_log:
                with open(f"{p.data_log}.rank{self.rank}", "a") as fh:
                    vids = sorted({self.index.video_ids[v] for v in self.frags.video_of(plan.bags[bags, 0])})
                    fh.write(f"{epoch} {stream} {batch_i} {' '.join(vids)}\n")
            return batch
        raise RuntimeError(f"rank {self.rank}: batch {g} of epoch {epoch}: every replacement bag was damaged")

    def mark_bad(self, err: ShardError) -> None:
        """Remember damage so that no later batch of this stream reads it again: a changed or
        unreadable shard whole, otherwise the sample."""
        slot = self.slot_of.get(err.key) if err.key is not None else None
        if slot is None:
            raise err
        if err.reason in ("shard_changed", "unreadable_shard"):
            self.bad_shards.add(self.spans.shard[slot])
        else:
            self.bad_slots.add(slot)

    def replace_unusable(self, plan: EpochPlan, g: int, bags: list[int]) -> list[int]:
        if not self.bad_slots and not self.bad_shards:
            return bags
        slots, shard = self.frags.slot, self.spans.shard

        def usable(b: int) -> bool:
            return all(
                int(slots[f]) not in self.bad_slots and shard[int(slots[f])] not in self.bad_shards
                for f in plan.bags[b]
            )

        keep = [b for b in bags if usable(b)]
        if len(keep) == len(bags):
            return bags
        identity = self.frags.identity
        held = {int(identity[plan.bags[b, 0]]) for b in keep}
        taken = set(keep)
        n = plan.n_batches
        for h in range(1, n + 1):
            for b in plan.batches[(g + h) % n]:
                b = int(b)
                ide = int(identity[plan.bags[b, 0]])
                if b in taken or (self.distinct_identities and ide in held) or not usable(b):
                    continue
                keep.append(b)
                taken.add(b)
                held.add(ide)
                self.stats["bags_replaced_after_damage"] += 1
                if len(keep) == len(bags):
                    return keep
        raise DataConfigError(
            f"rank {self.rank}: too few readable bags left to fill a batch of {len(bags)} "
            f"({len(self.bad_slots)} samples and {len(self.bad_shards)} shards skipped as damaged)"
        )

    def span_reader(self) -> SpanReader:
        """This process's reader (file descriptors are not shared across the workers' fork)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = SpanReader(), os.getpid()
            self._metas.clear()
        return self._reader

    def frame_meta(self, slot: int) -> FrameMeta:
        meta = self._metas.get(slot)
        if meta is None:
            meta = self._metas[slot] = self.spans.meta(slot)
            if len(self._metas) > META_CACHE:
                self._metas.popitem(last=False)
        else:
            self._metas.move_to_end(slot)
        return meta

    def planned_rows(self, plan: EpochPlan, bags: list[int]) -> list[Row]:
        """The batch's rows with their JPEGs read at their spans (each frame once per batch)."""
        sp, fr, ix = self.spans, self.frags, self.index
        reader = self.span_reader()
        read: dict[tuple[int, int], bytes] = {}
        rows = []
        for b, bag in enumerate(bags):
            members = plan.bags[bag]
            for f, v in zip(members, fr.video_of(members), strict=True):
                slot = int(fr.slot[f])
                meta = self.frame_meta(slot)
                rel = sp.shard[slot]
                url = ix.shard_url(rel)
                frames = tuple(int(i) for i in fr.frames[f])
                jpegs = {}
                for i in frames:
                    data = read.get((slot, i))
                    if data is None:
                        try:
                            data = reader.read(sp.path[rel], sp.span(slot, i), sp.shard_bytes[rel])
                        except MemberError as exc:
                            raise ShardError.at(url, meta.key, exc.reason, f"frame {i}: {exc}") from None
                        except OSError as exc:
                            raise ShardError.at(
                                url, meta.key, "unreadable_shard", f"cannot read ({exc})"
                            ) from exc
                        read[(slot, i)] = data
                    jpegs[i] = data
                rows.append(
                    Row(
                        b,
                        int(ix.video_codes[v]),
                        int(v),
                        int(fr.tracklet[f]),
                        int(fr.identity[f]),
                        float(fr.position[f]),
                        meta,
                        frames,
                        jpegs,
                        url,
                    )
                )
        return rows

    def _emit(self, pool: list[_OpenVideo], epoch: int, stream: int, batch_i: int, skip: int):
        p = self.params
        rng = np.random.default_rng([p.seed, epoch, stream, batch_i, 3])
        chosen = take_batch(pool, p.n_bags, rng, self.distinct_identities)
        if batch_i < skip:
            return
        batch = self.decode_batch(chosen, rng)
        if p.data_log:
            with open(f"{p.data_log}.rank{self.rank}", "a") as fh:
                vids = sorted({self.index.video_ids[ov.index] for ov, _ in chosen})
                fh.write(f"{epoch} {stream} {batch_i} {' '.join(vids)}\n")
        yield batch

    def decode_batch(self, chosen: list[tuple[_OpenVideo, np.ndarray]], rng: np.random.Generator) -> dict:
        """The batch dict of bags chosen from open videos (the sequential path)."""
        rows = []
        for b, (ov, members) in enumerate(chosen):
            shard = self.index.shard_url(self.index.video_shard[ov.index])
            for m in members:
                fr = ov.frags[int(m)]
                sample = ov.samples[fr.key]
                jpegs = {i: frame_jpeg(sample, i) for i in fr.frames}
                rows.append(
                    Row(
                        b,
                        ov.code,
                        ov.index,
                        fr.tracklet,
                        fr.identity,
                        fr.position,
                        ov.metas[fr.key],
                        fr.frames,
                        jpegs,
                        shard,
                    )
                )
        return self.batch_from_rows(rows, rng)

    def batch_from_rows(self, rows: list[Row], rng: np.random.Generator) -> dict:
        """The batch dict of the rows (one per fragment, bag by bag): each fragment's anchor crop is
        drawn here; only the rows' JPEGs are decoded and cropped, or (decode_on device) packed with
        their crop windows for the training process to decode (polyp_ssl.device_decode)."""
        p = self.params
        augment = Augment.from_config(p)
        for row in rows:
            row.crop = draw_crop_params(p.bbox_scale_factor, rng, row.meta.params.get("crop_scale"), augment)
        out = self.encode_rows(rows) if p.decode_on == "device" else {"frames": self.decode_rows(rows)}
        out.update(
            {
                "bag": torch.tensor([r.bag for r in rows], dtype=torch.int64),
                "video": torch.tensor([r.video for r in rows], dtype=torch.int64),
                "tracklet": torch.tensor([r.tracklet for r in rows], dtype=torch.int64),
                "identity": torch.tensor([r.identity for r in rows], dtype=torch.int64),
                "position": torch.tensor([r.position for r in rows], dtype=torch.float32),
                "videos_per_batch": torch.tensor(len({r.video_index for r in rows}), dtype=torch.int64),
            }
        )
        return out

    def decode_rows(self, rows: list[Row]) -> torch.Tensor:
        """uint8 [B, S, 3, im_size, im_size], each distinct JPEG decoded once, each resized frame
        written once into its slot of one preallocated batch (no stacking)."""
        p = self.params
        cache: dict[tuple[str, int], torch.Tensor] = {}
        cached_px = 0  # decoded images kept for reuse in this batch, bounded by DECODE_CACHE_PIXELS
        frames = batch_buffer((len(rows), p.fragment_length, 3, p.im_size, p.im_size))
        for n, row in enumerate(rows):
            meta, params = row.meta, row.crop
            for j, i in enumerate(row.frames):
                img = cache.get((meta.key, i))
                if img is None:
                    img = decode_frame(row.jpegs[i], meta, i, row.shard, self.decode)
                    if cached_px + img.shape[-1] * img.shape[-2] <= DECODE_CACHE_PIXELS:
                        cache[(meta.key, i)] = img
                        cached_px += img.shape[-1] * img.shape[-2]
                frames[n, j].copy_(crop_resize(img, meta.boxes_in_crop[i], params, p.im_size))
            if params.hflip or params.vflip:
                frames[n] = apply_flips(frames[n], params)
        return frames

    def encode_rows(self, rows: list[Row]) -> dict[str, Any]:
        """The rows' distinct JPEGs as bytes plus each frame's JPEG index, crop window and the
        rows' flips (the keys of polyp_ssl.device_decode); the windows come from the stored crop
        sizes in the sample JSON, so nothing is decoded here."""
        p = self.params
        slot: dict[tuple[str, int], int] = {}
        jpegs: list[bytes] = []
        names: list[str] = []
        which: list[list[int]] = []
        windows: list[list[tuple[int, int, int, int]]] = []
        for row in rows:
            meta = row.meta
            which.append([])
            windows.append([])
            for i in row.frames:
                m = slot.get((meta.key, i))
                if m is None:
                    m = slot[(meta.key, i)] = len(jpegs)
                    data = row.jpegs[i]
                    check_frame(data, meta, i, row.shard)
                    jpegs.append(data)
                    names.append(f"{row.shard}: sample {meta.key!r}: frame {i}")
                which[-1].append(m)
                w, h = meta.crop_sizes[i]
                windows[-1].append(crop_window(meta.boxes_in_crop[i], row.crop, w, h))
        data, offsets = pack_jpegs(jpegs)
        return {
            "jpeg_data": data,
            "jpeg_offsets": offsets,
            "jpeg_names": names,
            "frame_jpeg": torch.tensor(which, dtype=torch.int64).view(len(rows), p.fragment_length),
            "frame_window": torch.tensor(windows, dtype=torch.int64).view(len(rows), p.fragment_length, 4),
            "flips": torch.tensor([[r.crop.hflip, r.crop.vflip] for r in rows], dtype=torch.bool).view(-1, 2),
        }


def check_size(width: int, height: int, meta: TrackletSample, i: int, shard: str) -> None:
    """A frame's JPEG must have the size its JSON gives (crop_sizes), which the anchor-crop windows
    are computed from; ShardError (json_mismatch) otherwise."""
    if [width, height] != list(meta.crop_sizes[i]):
        raise ShardError.at(
            shard,
            meta.key,
            "json_mismatch",
            f"frame {i} is a {width}x{height} JPEG, the JSON's crop_sizes say "
            f"{meta.crop_sizes[i][0]}x{meta.crop_sizes[i][1]}",
        )


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a loader worker, made in shared memory from the start (as
    torch's default_collate does), so that handing the batch to the main process does not copy it
    into shared memory again (a second full copy of every frame, about as slow as decoding)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    proto = torch.empty(0, dtype=torch.uint8)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)


class StreamLoader(DataLoader):
    """DataLoader over a BagStream (batch_size=None, persistent workers) with a resumable state
    {epoch, batches_seen, seed}, which Lightning saves in the checkpoint and restores."""

    def __init__(
        self, dataset: BagStream, pin_memory: bool = False, prefetch_factor: int | None = None
    ) -> None:
        workers = dataset.num_workers
        ctx = mp.get_context() if workers > 0 else None
        dataset.shared = SharedState(ctx)
        for reason, n in dataset.build_skips.items():
            if reason in SKIP_REASONS:
                dataset.shared.add_skip(reason, n)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs.update(
                multiprocessing_context=ctx, persistent_workers=True, prefetch_factor=prefetch_factor or 2
            )
        super().__init__(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, **kwargs)
        self.epoch = 0
        self.batches_seen = 0
        self._resume: tuple[int, int] | None = None
        # decode_on device: where a background thread decodes batches ahead of the step (set by the
        # data module once the device is known); None leaves batches encoded
        self.decode_device: torch.device | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_seen": self.batches_seen, "seed": self.dataset.params.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.dataset.params.seed)) != self.dataset.params.seed:
            log.warning(
                "resuming with seed %s, the checkpoint's loader used %s: the data order differs",
                self.dataset.params.seed,
                state.get("seed"),
            )
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["batches_seen"]))

    def __iter__(self):
        skip = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        self._resume = None
        shared = self.dataset.shared
        shared.epoch.value = self.epoch
        shared.skip_epoch.value = self.epoch if skip else -1
        shared.skip_batches.value = skip
        self.batches_seen = skip
        batches = super().__iter__()
        if self.decode_device is not None and self.dataset.params.decode_on == "device":
            batches = iter(DevicePrefetcher(batches, self.decode_device, self.dataset.params.im_size))
        return self._counted(batches)

    def _counted(self, it):
        for batch in it:
            self.batches_seen += 1
            yield batch


# ---------------------------------------------------------------- validation: whole tracklets


class ValTracklets(IterableDataset):
    """Whole val tracklets (every fragment_stride-th frame, at most max_frames, evenly spread),
    deterministic anchor crop, padded batches with `mask`; rank r takes items r, r + world, ...
    padded with copies of real items (`valid` False, same tracklet code) so every rank runs the
    same number of batches and a gather that de-duplicates by tracklet sees each tracklet once."""

    def __init__(
        self,
        index: StreamIndex,
        params: StreamParams,
        batch_size: int,
        max_frames: int = 64,
        rank: int = 0,
        world_size: int = 1,
        aug_anchorcrop: bool = False,
    ) -> None:
        self.index, self.params, self.batch_size = index, params, batch_size
        self.max_frames, self.rank, self.world_size, self.aug = max_frames, rank, world_size, aug_anchorcrop
        keys = sorted(
            index.samples, key=lambda k: (index.video_shard[index.samples[k][0]], index.samples[k][0], k)
        )
        self.per_rank = math.ceil(len(keys) / world_size)
        self.all_keys = keys
        self.keys = keys[rank::world_size]
        self.n_batches = math.ceil(self.per_rank / batch_size) if self.per_rank else 0

    def __len__(self) -> int:
        return self.n_batches

    def _items(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """(sample, valid): the rank's samples in order, then copies of the first samples of the
        split as padding (valid False; their tracklet codes repeat, so a gather de-duplicates)."""
        ix = self.index
        pads = self.all_keys[: self.per_rank - len(self.keys)]
        wanted = set(self.keys) | set(pads)
        got: dict[str, dict] = {}
        for rel in dict.fromkeys(ix.video_shard[ix.samples[k][0]] for k in [*self.keys, *pads]):
            for s in iter_tar_samples(ix.shard_url(rel), expect=ix.shard_identity.get(rel)):
                if s["__key__"] in wanted:
                    got[s["__key__"]] = s
        missing = wanted - set(got)
        if missing:
            raise RuntimeError(
                f"val samples {sorted(missing)[:3]} listed in the catalog are not in their shards"
            )
        for k in self.keys:
            yield got[k], True
        for k in pads:
            yield got[k], False

    def _item(self, sample: dict[str, Any], valid: bool) -> dict[str, Any]:
        p = self.params
        key = sample["__key__"]
        shard = self.index.shard_url(self.index.video_shard[self.index.samples[key][0]])
        try:
            meta = check_sample(sample, self.index.sample_frames.get(key))
        except SampleDamage as bad:
            raise ShardError.at(shard, key, bad.reason, str(bad)) from bad
        v, t_code, i_code = self.index.samples[meta.key]
        idx = fragment_index_lists(meta.n_frames, -1, p.fragment_stride, False)[0]
        idx = even_subsample(idx, self.max_frames)
        params = CropParams(p.bbox_scale_factor)  # the deterministic anchor crop (--eval_aug_anchorcrop)
        clip = torch.stack(
            [
                anchor_crop(
                    decode_frame(frame_jpeg(sample, i), meta, i, shard, decode_jpeg_bytes),
                    meta.boxes_in_crop[i],
                    params,
                    p.im_size,
                )
                for i in idx
            ]
        )
        pos = cut_tracklet(
            meta.frame_ids, meta.video_first_frame, meta.video_last_frame, -1, p.fragment_stride, False
        )[0].position
        return {
            "frames": clip,
            "video": int(self.index.video_codes[v]),
            "tracklet": t_code,
            "identity": i_code,
            "position": pos,
            "valid": valid,
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buf: list[dict[str, Any]] = []
        for sample, valid in self._items():
            buf.append(self._item(sample, valid))
            if len(buf) == self.batch_size:
                yield collate_padded(buf)
                buf = []
        if buf:
            yield collate_padded(buf)


def collate_padded(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    s_max = max(it["frames"].shape[0] for it in items)
    _, c, h, w = items[0]["frames"].shape
    frames = torch.zeros((len(items), s_max, c, h, w), dtype=torch.uint8)
    mask = torch.zeros((len(items), s_max), dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["frames"].shape[0]
        frames[i, :n] = it["frames"]
        mask[i, :n] = True
    return {
        "frames": frames,
        "mask": mask,
        "video": torch.tensor([it["video"] for it in items], dtype=torch.int64),
        "tracklet": torch.tensor([it["tracklet"] for it in items], dtype=torch.int64),
        "identity": torch.tensor([it["identity"] for it in items], dtype=torch.int64),
        "position": torch.tensor([it["position"] for it in items], dtype=torch.float32),
        "valid": torch.tensor([it["valid"] for it in items], dtype=torch.bool),
    }
