"""Planned batches (random access): each stream's share of the epoch's global plan, every frame
read at its catalog byte span.

The span table and split fragments (polyp_ssl.span_index) are built once, in the main process,
so loader workers inherit them and a damaged JSON fails before any worker starts. The plan is
polyp_ssl.epoch_plan's (every bag of the split shuffled together); members are read through a
`shards.members.MemberReader` (`SpanReader`, a local `pread`, or shards.object_store's reader of
an object store), one per process.

Look-ahead: the plan says which members every later batch of the stream reads. Before a batch is
read, a reader with `prefetch` (the object-store reader) is handed the members of that batch and
of the next `lookahead_batches` of the stream (at most MAX_LOOKAHEAD), so it can fetch them
coalesced and concurrently while the current batch is decoded. The hint changes what is fetched
when, never which batches or bags are produced.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Sequence

import numpy as np

from polyp_ssl.bags import TemperatureSchedule
from polyp_ssl.batch_source import Draft, Row, too_few_identities
from polyp_ssl.damage import DamagePolicy
from polyp_ssl.epoch_plan import EpochPlan, plan_epoch, stream_batches
from polyp_ssl.loader_errors import DataConfigError, ShardError
from polyp_ssl.shards.members import MemberError, MemberReader, MemberRequest, SpanReader
from polyp_ssl.shards.sample import frame_ext
from polyp_ssl.span_index import FrameMeta, build_span_index
from polyp_ssl.stream_index import StreamIndex, StreamParams, default_schedule

META_CACHE = 4096  # tracklets whose crop geometry a worker keeps as lists (a few KB each)
MAX_LOOKAHEAD = 16  # batches after the current one a reader may be told about
PLAN_USES = 1 << 20  # member reads of the plan a block cache is told about (32 bytes each)


class PlannedSource:
    """Drafts of the epoch plan's batches for one rank. Under --on_shard_error warn a bag with a
    damaged frame is replaced by the next readable bag of the plan (its identity new to the batch
    for multipos), so batches stay full, and the damaged sample (or a changed or unreadable shard,
    whole) is never read again by this stream."""

    def __init__(
        self,
        index: StreamIndex,
        params: StreamParams,
        damage: DamagePolicy,
        rank: int,
        world_size: int,
        num_workers: int,
        per_worker: int,
        open_reader: Callable[[], MemberReader] = SpanReader,
        schedule: TemperatureSchedule | None = None,
    ) -> None:
        self.index = index
        self.params = params
        self.schedule = schedule or default_schedule(params)
        self.damage = damage
        self.stats = damage.stats
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.per_worker = per_worker
        self.distinct_identities = params.sampler == "multipos"
        self.open_reader = open_reader
        self.spans, self.frags = build_span_index(index, params, damage)
        self.slot_of = {k: i for i, k in enumerate(self.spans.keys)}
        self.bad_slots: set[int] = set()
        self.bad_shards: set[str] = set()
        self._reader: MemberReader | None = None
        self._reader_pid = -1
        self._metas: OrderedDict[int, FrameMeta] = OrderedDict()
        if self.distinct_identities:
            self.check_split_identities()

    @property
    def build_skips(self) -> Counter:
        """Samples left out while the span index was built (--on_shard_error warn), by reason."""
        return self.spans.skipped

    def check_split_identities(self) -> None:
        """multipos: DataConfigError when the split holds fewer identities that anchor a bag than
        the bags of a batch (every stream draws from the whole split)."""
        every = {i for ids in self.index.video_identities for i in ids}
        if len(every) < self.params.n_bags:
            raise too_few_identities(self.params, f"the split {self.index.split!r} has", len(every), "")

    def drafts(self, epoch: int, stream: int, skip: int = 0) -> Generator[Draft, None, None]:
        """Exactly `per_worker` batches of stream `stream` in `epoch`, taken from the epoch's global
        plan; the first `skip` are not read at all (resuming costs nothing)."""
        p = self.params
        temperature = self.schedule.at(epoch)
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
        hints: OrderedDict[int, list[MemberRequest]] = OrderedDict()
        if getattr(self.reader(), "wants_plan", False):
            self.schedule_reads(epoch, plan, skip)
        for k, g in enumerate(ids):
            if k < skip:
                continue
            self.hint(plan, ids, k, hints, epoch * self.per_worker + k)
            yield from self.batch_drafts(plan, int(g), epoch, k)

    def schedule_reads(self, epoch: int, plan: EpochPlan, skip: int) -> None:
        """Tell a reader with a block cache (`plan_uses`) when this rank's streams read each member
        for the rest of this epoch and all of the next: batch k of any stream of the rank at
        ordinal epoch * per_worker + k (the streams advance together)."""
        p, fr, sp = self.params, self.frags, self.spans
        nw = max(self.num_workers, 1)
        locations = list(dict.fromkeys(sp.path[rel] for rel in sp.shard))
        loc_of = {loc: i for i, loc in enumerate(locations)}
        slot_loc = np.asarray([loc_of[sp.path[rel]] for rel in sp.shard], dtype=np.int64)
        parts = []
        # at most PLAN_USES member reads in all (per process): the nearest batches of each stream
        per_batch = p.n_bags * p.n_views * max(p.fragment_length, 1)
        horizon = max(1, PLAN_USES // (per_batch * nw * 2))
        for e, first in ((epoch, skip), (epoch + 1, 0)):
            pl = (
                plan
                if e == epoch
                else plan_epoch(self.frags, p.sampler, p.n_views, p.n_bags, p.seed, e, self.schedule.at(e))
            )
            if pl.n_batches == 0:
                continue
            for w in range(nw):
                ids = stream_batches(
                    pl.n_batches, self.rank, self.world_size, w, self.num_workers, self.per_worker
                )
                ids = np.asarray(ids[first : first + horizon], dtype=np.int64)
                frags = pl.bags[pl.batches[ids]]  # [k, n_bags, n_views]
                slots = fr.slot[frags]
                rows = sp.frame_start[slots][..., None] + fr.frames[frags]  # [k, bags, views, L]
                at = (e * self.per_worker + first + np.arange(len(ids)))[:, None, None, None]
                parts.append(
                    (
                        np.broadcast_to(slots[..., None], rows.shape).ravel(),
                        rows.ravel(),
                        np.broadcast_to(at, rows.shape).ravel(),
                    )
                )
        if not parts:
            return
        slot = np.concatenate([a for a, _, _ in parts])
        row = np.concatenate([b for _, b, _ in parts])
        at = np.concatenate([c for _, _, c in parts])
        spans = sp.jpeg[row]
        starts = spans[:, 0] - 512  # the member's tar header lies before its data
        self.reader().plan_uses(locations, slot_loc[slot], starts, spans[:, 0] + spans[:, 1], at)

    def hint(
        self,
        plan: EpochPlan,
        ids: Sequence[int],
        k: int,
        memo: OrderedDict[int, list[MemberRequest]],
        position: int,
    ) -> None:
        """Tell a reader with `prefetch` the members of this stream's batches k .. k + L, nearest
        first (L: the reader's `lookahead_batches`, at most MAX_LOOKAHEAD); `memo` keeps each
        batch's list while it stays in the window. A reader with `advance` learns the batch's
        ordinal (`position`, the clock of schedule_reads)."""
        reader = self.reader()
        advance = getattr(reader, "advance", None)
        if advance is not None:
            advance(position)
        prefetch = getattr(reader, "prefetch", None)
        lookahead = getattr(reader, "lookahead_batches", None)
        if prefetch is None or lookahead is None:  # SpanReader: nothing to fetch ahead
            return
        ahead = min(max(int(lookahead), 0), MAX_LOOKAHEAD)
        window = [int(g) for g in ids[k : k + ahead + 1]]
        for g in list(memo):
            if g not in window:
                del memo[g]
        requests: list[MemberRequest] = []
        for g in window:
            if g not in memo:
                memo[g] = self.batch_requests(plan, g)
            requests += memo[g]
        prefetch(requests)

    def batch_requests(self, plan: EpochPlan, g: int) -> list[MemberRequest]:
        """The members global batch g of the plan reads, each once, in reading order (bags already
        known to be damaged left out)."""
        fr, sp = self.frags, self.spans
        seen: set[tuple[int, int]] = set()
        out = []
        for bag in plan.batches[g]:
            for f in plan.bags[int(bag)]:
                slot = int(fr.slot[f])
                rel = sp.shard[slot]
                if slot in self.bad_slots or rel in self.bad_shards:
                    continue
                for i in fr.frames[f]:
                    i = int(i)
                    if (slot, i) in seen:
                        continue
                    seen.add((slot, i))
                    out.append(
                        MemberRequest(
                            sp.path[rel],
                            sp.span(slot, i),
                            sp.shard_bytes[rel],
                            f"{sp.keys[slot]}.{frame_ext(i)}",
                        )
                    )
        return out

    def batch_drafts(self, plan: EpochPlan, g: int, epoch: int, batch_i: int) -> Generator[Draft, None, None]:
        """Global batch g of the plan, drafted until one draft is assembled without damage: a
        ShardError (reading here, or thrown back from the assembler) goes to the damage policy
        (which raises it under fail), marks the damage and drafts the batch again."""
        p = self.params
        bags = [int(b) for b in plan.batches[g]]
        for _ in range(8 * p.n_bags + 8):
            bags = self.replace_unusable(plan, g, bags)
            rng = np.random.default_rng([p.seed, epoch, g, 3])
            try:
                videos = self.frags.video_of(plan.bags[bags, 0]) if p.data_log else ()
                yield Draft(self.read_rows(plan, bags), rng, batch_i, g, videos)
                return
            except ShardError as err:
                self.damage(err)  # raises under fail
                self.mark_bad(err)
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

    def reader(self) -> MemberReader:
        """This process's member reader (file descriptors are not shared across the workers' fork)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = self.open_reader(), os.getpid()
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

    def read_member(self, slot: int, i: int, key: str, url: str) -> bytes:
        """Frame i of tracklet `slot`, read at its span; ShardError names the damage."""
        sp = self.spans
        rel = sp.shard[slot]
        try:
            return self.reader().read(
                sp.path[rel], sp.span(slot, i), sp.shard_bytes[rel], f"{key}.{frame_ext(i)}"
            )
        except MemberError as exc:
            raise ShardError.at(url, key, exc.reason, f"frame {i}: {exc}") from None
        except OSError as exc:
            raise ShardError.at(url, key, "unreadable_shard", f"cannot read ({exc})") from exc

    def read_rows(self, plan: EpochPlan, bags: list[int]) -> list[Row]:
        """The batch's rows with their JPEGs read at their spans (each frame once per batch)."""
        fr, ix = self.frags, self.index
        self.reader()
        read: dict[tuple[int, int], bytes] = {}
        rows = []
        for b, bag in enumerate(bags):
            members = plan.bags[bag]
            for f, v in zip(members, fr.video_of(members), strict=True):
                slot = int(fr.slot[f])
                meta = self.frame_meta(slot)
                url = ix.shard_url(self.spans.shard[slot])
                frames = tuple(int(i) for i in fr.frames[f])
                jpegs = {}
                for i in frames:
                    data = read.get((slot, i))
                    if data is None:
                        data = read[(slot, i)] = self.read_member(slot, i, meta.key, url)
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
