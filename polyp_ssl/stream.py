"""The training loader: finished batches from shards (docs/training.md "The data path").

`BagStream` wires the parts of the data path; its batches come from one of two batch sources
(`--shard_access`, polyp_ssl.batch_source):
- random access (plain tar shards, local or in an object store), `polyp_ssl.planned_source`: the
  epoch's global plan (`polyp_ssl.epoch_plan`, every bag of the split shuffled together) cut into
  each stream's share, each frame read at its catalog byte span (`polyp_ssl.span_index`,
  `polyp_ssl.shards.members`);
- sequential, `polyp_ssl.pooled_source`: each stream reads its own videos' shards
  (`polyp_ssl.shards.samples`) and mixes its open videos (`polyp_ssl.video_pool`).
`polyp_ssl.assembler` turns a source's rows into the batch; `polyp_ssl.damage` is the one
--on_shard_error policy every part reports damage to.
`StreamLoader` is the DataLoader whose state {epoch, batches_seen, seed} Lightning stores in the
checkpoint. The split's index comes from `polyp_ssl.stream_index`, validation batches from
`polyp_ssl.val_tracklets`; their names are importable from here too.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polyp_ssl.assembler import BatchAssembler, batch_buffer
from polyp_ssl.batch_source import Draft, Row
from polyp_ssl.config import DECODE_ON, SHARD_ACCESS
from polyp_ssl.damage import DamagePolicy
from polyp_ssl.device_decode import DevicePrefetcher
from polyp_ssl.loader_errors import ON_SHARD_ERROR, SKIP_REASONS, DataConfigError, ShardError
from polyp_ssl.planned_source import PlannedSource
from polyp_ssl.pooled_source import PooledSource
from polyp_ssl.shards.samples import SampleDamage, check_sample, iter_tar_samples
from polyp_ssl.span_index import member_locations, member_reader
from polyp_ssl.stream_index import (
    StreamIndex,
    StreamParams,
    build_index,
    dataset_codes,
    default_schedule,
    epoch_batches,
)
from polyp_ssl.val_tracklets import ValTracklets, collate_padded
from polyp_ssl.video_pool import assign_videos, can_fill, open_video, take_batch

log = logging.getLogger(__name__)

__all__ = [
    "ON_SHARD_ERROR",
    "SKIP_REASONS",
    "BagStream",
    "DataConfigError",
    "Draft",
    "Row",
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


def resolve_access(mode: str, index: StreamIndex) -> str:
    """`random` or `sequential` for --shard_access `mode` (polyp_ssl.config.SHARD_ACCESS): auto is
    random when every shard is a plain tar file, local or in an object store (read at offsets by
    range requests), else sequential (`pipe:`, compressed shards; said once in the log)."""
    if mode not in SHARD_ACCESS:
        raise DataConfigError(f"--shard_access {mode!r}: choose one of {SHARD_ACCESS}")
    if mode == "sequential":
        return mode
    if member_locations(index) is not None:
        return "random"
    where = index.shard_base or index.root
    if mode == "random":
        raise DataConfigError(
            f"--shard_access random: the shards under {where} are not plain .tar files that can be read "
            "at offsets (a pipe: or compressed location has none); use --shard_access sequential"
        )
    log.info(
        "shards under %s are not plain .tar files: reading them sequentially (batches come from the "
        "few videos each stream holds open; see --shard_access)",
        where,
    )
    return "sequential"


class BagStream(IterableDataset):
    """Finished training batches (docs/architecture.md "Batches"), batching inside the dataset:
    wiring of one batch source (by --shard_access: `PlannedSource` for random access,
    `PooledSource` for sequential), the `BatchAssembler` and the `DamagePolicy` both share."""

    def __init__(
        self,
        index: StreamIndex,
        params: StreamParams,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shared: SharedState | None = None,
        batches_per_worker: int | None = None,
        max_steps: int = -1,
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
        # made in the loader workers' multiprocessing context (StreamLoader uses the same one)
        self.shared = shared or SharedState(mp.get_context() if num_workers > 0 else None)
        if batches_per_worker is not None:  # a fixed epoch length instead of one pass over the data
            self.per_worker, self.length = batches_per_worker, batches_per_worker * max(num_workers, 1)
        else:
            self.per_worker, self.length = epoch_batches(
                index.total_anchors, params.n_bags, world_size, num_workers
            )
        self.stats: Counter = Counter()
        self.damage = DamagePolicy(params.on_shard_error, self.stats, self.shared, log, rank)
        self.assembler = BatchAssembler(params)
        self.access = resolve_access(params.shard_access, index)
        # --sampler_ttb_schedule steps: the schedule spans the epochs that --max_steps trains
        self.schedule = default_schedule(params, max_steps, self.length)
        self.source: PlannedSource | PooledSource
        if self.access == "random":
            self.source = PlannedSource(
                index,
                params,
                self.damage,
                rank,
                world_size,
                num_workers,
                self.per_worker,
                open_reader=member_reader(index),
                schedule=self.schedule,
            )
            log.info(
                "rank %d: random access: batches from a global shuffle of %d fragments over %d videos "
                "(span index %.1f MB)",
                rank,
                len(self.source.frags.slot),
                self.source.frags.n_videos,
                self.source.spans.nbytes / 2**20,
            )
        else:
            self.source = PooledSource(
                index, params, self.damage, rank, self.n_streams, self.per_worker, schedule=self.schedule
            )

    @property
    def build_skips(self) -> Counter:
        """Samples left out before streaming (random access, --on_shard_error warn), by reason."""
        return self.source.build_skips

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

    def iter_stream(self, epoch: int, stream: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Exactly `per_worker` batches of stream `stream` in `epoch`; the first `skip` are not
        yielded. Each draft of the source is assembled here; a ShardError while assembling goes
        back to the source (BatchSource), which drafts the batch again or raises."""
        drafts = self.source.drafts(epoch, stream, skip)
        draft = next(drafts, None)
        while draft is not None:
            try:
                batch = self.assembler(draft.rows, draft.rng)
            except ShardError as err:
                draft = drafts.throw(err)
                continue
            if self.params.data_log:
                self.log_batch(epoch, stream, draft)
            yield batch
            draft = next(drafts, None)

    def log_batch(self, epoch: int, stream: int, draft: Draft) -> None:
        """One --data_log line: epoch, stream, the stream's batch, the plan's batch (-1 for
        sequential access) and the videos of the batch's bags."""
        vids = sorted({self.index.video_ids[int(v)] for v in draft.videos})
        with open(f"{self.params.data_log}.rank{self.rank}", "a") as fh:
            fh.write(f"{epoch} {stream} {draft.batch_i} {draft.plan_batch} {' '.join(vids)}\n")


class StreamLoader(DataLoader):
    """DataLoader over a BagStream (batch_size=None, persistent workers) with a resumable state
    {epoch, batches_seen, seed}, which Lightning saves in the checkpoint and restores."""

    dataset: BagStream

    def __init__(
        self, dataset: BagStream, pin_memory: bool = False, prefetch_factor: int | None = None
    ) -> None:
        workers = dataset.num_workers
        ctx = mp.get_context() if workers > 0 else None
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
