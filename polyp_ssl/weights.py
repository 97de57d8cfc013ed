"""Pretrained backbone weights, resolved without network.

`sfe_backbone_weights` is either a torchvision weight name (``IMAGENET1K_V2``, ``DEFAULT``), read
only from the local torch hub cache, or a path to a state dict file. Nothing is ever downloaded:
a missing file is an error that says where to put it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

_STATE_DICT_WRAPPERS = ("state_dict", "model")


class WeightsError(ValueError):
    """Pretrained weights cannot be found or do not fit the backbone."""


def looks_like_path(weights: str) -> bool:
    return (
        os.sep in weights
        or "/" in weights
        or weights.endswith((".pth", ".pt", ".bin"))
        or Path(weights).exists()
    )


def torchvision_weight_file(arch: str, name: str) -> Path:
    """Where the torch hub cache keeps the file of torchvision weight `name` for `arch`."""
    try:
        enum_cls = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"unknown backbone architecture {arch!r} for weights {name!r}") from e
    try:
        weight = enum_cls[name] if name != "DEFAULT" else enum_cls.DEFAULT
    except KeyError:
        known = ", ".join(w.name for w in enum_cls)
        raise WeightsError(
            f"sfe_backbone_weights={name!r} is neither a file nor a torchvision weight name of {arch} "
            f"(known: {known})"
        ) from None
    filename = os.path.basename(urlparse(weight.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A bare state dict from `path` (also accepts one wrapped under "state_dict" or "model"); the
    file passes the checkpoint file check (size, zip records) before torch.load reads it."""
    from polyp_ssl.checkpoint import CheckpointError, check_checkpoint_file  # it imports this module

    try:
        check_checkpoint_file(path, "backbone weights file")
    except CheckpointError as e:
        raise WeightsError(f"sfe_backbone_weights: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure here means the file is unusable
        first = (str(e).strip().splitlines() or [""])[0][:200]
        what = f"{type(e).__name__}: {first}"
        raise WeightsError(f"{path}: cannot be read as a tensor state dict ({what})") from e
    for key in _STATE_DICT_WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (expected a dict of tensors, got {type(obj).__name__})")
    return obj


def resolve_backbone_state_dict(arch: str, weights: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict named by `weights` (a torchvision weight name or a file), and its file."""
    if looks_like_path(weights):
        path = Path(weights).expanduser()
        if not path.exists():  # a FIFO or device is refused by name (check_checkpoint_file)
            raise WeightsError(f"sfe_backbone_weights file not found: {path}")
        return read_state_dict(path), path
    path = torchvision_weight_file(arch, weights)
    if not path.is_file():
        raise WeightsError(
            f"weights {arch}/{weights} are not in the local torch cache and are never downloaded: "
            f"copy {path.name} into {path.parent}/ (expected file: {path}), "
            f"or pass a state dict file with --sfe_backbone_weights=/path/to/file.pth"
        )
    return read_state_dict(path), path


def load_backbone_weights(backbone: nn.Module, arch: str, weights: str) -> Path:
    """Load `weights` into a ResNet `backbone` whose classifier was removed; returns the file used.

    The classifier (``fc.*``) of a full torchvision state dict is dropped; every other key must match.
    """
    state, path = resolve_backbone_state_dict(arch, weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{path}: does not fit backbone {arch}: {e}") from e
    if missing or unexpected:
        raise WeightsError(
            f"{path}: does not fit backbone {arch}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    log.info("loaded %s backbone weights from %s", arch, path)
    return path
