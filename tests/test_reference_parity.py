"""The reference code's flags keep their meaning: every flag of its four command lines is accepted,
accepted with a notice, or refused, as tests/fixtures/reference_flags.json lists; the anchor crop is
deterministic; the crop scale cannot exceed the ingest scale; the hmve options behave as there."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from polyp_ssl.encoders import EncoderConfig, build_encoder
from polyp_ssl.losses import HierarchicalMILNCE, _logits
from polyp_ssl.stream import BagStream, StreamParams, build_index, open_video
from polyp_ssl.train_cli import resolve_config
from tests.shard_factory import make_root

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "reference_flags.json").read_text())
ANCHOR = ["--aug_anchorcrop", "--eval_aug_anchorcrop"]
VALUES = {  # valid values for flags whose type alone does not give one
    "batch_size": "10",
    "n_views": "5",
    "mode": "train",
    "task": "retrieval",
    "stages": "test",
    "devices": "auto",
    "dataset_root": "x",
    "loss_milnce_weights": "1.0 1.0",
    "bbox_scale_range": "0.8 1.2",
    "counting_hparams": "{}",
    "fragment_padding_mode": "repeat",
    "data_fragment_padding_mode": "repeat",
    "encoder_features_source": "encoder",
    "encoder_pooling": "cls",
    "im_size": "32",
    "data_im_size": "32",
}


def _argv(row: dict) -> list[str]:
    name = row["flag"][2:]
    if row["type"] == "store_true":
        return [row["flag"]]
    if name in VALUES:
        value = VALUES[name]
    elif row.get("choices"):
        refused = row.get("refused_values", {})
        value = next(str(c) for c in row["choices"] if str(c) not in refused)
    elif row["type"].startswith("float"):
        value = "0.5"
    elif row["type"].startswith("int"):
        value = "2"
    else:
        value = "v"
    return [row["flag"], *value.split()]


def _rows(cli: str) -> list[dict]:
    return FIXTURE["clis"][cli]["flags"]


def _train(extra: list[str]):
    return resolve_config(["--dataset_root", "x", *ANCHOR, *extra])


def _eval_apply(cli: str, extra: list[str]):
    from polyp_ssl.eval import cli as ecli

    if cli == "polypsense.reid.cli":
        p, base, tables = ecli.eval_parser(), ["--task", "retrieval"], ["reid"]
    else:
        p, base, tables = ecli.probe_parser(), ["--task", "size"], ["size", "histology"]
    args = p.parse_args([*base, *extra])
    ecli._apply_reference(p, args, tables)
    return args


RUNNERS = {
    "polypsense.e2e.cli": _train,
    "polypsense.reid.cli": lambda extra: _eval_apply("polypsense.reid.cli", extra),
    "polypsense.downstream.size.cli": lambda extra: _eval_apply("size", extra),
    "polypsense.downstream.histology.cli": lambda extra: _eval_apply("histology", extra),
}


def test_fixture_covers_the_reference_command_lines():
    counts = {cli: len(v["flags"]) for cli, v in FIXTURE["clis"].items()}
    assert counts == {
        "polypsense.e2e.cli": 67,
        "polypsense.reid.cli": 22,
        "polypsense.downstream.size.cli": 38,
        "polypsense.downstream.histology.cli": 41,
    }
    for v in FIXTURE["clis"].values():
        for row in v["flags"]:
            assert row["status"] in ("same", "notice", "refused"), row
            assert row["status"] == "same" or row.get("reason"), row


@pytest.mark.parametrize(
    "cli,row",
    [(cli, row) for cli in FIXTURE["clis"] for row in _rows(cli)],
    ids=lambda x: x["flag"] if isinstance(x, dict) else x.split(".")[-2],
)
def test_every_reference_flag_is_accepted_noticed_or_refused(cli, row, caplog):
    name = row["flag"][2:]
    run = RUNNERS[cli]
    caplog.set_level(logging.WARNING)
    if row["status"] == "refused":
        with pytest.raises(ValueError, match=f"--{name}"):
            run(_argv(row))
        return
    run(_argv(row))
    noticed = [r for r in caplog.records if f"--{name} accepted, no effect" in r.getMessage()]
    assert bool(noticed) == (row["status"] == "notice"), (row, [r.getMessage() for r in caplog.records])
    for value, why in row.get("refused_values", {}).items():
        with pytest.raises(ValueError, match=value):
            run([row["flag"], value])
        assert why


def test_the_reference_meaning_of_a_few_flags():
    cfg = _train(["--loss_lambda", "3", "--hmve_use_feature_norm", "--fragment_padding_mode", "repeat"])
    assert cfg.loss_ta_lambda == 3.0 and cfg.hmve_use_feature_norm and cfg.fragment_padding_mode == "repeat"
    with pytest.raises(ValueError, match="--aug_anchorcrop not given"):
        resolve_config(["--dataset_root", "x"])
    with pytest.raises(ValueError, match="--fragment_padding_mode"):
        _train(["--fragment_drop_last", "--fragment_padding_mode", "repeat"])
    with pytest.raises(ValueError, match="--mode eval"):
        _train(["--mode", "eval"])
    args = _eval_apply("polypsense.reid.cli", ["--stages", "validate"])
    assert args.split == "val"
    with pytest.raises(ValueError, match="--stages"):
        _eval_apply("polypsense.reid.cli", ["--stages", "fit"])


# ----------------------------------------------------------------------------------- anchor crop


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = make_root(tmp_path_factory.mktemp("parity"), videos={"train": 2}, frames_per_tracklet=8)
    manifest = r / "catalog" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["parameters"] = {"crop_scale": 6.0}
    manifest.write_text(json.dumps(m))
    return r


def _two_loads(root: Path, **aug: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = StreamParams(
        batch_size=4, n_views=2, fragment_length=2, fragment_stride=2, min_tracklet_length=4, im_size=32,
        aug_anchorcrop=True, bbox_scale_factor=5.0, shard_access="sequential", **aug,
    )  # fmt: skip
    index = build_index(root, "train", p)
    stream = BagStream(index, p)
    v, samples, codes = next(stream.source.iter_videos([0]))
    ov = open_video(v, 0, samples, codes, p, np.random.default_rng(0), 1.0, stream.stats)
    chosen = [(ov, bag) for bag in ov.bags[:2]]
    a = stream.assembler(stream.source.rows_of(chosen), np.random.default_rng(1))["frames"]
    b = stream.assembler(stream.source.rows_of(chosen), np.random.default_rng(2))["frames"]
    return a, b


def test_aug_anchorcrop_is_the_deterministic_anchor_crop(root):
    a, b = _two_loads(root)
    assert torch.equal(a, b)  # two loads of the same fragments: identical pixels
    a, b = _two_loads(root, aug_random_scale=True, aug_jitter=True, aug_hflip=True, aug_vflip=True)
    assert not torch.equal(a, b)  # the opt-in augmentations do draw


def test_scale_factor_above_the_ingest_scale_is_refused(root, tmp_path):
    assert _train(["--dataset_root", str(root), "--bbox_scale_factor", "6"]).bbox_scale_factor == 6.0
    with pytest.raises(ValueError, match=r"--bbox_scale_factor 7 is larger than the crop scale 6") as e:
        _train(["--dataset_root", str(root), "--bbox_scale_factor", "7"])
    assert "--overwrite --crop-scale 7" in str(e.value)
    from polyp_ssl.eval.embed import EmbedError, embeddings_file
    from tests.embed_factory import make_ckpt

    ckpt = make_ckpt(tmp_path / "tiny.ckpt")
    with pytest.raises(EmbedError, match=r"--data_bbox_scale_factor 7 is larger than the crop scale 6"):
        embeddings_file(root, ckpt, split="train", bbox_scale_factor=7.0, min_tracklet_frames=1)


# ----------------------------------------------------------------------------------- hmve options


def _encoder(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        sfe_backbone_arch="resnet18", hmve_d_model=16, hmve_d_feedforward=32, hmve_n_heads=2, hmve_n_layers=1,
        hmve_dropout=0.0, **kw,
    )  # fmt: skip
    return build_encoder(cfg).eval()


def test_hmve_feature_and_encoder_norm():
    plain = _encoder()
    both = _encoder(hmve_use_feature_norm=True, hmve_use_encoder_norm=True)
    assert isinstance(both.feature_norm, torch.nn.LayerNorm)
    assert not isinstance(plain.feature_norm, torch.nn.LayerNorm)
    assert isinstance(both.transformer.norm, torch.nn.LayerNorm) and plain.transformer.norm is None
    assert set(plain.state_dict()) < set(both.state_dict())  # old checkpoints keep their keys
    x = torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        cls, tokens = both(x)
    # the final LayerNorm (weight 1, bias 0 at init): every output token has mean 0, variance 1
    out = torch.cat([cls[:, None], tokens], dim=1)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3)


def test_mask_intra_fragment_frames_leaves_out_same_fragment_pairs():
    torch.manual_seed(0)
    b, s, t = 4, 3, 0.1
    z = torch.randn(b, s, 8, dtype=torch.float64)
    bag = torch.tensor([0, 0, 1, 1])
    loss = HierarchicalMILNCE([0.0, 1.0], t, mask_intra_fragment_frames=True)(z[:, 0], bag, z)
    # direct: frame i's candidates are frames of other fragments; positives those of its bag
    logits = _logits(z.reshape(b * s, -1), t)
    frag = torch.arange(b).repeat_interleave(s)
    bags = bag.repeat_interleave(s)
    other = frag[:, None] != frag[None, :]
    pos = other & (bags[:, None] == bags[None, :])
    expect = (
        torch.logsumexp(logits.masked_fill(~other, float("-inf")), 1)
        - torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1)
    ).mean()
    assert torch.allclose(loss["loss_cross_frame"], expect)
    unmasked = HierarchicalMILNCE([0.0, 1.0], t)(z[:, 0], bag, z)["loss_cross_frame"]
    assert not torch.allclose(unmasked, expect)
