"""Random access to a shard's members through the byte spans the catalog records at ingest.

Ingest writes, for every member of a sample (its `.json` and each `.NNNN.jpg` frame), where the
member's data starts in the tar, how long it is and its CRC-32 (the catalog's `json_offset`,
`json_size`, `json_crc32` in `tracklets` and `jpeg_offset`, `jpeg_size`, `jpeg_crc32` in
`frames`). A reader that needs only some frames of some tracklets then reads exactly those
bytes (one `pread` each on a local file) instead of streaming the whole shard, and the CRC of
what it read proves they are the bytes ingest wrote there.

Only plain (uncompressed) `.tar` shards on a local file system are read this way; a `pipe:`
command or a compressed shard has no offsets to seek to and is read sequentially instead.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from polyp_ssl.shards.reader import is_url

# a single member larger than this is not read into memory (a frame's JPEG is a few hundred KB;
# the sample JSON is capped at 16 MiB by shards.sample)
MAX_MEMBER_BYTES = 64 << 20


@dataclass(frozen=True)
class MemberSpan:
    """Where one member's data lies in its shard: byte offset, length and CRC-32 of the data."""

    offset: int
    size: int
    crc32: int


def crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def overlapping_spans(offsets: np.ndarray, sizes: np.ndarray) -> tuple[int, int] | None:
    """The indices of two spans of one shard that overlap (the first such pair in offset order),
    or None. Members of a tar never overlap, so the spans of a catalog that does are not ingest's;
    refusing them keeps what a batch reads bounded by the distinct bytes of its shards (a catalog
    cannot point every frame at one large region). Spans with a negative offset or size (null in
    the catalog) are ignored here and refused when read."""
    offsets, sizes = np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)
    ok = np.flatnonzero((offsets >= 0) & (sizes >= 0))
    if len(ok) < 2:
        return None
    order = ok[np.argsort(offsets[ok], kind="stable")]
    ends = offsets[order] + sizes[order]
    bad = np.flatnonzero(offsets[order][1:] < ends[:-1])
    if not len(bad):
        return None
    return int(order[bad[0]]), int(order[bad[0] + 1])


class MemberError(OSError):
    """A member that cannot be read as the catalog describes it; `reason` is one of the loader's
    skip reasons: `truncated_shard` (the span ends past the end of the file) or `shard_changed`
    (another size of file, or bytes whose CRC-32 differs from ingest's)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason

    def __reduce__(self) -> tuple:
        # OSError pickles as type(*args), args being (detail,) only: keep both arguments, so the
        # error survives the trip from a worker process
        return (type(self), (self.reason, str(self)))


def local_shard_path(url: str) -> str | None:
    """The local file behind a shard location (shards.locations.shard_location), or None when
    it is not one that can be read at offsets: a `pipe:` command, a remote URL, or a compressed
    shard (`.tar.gz`, `.tgz`, ...). Local means what shards.reader.open_shard opens with open()."""
    if is_url(url):
        return None
    path = url.removeprefix("file:")
    return path if path.endswith(".tar") else None


class SpanReader:
    """Reads member spans from local shard files, checking each read against the catalog.

    Keeps at most `max_open` files open (least recently used closed first). On opening a file
    its size is compared with the catalog's: a shorter file is `truncated_shard` for the spans
    that end past its end (the others still read), any other difference is `shard_changed` for
    every span of it. Every span's CRC-32 is checked after the read.
    """

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max(1, max_open)  # the file just opened is never the one closed
        self._files: OrderedDict[str, tuple[int, int]] = OrderedDict()  # path -> (fd, size)
        self.bytes_read = 0
        self.reads = 0

    def _open(self, path: str, expected_size: int) -> tuple[int, int]:
        entry = self._files.get(path)
        if entry is not None:
            self._files.move_to_end(path)
            return entry
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._files[path] = (fd, size)
        while len(self._files) > self.max_open:
            _, (old, _) = self._files.popitem(last=False)
            os.close(old)
        return fd, size

    def read(self, path: str, span: MemberSpan, expected_size: int = -1) -> bytes:
        """The span's bytes; MemberError when the file or the bytes are not ingest's, OSError
        when the file cannot be opened or read."""
        if span.offset < 0 or span.size < 0 or span.size > MAX_MEMBER_BYTES:
            raise MemberError(
                "shard_changed", f"the catalog's span {span.offset}+{span.size} is not readable"
            )
        fd, size = self._open(path, expected_size)
        if 0 <= expected_size < size:
            raise MemberError(
                "shard_changed", f"the file is {size} bytes, the catalog's shards table says {expected_size}"
            )
        end = span.offset + span.size
        if end > size:
            raise MemberError(
                "truncated_shard",
                f"bytes {span.offset}..{end} lie past the end of the file ({size} bytes; the catalog "
                f"says {expected_size})",
            )
        data = os.pread(fd, span.size, span.offset)
        self.reads += 1
        self.bytes_read += len(data)
        if len(data) != span.size:
            raise MemberError("truncated_shard", f"read {len(data)} of {span.size} bytes at {span.offset}")
        if crc32(data) != span.crc32:
            raise MemberError(
                "shard_changed",
                f"the {span.size} bytes at {span.offset} are not the ones ingest wrote (CRC-32 differs)",
            )
        return data

    def close(self) -> None:
        while self._files:
            _, (fd, _) = self._files.popitem()
            os.close(fd)

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
