"""Fault injection for ingest's crash and resume tests; inert unless a test installs it.

A test installs a `Faults` in its own process with `install` (the fixture `ingest_faults` of
tests/test_faults_ingest.py). A test that runs `polyp-ssl ingest` (or split, merge,
convert) as a subprocess cannot do that: it sets the variables below, which are read once, when
this module is first imported in a process (the ingest process, and each worker process of its
pool, which inherits the environment), never on the hot path: every hook below is one test of a
module global while none is installed.

    POLYP_SSL_TEST_CRASH_AT=POINT[:N]           SIGKILL this process the N-th time it reaches POINT
    POLYP_SSL_INGEST_PAUSE_AFTER_SHARDS=N       a worker sleeps after finishing N shards (an hour,
    POLYP_SSL_INGEST_PAUSE_SECONDS=S            or S seconds), so a test can interrupt the run

Points:

    sample_written   a sample was added to the shard being written (the tar is half written)
    shard_done       a shard and its stats file are complete (between shards)
    catalog_table    a catalog table file was renamed into place (before the manifest)
    before_manifest  every table is written, the manifest is not
    swap_moved       `--overwrite`: a file of the complete new output was renamed into place
                     (the old output is partly replaced; the next ingest finishes the swap)
    convert_image_placed        a converter placed one frame in OUT/images
    convert_annotation_written  a converter renamed one annotation file into place
    staged_moved     split / merge: one file of a staged set was renamed into place (the next
                     writer of the root finishes the swap)
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

CRASH_ENV = "POLYP_SSL_TEST_CRASH_AT"
PAUSE_ENV = "POLYP_SSL_INGEST_PAUSE_AFTER_SHARDS"
PAUSE_SECONDS_ENV = "POLYP_SSL_INGEST_PAUSE_SECONDS"
POINTS = (
    "sample_written",
    "shard_done",
    "catalog_table",
    "before_manifest",
    "swap_moved",
    "convert_image_placed",
    "convert_annotation_written",
    "staged_moved",
)


@dataclass
class Faults:
    """What to inject in this process: a SIGKILL at the `crash_nth` time `crash_at` is reached;
    a sleep of `pause_seconds` once `pause_after_shards` shards are finished here."""

    crash_at: str | None = None
    crash_nth: int = 1
    pause_after_shards: int = 0
    pause_seconds: float = 3600.0
    reached: Counter[str] = field(default_factory=Counter)
    shards_done: int = 0


_active: Faults | None = None


def install(faults: Faults | None) -> Faults | None:
    """Make `faults` this process's (None: inert); returns the one it replaces."""
    global _active
    previous, _active = _active, faults
    return previous


def from_env(env: Mapping[str, str]) -> Faults | None:
    """The faults the variables of `env` ask for; None when they ask for none."""
    spec = env.get(CRASH_ENV) or ""
    pause = int(env.get(PAUSE_ENV, "0") or 0)
    if not spec and not pause:
        return None
    point, _, nth = spec.partition(":")
    seconds = float(env.get(PAUSE_SECONDS_ENV, "3600") or 3600)
    return Faults(point or None, int(nth or 1), pause, seconds)


def crash_point(name: str) -> None:
    """SIGKILL this process here when the installed faults ask for it."""
    faults = _active
    if faults is None or faults.crash_at != name:
        return
    faults.reached[name] += 1
    if faults.reached[name] >= faults.crash_nth:
        os.kill(os.getpid(), signal.SIGKILL)


def shard_finished() -> None:
    """A worker finished a shard: pause here when the installed faults ask for it."""
    faults = _active
    if faults is None:
        return
    faults.shards_done += 1
    if faults.pause_after_shards and faults.shards_done >= faults.pause_after_shards:
        time.sleep(faults.pause_seconds)


install(from_env(os.environ))
