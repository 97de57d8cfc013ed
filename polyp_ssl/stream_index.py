"""The training split as the loader needs it, read once from the catalog in the main process:
`build_index` -> a small picklable `StreamIndex`, and the epoch length (`epoch_batches`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from polyp_ssl.bags import eligible_anchors
from polyp_ssl.fragments import count_fragments
from polyp_ssl.loader_errors import DataConfigError
from polyp_ssl.shards.locations import (
    ShardIdentity,
    UnsafeLocation,
    check_shard_value,
    shard_location,
)
from polyp_ssl.shards.schema import SHARDS, TRACKLETS, VIDEOS

log = logging.getLogger(__name__)


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
