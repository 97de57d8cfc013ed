"""Tracklet encoders: SFE (per-frame ResNet), MVE and HMVE (a transformer over frame features).

Input frames are uint8 ``[B, S, 3, H, W]`` (or float in [0, 1]); normalisation happens here, on the
device, so the data path ships uint8. An optional ``mask [B, S]`` (True = real frame) marks padded
positions of variable-length tracklets: padded frames never reach the backbone (so BatchNorm batch
statistics cannot see them either), are ignored by attention and by mean pooling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torchvision
from torch import nn

from polyp_ssl.config_parts import ENCODER_TYPES, POOLINGS  # owned by the encoder part of the config
from polyp_ssl.weights import load_backbone_weights

NORM_MEAN = 0.45
NORM_STD = 0.225


@dataclass
class EncoderConfig:
    encoder_type: str = "hmve"
    sfe_backbone_arch: str = "resnet50"
    sfe_backbone_weights: str | None = None
    sfe_d_model: int | None = None  # None: the backbone's feature size
    hmve_d_model: int = 256
    hmve_n_layers: int = 3
    hmve_n_heads: int = 8
    hmve_d_feedforward: int = 1024
    hmve_dropout: float = 0.1
    hmve_use_feature_norm: bool = False  # LayerNorm on the adapted frame features (mve, hmve)
    hmve_use_encoder_norm: bool = False  # LayerNorm after the last transformer layer (mve, hmve)
    channels_last: bool = False

    @classmethod
    def from_flat(cls, config: dict[str, Any]) -> EncoderConfig:
        """The encoder part of a flat run config (the training flags); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet-family model without its classifier, and its feature size."""
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as e:
        raise ValueError(f"unknown sfe_backbone_arch {arch!r}: {e}") from e
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"sfe_backbone_arch {arch!r} is not a ResNet-family model (no `fc` classifier)")
    model.fc = nn.Identity()
    return model, fc.in_features


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of ``tokens [B, S, D]``, counting only positions where ``mask [B, S]``."""
    if mask is None:
        return tokens.mean(dim=1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class TrackletEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.encoder_type not in ENCODER_TYPES:
            choices = ", ".join(ENCODER_TYPES)
            raise ValueError(f"unknown encoder_type {cfg.encoder_type!r} (choose from {choices})")
        self.cfg = cfg
        self.backbone, feat_dim = build_backbone(cfg.sfe_backbone_arch)
        if cfg.sfe_d_model is not None and cfg.sfe_d_model != feat_dim:
            raise ValueError(
                f"sfe_d_model={cfg.sfe_d_model} does not match {cfg.sfe_backbone_arch}, whose features "
                f"have {feat_dim} dimensions: set --sfe_d_model={feat_dim}"
            )
        self.feat_dim = feat_dim
        if cfg.sfe_backbone_weights:
            load_backbone_weights(self.backbone, cfg.sfe_backbone_arch, cfg.sfe_backbone_weights)
        if cfg.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.register_buffer("norm_mean", torch.full((1, 3, 1, 1), NORM_MEAN), persistent=False)
        self.register_buffer("norm_std", torch.full((1, 3, 1, 1), NORM_STD), persistent=False)

        self.adapter: nn.Module | None = None
        self.feature_norm: nn.Module = nn.Identity()
        self.transformer: nn.TransformerEncoder | None = None
        self.cls_token: nn.Parameter | None = None
        if cfg.encoder_type in ("mve", "hmve"):
            d = cfg.hmve_d_model
            if d % cfg.hmve_n_heads:
                raise ValueError(f"hmve_d_model={d} must be divisible by hmve_n_heads={cfg.hmve_n_heads}")
            self.adapter = nn.Linear(feat_dim, d)
            if cfg.hmve_use_feature_norm:
                self.feature_norm = nn.LayerNorm(d)
            layer = nn.TransformerEncoderLayer(
                d_model=d,
                nhead=cfg.hmve_n_heads,
                dim_feedforward=cfg.hmve_d_feedforward,
                dropout=cfg.hmve_dropout,
                batch_first=True,
            )
            self.transformer = nn.TransformerEncoder(
                layer,
                cfg.hmve_n_layers,
                norm=nn.LayerNorm(d) if cfg.hmve_use_encoder_norm else None,
                enable_nested_tensor=False,
            )
        if cfg.encoder_type == "hmve":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hmve_d_model))
            nn.init.normal_(self.cls_token, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.feat_dim if self.cfg.encoder_type == "sfe" else self.cfg.hmve_d_model

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (0..255) or float (0..1) images -> normalised float32."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.norm_mean) / self.norm_std

    def frame_features(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone features ``[B, S, F]``, zero at padded positions; one backbone call for all frames."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, S, 3, H, W], got {tuple(frames.shape)}")
        b, s = frames.shape[:2]
        flat = frames.reshape(b * s, *frames.shape[2:])
        if mask is not None:
            flat = flat[mask.reshape(-1)]
        x = self.normalise(flat)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(x)
        if mask is None:
            return feats.reshape(b, s, -1)
        out = feats.new_zeros(b * s, feats.shape[-1])
        out[mask.reshape(-1)] = feats
        return out.reshape(b, s, -1)

    def forward(
        self, frames: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(cls [B, D] or None, frame_tokens [B, S, D])``; frame tokens are zero where padded."""
        if mask is not None:
            mask = mask.to(device=frames.device, dtype=torch.bool)
            if mask.shape != frames.shape[:2]:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match frames {tuple(frames.shape[:2])}"
                )
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"tracklets at batch positions {empty} have no real frame in `mask`")
        return self.head(self.frame_features(frames, mask), mask)

    def head(
        self, feats: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The part after the backbone: ``feats [B, S, F]`` (backbone features) -> ``(cls, frame_tokens)``.
        Split from `forward` so that a long tracklet's backbone features can be computed in chunks."""
        if self.cfg.encoder_type == "sfe":
            return None, feats
        tokens = self.feature_norm(self.adapter(feats))
        pad = None if mask is None else ~mask
        if self.cls_token is not None:
            cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([cls, tokens], dim=1)
            if pad is not None:
                pad = torch.cat([pad.new_zeros(pad.shape[0], 1), pad], dim=1)
        out = self.transformer(tokens, src_key_padding_mask=pad)
        if self.cls_token is not None:
            cls_out, frame_out = out[:, 0], out[:, 1:]
        else:
            cls_out, frame_out = None, out
        if mask is not None:
            frame_out = frame_out * mask.unsqueeze(-1).to(frame_out.dtype)
        return cls_out, frame_out

    def embed_features(
        self, feats: torch.Tensor, mask: torch.Tensor | None = None, pooling: str = "cls"
    ) -> torch.Tensor:
        """`embed` from backbone features ``[B, S, F]`` (see `head`)."""
        if pooling not in POOLINGS:
            raise ValueError(f"unknown encoder_pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
        cls, tokens = self.head(feats, mask)
        if pooling == "cls" and cls is not None:
            return cls
        return masked_mean(tokens, mask)

    def embed(
        self, frames: torch.Tensor, mask: torch.Tensor | None = None, pooling: str = "cls"
    ) -> torch.Tensor:
        """The tracklet embedding ``[B, D]``: the CLS output (hmve, pooling="cls") or the masked mean
        of the frame tokens (pooling="mean"; always for sfe and mve, which have no CLS)."""
        if pooling not in POOLINGS:
            raise ValueError(f"unknown encoder_pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
        cls, tokens = self(frames, mask)
        if pooling == "cls" and cls is not None:
            return cls
        return masked_mean(tokens, mask)


def build_encoder(cfg: EncoderConfig) -> TrackletEncoder:
    return TrackletEncoder(cfg)
