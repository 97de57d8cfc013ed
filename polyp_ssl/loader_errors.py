"""The training loader's error types and skip reasons, shared by its reading paths. A damaged
shard or sample is `polyp_ssl.shards.samples.ShardError`, its reasons that module's
DAMAGE_REASONS (re-exported here as the loader's SKIP_REASONS)."""

from __future__ import annotations

from polyp_ssl.shards.samples import DAMAGE_REASONS, ShardError

__all__ = ["ON_SHARD_ERROR", "SKIP_REASONS", "DataConfigError", "ShardError"]


class DataConfigError(ValueError):
    """A data configuration that cannot work; the message says what to change."""


ON_SHARD_ERROR = ("fail", "warn")
# why a sample (or the rest of a shard) was skipped under --on_shard_error warn
SKIP_REASONS = DAMAGE_REASONS
