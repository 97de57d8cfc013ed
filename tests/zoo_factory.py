"""Random-weight files in each zoo model's release format (key names, nesting, file type), written
independently of eval/zoo.py's mappings: torchvision builds the ResNets, the sail-sg / SurgeNet
MetaFormer key layout and the Hugging Face Dinov2Model names are spelled out here."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch


def random_state(build, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict for the architecture `build()` makes, drawn without running its (slow)
    initialisation: normal(0, 0.02) tensors, norm scales near 1, BatchNorm variances 1."""
    with torch.device("meta"):
        model = build()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in model.state_dict().items():
        if not t.is_floating_point():
            out[k] = torch.zeros(t.shape, dtype=t.dtype)
        elif k.endswith("running_var"):
            out[k] = torch.ones(t.shape)
        elif t.ndim == 1 and k.endswith("weight"):
            out[k] = 1 + 0.02 * torch.randn(t.shape, generator=g)
        else:
            out[k] = 0.02 * torch.randn(t.shape, generator=g)
    return out


def _timm_state(arch: str, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    import timm

    return random_state(lambda: timm.create_model(arch, pretrained=False, num_classes=0, **kw), seed)


def _torchvision_resnet50_state(seed: int) -> dict[str, torch.Tensor]:
    import torchvision

    return random_state(lambda: torchvision.models.resnet50(weights=None), seed)


def torchvision_resnet50_file(path: Path) -> Path:
    """torchvision's resnet50-*.pth: a flat state dict with the fc classifier."""
    torch.save(_torchvision_resnet50_state(0), path)
    return path


def gastronet_resnet50_file(path: Path, prefix: str = "") -> Path:
    """GastroNet-5M's RN50_*.pth: a torchvision ResNet-50 state dict without the classifier (the
    94.4 MB of the release), optionally under an SSL prefix such as `backbone.`."""
    sd = _torchvision_resnet50_state(1)
    torch.save({prefix + k: v for k, v in sd.items() if not k.startswith("fc.")}, path)
    return path


def dinov2_official_state(arch: str = "vit_small_patch14_dinov2") -> dict[str, torch.Tensor]:
    """dinov2_vit*14_pretrain.pth: timm's names at 518 px (a 37x37 position grid) + mask_token."""
    sd = _timm_state(arch, img_size=518)
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return sd


def dinov2_official_file(path: Path, arch: str = "vit_small_patch14_dinov2") -> Path:
    torch.save(dinov2_official_state(arch), path)
    return path


def dinov2_hf_folder(folder: Path, arch: str = "vit_small_patch14_dinov2", bin_file: bool = False) -> Path:
    """A Hugging Face snapshot of facebook/dinov2-*: config.json + model.safetensors (or
    pytorch_model.bin) with Dinov2Model's names (query/key/value split, layer_scale lambda1)."""
    from safetensors.torch import save_file

    sd = dinov2_official_state(arch)
    dim = sd["cls_token"].shape[-1]
    hf: dict[str, torch.Tensor] = {
        "embeddings.cls_token": sd.pop("cls_token"),
        "embeddings.mask_token": sd.pop("mask_token"),
        "embeddings.position_embeddings": sd.pop("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias"),
        "layernorm.weight": sd.pop("norm.weight"),
        "layernorm.bias": sd.pop("norm.bias"),
    }
    names = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    n_layers = 0
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", k)
        assert m, k
        i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
        n_layers = max(n_layers, i + 1)
        pre = f"encoder.layer.{i}"
        if mod == "attn.qkv":
            q, kk, vv = v.chunk(3, dim=0)
            for name, t in (("query", q), ("key", kk), ("value", vv)):
                hf[f"{pre}.attention.attention.{name}.{leaf}"] = t.contiguous()
        elif mod in ("ls1", "ls2"):
            hf[f"{pre}.layer_scale{mod[-1]}.lambda1"] = v
        else:
            hf[f"{pre}.{names[mod]}.{leaf}"] = v
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": dim // 64,
        "patch_size": 14,
        "image_size": 518,
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(hf, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    return folder


def endovit_file(path: Path) -> Path:
    """EndoViT's endovit.pth: an MAE pretraining checkpoint {"model": encoder + decoder, "args":
    Namespace, "epoch": int, ...}; the encoder has timm's ViT-B/16 names."""
    sd = _timm_state("vit_base_patch16_224")
    sd["mask_token"] = torch.zeros(1, 1, 512)
    sd["decoder_embed.weight"] = torch.randn(512, 768) * 0.02
    sd["decoder_embed.bias"] = torch.zeros(512)
    sd["decoder_pos_embed"] = torch.zeros(1, 197, 512)
    sd["decoder_blocks.0.norm1.weight"] = torch.ones(512)
    sd["decoder_norm.weight"] = torch.ones(512)
    sd["decoder_pred.weight"] = torch.randn(768, 512) * 0.02
    sd["decoder_pred.bias"] = torch.zeros(768)
    torch.save(
        {"model": sd, "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.9), "epoch": 399},
        path,
    )
    return path


def timm_caformer_to_surgenet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's CAFormer keys -> the sail-sg MetaFormer layout SurgeNet's metaformer.py saves
    (downsample_layers.N, stages.N.M, norm; Linear weights as [out, in])."""
    out = {}
    for k, v in sd.items():
        k2 = k
        k2 = re.sub(r"^stem\.conv\.", "downsample_layers.0.conv.", k2)
        k2 = re.sub(r"^stem\.norm\.", "downsample_layers.0.post_norm.", k2)
        k2 = re.sub(r"^stages\.(\d+)\.downsample\.norm\.", r"downsample_layers.\1.pre_norm.", k2)
        k2 = re.sub(r"^stages\.(\d+)\.downsample\.conv\.", r"downsample_layers.\1.conv.", k2)
        k2 = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k2)
        k2 = re.sub(r"^head\.norm\.", "norm.", k2)
        if v.ndim == 4 and v.shape[-2:] == (1, 1) and (".pwconv" in k2 or ".mlp.fc" in k2):
            v = v[:, :, 0, 0]  # SurgeNet's SepConv / Mlp are nn.Linear
        out[k2] = v
    return out


def surgenet_file(path: Path) -> Path:
    """SurgeNet_checkpoint_epoch0050_teacher.pth: the teacher backbone's flat state dict in the
    sail-sg layout, with its MlpHead classifier (`head.fc1`, `head.norm`, `head.fc2`)."""
    from polyp_ssl.eval.zoo import build_architecture, get_spec

    sd = timm_caformer_to_surgenet(random_state(lambda: build_architecture(get_spec("surgenet-caformer")), 2))
    sd["head.fc1.weight"] = torch.randn(2048, 512) * 0.02
    sd["head.fc1.bias"] = torch.zeros(2048)
    sd["head.norm.weight"] = torch.ones(2048)
    sd["head.norm.bias"] = torch.zeros(2048)
    sd["head.fc2.weight"] = torch.randn(1, 2048) * 0.02
    sd["head.fc2.bias"] = torch.zeros(1)
    torch.save(sd, path)
    return path


WRITERS = {
    "imagenet-resnet50": torchvision_resnet50_file,
    "gastronet-resnet50": gastronet_resnet50_file,
    "dinov2-vits14": dinov2_official_file,
    "dinov2-vitb14": lambda p: dinov2_official_file(p, "vit_base_patch14_dinov2"),
    "endovit": endovit_file,
    "surgenet-caformer": surgenet_file,
}
# a small input each architecture allows (ViTs at their native patch size)
TINY_SIZE = {
    "imagenet-resnet50": 32,
    "gastronet-resnet50": 32,
    "dinov2-vits14": 28,
    "dinov2-vitb14": 28,
    "endovit": 32,
    "surgenet-caformer": 32,
}
