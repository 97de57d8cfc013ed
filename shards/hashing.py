"""The sha256 of a file's bytes: the one digest of shards, checkpoints, weights and inputs.

The file is opened through shards.files.open_regular, so a FIFO or device given in place of a
file is refused by name instead of being read without end. Standard library only.
"""

from __future__ import annotations

import hashlib
import os

from polyp_ssl.shards.files import open_regular

CHUNK = 1 << 20


def file_sha256_size(path: str | os.PathLike[str], chunk: int = CHUNK, what: str = "") -> tuple[str, int]:
    """The sha256 (hex) of a regular file's bytes and their count, read in chunks; `what` names
    the file in the refusal of a FIFO or device (never waited on)."""
    sha = hashlib.sha256()
    n = 0
    with open_regular(path, what) as f:
        while block := f.read(chunk):
            sha.update(block)
            n += len(block)
    return sha.hexdigest(), n


def file_sha256(path: str | os.PathLike[str], chunk: int = CHUNK, what: str = "") -> str:
    """The sha256 (hex) of a regular file's bytes (see file_sha256_size)."""
    return file_sha256_size(path, chunk, what)[0]
