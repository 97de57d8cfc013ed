"""Tiny ingested catalogs with embeddings files, for the evaluation tests (no shards, no encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from polyp_ssl.eval.embeddings import manifest_sha256, write_embeddings
from polyp_ssl.shards.schema import CATALOG_VERSION, POLYPS, TRACKLETS

HISTOLOGY = ["AD", "HP", "AD", "SSL", "NO POLYP"]


def make_eval_root(
    out: Path,
    splits: dict[str, int] | None = None,
    polyps_per_video: int = 3,
    tracklets_per_polyp: int = 3,
    fragments_per_tracklet: int = 0,
    dim: int = 16,
    noise: float = 0.1,
    seed: int = 0,
    tag: str = "a",
) -> Path:
    """OUT/catalog/{polyps,tracklets}.parquet + manifest.json, and per split
    OUT/embeddings/{split}.parquet (tracklet rows when fragments_per_tracklet is 0, else that many
    fragment rows per tracklet). Polyp p of a video: size 3 + 2p mm, histology HISTOLOGY[p % 5];
    its vectors are a random unit centre plus `noise`. Tracklet t of polyp p covers frames
    [(t * P + p) * 20, +10], so tracklets never overlap in time."""
    splits = splits or {"val": 3, "test": 3}
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "catalog").mkdir(parents=True, exist_ok=True)
    polyps, tracklets = [], []
    per_split: dict[str, dict[str, list]] = {}
    vectors: dict[str, list[np.ndarray]] = {}
    for split, n_videos in splits.items():
        cols = per_split.setdefault(split, {k: [] for k in _KEYS})
        vecs = vectors.setdefault(split, [])
        for v in range(n_videos):
            video = f"{split}{v:03d}"
            for p in range(polyps_per_video):
                ident = f"{video}_{p}"
                centre = rng.normal(size=dim)
                centre /= np.linalg.norm(centre)
                polyps.append(
                    {
                        "identity_id": ident,
                        "video_id": video,
                        "dataset_id": "realcolon",
                        "split": split,
                        "size_mm": 3.0 + 2 * p,
                        "histology": HISTOLOGY[p % 5],
                        "n_tracklets": tracklets_per_polyp,
                        "n_frames": 11 * tracklets_per_polyp,
                    }
                )
                for t in range(tracklets_per_polyp):
                    tid = f"{ident}#{t}"
                    start = (t * polyps_per_video + p) * 20
                    tracklets.append(
                        {
                            "tracklet_id": tid,
                            "split": split,
                            "dataset_id": "realcolon",
                            "video_id": video,
                            "identity_id": ident,
                            "start_frame": start,
                            "end_frame": start + 10,
                            "n_frames": 11,
                            "position_in_video": 0.0,
                            "size_mm": 3.0 + 2 * p,
                            "histology": HISTOLOGY[p % 5],
                            "shard": "",
                            "sample_key": tid.replace("#", "_"),
                            # no shards here: no member spans
                            "json_offset": None,
                            "json_size": None,
                            "json_crc32": None,
                        }
                    )
                    frags = [-1] if fragments_per_tracklet == 0 else list(range(fragments_per_tracklet))
                    for f in frags:
                        cols["tracklet_id"].append(tid)
                        cols["sample_key"].append(tid.replace("#", "_"))
                        cols["split"].append(split)
                        cols["video_id"].append(video)
                        cols["identity_id"].append(ident)
                        cols["fragment_index"].append(f)
                        cols["start_frame"].append(start + max(f, 0) * 2)
                        vecs.append(centre + noise * rng.normal(size=dim))
    pq.write_table(pa.Table.from_pylist(polyps, schema=POLYPS), out / "catalog" / "polyps.parquet")
    pq.write_table(pa.Table.from_pylist(tracklets, schema=TRACKLETS), out / "catalog" / "tracklets.parquet")
    (out / "catalog" / "manifest.json").write_text(json.dumps({"version": CATALOG_VERSION, "tag": tag}))
    mhash = manifest_sha256(out)
    for split, cols in per_split.items():
        meta = {
            "manifest_sha256": mhash,
            "dataset_root": str(out.resolve()),
            "checkpoint_sha256": "0" * 64,
            "params": {"split": split, "fragment_length": -1 if fragments_per_tracklet == 0 else 8},
        }
        write_embeddings(out / "embeddings" / f"{split}.parquet", cols, np.stack(vectors[split]), meta)
    return out


_KEYS = ("tracklet_id", "sample_key", "split", "video_id", "identity_id", "fragment_index", "start_frame")
