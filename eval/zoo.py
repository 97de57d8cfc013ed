"""Foundation-model baselines from local weights: named frozen encoders (`--encoder zoo:NAME`).

Each entry is an architecture built with timm (never `pretrained=True`, so nothing is downloaded),
the weights file (or Hugging Face snapshot folder) the user downloaded once by hand, and the
preprocessing the model was trained with (input size, mean/std, patch size). Weights are read with
`torch.load(weights_only=True)` or safetensors, mapped from the release's key layout to timm's,
and checked key by key: a file made for another architecture is refused naming the first missing
or unexpected key (or the first tensor of the wrong shape).

A tracklet becomes one vector in two steps: every frame's anchor crop (eval.embed) is resized to
the model's input size, normalised with the model's own statistics and encoded to one frame vector
(ViTs: the CLS token after the final norm with `--encoder_pooling cls`, the mean of all output
tokens with `mean`; CNNs: the global average pool of the last stage, plus the final LayerNorm for
CAFormer); the frame vectors are then averaged over the tracklet's real (unpadded) frames.

The entries, their weights pages, licences and the source of every preprocessing number are
listed in docs/zoo.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyp_ssl.shards.textio import TextInputError, load_json
from polyp_ssl.shards.writer import file_sha256

log = logging.getLogger(__name__)

ZOO_PREFIX = "zoo:"
ZOO_VERSION = 1  # bump when a mapping or the frame pooling changes (part of the cache key)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENDOVIT_MEAN = (0.3464, 0.2280, 0.2228)
ENDOVIT_STD = (0.2520, 0.2128, 0.2093)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_NOTICES_SHOWN: set[str] = set()


class ZooError(ValueError):
    """A zoo encoder that cannot be built; the message names the file and the key or field."""


@dataclass(frozen=True)
class ZooSpec:
    """One named encoder: architecture, preprocessing, where its weights come from."""

    name: str
    family: str  # "vit" | "resnet" | "caformer": how the frame vector is taken
    arch: str  # the timm architecture
    input_size: int  # side of the square input the model was trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int | None  # ViTs: the input side should be a multiple of it
    dim: int  # size of the frame (and tracklet) vector
    weights_file: str  # the file name of the release
    weights_page: str
    license: str
    notice: str | None = None  # printed once and kept in the embeddings' metadata
    hf_model_type: str | None = None  # a Hugging Face snapshot folder of this model type is accepted

    def preprocessing(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "patch_size": self.patch_size,
            "resize": "bilinear",
        }


ZOO: dict[str, ZooSpec] = {
    s.name: s
    for s in (
        ZooSpec(
            "imagenet-resnet50",
            "resnet",
            "resnet50",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            None,
            2048,
            "resnet50-11ad3fa6.pth",
            "https://pytorch.org/vision/stable/models/generated/torchvision.models.resnet50.html",
            "BSD-3-Clause (torchvision); trained on ImageNet-1k",
        ),
        ZooSpec(
            "dinov2-vits14",
            "vit",
            "vit_small_patch14_dinov2",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            14,
            384,
            "dinov2_vits14_pretrain.pth",
            "https://github.com/facebookresearch/dinov2",
            "Apache-2.0",
            hf_model_type="dinov2",
        ),
        ZooSpec(
            "dinov2-vitb14",
            "vit",
            "vit_base_patch14_dinov2",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            14,
            768,
            "dinov2_vitb14_pretrain.pth",
            "https://github.com/facebookresearch/dinov2",
            "Apache-2.0",
            hf_model_type="dinov2",
        ),
        ZooSpec(
            "endovit",
            "vit",
            "vit_base_patch16_224",
            224,
            ENDOVIT_MEAN,
            ENDOVIT_STD,
            16,
            768,
            "endovit.pth",
            "https://huggingface.co/egeozsoy/EndoViT",
            "none published; initialised from MAE's ImageNet weights (CC BY-NC 4.0)",
            notice="EndoViT weights: no licence is published with them, and they start from MAE's ImageNet "
            "weights (CC BY-NC 4.0): treat them as non-commercial",
        ),
        ZooSpec(
            "gastronet-resnet50",
            "resnet",
            "resnet50",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            None,
            2048,
            "RN50_GastroNet-5M_DINOv1.pth",
            "https://huggingface.co/tgwboers/GastroNet-5M_Pretrained_Weights",
            "CC BY-NC-ND 4.0",
            notice="GastroNet-5M weights are licensed CC BY-NC-ND 4.0: non-commercial use only, no "
            "derivatives distributed",
        ),
        ZooSpec(
            "surgenet-caformer",
            "caformer",
            "caformer_s18",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            None,
            512,
            "SurgeNet_checkpoint_epoch0050_teacher.pth",
            "https://github.com/TimJaspers0801/SurgeNet",
            "MIT (the repository's LICENSE.txt; no separate licence for the weights)",
        ),
    )
}


def zoo_names() -> list[str]:
    return sorted(ZOO)


def get_spec(name: str) -> ZooSpec:
    if name not in ZOO:
        raise ZooError(f"zoo:{name}: unknown zoo encoder (choose from {', '.join(zoo_names())})")
    return ZOO[name]


def parse_zoo(text: str, weights: str | Path | None = None) -> tuple[ZooSpec, Path]:
    """`zoo:NAME` with `weights`, or the one-string form `zoo:NAME=PATH` -> (spec, weights path)."""
    if not text.startswith(ZOO_PREFIX):
        raise ZooError(f"{text!r}: a zoo encoder is written zoo:NAME (choose from {', '.join(zoo_names())})")
    body = text[len(ZOO_PREFIX) :]
    name, sep, path = body.partition("=")
    if sep and weights is not None and Path(path) != Path(weights):
        raise ZooError(f"{text}: names weights {path!r} and --weights {weights}: give one")
    weights = path if sep else weights
    spec = get_spec(name.strip())
    if not weights:
        raise ZooError(
            f"zoo:{spec.name}: needs --weights PATH, the locally downloaded {spec.weights_file} "
            f"(from {spec.weights_page}; docs/zoo.md): weights are never downloaded"
        )
    p = Path(weights)
    if not p.exists():
        raise ZooError(f"zoo:{spec.name}: --weights {p}: no such file or folder")
    return spec, p


# ----------------------------------------------------------------------------- reading weights


def _hf_weights(folder: Path, spec: ZooSpec) -> tuple[Path, dict[str, Any]]:
    """The weights file and config of a Hugging Face snapshot folder, its config checked."""
    cfg_path = folder / "config.json"
    if spec.hf_model_type is None:
        raise ZooError(f"{folder}: a folder, but zoo:{spec.name} is loaded from its {spec.weights_file} file")
    if not cfg_path.is_file():
        raise ZooError(f"{folder}: not a Hugging Face snapshot (no config.json)")
    try:
        config = load_json(cfg_path, "Hugging Face config", max_bytes=1 << 20)
    except TextInputError as e:  # not JSON, too large, nested too deep: names the file
        raise ZooError(str(e)) from None
    except OSError as e:
        raise ZooError(f"{cfg_path}: not readable ({e})") from None
    if not isinstance(config, dict):
        raise ZooError(f"{cfg_path}: not a JSON object")
    if config.get("model_type") != spec.hf_model_type:
        raise ZooError(
            f"{cfg_path}: field 'model_type' is {config.get('model_type')!r}, zoo:{spec.name} needs "
            f"{spec.hf_model_type!r}"
        )
    for field_name, want in (("hidden_size", spec.dim), ("patch_size", spec.patch_size)):
        if config.get(field_name) != want:
            raise ZooError(
                f"{cfg_path}: field {field_name!r} is {config.get(field_name)!r}, zoo:{spec.name} has {want}"
            )
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name, config
    raise ZooError(f"{folder}: holds config.json but none of {', '.join(HF_WEIGHT_FILES)}")


def weights_file(path: Path, spec: ZooSpec) -> Path:
    """The one file holding the tensors (a snapshot folder's model.safetensors / pytorch_model.bin)."""
    return _hf_weights(path, spec)[0] if path.is_dir() else path


def read_tensors(path: Path) -> dict[str, Any]:
    """The mapping stored in a weights file: safetensors, or a torch file read with
    weights_only=True (tensors and plain containers only; nothing is unpickled). The file passes
    the checkpoint file check first (size, zip records, safetensors header spans)."""
    import torch

    from polyp_ssl.checkpoint import CheckpointError, check_checkpoint_file

    try:
        check_checkpoint_file(path, "weights file")
    except CheckpointError as e:
        raise ZooError(str(e)) from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # a damaged or foreign file
            raise ZooError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
    try:
        # MAE-style checkpoints (EndoViT) keep their argparse.Namespace of training arguments next to
        # the tensors: a plain attribute container, allowed; any other Python object is refused
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated file, not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ZooError(
            f"{path}: not a plain weights file torch.load(weights_only=True) can read "
            f"({type(e).__name__}: {first[:200]})"
        ) from None
    if not isinstance(obj, Mapping):
        raise ZooError(f"{path}: holds a {type(obj).__name__}, not a mapping of tensors")
    return dict(obj)


def weights_sha256(path: Path, spec: ZooSpec) -> str:
    """sha256 of the weights file; for a snapshot folder, of its config.json and weights file."""
    if not path.is_dir():
        return _sha256_file(path)
    wfile, _ = _hf_weights(path, spec)
    h = hashlib.sha256()
    for p in (path / "config.json", wfile):
        h.update(p.name.encode())
        h.update(_sha256_file(p).encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return file_sha256(path, what="weights file")  # a FIFO or device (/dev/zero): refused by name


# ----------------------------------------------------------------------------- key layouts


def _unwrap(obj: dict[str, Any], path: Path, wrappers: tuple[str, ...]) -> dict[str, Any]:
    """The tensor mapping inside a release's container (e.g. MAE's {"model": ...})."""
    for key in wrappers:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return dict(inner)
    return obj


def _strip_prefixes(sd: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Drop a prefix every key shares (DDP's `module.`, DINO's `backbone.`)."""
    changed = True
    while changed and sd:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _keep_tensors(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    import torch

    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ZooError(f"{path}: key {k!r} is not a string")
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif not isinstance(v, (int, float, str, bool, type(None))):
            raise ZooError(f"{path}: key {k!r} holds a {type(v).__name__}, not a tensor")
    return out


def convert_resnet(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """torchvision ResNet-50 keys (conv1, bn1, layer1..4; timm uses the same names). The classifier
    (`fc.*`) and a DINO projection head (`head.*`) are dropped; `module.`/`backbone.` prefixes of
    SSL checkpoints are removed."""
    sd = _unwrap(sd, path, ("state_dict", "model", "teacher", "student"))
    sd = _strip_prefixes(
        _keep_tensors(sd, path), ("module.", "backbone.", "student_backbone.", "teacher_backbone.")
    )
    return {k: v for k, v in sd.items() if not (k.startswith("fc.") or k.startswith("head."))}


def convert_dinov2(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """The official DINOv2 `.pth` (timm's names already; `mask_token` dropped) or a Hugging Face
    `Dinov2Model` state dict (embeddings.* / encoder.layer.N.* / layernorm.*), mapped to timm."""
    sd = _keep_tensors(_unwrap(sd, path, ("teacher", "model")), path)
    sd = _strip_prefixes(sd, ("module.", "backbone."))
    if any(k.startswith("embeddings.") or k.startswith("dinov2.") for k in sd):
        sd = _hf_dinov2_to_timm(_strip_prefixes(sd, ("dinov2.",)), path)
    sd.pop("mask_token", None)
    return sd


def _hf_dinov2_to_timm(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    per_layer = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    layer_re = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = layer_re.match(k)
        if not m:
            out[k] = v  # left as is: reported as unexpected by the key check
            continue
        i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
        if mod in ("layer_scale1", "layer_scale2") and leaf == "lambda1":
            out[f"blocks.{i}.ls{mod[-1]}.gamma"] = v
        elif mod.startswith("attention.attention.") and mod.rsplit(".", 1)[1] in ("query", "key", "value"):
            qkv.setdefault((i, leaf), {})[mod.rsplit(".", 1)[1]] = v
        elif mod in per_layer:
            out[f"blocks.{i}.{per_layer[mod]}.{leaf}"] = v
        else:
            out[k] = v
    for (i, leaf), parts in sorted(qkv.items()):
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            key = f"encoder.layer.{i}.attention.attention.{missing[0]}.{leaf}"
            raise ZooError(f"{path}: key {key!r} is missing")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def convert_mae_vit(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """An MAE checkpoint (`{"model": state_dict}`): the encoder keys are timm's; the MAE decoder
    (`decoder_*`) and `mask_token` are dropped (they are not part of the frozen encoder)."""
    sd = _strip_prefixes(_keep_tensors(_unwrap(sd, path, ("model", "state_dict")), path), ("module.",))
    return {
        k: v
        for k, v in sd.items()
        if not (k.startswith("decoder") or k == "mask_token" or k.startswith("head."))
    }


def convert_caformer(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """SurgeNet's CAFormer-S18 (the sail-sg MetaFormer layout: downsample_layers.N, stages.N.M,
    norm, head) mapped to timm's (stem, stages.N.downsample, stages.N.blocks.M, head.norm); the
    classification head (`head.*`) is dropped. Linear weights of timm's channels-first stages are
    1x1 convolutions: reshaped by the key check (same number of elements)."""
    sd = _unwrap(sd, path, ("teacher", "state_dict", "model"))
    sd = _strip_prefixes(_keep_tensors(sd, path), ("module.", "backbone."))
    if any(k.startswith("stem.") for k in sd):  # already timm's layout
        return {k: v for k, v in sd.items() if not k.startswith("head.fc")}
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            continue
        m = re.match(r"^downsample_layers\.(\d+)\.(pre_norm|post_norm|conv)\.(.+)$", k)
        if m:
            i, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            part = "norm" if part.endswith("norm") else "conv"
            out[f"stem.{part}.{leaf}" if i == 0 else f"stages.{i}.downsample.{part}.{leaf}"] = v
            continue
        m = re.match(r"^stages\.(\d+)\.(\d+)\.(.+)$", k)
        if m:
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}"] = v
            continue
        if k.startswith("norm."):
            out["head." + k] = v
            continue
        out[k] = v
    return out


CONVERTERS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "imagenet-resnet50": convert_resnet,
    "gastronet-resnet50": convert_resnet,
    "dinov2-vits14": convert_dinov2,
    "dinov2-vitb14": convert_dinov2,
    "endovit": convert_mae_vit,
    "surgenet-caformer": convert_caformer,
}


# ----------------------------------------------------------------------------- architectures


def build_architecture(spec: ZooSpec):
    """The timm model of an entry, random weights, no classifier; never downloads."""
    import timm
    from torch import nn

    if spec.family == "caformer":
        from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

        class ReLUSepConv(SepConv):
            """SurgeNet's CAFormer uses ReLU where the ImageNet CAFormer uses StarReLU."""

            def __init__(self, dim: int, **kwargs: Any) -> None:
                kwargs.pop("act1_layer", None)
                super().__init__(dim, act1_layer=nn.ReLU, **kwargs)

        return MetaFormer(
            depths=(3, 3, 9, 3),
            dims=(64, 128, 320, 512),
            token_mixers=[ReLUSepConv, ReLUSepConv, Attention, Attention],
            norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2,
            mlp_act=nn.ReLU,
            num_classes=0,
        )
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if spec.family == "vit":
        kwargs.update(img_size=spec.input_size, dynamic_img_size=True)
    return timm.create_model(spec.arch, **kwargs)


def _fit_pos_embed(sd: dict[str, Any], model) -> None:
    """Resample a ViT checkpoint's position embeddings to the model's patch grid (DINOv2 ships a
    37x37 grid for 518 px; the model is built at its evaluation size)."""
    from timm.layers import resample_abs_pos_embed

    pe = sd.get("pos_embed")
    want = getattr(model, "pos_embed", None)
    if pe is None or want is None or pe.shape == want.shape or pe.ndim != 3:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    n_old = pe.shape[1] - prefix
    side_old = int(round(n_old**0.5))
    side_new = int(round((want.shape[1] - prefix) ** 0.5))
    if side_old * side_old != n_old or pe.shape[2] != want.shape[2]:
        return  # reported by the shape check
    sd["pos_embed"] = resample_abs_pos_embed(
        pe.float(), (side_new, side_new), (side_old, side_old), num_prefix_tokens=prefix
    )


def check_keys(sd: dict[str, Any], model, path: Path, spec: ZooSpec) -> dict[str, Any]:
    """The state dict to load, or ZooError naming the first missing / unexpected key or the first
    tensor whose shape differs (reshaped when only the layout differs: Linear vs 1x1 conv)."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    what = f"{path}: not the {spec.name} weights ({spec.weights_file})"
    if missing:
        raise ZooError(f"{what}: key {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise ZooError(f"{what}: key {unexpected[0]!r} is unexpected ({len(unexpected)} unexpected in all)")
    out = {}
    for k, ref in want.items():
        v = sd[k]
        if tuple(v.shape) != tuple(ref.shape):
            if v.numel() != ref.numel():
                raise ZooError(
                    f"{what}: key {k!r} has shape {tuple(v.shape)}, the model's is {tuple(ref.shape)}"
                )
            v = v.reshape(ref.shape)
        out[k] = v.to(ref.dtype)
    return out


def load_model(spec: ZooSpec, weights: Path):
    """The entry's model with the file's weights (mapped, key-checked), in eval mode."""
    import torch

    wfile = weights_file(weights, spec)
    raw = read_tensors(wfile)
    sd = CONVERTERS[spec.name](raw, wfile)
    # built on the meta device: no random initialisation of weights that are replaced anyway
    with torch.device("meta"):
        model = build_architecture(spec)
    if spec.family == "vit":
        _fit_pos_embed(sd, model)
    sd = check_keys(sd, model, wfile, spec)
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            raise ZooError(f"{wfile}: key {k!r} holds non-finite values")
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a non-persistent buffer
        model = build_architecture(spec)
        model.load_state_dict(sd, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------- the encoder


def show_notice(spec: ZooSpec) -> None:
    """A licence notice, printed once per process and entry."""
    if spec.notice and spec.name not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(spec.name)
        print(f"notice: {spec.notice}", file=sys.stderr)


def preprocess(x, spec: ZooSpec, size: int | None = None):
    """uint8 (or float in [0, 1]) [N, 3, H, W] -> float [N, 3, size, size] normalised with the
    model's own statistics (size: default the model's input size; bilinear resize when H, W differ)."""
    import torch
    from torch import nn

    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    side = size or spec.input_size
    if tuple(x.shape[-2:]) != (side, side):
        x = nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def make_zoo_encoder(spec: ZooSpec, weights: Path, token_pooling: str = "cls", chunk_frames: int = 64):
    """A `ZooEncoder` (the interface eval.embed runs: frame_features / embed_features / embed)."""
    import torch
    from torch import nn

    from polyp_ssl.encoders import masked_mean

    model = load_model(spec, weights)
    show_notice(spec)

    class ZooEncoder(nn.Module):
        """Frozen per-frame model + its preprocessing; tracklet vector = mean of frame vectors."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.spec = spec
            self.token_pooling = token_pooling if spec.family == "vit" else "avg"
            self.chunk_frames = max(1, int(chunk_frames))

        @property
        def out_dim(self) -> int:
            return spec.dim

        def preprocess(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
            return preprocess(x, spec, size)

        def frame_vectors(self, x: torch.Tensor) -> torch.Tensor:
            """[N, 3, H, W] uint8 -> [N, D]; the backbone runs over chunks of `chunk_frames` frames
            (4x that on CUDA), so memory stays bounded whatever the batch."""
            side = x.shape[-1] if x.shape[-1] == x.shape[-2] else spec.input_size
            if spec.patch_size and side % spec.patch_size:
                side = max(spec.patch_size, round(side / spec.patch_size) * spec.patch_size)
            outs = []
            chunk = self.chunk_frames * (4 if x.is_cuda else 1)
            for c in range(0, x.shape[0], chunk):
                xi = self.preprocess(x[c : c + chunk], side)
                if xi.is_cuda:
                    xi = xi.contiguous(memory_format=torch.channels_last)
                feats = self.model.forward_features(xi)
                if spec.family == "vit":
                    v = feats[:, 0] if self.token_pooling == "cls" else feats.mean(dim=1)
                else:
                    v = self.model.forward_head(feats, pre_logits=True)
                outs.append(v.float())
            return torch.cat(outs, dim=0)

        def frame_features(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            if frames.ndim != 5 or frames.shape[2] != 3:
                raise ValueError(f"frames must be [B, S, 3, H, W], got {tuple(frames.shape)}")
            b, s = frames.shape[:2]
            flat = frames.reshape(b * s, *frames.shape[2:])
            if mask is not None:
                mask = mask.to(device=frames.device, dtype=torch.bool)
                flat = flat[mask.reshape(-1)]
            vec = self.frame_vectors(flat)
            if mask is None:
                return vec.reshape(b, s, -1)
            out = vec.new_zeros(b * s, vec.shape[-1])
            out[mask.reshape(-1)] = vec
            return out.reshape(b, s, -1)

        def embed_features(
            self, feats: torch.Tensor, mask: torch.Tensor | None = None, pooling: str = "cls"
        ) -> torch.Tensor:
            """Mean over the real frames (the frame vector's pooling is fixed at construction)."""
            return masked_mean(feats.float(), mask)

        def embed(
            self, frames: torch.Tensor, mask: torch.Tensor | None = None, pooling: str = "cls"
        ) -> torch.Tensor:
            if mask is not None:
                mask = mask.to(device=frames.device, dtype=torch.bool)
            return self.embed_features(self.frame_features(frames, mask), mask)

    return ZooEncoder().eval()


@dataclass(frozen=True)
class ZooSource:
    """What identifies a zoo encoder's vectors (the cache key's source part)."""

    spec: ZooSpec
    weights: Path
    sha256: str

    @property
    def identity(self) -> str:
        payload = {
            "zoo": self.spec.name,
            "weights_sha256": self.sha256,
            "preprocessing": self.spec.preprocessing(),
            "arch": self.spec.arch,
            "v": ZOO_VERSION,
        }
        return "zoo-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "arch": self.spec.arch,
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "preprocessing": self.spec.preprocessing(),
            "license": self.spec.license,
            "license_notice": self.spec.notice,
            "frame_pooling": "token" if self.spec.family == "vit" else "avg",
            "weights_page": self.spec.weights_page,
            "zoo_version": ZOO_VERSION,
        }


def resolve_zoo(text: str, weights: str | Path | None = None) -> ZooSource:
    """Identify a zoo encoder (hash its weights; nothing is loaded yet)."""
    spec, path = parse_zoo(text, weights)
    if path.is_dir():
        _hf_weights(path, spec)
    return ZooSource(spec, path, weights_sha256(path, spec))


__all__ = [
    "ZOO",
    "ZOO_PREFIX",
    "ZooError",
    "ZooSource",
    "ZooSpec",
    "build_architecture",
    "get_spec",
    "load_model",
    "make_zoo_encoder",
    "parse_zoo",
    "resolve_zoo",
    "zoo_names",
]
