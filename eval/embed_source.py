"""Building or loading the encoder of a source (a checkpoint, an `init:` config built with random
weights, a zoo model), the flat config of a run, and the embedding parameters its data config
fills (image size, crop scale)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from polyp_ssl.config import MAX_IM_SIZE
from polyp_ssl.eval.embed_params import (
    DEFAULT_BBOX_SCALE,
    DEFAULT_IM_SIZE,
    EmbedError,
    EmbedParams,
    EncoderSource,
)


def flat_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """A run config as one flat mapping (the train flags): nested `encoder`/`data`/... sections
    are merged into the top level, so both layouts of a saved config read the same."""
    flat: dict[str, Any] = {}
    for k, v in (config or {}).items():
        if isinstance(v, dict) and k in ("encoder", "data", "model", "train"):
            continue
        flat[k] = v
    for section in ("model", "train", "data", "encoder"):
        sub = (config or {}).get(section)
        if isinstance(sub, dict):
            flat.update(sub)
    return flat


_ARCH_SPEC = re.compile(r"^(sfe|mve|hmve)[-_:](resnet\d+)$")


def init_config(spec: str) -> dict[str, Any]:
    """The config of the encoder to build at initialisation, from a checkpoint, a YAML/JSON
    config file (the run's resolved config) or an architecture spec such as `hmve-resnet18`."""
    from polyp_ssl.checkpoint import MAX_INIT_PARAMS, CheckpointError, check_model_config

    m = _ARCH_SPEC.match(spec)
    if m:
        config = {"encoder_type": m.group(1), "sfe_backbone_arch": m.group(2), "sfe_d_model": None}
        where = f"init:{spec}"
    else:
        config, where = _init_config_file(spec), spec
    try:  # the check of every model config, before anything is built; random weights: a tighter bound
        check_model_config({**config, "sfe_d_model": None}, where, max_params=MAX_INIT_PARAMS)
    except CheckpointError as e:
        raise EmbedError(str(e)) from None
    return config


def _init_config_file(spec: str) -> dict[str, Any]:
    """The flat config of an `init:` file: a checkpoint's (checked as every checkpoint is), or a
    YAML/JSON run config."""
    from polyp_ssl.checkpoint import CheckpointError, checkpoint_kind, load_encoder, resolve_checkpoint_path

    path = Path(spec)
    try:
        if path.is_dir():  # a run folder: its last.ckpt
            path = resolve_checkpoint_path(path)
        if not path.is_file():
            raise EmbedError(f"init:{spec}: neither a file nor an architecture spec like hmve-resnet18")
        if checkpoint_kind(path) != "text":  # a checkpoint by its contents (or a wrong kind, named)
            _, config = load_encoder(path, map_location="cpu")
            return flat_config(config)
    except CheckpointError as e:
        raise EmbedError(str(e)) from None
    from polyp_ssl.shards.textio import TextInputError, load_config_file

    try:  # bounded, aliases and python tags refused, nesting bounded: one line naming the file
        config = load_config_file(path, "init: config")
    except TextInputError as e:
        raise EmbedError(f"init:{e}") from None
    if not isinstance(config, dict):
        raise EmbedError(f"{path}: config is not a mapping")
    return flat_config(config)


def encoder_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The EncoderConfig fields of a flat config; backbone weights dropped (initialisation means
    random weights, never a pretrained file)."""
    from polyp_ssl.encoders import EncoderConfig

    known = set(EncoderConfig.__dataclass_fields__)
    enc = {k: v for k, v in flat_config(config).items() if k in known}
    enc.pop("sfe_backbone_weights", None)
    enc.pop("channels_last", None)
    return enc


def build_init_encoder(config: dict[str, Any], seed: int):
    import torch

    from polyp_ssl.encoders import EncoderConfig, build_encoder

    enc = encoder_fields(config)
    if enc.get("sfe_d_model") is not None:
        # the seed's default sfe_d_model (2048) only fits resnet50: let the backbone decide
        enc["sfe_d_model"] = None
    torch.manual_seed(seed)
    try:
        return build_encoder(EncoderConfig(**enc))
    except ValueError as e:
        raise EmbedError(f"cannot build the encoder at initialisation: {e}") from e


def load_source_encoder(source: EncoderSource, init_seed: int, expect_type: str | None, pooling: str = "cls"):
    """(encoder module, config dict) of a checkpoint, init or zoo source."""
    if source.kind == "zoo":
        from polyp_ssl.eval.zoo import ZooError, get_spec, make_zoo_encoder

        if expect_type:
            raise EmbedError(f"--encoder_type {expect_type} is for checkpoints; {source.spec} is a zoo model")
        meta = source.config["zoo"]
        try:
            encoder = make_zoo_encoder(get_spec(meta["name"]), Path(meta["weights"]), token_pooling=pooling)
        except ZooError as e:
            raise EmbedError(str(e)) from None
        return encoder, {"im_size": source.config["im_size"]}
    if source.kind == "checkpoint":
        from polyp_ssl.checkpoint import CheckpointError, load_encoder

        try:
            encoder, config = load_encoder(source.spec, map_location="cpu")
        except EmbedError:
            raise
        except CheckpointError as e:  # names the file and the field already
            raise EmbedError(f"cannot load the encoder: {e}") from None
        except Exception as e:  # a bad checkpoint is reported, not traced
            raise EmbedError(f"{source.spec}: cannot load the encoder ({type(e).__name__}: {e})") from e
        config = flat_config(config)
        etype = getattr(getattr(encoder, "cfg", None), "encoder_type", None) or config.get("encoder_type")
    else:
        config = source.config
        encoder = build_init_encoder(config, init_seed)
        etype = encoder.cfg.encoder_type
    if expect_type and etype and etype != expect_type:
        raise EmbedError(
            f"{source.spec}: holds a {etype!r} encoder, but --encoder_type {expect_type!r} was asked"
        )
    encoder.eval()
    return encoder, config


def resolve_params(
    params: EmbedParams, config: dict[str, Any], im_size: int | None, bbox_scale_factor: float | None
) -> EmbedParams:
    """Unset image size and crop scale come from the checkpoint's data config."""
    data = flat_config(config)
    im = im_size if im_size is not None else int(data.get("im_size") or DEFAULT_IM_SIZE)
    scale = (
        bbox_scale_factor
        if bbox_scale_factor is not None
        else float(data.get("bbox_scale_factor") or DEFAULT_BBOX_SCALE)
    )
    if not 8 <= im <= MAX_IM_SIZE:  # a checkpoint's im_size passed check_model_config already
        raise EmbedError(f"--data_im_size must be in [8, {MAX_IM_SIZE}], got {im}")
    if scale <= 0:
        raise EmbedError(f"--data_bbox_scale_factor must be > 0, got {scale}")
    return replace(params, im_size=im, bbox_scale_factor=scale)
