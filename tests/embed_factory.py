"""A tiny encoder checkpoint (the exported-encoder format of polyp_ssl/checkpoint.py) and a tiny
ingested root with size labels, for the embed / report / demo tests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from polyp_ssl.encoders import EncoderConfig, build_encoder
from tests.shard_factory import make_root

TINY_CONFIG = {
    "encoder_type": "hmve",
    "sfe_backbone_arch": "resnet18",
    "sfe_d_model": 512,
    "hmve_d_model": 32,
    "hmve_n_layers": 1,
    "hmve_n_heads": 4,
    "hmve_d_feedforward": 64,
    "im_size": 32,
    "bbox_scale_factor": 3.0,
    "fragment_stride": 2,
}


def make_ckpt(path: Path, seed: int = 1, **overrides) -> Path:
    cfg = {**TINY_CONFIG, **overrides}
    torch.manual_seed(seed)
    enc = build_encoder(EncoderConfig.from_flat(cfg))
    torch.save(
        {
            "format": "polyp-ssl-encoder",
            "version": 1,
            "config_json": json.dumps(cfg),
            "state_dict": enc.state_dict(),
        },
        path,
    )
    return path


def make_tiny_root(path: Path, videos: dict[str, int] | None = None, seed: int = 0) -> Path:
    """3 polyps per video (sizes 4, 5, 6 mm: two diminutive, one not), 2 tracklets each, 32 frames
    (at least the 30 of the default evaluation protocol, so the defaults are what the tests run; a
    polyp's two tracklets start 60 frames apart and never overlap in time)."""
    return make_root(
        path,
        videos=videos or {"train": 1, "val": 2, "test": 3},
        polyps_per_video=3,
        tracklets_per_polyp=2,
        frames_per_tracklet=32,
        seed=seed,
    )


def tracklet_rows(root: Path, split: str) -> list[dict]:
    rows = pq.read_table(root / "catalog" / "tracklets.parquet").to_pylist()
    return [r for r in rows if r["split"] == split]
