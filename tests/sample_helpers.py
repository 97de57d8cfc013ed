"""Reading one tracklet's sample from its shard by member name, independent of the readers tested."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from polyp_ssl.shards.sample import TrackletSample


def read_tracklet_sample(root: Path, row: dict[str, Any]) -> tuple[TrackletSample, list[bytes]]:
    """The JSON and frame JPEGs of one tracklet, read by member name (independent of eval.embed)."""
    with tarfile.open(root / row["shard"]) as tar:
        meta = TrackletSample.from_json(tar.extractfile(f"{row['sample_key']}.json").read())
        jpegs = [tar.extractfile(f"{row['sample_key']}.{i:04d}.jpg").read() for i in range(meta.n_frames)]
    return meta, jpegs
