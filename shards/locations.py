"""Where a catalog's shard is, and whether the bytes read are the shard the catalog describes.

A catalog names each shard by a path relative to its root (`shards/train/train-000000.tar`).
That value is data: it never chooses a command (`pipe:...`), a URL or a file outside the root.
`shard_location` is the one place such a value becomes something to open:

- the value must be a plain relative path: no scheme (`pipe:`, `file:`, `http:`, any `name:`),
  not absolute, no empty, `.` or `..` parts, no backslash, NUL or control characters;
- under a local root (the default) its real path (symbolic links resolved) must stay inside the
  root's real path;
- under a remote root (`s3://bkt/root`, any URL fsspec reads: shards.remote) it is appended to
  the root's URL (percent-encoded for http and https), so it names an object under that prefix;
- under a `--shard_base` the user typed (any scheme, `pipe:` included, since the user chose it)
  the value is appended to the base, quoted for the shell when the base is a `pipe:` command and
  percent-encoded for curl's URLs, so a value can only ever name a file under that base.

`ShardIdentity` (size and sha256 from the catalog's `shards` table) with `HashingReader` lets a
reader that reads every byte anyway notice a shard that was changed or replaced since ingest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from polyp_ssl.shards.remote import remote_root

MAX_LOCATION_CHARS = 4096
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CURL_SCHEMES = ("http", "https", "sftp", "ftps", "scp")


class UnsafeLocation(ValueError):
    """A shard location that a catalog may not name; the message says which and why."""


def location_problem(value: object) -> str | None:
    """Why a catalog's shard value is not a plain path relative to the root, or None."""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if len(value) > MAX_LOCATION_CHARS:
        return f"is longer than {MAX_LOCATION_CHARS} characters"
    for ch in value:
        if ch == "\0":
            return "contains a NUL character"
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return f"contains the control character {ch!r}"
    if _SCHEME.match(value):
        return "has a URL scheme (a command or URL, not a path relative to the root)"
    if "\\" in value:
        return "contains a backslash"
    if value.startswith("/") or value.startswith("~"):
        return "is an absolute path"
    parts = value.split("/")
    if ".." in parts:
        return "climbs out of the root with '..'"
    if "" in parts or "." in parts:
        return "has an empty or '.' path part"
    return None


def check_shard_value(value: object, source: str | os.PathLike[str], where: str, field: str = "shard") -> str:
    """`value` when it is a safe relative shard path; UnsafeLocation naming the catalog file
    (`source`), the row (`where`, e.g. "tracklet 'v1_a#0'") and the field otherwise."""
    problem = location_problem(value)
    if problem is not None:
        raise UnsafeLocation(
            f"{source}: {where}: field {field!r}: shard location {value!r} {problem}; a catalog names "
            "shards by paths relative to its root (use --shard_base for a URL or command prefix)"
        )
    return value  # type: ignore[return-value]


def inside(root: str | os.PathLike[str], rel: str) -> Path:
    """root / rel, after checking that its real path (links resolved) stays inside root's."""
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([base, real]) != base:
        raise UnsafeLocation(
            f"{Path(root) / rel}: shard location {rel!r} leaves the root {root} through a symbolic "
            f"link (to {real})"
        )
    return Path(root) / rel


def _is_scheme(text: str) -> bool:
    """A `scheme:` prefix, not a Windows drive letter (`C:\\`)."""
    return bool(_SCHEME.match(text)) and not re.match(r"^[A-Za-z]:[\\/]", text)


def shard_location(rel: str, root: str | os.PathLike[str], shard_base: str | None = None) -> str:
    """The path or URL to open for the catalog's shard value `rel` (checked here).

    Without `shard_base`: root / rel, inside the root (the URL under a remote root). With a local
    `shard_base` (a folder, or `file:` folder): that folder / rel, inside it. With a `pipe:` base:
    the base followed by the shell-quoted value (a plain value like `shards/train/train-000000.tar`
    is unchanged by the quoting). With any other scheme: base + "/" + value, percent-encoded for
    curl's schemes.
    """
    problem = location_problem(rel)
    if problem is not None:
        raise UnsafeLocation(f"shard location {rel!r} {problem}")
    if not shard_base:
        url = remote_root(root)
        if url is not None:
            quoted = urllib.parse.quote(rel, safe="/") if url.split(":", 1)[0] in _CURL_SCHEMES else rel
            return url + "/" + quoted
        return str(inside(root, rel))
    base = shard_base.rstrip("/")
    if shard_base.startswith("file:") or not _is_scheme(shard_base):
        local = shard_base.removeprefix("file:") or "/"
        inside(local, rel)
        return base + "/" + rel
    scheme = shard_base.split(":", 1)[0].lower()
    if scheme == "pipe":
        return base + "/" + shlex.quote(rel)
    if scheme in _CURL_SCHEMES:
        return base + "/" + urllib.parse.quote(rel, safe="/")
    return base + "/" + rel


@dataclass(frozen=True)
class ShardIdentity:
    """A shard as the catalog's `shards` table describes it (sha256 "" = not recorded)."""

    n_bytes: int
    sha256: str


class ShardChanged(ValueError):
    """The bytes read are not the shard the catalog describes."""


def local_size(stream: Any) -> int | None:
    """Size of a regular file behind `stream`, or None (a pipe, a remote object)."""
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class HashingReader:
    """A read-only stream that hashes and counts every byte read through it.

    `finish()` reads what the consumer left (the tar's end-of-archive padding), at most up to the
    expected size plus one byte, and raises ShardChanged when the size or the sha256 differs."""

    def __init__(self, stream: BinaryIO, expect: ShardIdentity) -> None:
        self.stream, self.expect = stream, expect
        self.n = 0
        self.hash = hashlib.sha256() if expect.sha256 else None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.n += len(data)
        if self.hash is not None:
            self.hash.update(data)
        return data

    def fileno(self) -> int:
        return self.stream.fileno()

    def close(self) -> None:
        self.stream.close()

    def finish(self) -> None:
        size = self.expect.n_bytes  # < 0: not recorded
        while (size < 0 or self.n <= size) and self.read(
            1 << 20 if size < 0 else min(1 << 20, size + 1 - self.n)
        ):
            pass
        if size >= 0 and self.n != size:
            more = "more than " if self.n > self.expect.n_bytes else ""
            raise ShardChanged(f"{more}{self.n} bytes, the catalog says {self.expect.n_bytes}")
        if self.hash is not None and self.hash.hexdigest() != self.expect.sha256:
            raise ShardChanged(f"sha256 {self.hash.hexdigest()}, the catalog says {self.expect.sha256}")
