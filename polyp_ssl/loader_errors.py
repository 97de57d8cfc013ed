"""The training loader's error types and skip reasons, shared by its reading paths."""

from __future__ import annotations


class DataConfigError(ValueError):
    """A data configuration that cannot work; the message says what to change."""


ON_SHARD_ERROR = ("fail", "warn")
# why a sample (or the rest of a shard) was skipped under --on_shard_error warn
SKIP_REASONS = (
    "truncated_shard",
    "unreadable_shard",
    "bad_json",
    "json_mismatch",
    "jpeg_missing",
    "corrupt_jpeg",
    "sample_missing_from_shard",
    "shard_changed",  # size or sha256 differs from the catalog's shards table
    "decompression_bomb",  # a compressed shard expands past shards.reader.expanded_limit
    "duplicate_sample",  # a sample key seen twice in one shard
    "span_mismatch",  # the tar header before a catalog span names another member (spans swapped)
)


class ShardError(RuntimeError):
    """A damaged shard or sample; the message names the shard, the sample key and the reason."""

    def __init__(self, message: str, reason: str = "unreadable_shard", key: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.key = key  # the sample it is about, when there is one

    @classmethod
    def at(cls, shard: str, key: str | None, reason: str, detail: str) -> ShardError:
        where = f"sample {key!r}" if key is not None else "before its first sample"
        return cls(f"{shard}: {where}: {detail} [{reason}]", reason, key)
