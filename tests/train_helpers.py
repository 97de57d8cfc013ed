"""A tiny training run: its flags (TINY), its loader parameters (P), and the losses a run logged.
Shared by the training, loader, crash and damage tests."""

from __future__ import annotations

import csv
from pathlib import Path

from polyp_ssl.stream import StreamParams

TINY = [
    "--aug_anchorcrop",
    "--eval_aug_anchorcrop",
    "--num_workers",
    "0",
    "--batch_size",
    "8",
    "--n_views",
    "2",
    "--fragment_length",
    "2",
    "--fragment_stride",
    "2",
    "--min_tracklet_length",
    "4",
    "--im_size",
    "32",
    "--encoder_type",
    "hmve",
    "--sfe_backbone_arch",
    "resnet18",
    "--hmve_d_model",
    "32",
    "--hmve_d_feedforward",
    "64",
    "--hmve_n_heads",
    "2",
    "--hmve_n_layers",
    "1",
    "--hmve_dropout",
    "0.0",
    "--d_proj",
    "16",
    "--accelerator",
    "cpu",
    "--devices",
    "1",
    "--eval_batch_size",
    "4",
    "--lr",
    "0.001",
    "--loss_milnce_weights",
    "1.0",
    "1.0",
    "--log_every_n_steps",
    "1",
    "--open_videos",
    "2",
]


P = StreamParams(
    batch_size=8,
    n_views=2,
    fragment_length=2,
    fragment_stride=2,
    min_tracklet_length=4,
    im_size=32,
    open_videos=3,
    aug_anchorcrop=True,
    max_epochs=4,
)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss_step"):
                    out[int(row["step"])] = float(row["train/loss_step"])
    return out
