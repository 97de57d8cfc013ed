"""Checkpoints of the NT-SSL reference training load as our HMVE encoder, and `polyp-ssl export`
writes a plain safetensors encoder that every `--encoder_ckpt` accepts.

The reference checkpoints here are built from tests/fixtures/ntssl_checkpoint_manifest.json (the
top-level keys, hyper-parameters and state-dict keys/shapes of a real one), with random tensors.
`RefHMVE` is an independent rebuild of the reference network under its own parameter names (a
torchvision ResNet, adapter, optional LayerNorms, CLS token, transformer, projector), used as the
expected value of every embedding.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from polyp_ssl import reference_ckpt
from polyp_ssl.checkpoint import CheckpointError, export_encoder, load_encoder, sha256_file
from polyp_ssl.encoders import EncoderConfig
from polyp_ssl.eval.embed import embeddings_file, resolve_params
from polyp_ssl.eval.embeddings import read_embeddings
from polyp_ssl.export import main as export_main
from polyp_ssl.transforms import load_frames
from tests.embed_factory import TINY_CONFIG, make_ckpt, tracklet_rows
from tests.sample_helpers import read_tracklet_sample as _sample
from tests.shard_factory import make_root

REPO = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((REPO / "tests" / "fixtures" / "ntssl_checkpoint_manifest.json").read_text())
TINY_HP = dict(MANIFEST["hyper_parameters"])
PAPER_HP = {
    **TINY_HP,
    "backbone_arch": "resnet50",
    "backbone_weights": "IMAGENET1K_V2",
    "d_in": 2048,
    "d_model": 256,
    "n_layers": 3,
    "n_heads": 8,
    "d_feedforward": 1024,
    "d_proj": 128,
}


class _MVE(nn.Module):
    def __init__(self, hp: dict) -> None:
        super().__init__()
        self.sfe = nn.Module()
        self.sfe.backbone = torchvision.models.get_model(hp["backbone_arch"], weights=None)
        self.sfe.backbone.fc = nn.Identity()
        d = hp["d_model"]
        self.adapter = nn.Linear(hp["d_in"], d)
        self.feature_norm = nn.LayerNorm(d) if hp["use_feature_norm"] else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        layer = nn.TransformerEncoderLayer(
            d, hp["n_heads"], dim_feedforward=hp["d_feedforward"], dropout=hp["dropout"], batch_first=True
        )
        norm = nn.LayerNorm(d) if hp["use_encoder_norm"] else None
        self.encoder = nn.TransformerEncoder(layer, hp["n_layers"], norm=norm)


class RefHMVE(nn.Module):
    """The reference network under the reference's parameter names; `cls(frames)` follows its
    evaluation path: images scaled to [0, 1] as its ToDtype(float32, scale=True) does (uint8
    times 1/255), Normalize(0.45, 0.225), backbone per frame, adapter, feature norm, CLS
    prepended, transformer, token 0."""

    def __init__(self, hp: dict) -> None:
        super().__init__()
        self.mve = _MVE(hp)
        d = hp["d_model"]
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, hp["d_proj"]))

    def cls(self, frames: torch.Tensor) -> torch.Tensor:
        b, s = frames.shape[:2]
        x = frames.to(torch.float32).mul_(1.0 / 255) if frames.dtype == torch.uint8 else frames
        mean = torch.tensor([0.45] * 3).view(-1, 1, 1)
        std = torch.tensor([0.225] * 3).view(-1, 1, 1)
        x = (x - mean) / std
        x = self.mve.sfe.backbone(x.reshape(b * s, *x.shape[2:])).reshape(b, s, -1)
        x = self.mve.feature_norm(self.mve.adapter(x))
        x = torch.cat([self.mve.cls_token.expand(b, -1, -1), x], dim=1)
        return self.mve.encoder(x)[:, 0]


def random_state(shapes: dict[str, tuple[list[int], str]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes and dtypes, scaled like a trained network's (matrices
    ~ 1/sqrt(fan_in), norm scales and running variances near 1) so embeddings depend on the input."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in shapes.items():
        if dtype == "int64":
            state[key] = torch.randint(0, 100, shape, generator=g, dtype=torch.int64)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=g) / float(np.prod(shape[1:])) ** 0.5
        elif key.endswith(("running_var", "weight")):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def manifest_shapes() -> dict[str, tuple[list[int], str]]:
    return {k: (v["shape"], v["dtype"].removeprefix("torch.")) for k, v in MANIFEST["state_dict"].items()}


def lightning_layout(state: dict, hp: dict) -> dict:
    """The top level of a reference checkpoint (ModelCheckpoint with save_weights_only=True)."""
    return {
        "epoch": 0,
        "global_step": 2,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 0}}}},
        "hparams_name": "kwargs",
        "hyper_parameters": hp,
    }


@functools.lru_cache(maxsize=4)
def _base_state(seed: int) -> dict[str, torch.Tensor]:
    return random_state(manifest_shapes(), seed)


def reference_obj(hp: dict | None = None, seed: int = 0, edit=None) -> dict:
    """The top level of a reference checkpoint; `edit(state, hp)` changes its copies of the two."""
    hp = dict(TINY_HP if hp is None else hp)
    state = dict(_base_state(seed))  # edits replace entries, never a cached tensor's values
    if edit is not None:
        edit(state, hp)
    return lightning_layout(state, hp)


def write_reference(path: Path, hp: dict | None = None, seed: int = 0, edit=None) -> Path:
    torch.save(reference_obj(hp, seed, edit), path)
    return path


def reference_model(path: Path) -> RefHMVE:
    raw = torch.load(path, weights_only=True)
    model = RefHMVE(raw["hyper_parameters"])
    model.load_state_dict(raw["state_dict"], strict=True)
    return model.eval()


def frames_batch(seed: int = 0, b: int = 2, s: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("ntssl")
    return write_reference(base / "reference.ckpt", seed=3)


# ----------------------------------------------------------------------------- the mapping


def test_manifest_is_the_reference_network():
    """The manifest's keys and shapes are exactly those of the reference network with its
    hyper-parameters, and its top level is a Lightning weights-only checkpoint."""
    want = {k: list(v.shape) for k, v in RefHMVE(TINY_HP).state_dict().items()}
    assert {k: v["shape"] for k, v in MANIFEST["state_dict"].items()} == want
    assert len(want) == 151
    assert set(lightning_layout({}, {})) == set(MANIFEST["top_level_keys"])
    assert set(TINY_HP) == reference_ckpt.KNOWN_HYPER_PARAMETERS


def test_reference_checkpoint_gives_the_reference_cls_embedding_bit_for_bit(tiny):
    encoder, config = load_encoder(tiny)
    assert config["source_format"] == "ntssl-reference"
    assert config["encoder_type"] == "hmve" and config["sfe_backbone_arch"] == "resnet18"
    assert (config["sfe_d_model"], config["hmve_d_model"], config["hmve_n_layers"]) == (512, 64, 2)
    assert (config["hmve_n_heads"], config["hmve_d_feedforward"], config["d_proj"]) == (4, 128, 32)
    assert config["loss_milnce_weights"] == [1.0, 1.0, 1.0] and config["n_views"] == 3
    assert config["reference_global_step"] == 2 and config["reference_pytorch_lightning_version"] == "2.6.6"
    json.dumps(config)  # plain JSON: it goes into embeddings metadata and exported files
    ref = reference_model(tiny)
    # the same input: the float image in [0, 1] that the reference's data transform gives
    x = frames_batch().to(torch.float32).mul_(1.0 / 255)
    with torch.inference_mode():
        want = ref.cls(x)
        got = encoder.embed(x, pooling="cls")
        got_masked = encoder.embed(x, mask=torch.ones(x.shape[:2], dtype=torch.bool), pooling="cls")
        # uint8 frames (our loaders') are scaled by / 255, the reference's by * (1 / 255): the
        # pixels differ by at most one float32 ulp, the embeddings by rounding
        got_uint8 = encoder.embed(frames_batch(), pooling="cls")
    assert got.shape == (2, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_masked, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_uint8, want, rtol=1e-5, atol=1e-6)
    # and a different input changes the vector (the comparison can fail)
    with torch.inference_mode():
        other = encoder.embed(frames_batch(seed=1))
    assert (other - want).abs().max() > 1e-2


def test_paper_settings_map_at_full_size_without_allocating():
    """The paper's resnet50 HMVE: shapes come from the reference network built on the meta device,
    and the mapping checks every one of them (meta tensors: nothing is allocated)."""
    with torch.device("meta"):
        ref_state = RefHMVE(PAPER_HP).state_dict()
    obj = lightning_layout(dict(ref_state), dict(PAPER_HP))
    assert reference_ckpt.is_reference_checkpoint(obj)
    state, config = reference_ckpt.read_reference(obj)
    assert config["sfe_backbone_arch"] == "resnet50" and config["sfe_d_model"] == 2048
    assert (config["hmve_d_model"], config["hmve_n_layers"], config["hmve_n_heads"]) == (256, 3, 8)
    assert (config["hmve_d_feedforward"], config["d_proj"]) == (1024, 128)
    assert config["sfe_backbone_weights"] is None  # never built from downloaded weights
    assert config["reference_backbone_weights"] == "IMAGENET1K_V2"
    want = reference_ckpt.expected_shapes(config)
    assert len(ref_state) == len(want) + 4  # + the projection head
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert state["transformer.layers.2.linear1.weight"].shape == (1024, 256)
    assert state["adapter.weight"].shape == (256, 2048) and state["cls_token"].shape == (1, 1, 256)
    # a shape of another network is named
    bad = dict(ref_state, **{"mve.adapter.weight": torch.empty(256, 512, device="meta")})
    with pytest.raises(
        reference_ckpt.ReferenceCheckpointError, match=r"'mve\.adapter\.weight'.*\[256, 512\]"
    ):
        reference_ckpt.read_reference(lightning_layout(bad, dict(PAPER_HP)))


def test_backbone_weights_are_never_downloaded(tmp_path, monkeypatch):
    """`backbone_weights: IMAGENET1K_V2` is not resolved: an empty torch hub and a download that
    fails still load the checkpoint."""
    ckpt = write_reference(tmp_path / "r.ckpt", hp={**TINY_HP, "backbone_weights": "IMAGENET1K_V1"})

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        encoder, config = load_encoder(ckpt)
    finally:
        torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))
    assert config["reference_backbone_weights"] == "IMAGENET1K_V1"
    with torch.inference_mode():
        torch.testing.assert_close(encoder.embed(frames_batch()), reference_model(ckpt).cls(frames_batch()))


def test_a_real_lightning_checkpoint_loads_with_weights_only(tmp_path):
    """A checkpoint that Lightning itself writes (ModelCheckpoint, save_weights_only=True) from a
    module with the reference's structure and hyper-parameters: `loops` and `hyper_parameters`
    are plain containers, torch.load(weights_only=True) reads it, and the embedding is the
    trained module's."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class ReferenceLike(L.LightningModule):
        def __init__(self, **hp):
            super().__init__()
            net = RefHMVE(hp)
            self.mve, self.projector = net.mve, net.projector
            self.save_hyperparameters()

        def training_step(self, batch, batch_idx):
            z = self.projector(RefHMVE.cls(self, batch))
            return z.pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = ReferenceLike(**TINY_HP)
    data = torch.utils.data.DataLoader([frames_batch(i)[0] for i in range(4)], batch_size=2)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="ref", save_weights_only=True)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt_cb],
    )
    trainer.fit(module, data)
    path = tmp_path / "ref.ckpt"
    raw = torch.load(path, weights_only=True)
    assert list(raw) == MANIFEST["top_level_keys"]
    assert raw["hparams_name"] == "kwargs" and isinstance(raw["loops"], dict)
    assert dict(raw["hyper_parameters"]) == TINY_HP
    encoder, config = load_encoder(path)
    assert config["reference_global_step"] == 2
    module.eval()
    x = frames_batch(9).float() / 255
    with torch.inference_mode():
        torch.testing.assert_close(encoder.embed(x), RefHMVE.cls(module, x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- refusals


def _drop(key):
    def edit(state, hp):
        del state[key]

    return edit


def _extra(key, shape):
    def edit(state, hp):
        state[key] = torch.zeros(shape)

    return edit


def _hp(**values):
    def edit(state, hp):
        hp.update(values)

    return edit


def _hp_without(name):
    def edit(state, hp):
        del hp[name]

    return edit


REFUSED = {
    "unknown hyper-parameter": (
        _hp(pooling_strategy="mean"),
        r"unknown hyper-parameter\(s\) \['pooling_strategy'\]",
    ),
    "missing encoder key": (
        _drop("mve.encoder.layers.1.linear2.bias"),
        r"'mve\.encoder\.layers\.1\.linear2\.bias'",
    ),
    "missing backbone key": (
        _drop("mve.sfe.backbone.bn1.running_var"),
        r"'mve\.sfe\.backbone\.bn1\.running_var'",
    ),
    "missing projector key": (_drop("projector.2.bias"), r"'projector\.2\.bias'"),
    "extra key": (_extra("mve.pos_embedding", (1, 16, 64)), r"'mve\.pos_embedding'"),
    "extra key under a known prefix": (
        _extra("mve.encoder.layers.2.norm1.weight", (64,)),
        r"'mve\.encoder\.layers\.2\.norm1\.weight'",
    ),
    "extra projector layer": (_extra("projector.4.weight", (8, 32)), r"'projector\.4\.weight'"),
    "d_in of another backbone": (_hp(d_in=2048), r"sfe_d_model=2048 does not match resnet18"),
    "more layers than weights": (_hp(n_layers=3), r"lacks .*'mve\.encoder\.layers\.2\."),
    "backbone the reference cannot build": (_hp(backbone_arch="resnet34"), r"backbone_arch = 'resnet34'"),
    "architecture field missing": (_hp_without("d_model"), r"lacks \['d_model'\]"),
    "malformed field": (_hp(n_heads="4"), r"n_heads = '4'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_checkpoint_that_does_not_fit_is_refused_by_name(case):
    edit, pattern = REFUSED[case]
    obj = reference_obj(edit=edit)
    assert reference_ckpt.is_reference_checkpoint(obj)
    with pytest.raises(reference_ckpt.ReferenceCheckpointError, match=pattern):
        reference_ckpt.read_reference(obj)


def test_a_refused_file_is_named_with_the_key(tmp_path):
    ckpt = write_reference(tmp_path / "bad.ckpt", edit=_drop("mve.adapter.bias"))
    with pytest.raises(CheckpointError, match=r"'mve\.adapter\.bias'") as err:
        load_encoder(ckpt)
    assert str(err.value).startswith(f"{ckpt}: NT-SSL reference checkpoint: state_dict lacks")


def test_norm_options_map_to_our_encoder(tmp_path):
    """use_feature_norm and use_encoder_norm on (their LayerNorms under the reference names):
    mapped to hmve_use_feature_norm / hmve_use_encoder_norm, same CLS as the reference network."""
    fields = ("hmve_use_feature_norm", "hmve_use_encoder_norm")
    if not set(fields) <= set(EncoderConfig.__dataclass_fields__):
        pytest.skip("no such encoder settings: refused (test_an_option_this_stack_lacks_is_refused_by_name)")
    d = TINY_HP["d_model"]

    def edit(state, hp):
        hp.update(use_feature_norm=True, use_encoder_norm=True)
        for key in ("mve.feature_norm", "mve.encoder.norm"):
            state[f"{key}.weight"] = torch.rand(d) + 0.5
            state[f"{key}.bias"] = torch.randn(d) * 0.1

    ckpt = write_reference(tmp_path / "norm.ckpt", edit=edit)
    encoder, config = load_encoder(ckpt)
    assert [config[f] for f in fields] == [True, True]
    assert isinstance(encoder.feature_norm, nn.LayerNorm) and encoder.transformer.norm is not None
    x = frames_batch().float() / 255
    with torch.inference_mode():
        torch.testing.assert_close(encoder.embed(x), reference_model(ckpt).cls(x), rtol=0, atol=0)


@pytest.mark.parametrize("option", ["use_feature_norm", "use_encoder_norm", "mask_intra_fragment_frames"])
def test_an_option_this_stack_lacks_is_refused_by_name(monkeypatch, option):
    """Were a reference option's setting missing here, `true` is refused naming the option, and
    `false` still loads (the option is off, so nothing is dropped)."""
    monkeypatch.setitem(reference_ckpt._OPTIONS, option, "hmve_option_this_stack_lacks")
    match = rf"hyper_parameters\.{option} = true is not implemented"
    with pytest.raises(reference_ckpt.ReferenceCheckpointError, match=match):
        reference_ckpt.read_reference(reference_obj(edit=_hp(**{option: True})))
    state, config = reference_ckpt.read_reference(reference_obj())
    assert "hmve_option_this_stack_lacks" not in config and len(state) == 147


def test_mask_intra_fragment_frames_is_kept_as_a_training_setting(tmp_path):
    from polyp_ssl.config import SETTING_PART

    if "hmve_mask_intra_fragment_frames" not in SETTING_PART:
        pytest.skip("no such training setting: refused (see the test above)")
    ckpt = write_reference(tmp_path / "m.ckpt", edit=_hp(mask_intra_fragment_frames=True))
    encoder, config = load_encoder(ckpt)
    assert config["hmve_mask_intra_fragment_frames"] is True
    with torch.inference_mode():  # a loss option: the embedding is the reference network's
        torch.testing.assert_close(encoder.embed(frames_batch()), reference_model(ckpt).cls(frames_batch()))


def test_other_files_are_not_taken_for_reference_checkpoints(tmp_path):
    # our own Lightning checkpoint layout is not mistaken for the reference's
    ours = tmp_path / "ours.ckpt"
    cfg = dict(TINY_CONFIG)
    enc, _ = load_encoder(make_ckpt(tmp_path / "src.pt"))
    torch.save(
        {
            "state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()},
            "hyper_parameters": {"config": cfg},
        },
        ours,
    )
    assert load_encoder(ours)[1] == cfg
    assert not reference_ckpt.is_reference_checkpoint(torch.load(ours, weights_only=True))
    # a Lightning checkpoint of some other module still gets the old message
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {"lr": 1}}, other)
    with pytest.raises(CheckpointError, match="without hyper_parameters.config"):
        load_encoder(other)


# ----------------------------------------------------------------------------- through the CLI


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyp_ssl", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # tracklets of 32 frames: long enough for the paper's minimum tracklet length (30)
    return make_root(
        tmp_path_factory.mktemp("ntssl_root") / "root",
        videos={"test": 2},
        polyps_per_video=2,
        tracklets_per_polyp=1,
        frames_per_tracklet=32,
    )


def test_embed_cli_reads_a_reference_checkpoint(root, tiny, tmp_path):
    """`polyp-ssl embed` on a reference checkpoint: one row per tracklet, each the reference
    network's CLS on the same strided anchor crops; the exported file gives the same vectors."""
    out = run_cli(
        "embed",
        "--encoder_ckpt",
        str(tiny),
        "--dataset_root",
        str(root),
        "--split",
        "test",
        "--data_im_size",
        "32",
        "--device",
        "cpu",
        "--name",
        "ref",
    )
    assert out.returncode == 0, out.stderr
    emb = read_embeddings(root / "embeddings" / "ref.parquet", root=root)
    rows = tracklet_rows(root, "test")
    assert list(emb.tracklet_id) == [r["tracklet_id"] for r in rows] and emb.vectors.shape == (len(rows), 64)
    ref = reference_model(tiny)
    for k in (0, len(rows) - 1):
        meta, jpegs = _sample(root, rows[k])
        idx = list(range(0, meta.n_frames, 4))  # the default stride
        frames = load_frames([jpegs[i] for i in idx], [meta.boxes_in_crop[i] for i in idx], 32, 5.0)
        with torch.inference_mode():
            want = ref.cls(frames[None])[0].numpy()
        np.testing.assert_allclose(emb.vectors[k], want, rtol=1e-4, atol=1e-5)

    # the exported file embeds to the same bytes as the checkpoint it came from
    exported = tmp_path / "paper.safetensors"
    assert export_main([str(tiny), str(exported)]) == 0
    vectors = {}
    for name, ckpt in (("from_ckpt", tiny), ("from_export", exported)):
        path = embeddings_file(root, ckpt, split="test", im_size=32, device="cpu", name=name, progress=False)
        vectors[name] = read_embeddings(path, root=root).vectors
    assert np.array_equal(vectors["from_ckpt"], vectors["from_export"])
    np.testing.assert_allclose(vectors["from_ckpt"], emb.vectors, rtol=1e-5, atol=1e-6)


def test_embed_cli_refuses_a_bad_reference_checkpoint_in_one_line(root, tmp_path, capsys):
    from polyp_ssl.entry import main as entry_main

    ckpt = write_reference(tmp_path / "bad.ckpt", edit=_hp(pooling_strategy="mean"))
    before = sorted((root / "embeddings").glob("*")) if (root / "embeddings").exists() else []
    rc = entry_main(["embed", "--encoder_ckpt", str(ckpt), "--dataset_root", str(root), "--split", "test"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert str(ckpt) in line and "pooling_strategy" in line
    after = sorted((root / "embeddings").glob("*")) if (root / "embeddings").exists() else []
    assert after == before  # nothing written


def test_paper_defaults_for_the_data_settings(tiny):
    """The checkpoint does not record the image size and crop scale: the paper's are used."""
    from polyp_ssl.eval.embed import EmbedParams

    _, config = load_encoder(tiny)
    params = resolve_params(EmbedParams(), config, None, None)
    assert (params.im_size, params.bbox_scale_factor) == (232, 5.0)


# ----------------------------------------------------------------------------- export


def _ours_lightning(tmp_path: Path) -> Path:
    enc, cfg = load_encoder(make_ckpt(tmp_path / "src.pt", seed=5))
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "epoch": 1,
            "state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()},
            "hyper_parameters": {"config": cfg},
        },
        path,
    )
    return path


SOURCES = {
    "ours lightning": _ours_lightning,
    "ours exported v1": lambda tmp: make_ckpt(tmp / "enc_v1.pt", seed=6),
    "reference": lambda tmp: write_reference(tmp / "reference.ckpt", seed=7),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_export_round_trips_bit_for_bit(tmp_path, source):
    ckpt = SOURCES[source](tmp_path)
    src_encoder, src_config = load_encoder(ckpt)
    out = export_encoder(ckpt, tmp_path / "out" / "encoder.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["encoder.safetensors"]  # no temporary left
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "polyp-ssl-encoder" and meta["version"] == "2"
    assert meta["source_sha256"] == sha256_file(ckpt)
    assert json.loads(meta["config_json"]) == src_config
    assert keys == set(src_encoder.state_dict())
    encoder, config = load_encoder(out)
    assert config == src_config
    x = frames_batch(4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.inference_mode():
        for m in (None, mask):
            torch.testing.assert_close(encoder.embed(x, mask=m), src_encoder.embed(x, mask=m), rtol=0, atol=0)
    for a, b in zip(encoder.state_dict().values(), src_encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if source == "reference":  # an exported file exports again to the same bytes
        again = export_encoder(out, tmp_path / "again.safetensors")
        assert again.read_bytes() == out.read_bytes().replace(
            sha256_file(ckpt).encode(), sha256_file(out).encode()
        )


def test_export_cli_refuses_to_overwrite_and_writes_atomically(tmp_path, tiny, capsys, monkeypatch):
    out = tmp_path / "enc.safetensors"
    assert export_main([str(tiny), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    before = out.read_bytes()
    assert export_main([str(tiny), str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == before
    assert export_main([str(tiny), str(out), "--overwrite"]) == 0
    assert out.read_bytes() == before  # same input, same bytes
    # OUT is a folder; CKPT is missing: named, nothing written
    assert export_main([str(tiny), str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nope.ckpt"), str(tmp_path / "x.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()

    # the disk fills while writing: exit 1, no OUT, no temporary
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "full" / "enc.safetensors"
    assert export_main([str(tiny), str(target)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(target.parent.iterdir()) == []


def test_bad_exported_files_are_named(tmp_path, tiny):
    good = export_encoder(tiny, tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_encoder(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(
        CheckpointError, match=r"foreign\.safetensors: safetensors file without metadata format"
    ):
        load_encoder(foreign)
    # a well-formed export that lacks one weight of its config's encoder
    encoder, config = load_encoder(good)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "cls_token"}
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        state,
        str(wrong),
        metadata={"format": "polyp-ssl-encoder", "version": "2", "config_json": json.dumps(config)},
    )
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors: .*'cls_token'"):
        load_encoder(wrong)


def test_exported_file_loads_without_lightning_and_help_needs_no_torch(tmp_path, tiny):
    out = export_encoder(tiny, tmp_path / "enc.safetensors")
    code = (
        "import sys\n"
        "from polyp_ssl.checkpoint import load_encoder\n"
        f"enc, cfg = load_encoder({str(out)!r})\n"
        "assert cfg['source_format'] == 'ntssl-reference'\n"
        "print('lightning' in sys.modules, 'pytorch_lightning' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    code = (
        "import sys\n"
        "from polyp_ssl.entry import main\n"
        "try:\n"
        "    main(['export', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--overwrite" in proc.stdout and proc.stdout.split()[-1] == "False"
