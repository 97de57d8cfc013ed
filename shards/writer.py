"""Deterministic tar shard writing: the same samples always give the same bytes.

Members get a fixed mtime, owner and mode, and are written in the order given (a sample's JSON
first, then its frames). The shard is written under a temporary name, fsynced and renamed, so a
file with the final name is always complete; its sha256 is computed while writing, and `write`
returns where each member's data lies in the file (shards.members.MemberSpan), for the catalog.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from typing import Any, BinaryIO

from polyp_ssl.shards.hashing import file_sha256  # noqa: F401 - importable from here as before
from polyp_ssl.shards.members import MemberSpan, crc32

TAR_MTIME = 0
TAR_MODE = 0o644
TMP_SUFFIX = ".tmp"


class _HashingFile:
    """A write-only file that hashes and counts the bytes it forwards."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.n_bytes = 0

    def tell(self) -> int:
        return self.n_bytes

    def flush(self) -> None:
        self.raw.flush()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.raw.write(view)
        self.sha.update(view)
        self.n_bytes += view.nbytes
        return view.nbytes


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The (member name, bytes) of a webdataset-writer sample dict, JSON first then the rest
    sorted (frames `0000.jpg`, `0001.jpg`, ...)."""
    key = sample["__key__"]
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} is empty or contains '.' or '/'")
    suffixes = sorted(k for k in sample if not k.startswith("__"))
    if "json" in suffixes:
        suffixes.remove("json")
        suffixes.insert(0, "json")
    members = []
    for suffix in suffixes:
        data = sample[suffix]
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"sample {key!r} member {suffix!r} is {type(data).__name__}, not bytes")
        members.append((f"{key}.{suffix}", bytes(data)))
    return members


class ShardWriter:
    """Write one tar shard deterministically: `with ShardWriter(path) as w: w.write(sample)`.

    On success the file appears at `path` and `n_bytes` / `sha256` are set; on an exception the
    temporary file is removed and nothing appears at `path`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.tmp_path = self.path + TMP_SUFFIX
        self.n_samples = 0
        self.n_bytes = 0
        self.sha256 = ""
        self._file: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.GNU_FORMAT)
        return self

    def write(self, sample: dict[str, Any]) -> dict[str, MemberSpan]:
        """Append the sample's members; returns the span of each member's data in the file, by
        member suffix (`json`, `0000.jpg`, ...)."""
        assert self._tar is not None and self._hashing is not None, "ShardWriter used outside `with`"
        spans: dict[str, MemberSpan] = {}
        for name, data in sample_members(sample):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            # the data follows the member's header blocks (a GNU long-name header and its name
            # blocks first, for a name over 100 bytes); positions are bytes written to the file
            start = self._hashing.n_bytes
            offset = start + len(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors))
            self._tar.addfile(info, io.BytesIO(data))
            end = offset + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if self._hashing.n_bytes != end:
                raise RuntimeError(
                    f"member {name!r}: {self._hashing.n_bytes - start} bytes written, expected "
                    f"{end - start} (header and padded data); its span would be wrong"
                )
            spans[name.split(".", 1)[1]] = MemberSpan(offset, len(data), crc32(data))
        self.n_samples += 1
        return spans

    def write_all(self, samples: Iterable[dict[str, Any]]) -> None:
        for sample in samples:
            self.write(sample)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._tar is not None and self._file is not None and self._hashing is not None
        try:
            if exc_type is None:
                self._tar.close()
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self._file.close()
            _remove(self.tmp_path)
            raise
        if exc_type is not None:
            _remove(self.tmp_path)
            return
        self.n_bytes = self._hashing.n_bytes
        self.sha256 = self._hashing.sha.hexdigest()
        os.replace(self.tmp_path, self.path)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so that a rename into it survives a power cut; a folder that cannot be
    opened or synced (some platforms and file systems) is left as is: the rename is atomic anyway."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` via a temporary name, fsync and rename."""
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
