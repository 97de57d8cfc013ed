"""The training split as the loader needs it, read once from the catalog in the main process:
`build_index` -> a small picklable `StreamIndex`, and the epoch length (`epoch_batches`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from polyp_ssl.bags import (
    SAMPLERS,
    TTB_SCHEDULES,
    TemperatureSchedule,
    eligible_anchors,
    temperature_schedule,
)
from polyp_ssl.config_parts import BIG, MAX_IM_SIZE, Bound, check_choice, setting
from polyp_ssl.fragments import count_fragments
from polyp_ssl.loader_errors import DataConfigError
from polyp_ssl.shards.identities import root_identity_kind, track_refusal
from polyp_ssl.shards.locations import (
    ShardIdentity,
    UnsafeLocation,
    check_shard_value,
    shard_location,
)
from polyp_ssl.shards.remote import remote_root
from polyp_ssl.shards.schema import SHARDS, TRACKLETS, VIDEOS
from polyp_ssl.shards.tables import read_catalog_table, table_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamParams:
    """The stream part of the training configuration (`polyp_ssl.config.TrainConfig.stream`): the
    batches, bags, fragments and anchor crops the streams produce, and how they read the shards."""

    # how training batches read shards: "random" reads each frame at its catalog byte span (batches as
    # diverse as a global shuffle), "sequential" streams whole shards per worker (pipe: and remote
    # bases, compressed shards), "auto" = random whenever the shards are local plain tar files
    SHARD_ACCESS: ClassVar[tuple[str, ...]] = ("auto", "random", "sequential")
    DECODE_ON: ClassVar[tuple[str, ...]] = ("workers", "device")  # where training JPEGs are decoded
    ON_SHARD_ERROR: ClassVar[tuple[str, ...]] = ("fail", "warn")

    batch_size: int = setting(
        60, "fragments per batch and rank; a batch holds batch_size / n_views bags", Bound(1, 1 << 16)
    )
    n_views: int = setting(5, "bag size, anchor included (K + 1)", Bound(2, 1024))
    fragment_length: int = setting(
        8, "frames per fragment (at fragment_stride)", Bound(1, 100_000, minus_one=True)
    )
    fragment_stride: int = setting(4, "take every N-th frame of a tracklet", Bound(1, 100_000))
    fragment_drop_last: bool = setting(
        False, "drop a tracklet's last short fragment (else pad it by repeating its last frame)"
    )
    min_tracklet_length: int = setting(
        30, "tracklets with fewer frames (before striding) are not used for training", Bound(0, BIG)
    )
    bbox_scale_factor: float = setting(
        5.0, "anchor crop = box enlarged this much about its centre", Bound(0, 100, lo_open=True)
    )
    im_size: int = setting(232, "anchor crops are resized to im_size x im_size", Bound(8, MAX_IM_SIZE))
    # the reference's flag: the deterministic anchor crop (always used here); required (stored crops only)
    aug_anchorcrop: bool = setting(
        False,
        "the anchor crop, as in the reference: the box enlarged bbox_scale_factor times about its centre, "
        "clamped, resized to im_size; deterministic. Required: the root stores crops, not frames",
    )
    # random training augmentations: our extension, each off by default (polyp_ssl.transforms.Augment)
    aug_random_scale: bool = setting(
        False,
        "our extension, off by default: anchor-crop scale x U(0.8, 1.2) per training fragment (capped at "
        "the root's crop scale)",
    )
    aug_jitter: bool = setting(
        False,
        "our extension, off by default: anchor-crop centre shifted by up to 10%% of the box per training "
        "fragment",
    )
    aug_hflip: bool = setting(
        False, "our extension, off by default: horizontal flip of a training fragment with probability 0.5"
    )
    aug_vflip: bool = setting(
        False, "our extension, off by default: vertical flip of a training fragment with probability 0.5"
    )
    sampler: str = setting("temporaltemperaturebag", f"bag sampler: {', '.join(SAMPLERS)}")
    sampler_ttb_tmin: float = setting(
        0.3, "bag temperature at the first epoch (temporaltemperaturebag)", Bound(0, 1e6, lo_open=True)
    )
    sampler_ttb_tmax: float = setting(
        12.0, "bag temperature at the last epoch (temporaltemperaturebag)", Bound(0, 1e6, lo_open=True)
    )
    sampler_ttb_schedule: str = setting(
        "epochs",
        "length of the bag temperature schedule: epochs = over --max_epochs (the paper's; a run ended "
        "earlier by --max_steps sees only its start), steps = over the epochs the run trains (from "
        "--max_steps), first epoch at tmin, last at tmax",
    )
    max_epochs: int = setting(
        50,
        "training epochs (also the length of the bag temperature schedule, see --sampler_ttb_schedule)",
        Bound(1, 1_000_000),
    )
    open_videos: int = setting(
        4, "--shard_access sequential: videos each data stream keeps open and interleaves", Bound(1, 1024)
    )
    seed: int = setting(42, "random seed (model init, bags, data order)", Bound(0, (1 << 32) - 1))
    # debug: append the video ids of every batch, per rank, to this file
    data_log: str | None = setting(
        None,
        "debug: append a line per batch to FILE.rankR: epoch, stream, batch, plan batch (-1 with sequential "
        "access), the batch's videos",
    )
    # damaged shard/sample: "fail" stops the run, "warn" skips and counts
    on_shard_error: str = setting(
        "fail",
        "a damaged shard or sample (truncated tar, corrupt JPEG, JSON that disagrees with the catalog): "
        "fail = stop naming shard and sample; warn = skip it, count skips by reason, report them in the run "
        "summary and checkpoints/data_skips.rankR.json",
    )
    # or "device": workers ship JPEG bytes, the training process decodes
    decode_on: str = setting(
        "workers",
        "where training JPEGs are decoded: workers = in the loader workers (CPU); device = the workers ship "
        "JPEG bytes and crop windows, the training process decodes them on its device (nvJPEG on a GPU), so "
        "few CPU cores feed a fast GPU",
    )
    shard_access: str = setting(
        "auto",
        "auto (random for local tar shards), random (read each frame at its catalog offset: batches drawn "
        "from a global shuffle of the epoch's bags) or sequential (stream whole shards)",
    )

    @property
    def n_bags(self) -> int:
        return self.batch_size // self.n_views

    def check(self) -> None:
        """ValueError naming the flag for settings the streams cannot work with (the bounds of each
        field are checked before, by `polyp_ssl.config.TrainConfig.validate`)."""
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("sampler_ttb_schedule", self.sampler_ttb_schedule, TTB_SCHEDULES)
        if self.batch_size < self.n_views:
            raise ValueError(
                f"--batch_size {self.batch_size} < --n_views {self.n_views}: a batch must hold one whole bag"
            )
        if self.batch_size % self.n_views:
            raise ValueError(f"--batch_size {self.batch_size} is not a multiple of --n_views {self.n_views}")
        check_choice("shard_access", self.shard_access, self.SHARD_ACCESS)
        if self.on_shard_error not in self.ON_SHARD_ERROR:
            raise ValueError(f"--on_shard_error {self.on_shard_error!r}: choose fail or warn")
        check_choice("decode_on", self.decode_on, self.DECODE_ON)
        if not 0 < self.sampler_ttb_tmin <= self.sampler_ttb_tmax:
            raise ValueError(
                f"--sampler_ttb_tmin {self.sampler_ttb_tmin} / --sampler_ttb_tmax {self.sampler_ttb_tmax}: "
                "need 0 < tmin <= tmax"
            )


def default_schedule(p: StreamParams, max_steps: int = -1, batches_per_epoch: int = 0) -> TemperatureSchedule:
    """The temporal temperature schedule of `p` (--sampler_ttb_schedule); `max_steps` and the
    batches of an epoch (per rank) say how many epochs a `steps` schedule spans (without them,
    --max_epochs)."""
    return temperature_schedule(
        p.sampler_ttb_schedule,
        p.sampler_ttb_tmin,
        p.sampler_ttb_tmax,
        p.max_epochs,
        max_steps,
        batches_per_epoch,
    )


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
    # how remote shards are read (shards.object_store.ObjectReadOptions; None: local shards only).
    # It may hold credentials from --storage_options: never shown (repr=False), never saved
    read_options: Any = field(default=None, repr=False)

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


def as_root(root: str | Path) -> Any:
    """A local root as a Path, a remote one (shards.remote) as its URL string."""
    return remote_root(root) or Path(root)


def _read_table(root: Any, name: str, schema) -> Any:
    path = table_file(root, name)
    if isinstance(path, Path) and not path.exists():
        raise DataConfigError(
            f"{root}: no catalog table {path.name} (this root was never ingested?); "
            f"run `polyp-ssl ingest {root}` first"
        )
    table = read_catalog_table(root, name, checked=False)  # a remote root: one line if it is not there
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DataConfigError(f"{path}: catalog table lacks columns {missing}")
    return table.select([f.name for f in schema]).to_pydict()


def dataset_codes(root: str | Path) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Integer codes for video, tracklet and identity ids, stable for the dataset (sorted over
    every split of the catalog)."""
    root = as_root(root)
    trk = _read_table(root, "tracklets", TRACKLETS)
    vids = _read_table(root, "videos", VIDEOS)
    video = {v: i for i, v in enumerate(sorted(set(vids["video_id"]) | set(trk["video_id"])))}
    tracklet = {t: i for i, t in enumerate(sorted(set(trk["tracklet_id"])))}
    identity = {d: i for i, d in enumerate(sorted({d for d in trk["identity_id"] if d}))}
    return video, tracklet, identity


def _shard_identities(root: Any, trk: dict[str, list]) -> dict[str, ShardIdentity]:
    """Check every shard value of the catalog (tracklets' `shard`, the shards table's `path`) once,
    here at the boundary, and return each shard's size and sha256 from the shards table.

    DataConfigError naming the catalog file, the row and the field for a value that is not a
    plain path relative to the root (a `pipe:` command, a URL, an absolute or climbing path), or
    a tracklet whose shard the shards table does not list."""
    shards = _read_table(root, "shards", SHARDS)
    shards_path = table_file(root, "shards")
    trk_path = table_file(root, "tracklets")
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
    read_options: Any = None,
) -> StreamIndex:
    """Read the catalog once (main process) and keep the split's usable tracklets.

    Tracklets shorter than min_tracklet_length and, with require_bags, videos whose fragments
    cannot form a single bag with the chosen sampler are left out and counted in `excluded`.
    A remote root (shards.remote) is read through fsspec; its shards with `read_options`
    (shards.object_store.ObjectReadOptions, the defaults when None).
    """
    root = as_root(root)
    min_len = params.min_tracklet_length if min_tracklet_length is None else min_tracklet_length
    trk = _read_table(root, "tracklets", TRACKLETS)
    identities = _shard_identities(root, trk)
    video_code, tracklet_code, identity_code = dataset_codes(root)
    if root_identity_kind(root) == "tracks":  # tracker tracks, not polyps: unknown (-1) in batches
        if params.sampler == "multipos":
            raise DataConfigError(track_refusal(root, "--sampler multipos"))
        identity_code = {}
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
        read_options=read_options,
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
            raise DataConfigError(f"{table_file(root, 'tracklets')}: {exc}") from None
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
