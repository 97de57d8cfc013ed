"""Random access to a shard's members through the byte spans the catalog records at ingest.

Ingest writes, for every member of a sample (its `.json` and each `.NNNN.jpg` frame), where the
member's data starts in the tar, how long it is and its CRC-32 (the catalog's `json_offset`,
`json_size`, `json_crc32` in `tracklets` and `jpeg_offset`, `jpeg_size`, `jpeg_crc32` in
`frames`). A reader that needs only some frames of some tracklets then reads exactly those
bytes (one `pread` each on a local file) instead of streaming the whole shard, and the CRC of
what it read proves they are the bytes ingest wrote there. The same pread takes the tar header
right before the data, which must name the member the reader expects (key and extension) with the
span's size: CRCs prove the bytes, the header proves whose they are, so spans swapped between
members (CRCs moved along) are refused (`span_mismatch`). The catalog's spans are bounded too:
a frame's at most `max_jpeg_bytes` of its crop (checked when the loader's index is built).

Only plain (uncompressed) `.tar` shards on a local file system are read this way; a `pipe:`
command or a compressed shard has no offsets to seek to and is read sequentially instead.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from polyp_ssl.shards.files import open_regular_fd
from polyp_ssl.shards.reader import is_url

# a single member larger than this is not read into memory (a frame's JPEG is a few hundred KB;
# the sample JSON is capped at 16 MiB by shards.sample)
MAX_MEMBER_BYTES = 64 << 20
# headroom of a JPEG over its entropy-coded data: markers, quantisation and Huffman tables (a few
# hundred bytes from ingest's encoder) and any small metadata segment
JPEG_HEADROOM_BYTES = 64 << 10


def max_jpeg_bytes(width: int, height: int) -> int:
    """The most bytes a baseline JPEG of `width` x `height` pixels can take: libjpeg-turbo's worst
    case (tjBufSize: 6 bytes per pixel of the image padded to whole 16-pixel blocks, for 4:4:4
    noise at quality 100) plus JPEG_HEADROOM_BYTES. A catalog span longer than this for its crop
    is not a frame ingest wrote; refusing it bounds what a batch reads by the batch's pixels."""
    pad = 16
    return -(-int(width) // pad) * pad * (-(-int(height) // pad) * pad) * 6 + JPEG_HEADROOM_BYTES


@dataclass(frozen=True)
class MemberSpan:
    """Where one member's data lies in its shard: byte offset, length and CRC-32 of the data."""

    offset: int
    size: int
    crc32: int


@dataclass(frozen=True)
class MemberRequest:
    """One member a reader will be asked for soon (a `prefetch` hint): the arguments of its
    `MemberReader.read` call."""

    location: str
    span: MemberSpan
    expected_size: int = -1
    member: str | None = None


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
    skip reasons: `truncated_shard` (the span ends past the end of the file), `shard_changed`
    (another size of file, or bytes whose CRC-32 differs from ingest's) or `span_mismatch` (the
    tar header right before the span is not the expected member's: spans swapped or moved)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason

    def __reduce__(self) -> tuple:
        # OSError pickles as type(*args), args being (detail,) only: keep both arguments, so the
        # error survives the trip from a worker process
        return (type(self), (self.reason, str(self)))


def member_header_bytes(name: str) -> int:
    """How many header bytes ShardWriter (a GNU-format tar) writes right before member `name`'s
    data: one 512-byte header when the name fits the header's 100-byte name field, else a GNU
    long-name header, the name (NUL-terminated) in whole blocks, then the member's own header."""
    n = len(name.encode("utf-8", "surrogateescape"))
    if n <= tarfile.LENGTH_NAME:
        return tarfile.BLOCKSIZE
    return 2 * tarfile.BLOCKSIZE + -(-(n + 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _header(block: bytes, what: str) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise MemberError(
            "span_mismatch", f"no valid tar header right before the span ({what}: {exc})"
        ) from None


def _is_writers_header(block: bytes, raw: bytes, size: int) -> bool:
    """Whether `block` is, byte for byte where it matters, the header ShardWriter's tarfile writes
    for a regular member named `raw` (at most 100 bytes) of `size` bytes: the NUL-padded name, the
    size as 11 octal digits and a NUL, a regular-file type and a valid checksum. Anything else goes
    to the full parse, which names what differs."""
    return (
        block[:100] == raw.ljust(100, b"\0")
        and block[124:136] == b"%011o\0" % size
        and block[156:157] in (b"0", b"\0")
        and block[148:154].isdigit()
        and int(block[148:154], 8) == sum(block[:148]) + sum(block[156:]) + 256
    )


def check_member_header(head: bytes, name: str, size: int) -> None:
    """MemberError (`span_mismatch`) unless `head` (the `member_header_bytes(name)` bytes right
    before a span) is the header ShardWriter writes for a regular member `name` of `size` bytes.

    The CRC-32 proves the bytes are ingest's, the header proves whose they are: catalog spans
    rotated between members of one size (CRCs moved along) pass the CRC and fail here. A long
    name is verified only in the GNU long-name form the writer uses (a pax header cannot be)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= tarfile.LENGTH_NAME and _is_writers_header(head[-tarfile.BLOCKSIZE :], raw, size):
        return  # the common case, without parsing the header (4 us instead of 17 per frame)
    block = tarfile.BLOCKSIZE
    if len(raw) > tarfile.LENGTH_NAME:
        long_hdr = _header(head[:block], "long-name header")
        stored = head[block : block + len(raw) + 1]
        if (
            long_hdr.type != tarfile.GNUTYPE_LONGNAME
            or long_hdr.size != len(raw) + 1
            or stored != raw + b"\0"
        ):
            raise MemberError(
                "span_mismatch",
                f"member {name!r} has a name over {tarfile.LENGTH_NAME} bytes, and the blocks before "
                "the span are not its GNU long-name header (cannot verify which member it is)",
            )
    info = _header(head[-block:], "member header")
    # a long name's own header holds its first 100 bytes (the long-name blocks hold all of it)
    if info.name.encode("utf-8", "surrogateescape") != raw[: tarfile.LENGTH_NAME]:
        raise MemberError(
            "span_mismatch",
            f"the tar header before the span names member {info.name[:200]!r}, not {name!r} (the "
            "catalog's spans are swapped or moved)",
        )
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.size != size:
        raise MemberError(
            "span_mismatch",
            f"the tar header of {name!r} is of type {info.type!r} and {info.size} bytes; the catalog's "
            f"span is {size} bytes of a regular member",
        )


def check_span(span: MemberSpan) -> None:
    """MemberError (`shard_changed`) for a catalog span no reader reads: negative, or longer than
    MAX_MEMBER_BYTES."""
    if span.offset < 0 or span.size < 0 or span.size > MAX_MEMBER_BYTES:
        raise MemberError("shard_changed", f"the catalog's span {span.offset}+{span.size} is not readable")


def header_room(span: MemberSpan, size: int, expected_size: int, member: str | None, what: str) -> int:
    """How many header bytes a reader takes before `span` in a shard of `size` bytes (`what`:
    "file", "object"); MemberError when the shard's size is not the catalog's (`shard_changed`),
    the span ends past its end (`truncated_shard`) or leaves no room for the member's header
    (`span_mismatch`). The checks every MemberReader makes before it reads."""
    if 0 <= expected_size < size:
        raise MemberError(
            "shard_changed", f"the {what} is {size} bytes, the catalog's shards table says {expected_size}"
        )
    end = span.offset + span.size
    if end > size:
        raise MemberError(
            "truncated_shard",
            f"bytes {span.offset}..{end} lie past the end of the {what} ({size} bytes; the catalog "
            f"says {expected_size})",
        )
    pre = member_header_bytes(member) if member is not None else 0
    if span.offset < pre:
        raise MemberError(
            "span_mismatch", f"the span starts at {span.offset}, with no room for {member!r}'s tar header"
        )
    return pre


def checked_member(buf: bytes, span: MemberSpan, member: str | None, pre: int) -> bytes:
    """The member's data out of `buf` (its `pre` header bytes, then the data), checked: the whole
    span read (`truncated_shard`), the header names `member` (`span_mismatch`), the CRC-32 is the
    catalog's (`shard_changed`). The checks every MemberReader makes after it reads."""
    if len(buf) != pre + span.size:
        raise MemberError("truncated_shard", f"read {len(buf) - pre} of {span.size} bytes at {span.offset}")
    if member is not None:
        check_member_header(buf[:pre], member, span.size)
    data = buf[pre:] if pre else buf
    if crc32(data) != span.crc32:
        raise MemberError(
            "shard_changed",
            f"the {span.size} bytes at {span.offset} are not the ones ingest wrote (CRC-32 differs)",
        )
    return data


def local_shard_path(url: str) -> str | None:
    """The local file behind a shard location (shards.locations.shard_location), or None when
    it is not one that can be read at offsets: a `pipe:` command, a remote URL, or a compressed
    shard (`.tar.gz`, `.tgz`, ...). Local means what shards.reader.open_shard opens with open()."""
    if is_url(url):
        return None
    path = url.removeprefix("file:")
    return path if path.endswith(".tar") else None


class MemberReader(Protocol):
    """Reads one member of a shard at its catalog span, checked as `SpanReader.read` checks it.

    The interface the loader's planned batches read through (polyp_ssl.planned_source): today
    `SpanReader` (a local `pread`); a reader of another store (ranged GETs on an object store)
    implements the same two methods and raises the same errors: MemberError with its `reason`
    (`truncated_shard`, `shard_changed`, `span_mismatch`) for bytes that are not ingest's, OSError
    for a shard that cannot be reached. `location` is the shard's location (a local path for
    SpanReader), `expected_size` its size in the catalog's shards table (-1: unknown), `member`
    its name in the tar (key and extension), whose header the reader checks when given.

    A reader may also have `prefetch(requests: Sequence[MemberRequest]) -> None`: a hint of the
    members it will be asked for next, in order (shards.object_store fetches them ahead,
    coalesced); a reader without it is read member by member."""

    def read(
        self, location: str, span: MemberSpan, expected_size: int = -1, member: str | None = None
    ) -> bytes: ...

    def close(self) -> None: ...


class SpanReader:
    """The MemberReader of local plain `.tar` shards: reads member spans with `pread`, checking
    each read against the catalog.

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
        fd = open_regular_fd(path, "shard")  # a FIFO or device in place of a shard: refused by name
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

    def read(self, path: str, span: MemberSpan, expected_size: int = -1, member: str | None = None) -> bytes:
        """The span's bytes; MemberError when the file or the bytes are not ingest's, OSError
        when the file cannot be opened or read. With `member` (its name in the tar: key and
        extension), the header before the span is read in the same pread and must name that
        member with the span's size (`check_member_header`)."""
        check_span(span)
        fd, size = self._open(path, expected_size)
        pre = header_room(span, size, expected_size, member, "file")
        buf = os.pread(fd, pre + span.size, span.offset - pre)
        self.reads += 1
        self.bytes_read += len(buf)
        return checked_member(buf, span, member, pre)

    def prefetch(self, requests: Sequence[MemberRequest]) -> None:
        """Nothing to do ahead: a local pread costs no round trip."""

    def close(self) -> None:
        while self._files:
            _, (fd, _) = self._files.popitem()
            os.close(fd)

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
