"""Loading the tracklet encoder alone, from a Lightning checkpoint or from an exported encoder file.

Both are read with ``torch.load(weights_only=True)``: a file that needs pickled Python objects is
refused. An exported file is a dict of plain values::

    {"format": "polyp-ssl-encoder", "version": 1,
     "config_json": "<the run's config as JSON>", "state_dict": {name: tensor}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from polyp_ssl.encoders import EncoderConfig, TrackletEncoder, build_encoder

EXPORT_FORMAT = "polyp-ssl-encoder"
EXPORT_VERSION = 1
ENCODER_PREFIX = "encoder."


class CheckpointError(ValueError):
    """A checkpoint file that cannot give a tracklet encoder."""


def encoder_config_from(config: dict[str, Any]) -> EncoderConfig:
    """The encoder settings of a flat run config (the training flags)."""
    return EncoderConfig.from_flat(config)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read(path: Path, map_location: Any) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for other formats
        raise CheckpointError(
            f"{path}: cannot be loaded with torch.load(weights_only=True): it holds pickled Python "
            f"objects or is not a torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def check_loadable(path: str | os.PathLike[str]) -> None:
    """Raise CheckpointError unless `path` loads with ``torch.load(weights_only=True)`` (run before
    handing a checkpoint to anything that might unpickle it)."""
    _read(Path(path), "cpu")


def read_encoder_state(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[dict, dict]:
    """``(encoder state dict, run config)`` from a Lightning checkpoint or an exported file."""
    path = Path(path)
    obj = _read(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(obj).__name__}, not a dict)")
    if obj.get("format") == EXPORT_FORMAT:
        if obj.get("version") != EXPORT_VERSION:
            raise CheckpointError(f"{path}: exported encoder version {obj.get('version')!r} is not supported")
        try:
            config = json.loads(obj["config_json"])
            state = obj["state_dict"]
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: exported encoder file is incomplete ({e})") from e
        return state, config
    if "state_dict" in obj:
        config = (obj.get("hyper_parameters") or {}).get("config")
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{path}: Lightning checkpoint without hyper_parameters.config: not written by NTSSLModule"
            )
        state = {
            k[len(ENCODER_PREFIX) :]: v for k, v in obj["state_dict"].items() if k.startswith(ENCODER_PREFIX)
        }
        if not state:
            raise CheckpointError(f"{path}: checkpoint has no `encoder.*` weights")
        return state, config
    raise CheckpointError(
        f"{path}: unknown checkpoint format (neither a Lightning checkpoint with `state_dict` nor an "
        f"exported encoder with format={EXPORT_FORMAT!r}); keys: {sorted(map(str, obj))[:8]}"
    )


def load_encoder(
    path: str | os.PathLike[str], map_location: Any = "cpu"
) -> tuple[TrackletEncoder, dict[str, Any]]:
    """The trained tracklet encoder (eval mode) and the run's config. Pretrained backbone weights are
    not resolved again: the checkpoint holds every weight."""
    state, config = read_encoder_state(path, map_location)
    cfg = replace(encoder_config_from(config), sfe_backbone_weights=None)
    try:
        encoder = build_encoder(cfg)
        encoder.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: encoder weights do not fit its config {cfg}: {e}") from e
    encoder.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    encoder.eval()
    return encoder, config


def export_encoder(ckpt: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the encoder of checkpoint `ckpt` (weights + run config) to a small file `out_path`."""
    encoder, config = load_encoder(ckpt, "cpu")  # validates that the weights fit the config
    state = encoder.state_dict()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "config_json": json.dumps(config, sort_keys=True),
        "source_sha256": sha256_file(ckpt),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
    }
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out
