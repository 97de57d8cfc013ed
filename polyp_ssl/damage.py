"""The loader's damage policy (--on_shard_error), one object handed to every reading part.

As webdataset's `handler=`: the part that meets a damaged shard or sample builds a ShardError and
hands it to the policy; `fail` raises it, `warn` counts it (once, where it is met) and logs it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Protocol

from polyp_ssl.loader_errors import SKIP_REASONS, ShardError


class SkipCounter(Protocol):
    """Where a rank's skips are added up across its loader workers (polyp_ssl.stream.SharedState)."""

    def add_skip(self, reason: str, n: int = 1) -> None: ...


class DamagePolicy:
    """--on_shard_error `warn`, or `fail` (any other value). Under warn every skip is counted
    exactly once: in this stream's `stats` (`skipped_{reason}`) and in the rank's shared counters
    (reasons of SKIP_REASONS), then logged to `log` (the first five of a reason, then at 10,
    100, ...)."""

    def __init__(
        self, mode: str, stats: Counter, shared: SkipCounter, log: logging.Logger, rank: int = 0
    ) -> None:
        self.mode = mode
        self.stats = stats
        self.shared = shared
        self.log = log
        self.rank = rank

    @property
    def warn(self) -> bool:
        return self.mode == "warn"

    def __call__(self, err: ShardError) -> None:
        """A damaged shard or sample met while streaming: raised under fail, else counted and logged."""
        if not self.warn:
            raise err
        n = self.count(err.reason)
        if n <= 5 or math.log10(n).is_integer():
            self.log.warning(
                "rank %d: skipped (%s, %d so far in this stream): %s", self.rank, err.reason, n, err
            )

    def count(self, reason: str, n: int = 1) -> int:
        """Count `n` skips of `reason` (the caller logs them); the stream's total so far."""
        self.stats[f"skipped_{reason}"] += n
        if reason in SKIP_REASONS:
            self.shared.add_skip(reason, n)
        return self.stats[f"skipped_{reason}"]
