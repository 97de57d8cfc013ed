"""What `polyp-ssl reproduce` runs each command with: the paper's budget (the seed's training
command, for a GPU) and the quick budget (a small encoder that trains in minutes on a CPU), and
`--settings FILE` on top of either.

A budget is one dict per command (`ingest`, `split`, `train`, `report`) of option name -> value;
`flags()` turns it into the command's arguments. The evaluation protocol is the report's
defaults in both budgets (whole tracklets of at least 30 frames at stride 4, CLS pooling, probes
70/30 by polyp with seed 42, 95% intervals from 1,000 bootstrap resamples over polyps).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

BUDGETS = ("quick", "paper")
SECTIONS = ("ingest", "split", "train", "report")

# The seed's training command (README of the reference code), flag for flag; `--exp_name` and
# `--dataset_root` are set by reproduce.
PAPER_TRAIN: dict[str, Any] = {
    "num_workers": 8,
    "max_epochs": 50,
    "batch_size": 60,
    "fragment_length": 8,
    "fragment_stride": 4,
    "fragment_drop_last": True,
    "bbox_scale_factor": 5,
    "min_tracklet_length": 30,
    "im_size": 232,
    "aug_anchorcrop": True,
    "eval_n_views": 2,
    "eval_batch_size": 6,
    "eval_fragment_length": 8,
    "eval_aug_anchorcrop": True,
    "encoder_type": "hmve",
    "sfe_backbone_arch": "resnet50",
    "sfe_backbone_weights": "IMAGENET1K_V2",
    "sfe_d_model": 2048,
    "d_proj": 128,
    "hmve_d_model": 256,
    "hmve_d_feedforward": 1024,
    "hmve_n_heads": 8,
    "hmve_n_layers": 3,
    "hmve_dropout": 0.1,
    "lr": 0.00001,
    "loss_type": "mil-nce",
    "loss_temperature": 0.07,
    "loss_milnce_weights": [1.0, 1.0],
    "sampler": "temporaltemperaturebag",
    "sampler_ttb_tmin": 0.3,
    "sampler_ttb_tmax": 12,
    "n_views": 5,
}

# A CPU budget: the same method (HMVE, MIL-NCE, temporal-temperature bags) with a ResNet-18 from
# scratch at 64 px for 60 steps; a checkpoint every 10 steps so a killed run loses little.
QUICK_TRAIN: dict[str, Any] = {
    "num_workers": 1,
    "max_epochs": 1000,
    "max_steps": 60,
    "ckpt_every_n_steps": 10,
    "batch_size": 16,
    "fragment_length": 4,
    "fragment_stride": 4,
    "bbox_scale_factor": 3.0,
    "min_tracklet_length": 8,
    "im_size": 64,
    "aug_anchorcrop": True,
    "eval_aug_anchorcrop": True,
    "encoder_type": "hmve",
    "sfe_backbone_arch": "resnet18",
    "sfe_d_model": 512,
    "d_proj": 64,
    "hmve_d_model": 128,
    "hmve_d_feedforward": 256,
    "hmve_n_heads": 4,
    "hmve_n_layers": 1,
    "lr": 0.0003,
    "weight_decay": 0.0001,
    "loss_type": "mil-nce",
    "loss_temperature": 0.07,
    "loss_milnce_weights": [1.0, 1.0],
    "sampler": "temporaltemperaturebag",
    "n_views": 4,
    "monitor": "none",
}


def budget(name: str) -> dict[str, dict[str, Any]]:
    """The settings of budget `name` (a fresh copy)."""
    if name not in BUDGETS:
        raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}, got {name!r}")
    paper = name == "paper"
    out = {
        # crops stored at the paper's crop scale; smaller stored crops for a CPU run
        "ingest": {"crop-scale": 5.0, "store-size": 256 if paper else 96},
        # the paper's 70/30 by polyp, seeded
        "split": {"fractions": "0.7,0.3", "seed": 42},
        "train": PAPER_TRAIN if paper else QUICK_TRAIN,
        "report": {} if paper else {"batch_size": 16},
    }
    return copy.deepcopy(out)


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def apply_settings(settings: dict[str, dict[str, Any]], path: Path) -> dict[str, dict[str, Any]]:
    """`settings` with the options of a JSON file `{"train": {"max_steps": 5}, ...}` put over them:
    a value replaces the budget's, `null` or `false` removes the option. Only the sections of
    SECTIONS and plain values (numbers, text, true/false, lists of numbers or text) are taken."""
    from polyp_ssl.shards.textio import TextInputError, load_json

    try:
        extra = load_json(path, "settings file")
    except TextInputError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: expected an object of sections ({', '.join(SECTIONS)})")
    out = copy.deepcopy(settings)
    for section, options in extra.items():
        if section not in SECTIONS:
            raise ValueError(f"{path}: section {section!r} is not one of {', '.join(SECTIONS)}")
        if not isinstance(options, dict):
            raise ValueError(f"{path}: section {section!r}: expected an object of options")
        for key, value in options.items():
            if not isinstance(key, str) or not key.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"{path}: {section}: {key!r} is not an option name")
            if not _plain(value):
                raise ValueError(f"{path}: {section}.{key}: {json.dumps(value)[:80]} is not a plain value")
            if value is None or value is False:
                out[section].pop(key, None)
            else:
                out[section][key] = value
    return out


def flags(options: dict[str, Any]) -> list[str]:
    """{"a": 1, "b": True, "c": [1, 2]} -> ["--a", "1", "--b", "--c", "1", "2"] (False, None omitted)."""
    out: list[str] = []
    for key, value in options.items():
        if value is False or value is None:
            continue
        out.append(f"--{key}")
        if value is True:
            continue
        out.extend(str(v) for v in value) if isinstance(value, list) else out.append(str(value))
    return out
