"""Tracklet encoders: shapes, padding invariance, normalisation inside, pretrained weight resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from polyp_ssl.encoders import EncoderConfig, build_encoder
from polyp_ssl.weights import WeightsError, torchvision_weight_file

SMALL = {"hmve_d_model": 32, "hmve_n_heads": 4, "hmve_d_feedforward": 64, "hmve_n_layers": 2}


def small(encoder_type: str, **kw) -> EncoderConfig:
    return EncoderConfig(encoder_type=encoder_type, sfe_backbone_arch="resnet18", **{**SMALL, **kw})


def frames(b: int = 3, s: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def encoders() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {t: build_encoder(small(t)).eval() for t in ("sfe", "mve", "hmve")}


@pytest.mark.parametrize(
    ("kind", "dim", "has_cls"), [("sfe", 512, False), ("mve", 32, False), ("hmve", 32, True)]
)
def test_output_shapes(encoders, kind: str, dim: int, has_cls: bool) -> None:
    enc = encoders[kind]
    with torch.no_grad():
        cls, tokens = enc(frames())
        assert tokens.shape == (3, 4, dim)
        assert (cls is not None) == has_cls
        if has_cls:
            assert cls.shape == (3, dim)
        assert enc.out_dim == dim
        assert enc.embed(frames(), pooling="cls").shape == (3, dim)
        assert enc.embed(frames(), pooling="mean").shape == (3, dim)


def test_embed_pooling(encoders) -> None:
    x = frames()
    with torch.no_grad():
        cls, tokens = encoders["hmve"](x)
        torch.testing.assert_close(encoders["hmve"].embed(x, pooling="cls"), cls)
        torch.testing.assert_close(encoders["hmve"].embed(x, pooling="mean"), tokens.mean(1))
        _, sfe_tokens = encoders["sfe"](x)
        torch.testing.assert_close(encoders["sfe"].embed(x, pooling="cls"), sfe_tokens.mean(1))
    with pytest.raises(ValueError, match="encoder_pooling"):
        encoders["sfe"].embed(x, pooling="max")


@pytest.mark.parametrize("kind", ["sfe", "mve", "hmve"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_padding_does_not_change_embeddings(encoders, kind: str, train_mode: bool) -> None:
    enc = encoders[kind]
    enc.train(train_mode)
    lengths = [2, 4, 1]
    x = frames(b=3, s=4)
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    garbage = x.clone()
    garbage[~mask] = 255 - garbage[~mask]  # different padding content
    with torch.no_grad():
        # train mode: BatchNorm uses batch statistics, which must not see padding; dropout draws
        # are made equal by reseeding
        torch.manual_seed(5)
        a = enc.embed(x, mask, pooling="cls")
        torch.manual_seed(5)
        b = enc.embed(garbage, mask, pooling="cls")
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        if not train_mode:  # each tracklet alone, unpadded, gives the same embedding
            for i, n in enumerate(lengths):
                alone = enc.embed(x[i : i + 1, :n], pooling="cls")
                torch.testing.assert_close(a[i : i + 1], alone, rtol=1e-4, atol=1e-5)
        _, tokens = enc(garbage, mask)
        assert (tokens[~mask] == 0).all()
    enc.eval()


def test_mask_errors(encoders) -> None:
    x = frames(b=2, s=3)
    with pytest.raises(ValueError, match="no real frame"):
        encoders["hmve"](x, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="does not match"):
        encoders["hmve"](x, torch.ones(2, 4, dtype=torch.bool))


def test_normalisation_inside(encoders) -> None:
    """uint8 frames and float frames in [0, 1] give the same output; the backbone sees
    (x/255 - 0.45) / 0.225."""
    x = frames()
    enc = encoders["sfe"]
    with torch.no_grad():
        _, from_uint8 = enc(x)
        _, from_float = enc(x.float() / 255.0)
        torch.testing.assert_close(from_uint8, from_float)
        flat = x.reshape(-1, 3, 32, 32).float() / 255.0
        direct = enc.backbone((flat - 0.45) / 0.225).reshape(3, 4, -1)
        torch.testing.assert_close(from_uint8, direct)
    assert "norm_mean" not in enc.state_dict()


def test_channels_last_same_output() -> None:
    torch.manual_seed(1)
    a = build_encoder(small("hmve", hmve_dropout=0.0)).eval()
    b = build_encoder(small("hmve", hmve_dropout=0.0, channels_last=True)).eval()
    b.load_state_dict(a.state_dict())
    x = frames()
    with torch.no_grad():
        torch.testing.assert_close(a.embed(x), b.embed(x), rtol=1e-4, atol=1e-4)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="sfe_d_model=2048 does not match resnet18"):
        build_encoder(small("sfe", sfe_d_model=2048))
    with pytest.raises(ValueError, match="encoder_type"):
        build_encoder(small("vit"))
    with pytest.raises(ValueError, match="sfe_backbone_arch"):
        build_encoder(EncoderConfig(sfe_backbone_arch="notanet"))
    cfg = EncoderConfig.from_flat({"encoder_type": "sfe", "sfe_backbone_arch": "resnet18", "lr": 1.0})
    assert cfg.encoder_type == "sfe" and cfg.sfe_d_model is None


@pytest.mark.parametrize("with_fc", [True, False])
def test_weights_from_file(tmp_path: Path, with_fc: bool) -> None:
    torch.manual_seed(2)
    ref = torchvision.models.resnet18()
    state = ref.state_dict()
    if not with_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    enc = build_encoder(small("sfe", sfe_backbone_weights=str(path))).eval()
    ref.fc = torch.nn.Identity()
    ref.eval()
    x = frames(b=1, s=2)
    with torch.no_grad():
        want = ref((x.reshape(2, 3, 32, 32).float() / 255 - 0.45) / 0.225)
        torch.testing.assert_close(enc(x)[1][0], want)


def test_weights_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        build_encoder(small("sfe", sfe_backbone_weights="IMAGENET1K_V1"))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(err.value) and "copy resnet18-f37072fd.pth into" in str(err.value)
    assert torchvision_weight_file("resnet50", "IMAGENET1K_V2").name == "resnet50-11ad3fa6.pth"
    with pytest.raises(WeightsError, match="known: IMAGENET1K_V1"):
        build_encoder(small("sfe", sfe_backbone_weights="IMAGENET9K"))
    with pytest.raises(WeightsError, match="not found"):
        build_encoder(small("sfe", sfe_backbone_weights=str(tmp_path / "missing.pth")))
    r34 = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), r34)
    with pytest.raises(WeightsError, match="does not fit backbone resnet18"):
        build_encoder(small("sfe", sfe_backbone_weights=str(r34)))
    # a torchvision name found in the (local) cache is loaded from there
    expected.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), expected)
    assert build_encoder(small("sfe", sfe_backbone_weights="IMAGENET1K_V1")).out_dim == 512
