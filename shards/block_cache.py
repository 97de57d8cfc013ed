"""A node-local cache of object-store bytes in fixed-size blocks, evicted by the plan's next use.

Remote shards are cut into blocks of `block_bytes`; block i of an object holds its bytes
[i * block_bytes, (i + 1) * block_bytes). A block is one file,

    CACHE_DIR/blocks/<object hash>/<hash of ETag and block size>-<i>.blk

keyed by (object, ETag, block), so a replaced object (a new ETag) never reads an old block. Every
loader worker and every rank of a machine pointed at the same directory shares it: a block is
written to a temporary file and renamed into place while holding `CACHE_DIR/.lock` (an advisory
`flock`, dropped by the kernel if its holder dies), and readers read a block file without the
lock (a rename is atomic; an evicted file still open stays readable).

Eviction knows the future: the loader's epoch plan says when each block will be read next
(`schedule`: the block reads of this rank's streams for the rest of this epoch and the next, each
at its batch ordinal; `advance`: the batch being read now). When the cache would exceed
`capacity` bytes, the blocks needed furthest in the future go first (`eviction_order`, Belady's
rule), blocks with no known next use before any other, and a new block needed later than every
cached one is not stored at all; recency plays no part (an LRU cache over an epoch of random
access degenerates to FIFO and re-downloads everything). Several ranks on one machine each rank
blocks by their own plan.

Bounds: at most `capacity` bytes of blocks on disk (plus one block per writer in flight); the
plan's uses at most MAX_PLAN_USES entries (32 bytes each) per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np

MAX_PLAN_USES = 1 << 20
NEVER = np.iinfo(np.int64).max
_HASH_BITS = 40  # object hash bits in a block's integer key
_BLOCK_BITS = 23  # block index bits (objects up to 8 Mi blocks)
EVICT_SLACK = 1 / 32  # an eviction frees this share of the capacity beyond the incoming block
_TMP_AGE_S = 600  # a temporary file older than this was left by a dead writer


def object_hash(location: str) -> int:
    """A stable 40-bit number naming an object (the same in every process)."""
    return int.from_bytes(hashlib.sha1(location.encode("utf-8", "surrogateescape")).digest()[:5], "big")


def block_key(obj: int | np.ndarray, block: int | np.ndarray) -> int | np.ndarray:
    return (obj << _BLOCK_BITS) | block


def eviction_order(cached: Sequence[int], next_use: Callable[[int], int]) -> list[int]:
    """The cached block keys in the order they should go: the one needed furthest in the future
    first, those with no known next use (NEVER) before all others; ties by key, so every process
    ranks the same blocks the same way."""
    return sorted(cached, key=lambda k: (-int(next_use(k)), k))


@dataclass
class CacheStats:
    hits: int = 0  # block lookups found in the cache
    misses: int = 0
    bytes_hit: int = 0  # bytes returned from cached blocks
    bytes_missed: int = 0
    blocks_written: int = 0
    blocks_evicted: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        out: dict = {f.name: getattr(self, f.name) for f in fields(self)}
        out["hit_rate"] = round(self.hit_rate, 4)
        return out


class PlanUses:
    """When each block will be read next: block keys sorted, each with its sorted read ordinals."""

    def __init__(self, keys: np.ndarray, positions: np.ndarray) -> None:
        order = np.lexsort((positions, keys))
        self.keys = keys[order]
        self.positions = positions[order]

    def next_use(self, key: int, now: int) -> int:
        lo = int(np.searchsorted(self.keys, key, "left"))
        hi = int(np.searchsorted(self.keys, key, "right"))
        if lo == hi:
            return NEVER
        i = lo + int(np.searchsorted(self.positions[lo:hi], now, "left"))
        return int(self.positions[i]) if i < hi else NEVER


class BlockCache:
    """See the module docstring. `read` is what the object-store reader calls for a byte range."""

    def __init__(
        self, directory: str | os.PathLike[str], capacity: int, block_bytes: int = 256 << 10
    ) -> None:
        self.directory = os.fspath(directory)
        self.capacity = int(capacity)
        self.block_bytes = int(block_bytes)
        self.stats = CacheStats()
        self._uses = PlanUses(np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._now = 0
        self._done_now: set[int] = set()  # blocks the current batch has read
        self.trace: list[int] | None = None  # a list: every block lookup's key is appended (benchmarks)
        self._mutex = threading.Lock()
        os.makedirs(os.path.join(self.directory, "blocks"), exist_ok=True)

    # ------------------------------------------------------------------ the future

    def schedule(
        self,
        locations: Sequence[str],
        which: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        at: np.ndarray,
    ) -> None:
        """The plan's reads to come: read r covers bytes [starts[r], ends[r]) of
        locations[which[r]] at batch ordinal at[r] (the first MAX_PLAN_USES reads are kept)."""
        n = min(len(at), MAX_PLAN_USES)
        hashes = np.asarray([object_hash(loc) for loc in locations], dtype=np.int64)
        obj = hashes[np.asarray(which[:n], np.int64)]
        b0 = np.asarray(starts[:n], np.int64) // self.block_bytes
        b1 = (np.maximum(np.asarray(ends[:n], np.int64), np.asarray(starts[:n], np.int64) + 1) - 1) // (
            self.block_bytes
        )
        span = b1 - b0 + 1
        rep = np.repeat(np.arange(n), span)
        blocks = b0[rep] + (np.arange(len(rep)) - np.repeat(np.cumsum(span) - span, span))
        keys = block_key(obj[rep], blocks)
        with self._mutex:
            self._uses = PlanUses(np.asarray(keys, np.int64), np.asarray(at[:n], np.int64)[rep])

    def advance(self, now: int) -> None:
        """The batch ordinal being read now (reads before it are past)."""
        if int(now) != self._now:
            self._done_now.clear()
        self._now = int(now)

    def next_use(self, key: int) -> int:
        """The ordinal of the block's next read: this batch's when it has not read the block yet,
        else a later one's (NEVER when the plan names none)."""
        return self._uses.next_use(key, self._now + (key in self._done_now))

    # ------------------------------------------------------------------ files

    def _dir(self, obj: int) -> str:
        return os.path.join(self.directory, "blocks", f"{obj:010x}")

    def _file(self, obj: int, etag: str | None, block: int) -> str:
        # the block size is part of the key: a cache filled with other blocks never serves these
        tag = hashlib.sha1(f"{etag or ''}|{self.block_bytes}".encode()).hexdigest()[:12]
        return os.path.join(self._dir(obj), f"{tag}-{block}.blk")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the lock

    def _cached_files(self) -> list[tuple[int, str, int]]:
        """(block key, path, bytes) of every block on disk; stale temporary files removed."""
        out = []
        root = os.path.join(self.directory, "blocks")
        now = time.time()
        for d in os.scandir(root):
            if not d.is_dir(follow_symlinks=False):
                continue
            try:
                obj = int(d.name, 16)
            except ValueError:
                continue
            for f in os.scandir(d.path):
                if f.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - f.stat().st_mtime > _TMP_AGE_S:
                            os.unlink(f.path)
                    continue
                try:
                    block = int(f.name.rsplit("-", 1)[1].removesuffix(".blk"))
                    out.append((int(block_key(obj, block)), f.path, f.stat().st_size))
                except (ValueError, IndexError, OSError):
                    continue
        return out

    def _used(self) -> int:
        """Bytes of blocks on disk as last recorded (holding the lock); a scan when unknown."""
        try:
            with open(os.path.join(self.directory, "used"), "rb") as fh:
                return max(0, int(fh.read(32) or b"0"))
        except (OSError, ValueError):
            return sum(size for _, _, size in self._cached_files())

    def _set_used(self, used: int) -> None:
        tmp = os.path.join(self.directory, f"used.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(str(max(0, used)).encode())
        os.replace(tmp, os.path.join(self.directory, "used"))

    def _make_room(self, incoming: int, incoming_next: int) -> int:
        """Evict (holding the lock) until `incoming` more bytes fit, furthest next use first, but
        only blocks needed later than the incoming one (`incoming_next`; Belady's rule: when
        every cached block is needed sooner, nothing is evicted and the block is not stored);
        returns the bytes left on disk (counted by a scan, which corrects the record)."""
        files = self._cached_files()
        used = sum(size for _, _, size in files)
        if used + incoming <= self.capacity:
            return used
        by_key: dict[int, list[tuple[str, int]]] = {}
        for key, path, size in files:
            by_key.setdefault(key, []).append((path, size))
        later = [k for k in by_key if self.next_use(k) > incoming_next]
        if used - sum(size for k in later for _, size in by_key[k]) + incoming > self.capacity:
            return used
        # room for a few more blocks too (EVICT_SLACK of the capacity), so that a scan of the
        # directory serves several writes, not one
        target = max(self.capacity - incoming - int(self.capacity * EVICT_SLACK), 0)
        for key in eviction_order(later, self.next_use):
            for path, size in by_key[key]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    used -= size
                    self.stats.blocks_evicted += 1
            if used <= target:
                break
        return used

    def _store(self, obj: int, etag: str | None, block: int, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        path = self._file(obj, etag, block)
        with self._locked():
            if os.path.exists(path):
                return
            used = self._used()
            if used + len(data) > self.capacity:
                upcoming = self.next_use(int(block_key(obj, block)))
                if upcoming == NEVER:
                    return  # not worth a place: nothing says it is read again
                used = self._make_room(len(data), upcoming)
                if used + len(data) > self.capacity:
                    self._set_used(used)
                    return
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
            self._set_used(used + len(data))
            self.stats.blocks_written += 1

    # ------------------------------------------------------------------ reading

    def read(
        self,
        location: str,
        etag: str | None,
        size: int,
        start: int,
        end: int,
        get: Callable[[str, int, int], bytes],
    ) -> bytes:
        """Bytes [start, end) of the object (`size` bytes long): cached blocks read from disk, the
        missing ones fetched with `get(location, lo, hi)` (one request per run of adjacent missing
        blocks), stored, and the range cut out of them."""
        if end <= start:
            return b""
        obj = object_hash(location)
        bb = self.block_bytes
        first, last = start // bb, (min(end, max(size, end)) - 1) // bb
        parts: dict[int, bytes] = {}
        missing: list[int] = []
        for b in range(first, last + 1):
            self._done_now.add(int(block_key(obj, b)))
            if self.trace is not None:
                self.trace.append(int(block_key(obj, b)))
            lo, hi = max(start, b * bb) - b * bb, min(end, (b + 1) * bb) - b * bb
            try:
                with open(self._file(obj, etag, b), "rb") as fh:
                    data = os.pread(fh.fileno(), hi - lo, lo)
            except FileNotFoundError:
                data = b""
            if len(data) == hi - lo and data:
                parts[b] = data
                self.stats.hits += 1
                self.stats.bytes_hit += len(data)
            else:
                missing.append(b)
                self.stats.misses += 1
        for run in _runs(missing):
            lo, hi = run[0] * bb, (run[-1] + 1) * bb
            hi = min(hi, size) if size >= 0 else hi
            got = get(location, lo, hi)
            for b in run:
                block = got[b * bb - lo : (b + 1) * bb - lo]
                if len(block) == bb or (size >= 0 and b * bb + len(block) == size):
                    self._store(obj, etag, b, block)  # only whole blocks (or the object's tail)
                cut_lo, cut_hi = max(start, b * bb) - b * bb, min(end, (b + 1) * bb) - b * bb
                parts[b] = block[cut_lo:cut_hi]
                self.stats.bytes_missed += len(parts[b])
        return b"".join(parts[b] for b in range(first, last + 1))


def _runs(blocks: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][-1] == b - 1:
            out[-1].append(b)
        else:
            out.append([b])
    return out
