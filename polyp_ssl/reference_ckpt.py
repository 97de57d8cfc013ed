"""Checkpoints written by the NT-SSL reference training (`polypsense`, `HierarchicalMVEEncoder`).

The paper's released model is such a Lightning checkpoint. Its encoder is the same network as our
HMVE (`polyp_ssl.encoders`): a torchvision ResNet without its classifier, a linear adapter, a
batch-first `nn.TransformerEncoder` and a learned CLS token prepended to the frame tokens; inputs
are normalised with mean 0.45 and std 0.225 in both. Only the parameter names differ:

    reference state dict          ours (TrackletEncoder)
    mve.sfe.backbone.*       ->   backbone.*
    mve.adapter.*            ->   adapter.*
    mve.encoder.*            ->   transformer.*       (mve.encoder.norm.* too, when present)
    mve.cls_token            ->   cls_token
    mve.feature_norm.*       ->   feature_norm.*      (only with use_feature_norm)
    projector.*              ->   (checked, not kept: the projection head serves the training loss)

The file is recognised by its contents, never by its name: a Lightning checkpoint whose
`hyper_parameters` are the reference's constructor arguments (no `config` entry) and whose state
dict holds `mve.*` keys. Every hyper-parameter is either mapped to an `EncoderConfig` field, kept
as a training setting for the record, or refused by name; every state-dict key and shape is checked
against the encoder the mapped config builds (on the meta device, nothing allocated), so a missing
or extra key is named before any weight is copied.

`backbone_weights` (e.g. "IMAGENET1K_V2") is kept for the record only: the reference rebuilds the
ResNet with those torchvision weights first (a download), but the checkpoint holds every weight of
the trained backbone, so we always build with `sfe_backbone_weights=None`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from polyp_ssl.config import SETTING_PART
from polyp_ssl.encoders import EncoderConfig, build_encoder

REFERENCE_FORMAT = "ntssl-reference"

# reference prefix -> our prefix (None: checked, then dropped)
KEY_RENAMES: tuple[tuple[str, str | None], ...] = (
    ("mve.sfe.backbone.", "backbone."),
    ("mve.adapter.", "adapter."),
    ("mve.encoder.", "transformer."),
    ("mve.feature_norm.", "feature_norm."),
    ("mve.cls_token", "cls_token"),
    ("projector.", None),
)

# the reference only builds these backbones (SFEv3)
REFERENCE_BACKBONES = ("resnet18", "resnet50")

# reference hyper-parameter -> EncoderConfig field (architecture: required)
_ARCH_FIELDS = {
    "backbone_arch": "sfe_backbone_arch",
    "d_in": "sfe_d_model",
    "d_model": "hmve_d_model",
    "d_feedforward": "hmve_d_feedforward",
    "n_heads": "hmve_n_heads",
    "n_layers": "hmve_n_layers",
}
# reference hyper-parameter -> run-config key (training only: recorded, no effect on the encoder)
_TRAINING_FIELDS = {
    "d_proj": "d_proj",
    "loss_lr": "lr",
    "loss_temperature": "loss_temperature",
    "loss_weights": "loss_milnce_weights",
    "n_views": "n_views",
}
# boolean options of the reference; each maps to the named field when this stack has it (an
# EncoderConfig field for the network's options, a TrainConfig field for the loss's), and is
# refused by name when it is true and the field does not exist
_OPTIONS = {
    "use_feature_norm": "hmve_use_feature_norm",
    "use_encoder_norm": "hmve_use_encoder_norm",
    "mask_intra_fragment_frames": "hmve_mask_intra_fragment_frames",
}
_TRAINING_OPTIONS = ("mask_intra_fragment_frames",)  # changes the loss only, never an embedding
KNOWN_HYPER_PARAMETERS = frozenset(
    [*_ARCH_FIELDS, *_TRAINING_FIELDS, *_OPTIONS, "backbone_weights", "dropout"]
)

# the paper's data settings (its retrieval / re-id / probe commands); the checkpoint does not
# record them, so they become the defaults of `polyp-ssl embed` for this file
PAPER_IM_SIZE = 232
PAPER_BBOX_SCALE_FACTOR = 5.0


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint that this stack cannot load as it was trained."""


def is_reference_checkpoint(obj: Any) -> bool:
    """True for the top level of a checkpoint written by the reference training (by contents)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return False
    hp = obj.get("hyper_parameters")
    if not isinstance(hp, dict) or "config" in hp:
        return False
    return any(isinstance(k, str) and k.startswith("mve.") for k in obj["state_dict"])


def _int(hp: dict[str, Any], name: str, minimum: int = 1) -> int:
    v = hp.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ReferenceCheckpointError(f"hyper_parameters.{name} = {v!r}: an integer >= {minimum} is needed")
    return v


def _flag(hp: dict[str, Any], name: str) -> bool:
    v = hp.get(name)
    if v is None:  # the reference's default; falsy there, so the option is off
        return False
    if not isinstance(v, bool):
        raise ReferenceCheckpointError(f"hyper_parameters.{name} = {v!r}: true, false or null is needed")
    return v


def reference_config(hp: dict[str, Any]) -> dict[str, Any]:
    """Our flat run config for the reference hyper-parameters `hp`; ReferenceCheckpointError names
    the hyper-parameter that is unknown, missing, malformed or not implemented here."""
    unknown = sorted(str(k) for k in hp if k not in KNOWN_HYPER_PARAMETERS)
    if unknown:
        raise ReferenceCheckpointError(
            f"unknown hyper-parameter(s) {unknown} of a reference (polypsense) checkpoint: not loaded, "
            "as the network they describe may differ from HMVE"
        )
    missing = sorted(k for k in [*_ARCH_FIELDS, "d_proj"] if k not in hp)
    if missing:
        raise ReferenceCheckpointError(f"hyper_parameters lacks {missing}: the encoder cannot be rebuilt")
    arch = hp["backbone_arch"]
    if arch not in REFERENCE_BACKBONES:
        raise ReferenceCheckpointError(
            f"hyper_parameters.backbone_arch = {arch!r}: the reference builds {list(REFERENCE_BACKBONES)}"
        )
    weights = hp.get("backbone_weights")
    if weights is not None and not isinstance(weights, str):
        raise ReferenceCheckpointError(f"hyper_parameters.backbone_weights = {weights!r}: a name or null")
    dropout = hp.get("dropout", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ReferenceCheckpointError(
            f"hyper_parameters.dropout = {dropout!r}: a number in [0, 1) is needed"
        )

    config: dict[str, Any] = {
        "encoder_type": "hmve",
        "sfe_backbone_arch": arch,
        "sfe_backbone_weights": None,  # the checkpoint holds the trained backbone
        "hmve_dropout": float(dropout),
        "encoder_pooling": "cls",
        "im_size": PAPER_IM_SIZE,
        "bbox_scale_factor": PAPER_BBOX_SCALE_FACTOR,
        "source_format": REFERENCE_FORMAT,
        "reference_backbone_weights": weights,
    }
    for ref, ours in _ARCH_FIELDS.items():
        if ref != "backbone_arch":
            config[ours] = _int(hp, ref)
    config["d_proj"] = _int(hp, "d_proj")
    for ref, ours in _TRAINING_FIELDS.items():
        if ref in hp and ref != "d_proj":
            config[ours] = hp[ref]
    encoder_fields = {f.name for f in fields(EncoderConfig)}
    train_fields = set(SETTING_PART)
    for ref, ours in _OPTIONS.items():
        on = _flag(hp, ref)
        if ours in (train_fields if ref in _TRAINING_OPTIONS else encoder_fields):
            config[ours] = on
        elif on:
            why = (
                "the run config could not say how the model was trained"
                if ref in _TRAINING_OPTIONS
                else "embeddings would differ from the reference's"
            )
            raise ReferenceCheckpointError(
                f"hyper_parameters.{ref} = true is not implemented here (no {ours} setting): {why}, "
                "so the checkpoint is refused"
            )
    return config


def rename_key(key: str) -> str | None:
    """Our state-dict name of reference key `key`; None for the projection head. KeyError when no
    rule applies (a key of another network)."""
    for ref, ours in KEY_RENAMES:
        if key == ref or (ref.endswith(".") and key.startswith(ref)):
            return None if ours is None else ours + key[len(ref) :]
    raise KeyError(key)


def _reference_name(ours: str) -> str:
    for ref, mine in KEY_RENAMES:
        if mine is not None and (ours == mine or (mine.endswith(".") and ours.startswith(mine))):
            return ref + ours[len(mine) :]
    return ours


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Our encoder's state-dict shapes for `config`, built on the meta device (nothing allocated)."""
    cfg = EncoderConfig.from_flat(config)
    with torch.device("meta"):
        encoder = build_encoder(cfg)
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def reference_state(ref_state: dict[str, Any], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder state dict (our names) of the reference state dict; ReferenceCheckpointError
    names the first missing, extra or misshapen key (by its reference name)."""
    try:
        want = expected_shapes(config)
    except ValueError as e:  # e.g. d_in that does not match the backbone
        raise ReferenceCheckpointError(f"hyper_parameters do not describe a buildable encoder: {e}") from e
    d_model, d_proj = config["hmve_d_model"], config["d_proj"]
    state: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    for key, value in ref_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ReferenceCheckpointError(f"state_dict entry {key!r} is not a named tensor")
        try:
            ours = rename_key(key)
        except KeyError:
            raise ReferenceCheckpointError(
                f"state_dict key {key!r} is not part of the reference HMVE encoder "
                f"(expected prefixes {[r for r, _ in KEY_RENAMES]})"
            ) from None
        if ours is None:
            projector[key] = value
            continue
        if ours not in want:
            raise ReferenceCheckpointError(
                f"state_dict key {key!r} does not exist in the encoder its hyper_parameters describe"
            )
        if tuple(value.shape) != want[ours]:
            raise ReferenceCheckpointError(
                f"state_dict key {key!r} has shape {list(value.shape)}, "
                f"the hyper_parameters give {list(want[ours])}"
            )
        state[ours] = value
    missing = [_reference_name(k) for k in want if k not in state]
    if missing:
        raise ReferenceCheckpointError(f"state_dict lacks {len(missing)} encoder key(s), e.g. {missing[:3]}")
    _check_projector(projector, d_model, d_proj)
    return state


def _check_projector(projector: dict[str, torch.Tensor], d_model: int, d_proj: int) -> None:
    """The projection head `Linear(d, d), ReLU, Linear(d, d_proj)`: not used for embeddings, but a
    head of another shape means another network, so it is checked like the rest."""
    want = {
        "projector.0.weight": [d_model, d_model],
        "projector.0.bias": [d_model],
        "projector.2.weight": [d_proj, d_model],
        "projector.2.bias": [d_proj],
    }
    for key, value in projector.items():
        if key not in want:
            raise ReferenceCheckpointError(
                f"state_dict key {key!r} is not part of the reference projection head"
            )
        if list(value.shape) != want[key]:
            raise ReferenceCheckpointError(
                f"state_dict key {key!r} has shape {list(value.shape)}, expected {want[key]}"
            )
    missing = [k for k in want if k not in projector]
    if missing:
        raise ReferenceCheckpointError(f"state_dict lacks projection-head key(s) {missing}")


def read_reference(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(encoder state dict, run config)`` of the loaded top level of a reference checkpoint."""
    config = reference_config(obj["hyper_parameters"])
    state = reference_state(obj["state_dict"], config)
    for key in ("epoch", "global_step", "pytorch-lightning_version"):
        value = obj.get(key)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            config[f"reference_{key.replace('-', '_')}"] = value
    return state, config
