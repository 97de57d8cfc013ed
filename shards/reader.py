"""Read tar shards back as raw samples, in file order, without webdataset.

A sample is the run of consecutive members sharing a key (the member name up to its first dot),
as webdataset groups them: `{"__key__": K, "json": b"...", "0000.jpg": b"...", ...}`.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any


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
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                if not safe_member_name(member.name):
                    raise ValueError(
                        f"{path}: member {member.name!r} is an absolute path or climbs with '..'"
                    )
                key, suffix = split_member_name(member.name)
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise ValueError(f"{path}: key {key!r} appears twice, not consecutively")
                    seen.add(key)
                    current = {"__key__": key}
                if suffix in current:
                    raise ValueError(f"{path}: member {member.name!r} appears twice")
                f = tar.extractfile(member)
                assert f is not None
                current[suffix] = f.read()
            if current is not None:
                yield current
