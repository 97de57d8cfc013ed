"""The training loader: finished batches from shards (docs/training.md "The data path").

`BagStream` yields batches in one of two ways (`--shard_access`):
- random access (local plain tar shards): the epoch's global plan (`polyp_ssl.epoch_plan`, every
  bag of the split shuffled together) cut into each stream's share, each frame read at its catalog
  byte span (`polyp_ssl.span_index`, `polyp_ssl.shards.members`);
- sequential: each stream reads its own videos' shards (`polyp_ssl.tar_samples`) and mixes its
  open videos (`polyp_ssl.video_pool`).
`StreamLoader` is the DataLoader whose state {epoch, batches_seen, seed} Lightning stores in the
checkpoint. The split's index comes from `polyp_ssl.stream_index`, validation batches from
`polyp_ssl.val_tracklets`; their names are importable from here too.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polyp_ssl.bags import temporal_temperature
from polyp_ssl.config import DECODE_ON, SHARD_ACCESS
from polyp_ssl.device_decode import DevicePrefetcher, pack_jpegs
from polyp_ssl.epoch_plan import EpochPlan, SplitFragments, plan_epoch, stream_batches
from polyp_ssl.loader_errors import ON_SHARD_ERROR, SKIP_REASONS, DataConfigError, ShardError
from polyp_ssl.shards.members import MemberError, SpanReader
from polyp_ssl.shards.sample import (
    frame_ext,
    frame_jpeg,
)
from polyp_ssl.span_index import FrameMeta, SpanTable, build_span_index, local_paths
from polyp_ssl.stream_index import StreamIndex, StreamParams, build_index, dataset_codes, epoch_batches
from polyp_ssl.tar_samples import (
    DECODE_CACHE_PIXELS,
    PARSED_META,
    SampleDamage,
    check_frame,
    check_sample,
    decode_frame,
    iter_tar_samples,
)
from polyp_ssl.transforms import (
    Augment,
    apply_flips,
    crop_resize,
    crop_window,
    decode_jpeg_bytes,
    draw_crop_params,
)
from polyp_ssl.val_tracklets import ValTracklets, collate_padded
from polyp_ssl.video_pool import (
    _OpenVideo,
    assign_videos,
    can_fill,
    open_video,
    pool_identities,
    take_batch,
)

log = logging.getLogger(__name__)

__all__ = [
    "ON_SHARD_ERROR",
    "SKIP_REASONS",
    "BagStream",
    "DataConfigError",
    "SampleDamage",
    "ShardError",
    "StreamIndex",
    "StreamLoader",
    "StreamParams",
    "ValTracklets",
    "assign_videos",
    "batch_buffer",
    "build_index",
    "can_fill",
    "check_sample",
    "collate_padded",
    "dataset_codes",
    "epoch_batches",
    "iter_tar_samples",
    "open_video",
    "take_batch",
]


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
            log.info(
                "rank %d: random access: batches from a global shuffle of %d fragments over %d videos "
                "(span index %.1f MB)",
                rank,
                len(self.frags.slot),
                self.frags.n_videos,
                self.spans.nbytes / 2**20,
            )
        elif self.distinct_identities:  # fail here, in the main process, rather than in a worker
            self.check_stream_identities(0)

    def check_split_identities(self) -> None:
        """multipos with random access: DataConfigError when the split holds fewer identities that
        anchor a bag than the bags of a batch (every stream draws from the whole split)."""
        every = {i for ids in self.index.video_identities for i in ids}
        if len(every) < self.params.n_bags:
            raise self.too_few_identities(f"the split {self.index.split!r} has", len(every), "")

    def too_few_identities(self, scope: str, n: int, remedy: str) -> DataConfigError:
        p = self.params
        return DataConfigError(
            f"--sampler multipos: {scope} {n} distinct identities (polyps) with a bag, fewer than the "
            f"{p.n_bags} bags of a batch (--batch_size {p.batch_size} / --n_views {p.n_views}), and a "
            f"batch holds each identity at most once; lower --batch_size{remedy}"
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
                raise self.too_few_identities(scope, len(have), ", or use fewer devices or --num_workers")

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
                    fh.write(f"{epoch} {stream} {batch_i} {g} {' '.join(vids)}\n")
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
                            data = reader.read(
                                sp.path[rel],
                                sp.span(slot, i),
                                sp.shard_bytes[rel],
                                f"{meta.key}.{frame_ext(i)}",
                            )
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
                fh.write(f"{epoch} {stream} {batch_i} -1 {' '.join(vids)}\n")
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
