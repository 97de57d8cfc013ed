"""Fault-injection hook for the crash tests: kill this process with SIGKILL at a named point.

Inert unless the environment variable POLYP_SSL_TEST_CRASH_AT is set, to `POINT` (the first
time this process reaches POINT) or `POINT:N` (the N-th time). Points:

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
from collections import Counter

CRASH_ENV = "POLYP_SSL_TEST_CRASH_AT"
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
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
