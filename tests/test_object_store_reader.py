"""The object-store member reader (shards.object_store) against moto's S3 server on 127.0.0.1:
the same bytes as SpanReader, coalesced requests, the look-ahead of planned batches, replaced and
truncated objects, throttling through a proxy, and bounded prefetch memory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from object_store_helpers import KEY_ID, SECRET
from object_store_proxy import LatencyProxy
from shard_factory import make_root

from polyp_ssl.shards.members import MemberError, MemberRequest, SpanReader
from polyp_ssl.shards.object_ranges import Interval, RangeRequest, backoff_s, coalesce, is_retryable
from polyp_ssl.shards.object_store import ObjectReadOptions, ObjectStoreReader, open_object_reader
from polyp_ssl.shards.sample import frame_ext
from polyp_ssl.span_index import build_span_index
from polyp_ssl.stream import BagStream, StreamParams, build_index

P = StreamParams(
    batch_size=12,
    n_views=2,
    fragment_length=4,
    fragment_stride=4,
    min_tracklet_length=4,
    im_size=16,
    aug_anchorcrop=True,
)
# fast retries for tests (the defaults wait up to 5 s)
FAST = {"backoff_s": 0.001, "backoff_max_s": 0.01}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(
        tmp_path_factory.mktemp("osr") / "root",
        videos={"train": 6, "val": 1},
        frames_per_tracklet=[24, 40],
        videos_per_shard=2,
    )


@pytest.fixture(scope="module")
def remote(root, s3_server) -> str:
    """The root uploaded as `aws s3 sync` would: s3://BUCKET/data/..."""
    bucket = s3_server.bucket()
    s3_server.upload_tree(root, bucket, "data")
    return f"s3://{bucket}/data"


@pytest.fixture(scope="module")
def members(root, remote) -> list[tuple[str, str, MemberRequest]]:
    """Every training frame as (local path, its MemberRequest against the bucket)."""
    index = build_index(root, "train", P)
    spans, _ = build_span_index(index, P)
    out = []
    for slot, key in enumerate(spans.keys):
        rel = spans.shard[slot]
        for i in range(int(spans.frame_start[slot + 1] - spans.frame_start[slot])):
            out.append(
                (
                    spans.path[rel],
                    MemberRequest(
                        f"{remote}/{rel}",
                        spans.span(slot, i),
                        spans.shard_bytes[rel],
                        f"{key}.{frame_ext(i)}",
                    ),
                )
            )
    return out


def remote_stream(root: Path, remote: str, options: ObjectReadOptions, params: StreamParams = P) -> BagStream:
    """A BagStream over the local catalog whose members are read from the bucket."""
    ds = BagStream(build_index(root, "train", params), params)
    src = ds.source
    src.spans.path = {rel: f"{remote}/{rel}" for rel in src.spans.path}
    src.open_reader = open_object_reader(options)
    return ds


# ---------------------------------------------------------------- coalescing (pure)


def test_coalesce_merges_spans_closer_than_the_gap_within_the_size_bound():
    ivs = [Interval(0, 100, 0), Interval(150, 200, 1), Interval(1000, 1100, 2), Interval(1100, 1300, 3)]
    assert coalesce(ivs, max_gap=50, max_bytes=10_000) == [
        RangeRequest(0, 200, (0, 1)),
        RangeRequest(1000, 1300, (2, 3)),
    ]
    # a gap of 51 > 50: apart; a bound of 250 bytes splits the second run
    assert coalesce(ivs, max_gap=49, max_bytes=250) == [
        RangeRequest(0, 100, (0,)),
        RangeRequest(150, 200, (1,)),
        RangeRequest(1000, 1100, (2,)),
        RangeRequest(1100, 1300, (3,)),
    ]
    # unsorted input, a repeated member and one larger than the bound (a request alone)
    out = coalesce([Interval(500, 5000, 7), Interval(0, 10, 8), Interval(0, 10, 9)], 1000, 1000)
    assert out == [RangeRequest(0, 10, (8, 9)), RangeRequest(500, 5000, (7,))]
    assert coalesce([], 10, 10) == []


def test_coalesce_covers_every_interval_once_and_respects_the_bounds():
    rng = random.Random(3)
    for _ in range(200):
        ivs = []
        for i in range(rng.randint(1, 40)):
            s = rng.randint(0, 10_000)
            ivs.append(Interval(s, s + rng.randint(0, 300), i))
        gap, bound = rng.randint(0, 500), rng.randint(100, 3000)
        reqs = coalesce(ivs, gap, bound)
        assert sorted(i for r in reqs for i in r.items) == list(range(len(ivs)))
        for r in reqs:
            covered = [ivs[i] for i in r.items]
            assert all(r.start <= iv.start and iv.end <= r.end for iv in covered)
            assert r.size <= bound or len(r.items) == 1
        assert all(a.end <= b.start or a.start <= b.start for a, b in zip(reqs, reqs[1:], strict=False))


def test_retry_classification_and_jittered_backoff():
    class ClientError(Exception):
        def __init__(self, code: str, status: int) -> None:
            super().__init__(code)
            self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

    assert is_retryable(ClientError("SlowDown", 503))
    assert is_retryable(ClientError("InternalError", 500))
    assert is_retryable(TimeoutError("read timed out"))
    wrapped = OSError(16, "busy")
    wrapped.__cause__ = ClientError("SlowDown", 503)
    assert is_retryable(wrapped)
    assert not is_retryable(ClientError("NoSuchKey", 404))
    assert not is_retryable(ClientError("AccessDenied", 403))
    assert not is_retryable(ClientError("PreconditionFailed", 412))
    assert not is_retryable(ValueError("bad"))
    rng = random.Random(0)
    waits = [backoff_s(a, 0.1, 1.0, rng) for a in range(8) for _ in range(50)]
    assert all(0 <= w <= 1.0 for w in waits)
    assert max(backoff_s(0, 0.1, 1.0, rng) for _ in range(50)) <= 0.1
    assert len({round(w, 6) for w in waits}) > 300  # jittered, not a fixed schedule


# ---------------------------------------------------------------- bytes and requests


@pytest.mark.parametrize("prefetch", [False, True])
def test_bytes_equal_span_readers_for_random_member_sets(members, s3_env, prefetch):
    local = SpanReader()
    rng = random.Random(11 + prefetch)
    for _ in range(3):
        reader = ObjectStoreReader(ObjectReadOptions())
        chosen = rng.sample(members, 60)
        if prefetch:
            reader.prefetch([r for _, r in chosen])
        for path, r in chosen:
            got = reader.read(r.location, r.span, r.expected_size, r.member)
            assert got == local.read(path, r.span, r.expected_size, r.member)
        s = reader.stats
        assert s.members_read == 60
        if prefetch:
            assert s.prefetch_hits == 60 and s.direct_reads == 0
            assert s.range_requests < 60  # coalesced
        else:
            assert s.direct_reads == 60 and s.range_requests == 60
        reader.close()


def test_planned_batches_from_the_bucket_equal_local_ones_with_few_requests(root, remote, s3_env):
    """The loader over the bucket (look-ahead on) yields the batches of the local copy, and asks
    for at most a quarter as many ranges as it reads frames."""
    local = list(BagStream(build_index(root, "train", P), P).iter_stream(0, 0))
    ds = remote_stream(root, remote, ObjectReadOptions())
    got = list(ds.iter_stream(0, 0))
    assert len(got) == len(local) > 2
    for a, b in zip(local, got, strict=True):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["tracklet"], b["tracklet"])
    stats = ds.source.reader().stats
    frames = stats.members_read
    assert frames >= len(local) * P.batch_size
    assert stats.range_requests <= frames / 4, stats.as_dict()
    assert stats.prefetch_hits == frames  # every frame came from the look-ahead


def test_without_look_ahead_each_batch_is_still_coalesced(root, remote, s3_env):
    ahead = remote_stream(root, remote, ObjectReadOptions(lookahead_batches=4))
    alone = remote_stream(root, remote, ObjectReadOptions(lookahead_batches=0))
    a, b = list(ahead.iter_stream(0, 0)), list(alone.iter_stream(0, 0))
    assert all(torch.equal(x["frames"], y["frames"]) for x, y in zip(a, b, strict=True))
    sa, sb = ahead.source.reader().stats, alone.source.reader().stats
    assert sa.members_read == sb.members_read
    assert sa.range_requests <= sb.range_requests  # a wider window merges at least as much
    assert sb.prefetch_hits == sb.members_read


# ---------------------------------------------------------------- damage in the bucket


def _shard_of(members, remote):
    path, r = members[0]
    return path, r, r.location.removeprefix("s3://").split("/", 1)


def test_truncated_object_reads_what_is_there_and_refuses_the_rest(members, remote, s3_server, s3_env):
    path, first, (bucket, key) = _shard_of(members, remote)
    data = Path(path).read_bytes()
    same = [r for p, r in members if p == path]
    last = max(same, key=lambda r: r.span.offset)
    cut = last.span.offset + 10  # inside the last frame
    copy_key = key.replace(".tar", "-trunc.tar")
    s3_server.put(bucket, copy_key, data[:cut])
    url = f"s3://{bucket}/{copy_key}"
    reader = ObjectStoreReader(ObjectReadOptions())
    with pytest.raises(MemberError) as err:
        reader.read(url, last.span, last.expected_size, last.member)
    assert err.value.reason == "truncated_shard"
    assert reader.read(url, first.span, first.expected_size, first.member) == SpanReader().read(
        path, first.span, first.expected_size, first.member
    )
    # prefetched, the same verdicts
    reader = ObjectStoreReader(ObjectReadOptions())
    reader.prefetch([MemberRequest(url, r.span, r.expected_size, r.member) for r in (first, last)])
    assert reader.read(url, first.span, first.expected_size, first.member)
    with pytest.raises(MemberError, match="past the end") as err:
        reader.read(url, last.span, last.expected_size, last.member)
    assert err.value.reason == "truncated_shard"


@pytest.mark.parametrize("when", ["before_first_read", "after_first_read"])
def test_object_replaced_with_other_bytes_of_the_same_size_is_shard_changed(
    members, remote, s3_server, s3_env, when
):
    path, first, (bucket, key) = _shard_of(members, remote)
    data = bytearray(Path(path).read_bytes())
    second = next(r for p, r in members if p == path and r.span.offset > first.span.offset + 2000)
    copy_key = key.replace(".tar", f"-{when}.tar")
    s3_server.put(bucket, copy_key, bytes(data))
    url = f"s3://{bucket}/{copy_key}"
    reader = ObjectStoreReader(ObjectReadOptions())
    if when == "after_first_read":
        assert reader.read(url, first.span, first.expected_size, first.member)
    data[second.span.offset + 3] ^= 0xFF
    s3_server.put(bucket, copy_key, bytes(data))  # same size, a new ETag
    with pytest.raises(MemberError) as err:
        reader.read(url, second.span, second.expected_size, second.member)
    assert err.value.reason == "shard_changed"
    # after the first read, even an unchanged member of the replaced object is refused (If-Match)
    if when == "after_first_read":
        with pytest.raises(MemberError, match="replaced") as err:
            reader.read(url, first.span, first.expected_size, first.member)
        assert err.value.reason == "shard_changed"


def test_object_replaced_with_another_size_is_shard_changed(members, remote, s3_server, s3_env):
    path, first, (bucket, key) = _shard_of(members, remote)
    copy_key = key.replace(".tar", "-longer.tar")
    s3_server.put(bucket, copy_key, Path(path).read_bytes() + b"\0" * 1024)
    reader = ObjectStoreReader(ObjectReadOptions())
    with pytest.raises(MemberError, match="shards table says") as err:
        reader.read(f"s3://{bucket}/{copy_key}", first.span, first.expected_size, first.member)
    assert err.value.reason == "shard_changed"


def test_member_spans_swapped_in_the_catalog_are_span_mismatch(members, s3_env):
    """The header before the span names the member: a span of another frame (its own CRC) fails."""
    (_, a), (_, b) = members[0], members[1]
    reader = ObjectStoreReader(ObjectReadOptions())
    reader.prefetch([MemberRequest(a.location, b.span, a.expected_size, a.member)])
    with pytest.raises(MemberError) as err:
        reader.read(a.location, b.span, a.expected_size, a.member)
    assert err.value.reason == "span_mismatch"


# ---------------------------------------------------------------- throttling


@pytest.fixture()
def proxy(s3_server):
    with LatencyProxy(s3_server.endpoint) as p:
        yield p


def test_throttled_requests_are_retried_and_counted(members, proxy, s3_env):
    opts = ObjectReadOptions(storage_options={"endpoint_url": proxy.endpoint}, **FAST)
    path, r = members[5]
    reader = ObjectStoreReader(opts)
    proxy.fail_next(2)  # the HEAD and its first retry
    want = SpanReader().read(path, r.span, r.expected_size, r.member)
    assert reader.read(r.location, r.span, r.expected_size, r.member) == want
    assert reader.stats.retries == 2 and proxy.counts["503"] == 2
    # prefetched ranges too
    proxy.fail_next(3)
    chosen = [m for _, m in members[10:40]]
    reader.prefetch(chosen)
    for p, m in members[10:40]:
        assert reader.read(m.location, m.span, m.expected_size, m.member) == SpanReader().read(
            p, m.span, m.expected_size, m.member
        )
    assert reader.stats.retries == 5 and proxy.counts["503"] == 5
    reader.close()


def test_throttling_beyond_the_retry_budget_is_one_oserror_without_credentials(members, proxy, s3_env):
    opts = ObjectReadOptions(storage_options={"endpoint_url": proxy.endpoint}, retries=3, **FAST)
    _, r = members[0]
    reader = ObjectStoreReader(opts)
    proxy.fail_next(1000)
    with pytest.raises(OSError) as err:
        reader.read(r.location, r.span, r.expected_size, r.member)
    assert not isinstance(err.value, MemberError)
    text = str(err.value)
    assert text.startswith(f"{r.location}: cannot read it after 4 tries (HTTP 503")
    assert KEY_ID not in text and SECRET not in text and "\n" not in text
    assert reader.stats.retries == 3 and proxy.counts["503"] == 4


# ---------------------------------------------------------------- memory


def test_prefetched_bytes_never_exceed_the_budget(members, s3_env):
    budget = 40_000
    reader = ObjectStoreReader(ObjectReadOptions(prefetch_bytes=budget, max_request_bytes=16_000))
    local = SpanReader()
    window = 50
    reqs = [r for _, r in members]
    total = 0
    for k in range(0, len(members), 10):  # a sliding hint, as the loader gives it
        reader.prefetch(reqs[k : k + window])
        for path, r in members[k : k + 10]:
            assert reader.read(r.location, r.span, r.expected_size, r.member) == local.read(
                path, r.span, r.expected_size, r.member
            )
            total += r.span.size
        assert 0 <= reader.stats.buffer_bytes <= budget
    s = reader.stats
    assert s.buffer_peak_bytes <= budget and total > 4 * budget
    assert s.prefetch_hits > len(members) // 2  # the budget still serves most reads
    reader.close()
    assert reader.stats.buffer_bytes == 0


def test_options_pickle_and_refuse_negative_values():
    import pickle

    opts = ObjectReadOptions(storage_options={"key": "AKIA-secret-value"}, cache_dir="/tmp/x", cache_bytes=5)
    assert pickle.loads(pickle.dumps(opts)) == opts
    assert "AKIA-secret-value" not in repr(opts) and "cache_bytes=5" in repr(opts)
    assert isinstance(pickle.loads(pickle.dumps(open_object_reader(opts)))(), ObjectStoreReader)
    with pytest.raises(ValueError, match="prefetch_bytes"):
        ObjectReadOptions(prefetch_bytes=-1)


# ---------------------------------------------------------------- the block cache


def test_eviction_order_is_by_next_use_never_by_recency():
    import numpy as np

    from polyp_ssl.shards.block_cache import NEVER, PlanUses, eviction_order

    uses = PlanUses(np.array([7, 3, 7, 5, 3]), np.array([40, 2, 9, 30, 50]))
    assert uses.next_use(7, 0) == 9 and uses.next_use(7, 10) == 40 and uses.next_use(7, 41) == NEVER
    assert uses.next_use(3, 3) == 50 and uses.next_use(4, 0) == NEVER
    # now = 10: 3 -> 50, 5 -> 30, 7 -> 40, 9 -> never; furthest first, never before all
    assert eviction_order([3, 5, 7, 9], lambda k: uses.next_use(k, 10)) == [9, 3, 7, 5]
    # ties (both never) in key order, whatever order they were cached in
    assert eviction_order([12, 11], lambda k: NEVER) == [11, 12]


def _cache_read(directory: str, location: str, ranges, out) -> None:
    from polyp_ssl.shards.block_cache import BlockCache

    data = bytes(range(256)) * 64  # 16 KiB object
    calls = []

    def get(loc, lo, hi):
        calls.append((lo, hi))
        return data[lo:hi]

    cache = BlockCache(directory, capacity=1 << 20, block_bytes=1024)
    got = [cache.read(location, '"etag1"', len(data), lo, hi, get) == data[lo:hi] for lo, hi in ranges]
    out.put((all(got), calls, cache.stats.as_dict()))


def test_blocks_written_by_one_process_are_read_by_another(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # two processes of one machine, as loader workers are
    q = ctx.Queue()
    ranges = [(100, 3000), (5000, 5100), (16000, 16384)]
    for _ in range(2):
        p = ctx.Process(target=_cache_read, args=(str(tmp_path), "s3://b/shard.tar", ranges, q))
        p.start()
        first = q.get(timeout=60)
        p.join(timeout=60)
        assert p.exitcode == 0 and first[0]
        if _ == 0:
            assert first[1] == [(0, 3072), (4096, 5120), (15360, 16384)]  # whole blocks fetched
            assert first[2]["hits"] == 0
        else:
            assert first[1] == [] and first[2]["misses"] == 0  # every block from the other process
    blocks = list((tmp_path / "blocks").rglob("*.blk"))
    assert len(blocks) == 5 and not list(tmp_path.rglob("*.tmp"))


def test_cache_stays_within_its_size_and_keeps_the_blocks_needed_soonest(tmp_path):
    import numpy as np

    from polyp_ssl.shards.block_cache import BlockCache

    data = bytes(range(256)) * 40  # 10 blocks of 1 KiB
    cache = BlockCache(tmp_path, capacity=4 * 1024, block_bytes=1024)
    # the plan reads blocks 0..9 at ordinal 0, then blocks 2, 5, 7 at ordinals 1..3
    which = np.zeros(13, np.int64)
    starts = np.array([b * 1024 for b in range(10)] + [2048, 5120, 7168])
    cache.schedule(["s3://b/x.tar"], which, starts, starts + 100, np.array([0] * 10 + [1, 2, 3]))
    cache.advance(0)
    for b in range(10):
        assert cache.read(
            "s3://b/x.tar", "e", len(data), b * 1024, b * 1024 + 100, lambda _, lo, hi: data[lo:hi]
        )
    on_disk = sorted(int(p.name.split("-")[1].split(".")[0]) for p in (tmp_path / "blocks").rglob("*.blk"))
    assert sum(p.stat().st_size for p in (tmp_path / "blocks").rglob("*.blk")) <= 4 * 1024
    assert {2, 5, 7} <= set(on_disk)  # the blocks read again stayed; no recency rule evicted them
    cache.advance(1)
    fetched = []
    for b in (2, 5, 7):
        cache.read(
            "s3://b/x.tar", "e", len(data), b * 1024, b * 1024 + 100, lambda _, lo, hi: fetched.append(lo)
        )
    assert fetched == []
    # another ETag (a replaced object) never reads the old blocks
    cache.read(
        "s3://b/x.tar", "other", len(data), 2048, 2148, lambda _, lo, hi: fetched.append(lo) or data[lo:hi]
    )
    assert fetched == [2048]


def test_cache_hits_on_the_second_epoch_and_batches_stay_the_same(root, remote, tmp_path, s3_env):
    size = sum(p.stat().st_size for p in (root / "shards" / "train").glob("*.tar"))
    opts = ObjectReadOptions(
        cache_dir=str(tmp_path / "cache"), cache_bytes=size // 4, cache_block_bytes=16 << 10
    )
    params = replace_params(max_epochs=2)
    ds = remote_stream(root, remote, opts, params)
    local = BagStream(build_index(root, "train", params), params)
    hits = []
    for epoch in range(2):
        reader = ds.source.reader()
        before = dict(reader.cache_stats)
        got = list(ds.iter_stream(epoch, 0))
        want = list(local.iter_stream(epoch, 0))
        assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(got, want, strict=True))
        after = reader.cache_stats
        hits.append((after["hits"] - before["hits"], after["misses"] - before["misses"]))
    assert hits[1][0] > 0, hits
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "blocks").rglob("*.blk"))
    assert 0 < on_disk <= size // 4


def replace_params(**kw) -> StreamParams:
    from dataclasses import replace

    return replace(P, **kw)


def test_a_shard_mostly_in_the_look_ahead_is_fetched_whole_into_the_cache(members, tmp_path, s3_env):
    """Hinted frames that are most of a shard's bytes: the whole object comes into the cache, and a
    member never hinted (a sample JSON) is then read without a request."""
    import tarfile

    from polyp_ssl.shards.members import MemberSpan, crc32

    path, first = members[0]
    same = [r for p, r in members if p == path]
    size = first.expected_size
    assert sum(r.span.size for r in same) >= size / 2
    opts = ObjectReadOptions(cache_dir=str(tmp_path), cache_bytes=4 * size, cache_block_bytes=16 << 10)
    reader = ObjectStoreReader(opts)
    reader.prefetch(same)
    for r in same:
        reader.read(r.location, r.span, r.expected_size, r.member)
    assert reader.stats.bytes_fetched >= size  # every byte of the object
    requests = reader.stats.range_requests
    with tarfile.open(path) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        data = tar.extractfile(info).read()
    span = MemberSpan(info.offset_data, info.size, crc32(data))
    assert reader.read(first.location, span, size, info.name) == data
    assert reader.stats.range_requests == requests  # from the cache
    reader.close()


def test_a_damaged_cache_block_is_not_taken_for_a_changed_shard(members, tmp_path, s3_env):
    path, r = members[3]
    opts = ObjectReadOptions(cache_dir=str(tmp_path), cache_bytes=1 << 20, cache_block_bytes=4 << 10)
    want = SpanReader().read(path, r.span, r.expected_size, r.member)
    assert ObjectStoreReader(opts).read(r.location, r.span, r.expected_size, r.member) == want
    blocks = sorted((tmp_path / "blocks").rglob("*.blk"))
    assert blocks
    for b in blocks:  # flip every cached byte
        b.write_bytes(bytes(x ^ 0xFF for x in b.read_bytes()))
    reader = ObjectStoreReader(opts)
    assert reader.read(r.location, r.span, r.expected_size, r.member) == want
    assert reader.cache_stats["hits"] > 0 and reader.stats.range_requests == 1
