"""Read tar shards back as raw samples, in file order, without webdataset.

A sample is the run of consecutive members sharing a key (the member name up to its first dot),
as webdataset groups them: `{"__key__": K, "json": b"...", "0000.jpg": b"...", ...}`.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

from polyp_ssl.shards.files import open_regular
from polyp_ssl.shards.locations import HashingReader, ShardChanged, ShardIdentity

URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# schemes webdataset.gopen opens itself (pipe: commands, curl for http, gsutil, ...); any other
# scheme (s3://, gcs://, az://, memory://, ...) is opened with fsspec
WEBDATASET_SCHEMES = ("pipe", "http", "https", "sftp", "ftps", "scp", "gs", "ais", "hf")
BLOCK = 512
_ZERO = bytes(BLOCK)
# magic bytes of the compressions tarfile's "r|*" reads; a plain tar starts with a member name
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
MAX_HEADER_BYTES = 1 << 20  # a pax header or GNU long name (real ones are a few hundred bytes)
MAX_MEMBER_BYTES = 256 << 20  # a member read into memory (a sample's JSON or JPEG is far smaller)
READ_CHUNK = 1 << 20
EXPANSION_RATIO = 20  # a compressed shard expands to at most this many times its size ...
EXPANSION_FLOOR = 64 << 20  # ... or this many bytes, whichever is more
EXPANSION_UNKNOWN = 64 << 30  # when the compressed size is not known (a pipe, a URL)


def split_member_name(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name: the key ends at the first dot of the last path part."""
    head, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no suffix")
    return (f"{head}/{stem}" if head else stem), suffix


def safe_member_name(name: str) -> bool:
    """A relative member name without '..' parts (members are read in memory, never extracted,
    but their keys reach callers that might build paths from them)."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts


PathArg = str | os.PathLike[str]


def _open_for_samples(path: PathArg) -> BinaryIO:
    """A local shard as a regular file; an object under a remote root (shards.remote) streamed."""
    from polyp_ssl.shards.remote import is_remote

    text = os.fspath(path)
    if isinstance(text, str) and is_remote(text):
        return open_shard(text)
    return open_regular(path, "shard")


def iter_samples(
    paths: Iterable[PathArg] | PathArg, identities: Mapping[str, ShardIdentity] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples of the shards at `paths`, in order. A key that reappears later in the same
    shard (not consecutive) is an error, since webdataset would read it as two samples.

    With `identities` (str(path) -> the catalog's size and sha256), the bytes of each listed shard
    are hashed while they are read, and `ShardChanged` (a ValueError) is raised after its last
    sample when they are not that shard: a consumer that commits its output only at the end (embed)
    reads each shard once and still never keeps the result of a changed one."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    for path in paths:
        seen: set[str] = set()
        current: dict[str, Any] | None = None
        with _open_for_samples(path) as raw:
            expect = identities.get(str(path)) if identities else None
            stream: Any = HashingReader(raw, expect) if expect is not None else raw
            for name, data in read_members(stream):
                if not safe_member_name(name):
                    raise ValueError(f"{path}: member {name!r} is an absolute path or climbs with '..'")
                key, suffix = split_member_name(name)
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise ValueError(f"{path}: key {key!r} appears twice, not consecutively")
                    seen.add(key)
                    current = {"__key__": key}
                if suffix in current:
                    raise ValueError(f"{path}: member {name!r} appears twice")
                current[suffix] = data
            if current is not None:
                yield current
            if expect is not None:
                try:
                    stream.finish()
                except ShardChanged as exc:
                    raise ShardChanged(
                        f"{path}: {exc}: not the shard the catalog describes (changed or replaced since "
                        "ingest; `polyp-ssl verify` checks every shard)"
                    ) from None


def is_url(path: str) -> bool:
    """True for `scheme:...` (not a Windows drive letter, not `file:`)."""
    if path.startswith("file:") or re.match(r"^[A-Za-z]:[\\/]", path):
        return False
    return bool(URL_SCHEME.match(path))


def open_shard(url: str) -> BinaryIO:
    """A binary stream of a shard: a local path (or `file:` path) with open(); `pipe:`, http(s) and
    the other schemes of webdataset.gopen with it; any other URL with fsspec."""
    if not is_url(url):
        return open_regular(url.removeprefix("file:"), "shard")  # a FIFO or device: refused by name
    if url.split(":", 1)[0].lower() in WEBDATASET_SCHEMES:
        import webdataset

        return webdataset.gopen(url, "rb")
    from polyp_ssl.shards.remote import filesystem_for  # this command's --storage_options

    fs, path = filesystem_for(url)
    return fs.open(path, "rb")


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 when the first byte has its top bit."""
    if field[:1] and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid {what} field {field!r} in a tar header") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The records ("LEN key=value\\n") of a pax extended header; a record whose length is not a
    number, is too short for its own length field or runs past the header is a ReadError."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        if length <= space - pos or pos + length > len(data):
            raise tarfile.ReadError(f"malformed pax header (a record at byte {pos} of {len(data)})")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _pax_size(value: str) -> int:
    """A pax `size` record: decimal digits only (no sign, no exponent, no spaces)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise tarfile.ReadError(f"pax header size {value[:40]!r} is not a non-negative integer")
    return int(value)


def iter_tar_members(
    fileobj: BinaryIO,
    select: Callable[[str], bool] | None = None,
    limit: int | None = None,
    expanded: bool = False,
) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the regular-file members of an uncompressed tar stream, in order.

    The reader of every shard reader here (training loader, `iter_samples`, `verify`): it parses
    the 512-byte headers itself (ustar, GNU long names, pax path and size) instead of through
    `tarfile`, which costs about ten times more per member, and most members of a shard are frames
    no fragment uses. Members `select` rejects come back with data None, their bytes skipped.

    Declared sizes are checked before anything is read or allocated: `limit` is the number of
    bytes the stream holds (the file size; read_members finds it), and a member that declares
    more than is left, a negative or non-numeric size, a pax header or GNU long name over
    MAX_HEADER_BYTES, or a member to read over MAX_MEMBER_BYTES is a tarfile.ReadError; so is a
    bad header checksum or a tar that ends mid-member. Data is read in chunks of at most
    READ_CHUNK bytes, so memory follows what the stream holds, never what a header claims.
    With `expanded` (the stream is a decompressed shard, `limit` its expansion bound) a size past
    the limit is a DecompressionBomb.
    """
    read = fileobj.read
    long_name: str | None = None
    pax: dict[str, str] = {}
    consumed = 0
    while True:
        header = read(BLOCK)
        consumed += len(header)
        if len(header) < BLOCK:
            if not header:
                return
            raise tarfile.ReadError("unexpected end of data (truncated header)")
        if header == _ZERO:
            return
        stored = _number(header[148:156], "checksum")
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.ReadError("bad checksum in a tar header")
        size = _number(header[124:136], "size")
        kind = header[156:157]
        if size < 0:
            raise tarfile.ReadError(f"a tar header at byte {consumed - BLOCK} declares size {size}")
        if kind in (b"x", b"g", b"L", b"K"):
            if size > MAX_HEADER_BYTES:
                raise tarfile.ReadError(
                    f"a {'pax' if kind in (b'x', b'g') else 'GNU long-name'} header at byte "
                    f"{consumed - BLOCK} declares {size} bytes, more than the {MAX_HEADER_BYTES} allowed"
                )
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            _check_left(padded, limit, consumed, "an extended header", expanded)
            data = _read_exactly(read, padded)[:size]
            consumed += padded
            if kind == b"x":
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if "size" in pax:
            size = _pax_size(pax["size"])
        long_name, pax = None, {}
        padding = (BLOCK - size % BLOCK) % BLOCK
        _check_left(size + padding, limit, consumed, f"member {name[:200]!r}", expanded)
        consumed += size + padding
        regular = kind in (b"0", b"\0", b"7")
        if not regular or (select is not None and not select(name)):
            _skip(fileobj, size + padding)
            if regular:
                yield name, None
            continue
        if size > MAX_MEMBER_BYTES:
            raise tarfile.ReadError(
                f"member {name[:200]!r} declares {size} bytes, more than the {MAX_MEMBER_BYTES} a "
                "member read into memory may have"
            )
        data = _read_exactly(read, size)
        if padding:
            _skip(fileobj, padding)
        yield name, data


def _check_left(n: int, limit: int | None, consumed: int, what: str, expanded: bool = False) -> None:
    if limit is not None and n > limit - consumed and expanded:
        raise DecompressionBomb(
            f"{what} declares {n} bytes, past the {limit} the compressed shard may expand to "
            f"(expanded_limit) [decompression_bomb]"
        )
    if limit is not None and n > limit - consumed:
        raise tarfile.ReadError(
            f"{what} declares {n} bytes, only {max(limit - consumed, 0)} are left in the shard"
        )


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    """n bytes, read in chunks (a stream's read(n) may allocate n bytes before it knows how many
    there are)."""
    parts = []
    left = n
    while left:
        more = read(min(left, READ_CHUNK))
        if not more:
            raise tarfile.ReadError("unexpected end of data (truncated member)")
        parts.append(more)
        left -= len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _skip(fileobj: BinaryIO, n: int) -> None:
    """Skip n bytes by reading them (works on pipes too, and a truncated tar is noticed)."""
    left = n
    while left:
        chunk = fileobj.read(min(left, READ_CHUNK))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data (truncated member)")
        left -= len(chunk)


class _Prefixed:
    """A read-only stream: `head` (bytes already read), then the rest of `fileobj`."""

    def __init__(self, head: bytes, fileobj: BinaryIO) -> None:
        self.head, self.fileobj = head, fileobj

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.fileobj.read(n)
        if n < 0:
            out, self.head = self.head + self.fileobj.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + self.fileobj.read(n - len(out))


class DecompressionBomb(tarfile.ReadError):
    """A compressed shard that expands past expanded_limit(); the loader's reason
    `decompression_bomb`."""


class _Expanded:
    """The decompressed bytes of a gzip, bzip2 or xz stream, read in bounded pieces, stopping with
    DecompressionBomb once more than `cap` bytes come out; damaged compressed data is a
    tarfile.ReadError."""

    def __init__(self, fileobj: BinaryIO, head: bytes, cap: int) -> None:
        import bz2
        import gzip
        import lzma

        self.cap, self.out = cap, 0
        if head.startswith(b"\x1f\x8b"):
            self.f: Any = gzip.GzipFile(fileobj=fileobj, mode="rb")
        elif head.startswith(b"BZh"):
            self.f = bz2.BZ2File(fileobj, mode="rb")
        else:
            self.f = lzma.LZMAFile(fileobj, mode="rb")  # noqa: SIM115 (lives as long as the stream)
        self.errors = (OSError, EOFError, zlib.error, lzma.LZMAError)

    def read(self, n: int = -1) -> bytes:
        want = READ_CHUNK if n < 0 else min(n, READ_CHUNK)
        try:
            data = self.f.read(want)
        except self.errors as exc:
            raise tarfile.ReadError(f"compressed data is damaged ({type(exc).__name__}: {exc})") from None
        self.out += len(data)
        if self.out > self.cap:
            raise DecompressionBomb(
                f"expands past {self.cap} bytes (the most a compressed shard may expand to: "
                f"max({EXPANSION_FLOOR}, {EXPANSION_RATIO} x its compressed size)) [decompression_bomb]"
            )
        return data


def expanded_limit(compressed_size: int | None) -> int:
    """The most a compressed shard may expand to: max(EXPANSION_FLOOR, EXPANSION_RATIO x its
    compressed size), or EXPANSION_UNKNOWN when its size is not known (a pipe or URL). A shard of
    JPEGs barely compresses (ratio about 1.1), so only a bomb comes near."""
    if compressed_size is None:
        return EXPANSION_UNKNOWN
    return max(EXPANSION_FLOOR, EXPANSION_RATIO * compressed_size)


def stream_size(fileobj: Any) -> int | None:
    """At most the bytes left in `fileobj` when it is a regular file (its size minus its position;
    a wrapper without `tell` counts from 0, an upper bound still), else None."""
    try:
        st = os.fstat(fileobj.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        tell = getattr(fileobj, "tell", None)
        return max(st.st_size - (tell() if tell is not None else 0), 0)
    except (AttributeError, OSError, ValueError):
        return None


def read_members(
    fileobj: BinaryIO, select: Callable[[str], bool] | None = None, limit: int | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """iter_tar_members of a plain or a gzip, bzip2 or xz compressed tar (decompressed as it is
    read, bounded by expanded_limit). `limit` is the bytes the stream holds; by default the
    file's size when `fileobj` is a regular file."""
    if limit is None:
        limit = stream_size(fileobj)
    head = fileobj.read(BLOCK)
    stream: Any = _Prefixed(head, fileobj)
    if not head.startswith(COMPRESSED_MAGIC):
        yield from iter_tar_members(stream, select, limit)
        return
    expanded = _Expanded(stream, head, expanded_limit(limit))
    yield from iter_tar_members(expanded, select, expanded.cap, expanded=True)
