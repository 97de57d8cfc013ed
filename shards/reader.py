"""Read tar shards back as raw samples, in file order, without webdataset.

A sample is the run of consecutive members sharing a key (the member name up to its first dot),
as webdataset groups them: `{"__key__": K, "json": b"...", "0000.jpg": b"...", ...}`.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# schemes webdataset.gopen opens itself (pipe: commands, curl for http, gsutil, ...); any other
# scheme (s3://, gcs://, az://, memory://, ...) is opened with fsspec
WEBDATASET_SCHEMES = ("pipe", "http", "https", "sftp", "ftps", "scp", "gs", "ais", "hf")
BLOCK = 512
_ZERO = bytes(BLOCK)
# magic bytes of the compressions tarfile's "r|*" reads; a plain tar starts with a member name
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


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


def iter_samples(paths: Iterable[PathArg] | PathArg) -> Iterator[dict[str, Any]]:
    """Raw samples of the shards at `paths`, in order. A key that reappears later in the same
    shard (not consecutive) is an error, since webdataset would read it as two samples."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    for path in paths:
        seen: set[str] = set()
        current: dict[str, Any] | None = None
        with open(path, "rb") as stream:
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


def is_url(path: str) -> bool:
    """True for `scheme:...` (not a Windows drive letter, not `file:`)."""
    if path.startswith("file:") or re.match(r"^[A-Za-z]:[\\/]", path):
        return False
    return bool(URL_SCHEME.match(path))


def open_shard(url: str) -> BinaryIO:
    """A binary stream of a shard: a local path (or `file:` path) with open(); `pipe:`, http(s) and
    the other schemes of webdataset.gopen with it; any other URL with fsspec."""
    if not is_url(url):
        return open(url.removeprefix("file:"), "rb")
    if url.split(":", 1)[0].lower() in WEBDATASET_SCHEMES:
        import webdataset

        return webdataset.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


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
    """The records ("LEN key=value\\n") of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length <= space - pos:
            raise tarfile.ReadError("malformed pax header")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar_members(
    fileobj: BinaryIO, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the regular-file members of an uncompressed tar stream, in order.

    The reader of every shard reader here (training loader, `iter_samples`): it parses the
    512-byte headers itself (ustar, GNU long names,
    pax path and size) instead of through `tarfile`, which costs about ten times more per member,
    and most members of a shard are frames no fragment uses. Members `select` rejects come back
    with data None, their bytes skipped. Raises tarfile.ReadError on a bad header checksum or a
    tar that ends mid-member.
    """
    read = fileobj.read
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = read(BLOCK)
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
        if kind in (b"x", b"g", b"L", b"K"):
            data = _read_exactly(read, (size + BLOCK - 1) // BLOCK * BLOCK)[:size]
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
            size = int(pax["size"])
        long_name, pax = None, {}
        padding = (BLOCK - size % BLOCK) % BLOCK
        regular = kind in (b"0", b"\0", b"7")
        if not regular or (select is not None and not select(name)):
            _skip(fileobj, size + padding)
            if regular:
                yield name, None
            continue
        data = _read_exactly(read, size)
        if padding:
            _read_exactly(read, padding)
        yield name, data


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    data = read(n)
    while len(data) < n:
        more = read(n - len(data))
        if not more:
            raise tarfile.ReadError("unexpected end of data (truncated member)")
        data += more
    return data


def _skip(fileobj: BinaryIO, n: int) -> None:
    """Skip n bytes by reading them (works on pipes too, and a truncated tar is noticed)."""
    left = n
    while left:
        chunk = fileobj.read(min(left, 1 << 20))
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


def read_members(
    fileobj: BinaryIO, select: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """iter_tar_members for a plain tar; a gzip, bzip2 or xz compressed tar goes through tarfile."""
    head = fileobj.read(BLOCK)
    stream: Any = _Prefixed(head, fileobj)
    if not head.startswith(COMPRESSED_MAGIC):
        yield from iter_tar_members(stream, select)
        return
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if select is not None and not select(member.name):
                yield member.name, None
                continue
            f = tar.extractfile(member)
            yield member.name, (f.read() if f is not None else b"")
