"""What a batch source hands the batch assembler: the rows of one batch (`Draft`).

Two sources implement `BatchSource`: `polyp_ssl.planned_source.PlannedSource` (random access:
the epoch's global plan, frames read at their catalog spans) and
`polyp_ssl.pooled_source.PooledSource` (sequential: whole shards, the few videos a stream holds
open). `polyp_ssl.stream.BagStream` picks one by --shard_access and turns each draft into a batch
with `polyp_ssl.assembler.BatchAssembler`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from polyp_ssl.loader_errors import DataConfigError
from polyp_ssl.stream_index import StreamParams


@dataclass
class Row:
    """One fragment of a batch, whichever source read it: its bag, codes, the JSON fields decoding
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
    crop: Any = None  # CropParams, drawn when the batch is assembled


@dataclass
class Draft:
    """The rows of one batch, the generator its crops are drawn from, and what the data log
    records of it: the stream's batch number, the plan's batch (-1 without a plan) and the
    videos of its bags (StreamIndex indices)."""

    rows: list[Row]
    rng: np.random.Generator
    batch_i: int
    plan_batch: int
    videos: Sequence[int] | np.ndarray


class BatchSource(Protocol):
    """A stream's batches of one epoch, as drafts.

    `drafts(epoch, stream, skip)` yields exactly the stream's batches of the epoch, the first
    `skip` formed (bags drawn) but not read nor yielded. A ShardError met while assembling a
    draft is thrown back into the generator (`generator.throw`): the source hands it to its damage
    policy and, where it can, yields the same batch again without the damaged sample."""

    def drafts(self, epoch: int, stream: int, skip: int = 0) -> Generator[Draft, None, None]: ...

    @property
    def build_skips(self) -> dict[str, int]: ...


def too_few_identities(params: StreamParams, scope: str, n: int, remedy: str) -> DataConfigError:
    """The multipos error: fewer distinct identities with a bag than the bags of a batch."""
    p = params
    return DataConfigError(
        f"--sampler multipos: {scope} {n} distinct identities (polyps) with a bag, fewer than the "
        f"{p.n_bags} bags of a batch (--batch_size {p.batch_size} / --n_views {p.n_views}), and a "
        f"batch holds each identity at most once; lower --batch_size{remedy}"
    )
