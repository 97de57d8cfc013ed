"""Members of shards in an object store (`s3://`, `gs://`, `https://`, ...), read by range requests.

`ObjectStoreReader` is the `shards.members.MemberReader` of remote shards: `read` returns one
member's bytes checked exactly as `SpanReader` checks a local pread (the tar header before the
span, the CRC-32, the shard's size against the catalog's; the same `MemberError` reasons), and
`prefetch` takes a hint of the members the loader will read next (polyp_ssl.planned_source hands
it the members of the next batches of the epoch plan). The hinted members are grouped by shard,
intervals closer than `max_gap_bytes` merged into one range request of at most
`max_request_bytes` (shards.object_ranges.coalesce; each interval is a member's tar header and
data, so the header check works as on a local file), and fetched concurrently by at most
`max_in_flight` threads per process. A request that meets throttling (`503 SlowDown`), another 5xx
or a timeout is tried again after an exponential, jittered wait, at most `retries` times; then an
OSError names the object (never a credential).

A replaced object is refused: the first read of a shard asks for its size and ETag (one HEAD);
a size other than the catalog's is `shard_changed` (or `truncated_shard` for spans past the end
of a shorter object, as for a local file), every S3 range request is conditional on that ETag
(`If-Match`: an object replaced later answers 412 -> `shard_changed`), and every member's CRC-32
is checked whatever the store.

Memory per process (each loader worker has its own reader) is bounded and accounted:
  prefetched member bytes (held until read, or dropped when the hint no longer names them)
      <= prefetch_bytes                                       (default 128 MiB)
  range bodies in flight (gap bytes included)
      <= max_in_flight * max_request_bytes                    (default 16 x 4 MiB = 64 MiB)
  one direct read of a member that was not prefetched
      <= shards.members.MAX_MEMBER_BYTES + its header
`stats.buffer_peak_bytes` records the most prefetched bytes held at once. With `cache_dir`, range
reads go through the node's block cache (shards.block_cache), shared by every worker and rank
of the machine, at most `cache_bytes` on disk.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from polyp_ssl.shards.members import (
    MAX_MEMBER_BYTES,
    MemberError,
    MemberReader,
    MemberRequest,
    MemberSpan,
    check_span,
    checked_member,
    header_room,
    member_header_bytes,
)
from polyp_ssl.shards.object_ranges import (
    Interval,
    backoff_s,
    coalesce,
    is_changed_object,
    is_retryable,
    status_of,
)

log = logging.getLogger(__name__)

# s3fs and botocore each retry on their own (5 and 4 times, nested); the reader does it once, counted
_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 10, "read_timeout": 60},
}

Key = tuple[str, int, int, str | None]  # (location, offset, size, member)
# with a cache, a shard whose hinted members are at least this share of its bytes is fetched whole
WHOLE_OBJECT_SHARE = 0.5
WHOLE_OBJECT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class ObjectReadOptions:
    """How remote shards are read (see the module docstring for the memory bound). Pickles, so a
    spawned loader worker builds the same reader."""

    storage_options: dict = field(default_factory=dict, repr=False)  # may hold keys: never shown
    lookahead_batches: int = 3  # batches after the current one whose members are hinted
    max_gap_bytes: int = 128 << 10  # members of one shard closer than this share a request
    max_request_bytes: int = 4 << 20  # the most bytes one merged range request asks for
    max_in_flight: int = 16  # concurrent range requests per process
    prefetch_bytes: int = 128 << 20  # prefetched member bytes held per process
    retries: int = 5  # tries after the first, for throttling, 5xx and timeouts
    backoff_s: float = 0.05  # the first retry waits up to this (full jitter), doubling each time
    backoff_max_s: float = 5.0
    cache_dir: str | None = None  # the node's block cache (shards.block_cache); None: no cache
    cache_bytes: int = 0
    cache_block_bytes: int = 256 << 10  # small: a miss fetches whole blocks

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"ObjectReadOptions.{f.name} is {v}; it must be >= 0")
        if self.max_in_flight < 1 or self.max_request_bytes < 1 or self.cache_block_bytes < 1:
            raise ValueError("ObjectReadOptions: max_in_flight, max_request_bytes and cache_block_bytes >= 1")


@dataclass
class ReadStats:
    """What a reader did: requests (range GETs, HEADs) and bytes fetched, retries, and how the
    members it returned were found (prefetched or read alone)."""

    range_requests: int = 0
    head_requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    members_read: int = 0
    member_bytes: int = 0
    prefetch_hits: int = 0
    direct_reads: int = 0
    buffer_bytes: int = 0
    buffer_peak_bytes: int = 0
    dropped_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None


def _with_defaults(url: str, options: dict) -> dict:
    """The storage options with the reader's retry and timeout settings for S3 underneath (the
    user's own values win)."""
    if not url.lower().startswith(("s3://", "s3a://")):
        return dict(options)
    merged = {**_S3_DEFAULTS, **options}
    if "config_kwargs" in options and isinstance(options["config_kwargs"], dict):
        merged["config_kwargs"] = {**_S3_DEFAULTS["config_kwargs"], **options["config_kwargs"]}
    return merged


def _filesystem(url: str, options: dict) -> Any:
    """The filesystem for `url` with the reader's settings. On S3 these differ from any other
    user's (the S3 library's retries off), so fsspec's instance cache gives the readers of a
    process one instance of their own: s3fs's own retry loop is set to one try there."""
    from polyp_ssl.shards.remote import filesystem_for

    fs, _ = filesystem_for(url, _with_defaults(url, options))
    if url.lower().startswith(("s3://", "s3a://")) and hasattr(fs, "retries") and "retries" not in options:
        fs.retries = 1  # one try per call; this reader retries, counted
    return fs


async def _s3_range(fs: Any, path: str, start: int, end: int, etag: str | None) -> bytes:
    bucket, key, _ = fs.split_path(path)
    kw = {"Range": f"bytes={start}-{end - 1}"}
    if etag:
        kw["IfMatch"] = etag
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
    try:
        return await resp["Body"].read()
    finally:
        resp["Body"].close()


def get_range(fs: Any, path: str, start: int, end: int, etag: str | None) -> bytes:
    """Bytes [start, end) of the object at `path` in one request: on S3 conditional on `etag`
    (If-Match, so a replaced object answers 412), elsewhere fsspec's `cat_file`."""
    if end <= start:
        return b""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("s3", "s3a") and hasattr(fs, "_call_s3"):
        import fsspec.asyn

        return fsspec.asyn.sync(fs.loop, _s3_range, fs, path, start, end, etag)
    return fs.cat_file(path, start=start, end=end)


class ObjectStoreReader:
    """The MemberReader of shards in an object store (see the module docstring)."""

    def __init__(self, options: ObjectReadOptions | None = None) -> None:
        self.options = options or ObjectReadOptions()
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._fs: dict[str, Any] = {}  # URL scheme -> filesystem
        self._paths: dict[str, str] = {}  # location -> path within its filesystem
        self._objects: dict[str, ObjectInfo] = {}
        self._heading: dict[str, threading.Lock] = {}
        self._buffer: dict[Key, bytes] = {}  # prefetched header + data of a member
        self._pending: dict[Key, Future] = {}
        self._reserved: dict[Key, int] = {}  # bytes counted against prefetch_bytes
        self._wanted: set[Key] = set()
        self._whole: set[str] = set()  # objects fetched whole into the cache
        self._pool: ThreadPoolExecutor | None = None
        self._cache: Any = None
        if self.options.cache_dir and self.options.cache_bytes > 0:
            from polyp_ssl.shards.block_cache import BlockCache

            self._cache = BlockCache(
                self.options.cache_dir, self.options.cache_bytes, self.options.cache_block_bytes
            )

    @property
    def lookahead_batches(self) -> int:
        """How many batches after the current one the loader hints (polyp_ssl.planned_source)."""
        return self.options.lookahead_batches

    # ------------------------------------------------------------------ the plan, for the cache

    @property
    def wants_plan(self) -> bool:
        """True when the reader has a block cache, whose eviction needs the plan's future reads."""
        return self._cache is not None

    def plan_uses(
        self,
        locations: Sequence[str],
        which: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        at: np.ndarray,
    ) -> None:
        """The plan's reads to come (shards.block_cache.BlockCache.schedule)."""
        if self._cache is not None:
            self._cache.schedule(locations, which, starts, ends, at)

    def advance(self, position: int) -> None:
        """The batch ordinal being read now."""
        if self._cache is not None:
            self._cache.advance(position)

    @property
    def cache_stats(self) -> dict | None:
        return None if self._cache is None else self._cache.stats.as_dict()

    # ------------------------------------------------------------------ objects and requests

    def _path(self, location: str) -> tuple[Any, str]:
        scheme = location.split(":", 1)[0].lower()
        with self._lock:
            fs = self._fs.get(scheme)
        if fs is None:
            fs = _filesystem(location, self.options.storage_options)
            with self._lock:
                fs = self._fs.setdefault(scheme, fs)
        path = self._paths.get(location)
        if path is None:
            path = self._paths[location] = fs._strip_protocol(location)
        return fs, path

    def _retrying(self, location: str, what: str, fn: Callable[[], Any]) -> Any:
        """fn() tried again after a jittered exponential wait while it fails transiently, at most
        `retries` times; RemoteError (an OSError) naming the object otherwise."""
        from polyp_ssl.shards.remote import RemoteError, cause_of, display_url, remote_failure

        opts = self.options
        for attempt in range(opts.retries + 1):
            try:
                return fn()
            except MemberError:
                raise
            except Exception as exc:
                if is_changed_object(exc):
                    raise MemberError(
                        "shard_changed",
                        f"{display_url(location)} was replaced in the store since it was first read "
                        "(its ETag differs)",
                    ) from None
                if not is_retryable(exc):
                    raise remote_failure(location, exc, opts.storage_options, what) from None
                if attempt == opts.retries:
                    answer = status_of(exc)
                    raise RemoteError(
                        f"{display_url(location)}: cannot {what} it after {attempt + 1} tries"
                        f"{f' ({answer})' if answer else ''}: {cause_of(exc, opts.storage_options)}"
                    ) from None
                with self._lock:
                    self.stats.retries += 1
                time.sleep(backoff_s(attempt, opts.backoff_s, opts.backoff_max_s))
        raise AssertionError("unreachable")

    def object_info(self, location: str) -> ObjectInfo:
        """Size and ETag of the object, asked once per reader (the first answer is the reference
        every later request is checked against)."""
        info = self._objects.get(location)
        if info is not None:
            return info
        with self._lock:
            one = self._heading.setdefault(location, threading.Lock())
        with one:  # one HEAD per object, however many fetch threads ask at once
            info = self._objects.get(location)
            return info if info is not None else self._head(location)

    def _head(self, location: str) -> ObjectInfo:
        fs, path = self._path(location)

        def head() -> dict:
            with self._lock:
                self.stats.head_requests += 1
            return fs.info(path)

        meta = self._retrying(location, "read", head)
        etag = meta.get("ETag") or meta.get("etag")
        info = ObjectInfo(int(meta.get("size", -1)), str(etag) if etag else None)
        with self._lock:
            return self._objects.setdefault(location, info)

    def fetch(self, location: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object, through the block cache when there is one."""
        info = self.object_info(location)
        if self._cache is not None:
            return self._cache.read(location, info.etag, info.size, start, end, self._get)
        return self._get(location, start, end)

    def _get(self, location: str, start: int, end: int) -> bytes:
        """One range request (retried), counted."""
        fs, path = self._path(location)
        etag = self.object_info(location).etag

        def once() -> bytes:
            with self._lock:
                self.stats.range_requests += 1
            return get_range(fs, path, start, end, etag)

        data = self._retrying(location, "read", once)
        with self._lock:
            self.stats.bytes_fetched += len(data)
        return data

    # ------------------------------------------------------------------ the member interface

    def _checked_bounds(self, location: str, span: MemberSpan, expected_size: int, member: str | None) -> int:
        """The header bytes before the span; MemberError for a span or object that cannot hold it
        (the checks of shards.members, as SpanReader makes them)."""
        check_span(span)
        return header_room(span, self.object_info(location).size, expected_size, member, "object")

    def read(
        self, location: str, span: MemberSpan, expected_size: int = -1, member: str | None = None
    ) -> bytes:
        """The span's bytes, checked as SpanReader.read checks them: MemberError when the object
        or the bytes are not ingest's, OSError (RemoteError) when the object cannot be reached."""
        pre = self._checked_bounds(location, span, expected_size, member)
        buf = self._take((location, span.offset, span.size, member))
        if buf is None:
            buf = self.fetch(location, span.offset - pre, span.offset + span.size)
            with self._lock:
                self.stats.direct_reads += 1
        try:
            return self._checked(buf, span, member, pre)
        except MemberError:
            if self._cache is None:
                raise
        # bytes that came through the cache: a damaged block file is not a changed shard, so the
        # store itself is asked once more and has the last word
        from polyp_ssl.shards.remote import display_url

        log.warning("%s: a cached block did not check; reading the store directly", display_url(location))
        return self._checked(
            self._get(location, span.offset - pre, span.offset + span.size), span, member, pre
        )

    def _checked(self, buf: bytes, span: MemberSpan, member: str | None, pre: int) -> bytes:
        """The member's data, checked (shards.members.checked_member) and counted."""
        data = checked_member(buf, span, member, pre)
        with self._lock:
            self.stats.members_read += 1
            self.stats.member_bytes += len(data)
        return bytes(data)

    # ------------------------------------------------------------------ prefetching

    def _release(self, key: Key) -> None:
        """Forget a member's prefetched bytes (caller holds the lock)."""
        self._buffer.pop(key, None)
        self.stats.buffer_bytes -= self._reserved.pop(key, 0)

    def _take(self, key: Key) -> bytes | None:
        with self._lock:
            fut = self._pending.get(key)
        if fut is not None:
            with contextlib.suppress(Exception):  # the direct read meets the error again, named
                fut.result()
        with self._lock:
            data = self._buffer.get(key)
            if data is not None:
                self.stats.prefetch_hits += 1
            self._release(key)
            self._wanted.discard(key)
        return data

    def prefetch(self, requests: Sequence[MemberRequest]) -> None:
        """Fetch these members ahead, in the background (see the module docstring): prefetched
        members the hint no longer names are dropped, the rest are coalesced per shard and queued,
        nearest first, while their bytes fit `prefetch_bytes`."""
        opts = self.options
        todo: dict[str, list[tuple[Key, int]]] = {}
        with self._lock:
            wanted: dict[Key, MemberRequest] = {}
            for r in requests:
                wanted.setdefault((r.location, r.span.offset, r.span.size, r.member), r)
            self._wanted = set(wanted)
            for key in [k for k in self._buffer if k not in wanted]:
                self.stats.dropped_bytes += len(self._buffer[key])
                self._release(key)
            for key, r in wanted.items():
                if key in self._buffer or key in self._pending:
                    continue
                pre = member_header_bytes(r.member) if r.member is not None else 0
                need = pre + r.span.size
                if r.span.offset < pre or r.span.size < 0 or r.span.size > MAX_MEMBER_BYTES:
                    continue  # read() refuses it by name
                if self.stats.buffer_bytes + need > opts.prefetch_bytes:
                    break  # the rest is hinted again with the next batches
                self._reserved[key] = need
                self.stats.buffer_bytes += need
                self.stats.buffer_peak_bytes = max(self.stats.buffer_peak_bytes, self.stats.buffer_bytes)
                todo.setdefault(r.location, []).append((key, pre))
            if not todo:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(opts.max_in_flight, thread_name_prefix="object-read")
            for location, members in todo.items():
                intervals = [Interval(k[1] - pre, k[1] + k[2], i) for i, (k, pre) in enumerate(members)]
                intervals += self._whole_object(wanted, location)
                for req in coalesce(intervals, opts.max_gap_bytes, opts.max_request_bytes):
                    keys = [members[i][0] for i in req.items if i >= 0]
                    fut = self._pool.submit(self._fetch_range, location, req.start, req.end, keys)
                    for k in keys:
                        self._pending[k] = fut

    def _whole_object(self, wanted: dict[Key, MemberRequest], location: str) -> list[Interval]:
        """With a cache: block-sized filler intervals covering the whole object when the hint's
        members of it are at least WHOLE_OBJECT_SHARE of its bytes (the whole shard is fetched,
        into the cache, in requests of at most max_request_bytes); else none."""
        if self._cache is None:
            return []
        size = max((r.expected_size for k, r in wanted.items() if k[0] == location), default=-1)
        if size <= 0 or size > WHOLE_OBJECT_MAX_BYTES or location in self._whole:
            return []
        hinted = sum(k[2] for k in wanted if k[0] == location)
        if hinted < WHOLE_OBJECT_SHARE * size:
            return []
        self._whole.add(location)
        bb = self._cache.block_bytes
        return [Interval(lo, min(lo + bb, size), -1) for lo in range(0, size, bb)]

    def _fetch_range(self, location: str, start: int, end: int, keys: list[Key]) -> None:
        """One merged request; each member's header and data go to the buffer while still wanted."""
        try:
            data = memoryview(self.fetch(location, start, end))
        except BaseException:
            with self._lock:
                for k in keys:
                    self._pending.pop(k, None)
                    self._release(k)
            raise
        with self._lock:
            for k in keys:
                self._pending.pop(k, None)
                if k not in self._wanted or k not in self._reserved:
                    self._release(k)
                    continue
                lo = k[1] - self._reserved[k] + k[2] - start
                self._buffer[k] = bytes(data[lo : k[1] + k[2] - start])

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for key in list(self._reserved):
                self._release(key)
            self._pending.clear()
            self._wanted.clear()


def open_object_reader(options: ObjectReadOptions | None = None) -> Callable[[], MemberReader]:
    """What PlannedSource(open_reader=...) takes: builds one ObjectStoreReader per process."""
    return functools.partial(ObjectStoreReader, options or ObjectReadOptions())
