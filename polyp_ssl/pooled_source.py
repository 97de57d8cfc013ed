"""Pooled batches (sequential access): each stream reads the shards of its own videos in order
and takes its batches across the few videos it holds open (polyp_ssl.video_pool).

For shards that cannot be read at offsets (a `pipe:` or remote --shard_base, compressed tars):
nothing is built up front, every sample is checked against the catalog as it streams by.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import numpy as np

from polyp_ssl.bags import TemperatureSchedule
from polyp_ssl.batch_source import Draft, Row, too_few_identities
from polyp_ssl.damage import DamagePolicy
from polyp_ssl.loader_errors import DataConfigError, ShardError
from polyp_ssl.shards.sample import frame_jpeg
from polyp_ssl.shards.samples import SampleDamage, check_sample, iter_tar_samples
from polyp_ssl.stream_index import StreamIndex, StreamParams, default_schedule
from polyp_ssl.tar_samples import PARSED_META
from polyp_ssl.video_pool import (
    _OpenVideo,
    assign_videos,
    can_fill,
    open_video,
    pool_identities,
    take_batch,
)


@dataclass
class _Epoch:
    """One stream's progress through an epoch: its videos, the open-video pool, batches made."""

    epoch: int
    stream: int
    skip: int
    videos: list[int]
    temperature: float
    pool: list[_OpenVideo] = field(default_factory=list)
    done: int = 0
    n_pass: int = 0


class PooledSource:
    """Drafts of one rank's streams from their own videos' shards (disjoint across the rank's
    streams and the ranks), mixing each stream's open videos."""

    def __init__(
        self,
        index: StreamIndex,
        params: StreamParams,
        damage: DamagePolicy,
        rank: int,
        n_streams: int,
        per_worker: int,
        schedule: TemperatureSchedule | None = None,
    ) -> None:
        self.index = index
        self.params = params
        self.schedule = schedule or default_schedule(params)
        self.damage = damage
        self.stats = damage.stats
        self.rank = rank
        self.n_streams = n_streams
        self.per_worker = per_worker
        self.distinct_identities = params.sampler == "multipos"
        if self.distinct_identities:  # fail here, in the main process, rather than in a worker
            self.check_stream_identities(0)

    @property
    def build_skips(self) -> Counter:
        """Nothing is read before streaming starts."""
        return Counter()

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
                raise too_few_identities(p, scope, len(have), ", or use fewer devices or --num_workers")

    # ------------------------------------------------------------ reading a stream's shards

    def iter_videos(self, videos: list[int]) -> Iterator[tuple[int, list[dict], list[tuple[int, int]]]]:
        """(video, its checked samples in shard order, their (tracklet, identity) codes) for the
        videos of `videos`, reading each of their shards once, in order; damage goes to the policy."""
        wanted = set(videos)
        ix = self.index
        by_shard: dict[str, None] = dict.fromkeys(ix.video_shard[v] for v in videos)
        expected: dict[str, list[str]] = {}
        for k, (v, _, _) in ix.samples.items():
            if v in wanted:
                expected.setdefault(ix.video_shard[v], []).append(k)
        for rel in by_shard:
            yield from self.shard_videos(rel, wanted, expected.get(rel, []))

    def shard_videos(
        self, rel: str, wanted: set[int], expected: list[str]
    ) -> Iterator[tuple[int, list[dict], list[tuple[int, int]]]]:
        """One shard's part of iter_videos: samples of the wanted videos, grouped by video."""
        ix = self.index
        url = ix.shard_url(rel)
        cur_v = -1
        cur: list[dict] = []
        cur_codes: list[tuple[int, int]] = []
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
                    self.damage(err)
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
                self.damage(ShardError.at(url, key, "duplicate_sample", "appears twice in the shard"))
                continue
            seen.add(key)
            try:
                sample[PARSED_META] = check_sample(sample, ix.sample_frames.get(key))
            except SampleDamage as bad:
                self.damage(ShardError.at(url, key, bad.reason, str(bad)))
                continue
            if v != cur_v and cur:
                yield cur_v, cur, cur_codes
                cur, cur_codes = [], []
            cur_v = v
            cur.append(sample)
            cur_codes.append((t_code, i_code))
        missing = [k for k in expected if k not in seen]
        for k in missing:
            detail = f"listed in the catalog but not in the shard ({len(missing)} such samples)"
            self.damage(ShardError.at(url, k, "sample_missing_from_shard", detail))
        if changed is not None:
            self.damage(changed)
            cur = []  # warn: what is left of a changed shard is not used
        if cur:
            yield cur_v, cur, cur_codes

    # ------------------------------------------------------------ the epoch

    def drafts(self, epoch: int, stream: int, skip: int = 0) -> Generator[Draft, None, None]:
        """Exactly `per_worker` batches of stream `stream` in `epoch`, in passes over the stream's
        videos; the first `skip` are formed (bags drawn) but not yielded."""
        p = self.params
        videos = assign_videos(self.index, self.n_streams, p.seed, epoch)[stream]
        temperature = self.schedule.at(epoch)
        if self.distinct_identities and epoch:
            self.check_stream_identities(epoch)
        run = _Epoch(epoch, stream, skip, videos, temperature)
        while run.done < self.per_worker:
            done_before = run.done
            added = yield from self.one_pass(run)
            run.n_pass += 1
            if added == 0:
                raise RuntimeError(
                    f"stream {stream} (rank {self.rank}): its videos "
                    f"{[self.index.video_ids[v] for v in videos][:5]} gave no bag; "
                    "shards and catalog disagree?"
                )
            yield from self.end_of_pass(run)
            if self.distinct_identities and run.done == done_before and run.done < self.per_worker:
                # a whole pass re-opened every video and still no batch of distinct identities:
                # another pass cannot do better (samples skipped as damaged, or catalog disagreement)
                raise DataConfigError(
                    f"--sampler multipos: stream {stream} (rank {self.rank}): its readable videos give "
                    f"bags of only {len(pool_identities(run.pool))} distinct identities, fewer than the "
                    f"{p.n_bags} bags of a batch; lower --batch_size"
                )
        if run.pool:
            self.stats["bags_left_at_epoch_end"] += sum(len(o.bags) for o in run.pool)

    def one_pass(self, run: _Epoch) -> Generator[Draft, None, int]:
        """Open the stream's videos one by one into the pool, drafting a batch whenever the pool
        holds open_videos videos and can fill one; returns the bags added."""
        p = self.params
        pool = run.pool
        added = 0
        for v, samples, codes in self.iter_videos(run.videos):
            code = int(self.index.video_codes[v])
            rng = np.random.default_rng([p.seed, run.epoch, run.stream, run.n_pass, code])
            ov = open_video(v, code, samples, codes, p, rng, run.temperature, self.stats)
            if not ov.bags:
                continue
            rng.shuffle(ov.bags)
            if self.distinct_identities:
                # a video's new pass replaces what is left of its previous one: the pool holds at
                # most one entry per video, whatever the identities' imbalance
                old = [o for o in pool if o.index == v]
                if old:
                    self.stats["multipos_bags_replaced_by_next_pass"] += sum(len(o.bags) for o in old)
                    pool[:] = [o for o in pool if o.index != v]
            pool.append(ov)
            added += len(ov.bags)
            while (
                run.done < self.per_worker
                and len(pool) >= p.open_videos
                and can_fill(pool, p.n_bags, self.distinct_identities)
            ):
                yield from self.take(run)
            if run.done >= self.per_worker:
                break
        return added

    def end_of_pass(self, run: _Epoch) -> Generator[Draft, None, None]:
        """End of a pass: fewer open videos than open_videos is all this stream has; and when the
        bags left finish the epoch, use them rather than start a pass that repeats anchors."""
        p = self.params
        pool, distinct = run.pool, self.distinct_identities
        while (
            run.done < self.per_worker
            and pool
            and can_fill(pool, p.n_bags, distinct)
            and (
                distinct  # the pool holds at most one entry per video: it cannot grow by waiting
                or len(pool) >= min(p.open_videos, len(run.videos))
                or (self.per_worker - run.done) * p.n_bags <= sum(len(o.bags) for o in pool)
            )
        ):
            yield from self.take(run)

    def take(self, run: _Epoch) -> Generator[Draft, None, None]:
        """The next batch's bags, taken from the pool; drafted unless it is one to skip."""
        p = self.params
        batch_i = run.done
        run.done += 1
        rng = np.random.default_rng([p.seed, run.epoch, run.stream, batch_i, 3])
        chosen = take_batch(run.pool, p.n_bags, rng, self.distinct_identities)
        if batch_i < run.skip:
            return
        videos = [ov.index for ov, _ in chosen]
        yield Draft(self.rows_of(chosen), rng, batch_i, -1, videos)

    def rows_of(self, chosen: list[tuple[_OpenVideo, np.ndarray]]) -> list[Row]:
        """The rows of bags chosen from open videos, with their JPEGs (already in memory)."""
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
        return rows
