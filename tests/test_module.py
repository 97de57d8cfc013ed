"""NTSSLModule: a real (tiny) Lightning fit, checkpoint reload and export, lr schedule, validation mAP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sklearn.metrics import average_precision_score

from polyp_ssl.checkpoint import CheckpointError, export_encoder, load_encoder, sha256_file
from polyp_ssl.module import NTSSLModule, lr_factor, retrieval_map, temporal_alignment

IM, S, BAGS, VIEWS = 32, 2, 4, 2

TINY = {
    "encoder_type": "hmve",
    "sfe_backbone_arch": "resnet18",
    "sfe_d_model": 512,
    "d_proj": 16,
    "hmve_d_model": 32,
    "hmve_d_feedforward": 64,
    "hmve_n_heads": 4,
    "hmve_n_layers": 1,
    "lr": 1e-3,
    "loss_milnce_weights": [1.0, 1.0, 0.5],
    "im_size": IM,  # a data key: kept and ignored by the module
    "dataset_root": Path("/data/root"),  # not JSON: stored as a string
}


def train_batch(seed: int, im: int = IM, s: int = S) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = BAGS * VIEWS
    bag = torch.arange(BAGS).repeat_interleave(VIEWS)
    return {
        "frames": torch.randint(0, 256, (b, s, 3, im, im), dtype=torch.uint8, generator=g),
        "bag": bag,
        "video": bag // 2,
        "tracklet": torch.arange(b),
        "identity": bag,
        "position": torch.rand(b, generator=g),
    }


def val_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    b, s_max = 4, 3
    lengths = torch.tensor([3, 1, 2, 3])
    return {
        "frames": torch.randint(0, 256, (b, s_max, 3, IM, IM), dtype=torch.uint8, generator=g),
        "mask": torch.arange(s_max)[None, :] < lengths[:, None],
        "identity": torch.tensor([0, 0, 1, -1]) + 2 * seed * (torch.tensor([0, 0, 1, -1]) >= 0),
        "video": torch.tensor([seed, seed, seed, seed]),
        "tracklet": torch.arange(b) + 10 * seed,
        "valid": torch.tensor([True, True, True, seed != 1]),  # batch 1: a padding row to drop
    }


class LrRecorder(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(
    tmp_path: Path,
    config: dict,
    max_steps: int = 2,
    callbacks=(),
    validate: bool = True,
    im: int = IM,
    **trainer_kw,
) -> tuple[L.Trainer, NTSSLModule]:
    torch.manual_seed(0)
    module = NTSSLModule(config)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        limit_val_batches=None if validate else 0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **{"accelerator": "cpu", "devices": 1, **trainer_kw},
    )
    train = [train_batch(i, im=im) for i in range(max_steps)]
    val = [val_batch(i) for i in range(2)]
    trainer.fit(
        module,
        torch.utils.data.DataLoader(train, batch_size=None),
        torch.utils.data.DataLoader(val, batch_size=None),
    )
    return trainer, module


def test_fit_checkpoint_reload_and_export(tmp_path: Path) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, monitor="val/map", mode="max")
    trainer, module = fit(tmp_path, TINY, callbacks=[ckpt_cb])
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_frag", "train/loss_cross_frame", "train/loss_intra_frame"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/videos_per_batch"].item() == 2.0
    assert metrics["train/fragments_per_s"].item() > 0 and "train/frames_per_s" in metrics
    assert metrics["train/lr"].item() == pytest.approx(1e-3)
    assert 0.0 <= metrics["val/map"].item() <= 1.0 and "val/alignment" in metrics
    assert metrics["val/n_tracklets"].item() == 7  # 2 batches of 4, one row not valid

    last = tmp_path / "checkpoints" / "last.ckpt"
    raw = torch.load(last, weights_only=True)  # plain types only
    assert raw["hyper_parameters"]["config"]["dataset_root"] == "/data/root"

    encoder, config = load_encoder(last)
    assert config["im_size"] == IM and config["encoder_type"] == "hmve"
    x = val_batch(0)
    module.eval()
    with torch.no_grad():
        want = module.encoder.embed(x["frames"], x["mask"])
        got = encoder.embed(x["frames"], x["mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    exported = export_encoder(last, tmp_path / "enc.pt")
    assert exported.stat().st_size < last.stat().st_size
    assert not (tmp_path / "enc.pt.tmp").exists()
    encoder2, config2 = load_encoder(exported)
    assert config2 == config
    with torch.no_grad():
        torch.testing.assert_close(encoder2.embed(x["frames"], x["mask"]), want, rtol=0, atol=0)
    assert len(sha256_file(exported)) == 64


@pytest.mark.parametrize("loss_type", ["supervised", "temporally-aware"])
def test_other_losses_and_encoders_train(tmp_path: Path, loss_type: str) -> None:
    config = {**TINY, "loss_type": loss_type, "encoder_type": "sfe", "encoder_pooling": "mean"}
    trainer, module = fit(tmp_path, config, max_steps=1, validate=False, im=16)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # every loss type trains the same three levels, weighted by loss_milnce_weights
    for term in ("loss_frag", "loss_cross_frame", "loss_intra_frame"):
        assert torch.isfinite(trainer.callback_metrics[f"train/{term}"])


def test_lr_schedule_warmup_cosine(tmp_path: Path) -> None:
    assert [lr_factor(s, 2, 6, "cosine") for s in range(7)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    )
    assert [lr_factor(s, 3, 100, "constant") for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    rec = LrRecorder()
    config = {**TINY, "lr": 0.01, "lr_schedule": "cosine", "warmup_steps": 2, "encoder_type": "sfe"}
    trainer, _ = fit(tmp_path, config, max_steps=4, callbacks=[rec], validate=False, im=16)
    assert rec.lrs == pytest.approx([0.005, 0.01, 0.01, 0.005])
    # the scheduler state stays plain: a resumable checkpoint loads with weights_only=True
    trainer.save_checkpoint(tmp_path / "sched.ckpt")
    sched = torch.load(tmp_path / "sched.ckpt", weights_only=True)["lr_schedulers"][0]
    assert sched["last_epoch"] == 4 and sched["lr_lambdas"][0]["warmup_steps"] == 2
    constant = NTSSLModule({**TINY, "lr": 0.01, "lr_schedule": "none", "encoder_type": "sfe"})
    opt = constant.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["weight_decay"] == 1e-4


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        NTSSLModule({**TINY, "loss_type": "triplet"})
    with pytest.raises(ValueError, match="encoder_type"):
        NTSSLModule({**TINY, "encoder_type": "vit"})
    with pytest.raises(ValueError, match="lr_schedule"):
        NTSSLModule({**TINY, "lr_schedule": "step"})
    with pytest.raises(ValueError, match="sfe_d_model"):
        NTSSLModule({**TINY, "sfe_d_model": 2048})


class Payload:
    """A pickled Python object: weights_only loading must refuse it."""


def test_load_encoder_refuses_pickled_objects_and_other_formats(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "extra": Payload()}, pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.ckpt.*weights_only=True"):
        load_encoder(pickled)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        load_encoder(text)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_encoder(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "missing.ckpt")


def test_retrieval_map_against_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(9, 4, generator=g)
    identity = torch.tensor([0, 0, 0, 1, 1, 2, 3, -1, -1])  # 2, 3: no positive; -1: unknown
    got, n_queries, excluded = retrieval_map(emb, identity)
    assert (n_queries, excluded) == (5, 2)
    e = torch.nn.functional.normalize(emb, dim=1).double().numpy()
    aps = []
    for i in range(7):
        labels = [identity[j].item() == identity[i].item() for j in range(7) if j != i]
        if not any(labels):
            continue
        # AP by its definition: mean precision at the rank of each positive
        scores = [float(e[i] @ e[j]) for j in range(7) if j != i]
        order = np.argsort(scores)[::-1]
        hits, precisions = 0, []
        for rank, j in enumerate(order, start=1):
            if labels[j]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(np.mean(precisions))
        assert aps[-1] == pytest.approx(average_precision_score(labels, scores))
    assert got == pytest.approx(float(np.mean(aps)))
    perfect = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    assert retrieval_map(perfect, torch.tensor([0, 0, 1, 1]))[0] == pytest.approx(1.0)
    assert math.isnan(retrieval_map(perfect, torch.tensor([0, 1, 2, -1]))[0])


def test_temporal_alignment() -> None:
    emb = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    video = torch.tensor([0, 0, 0, 1, 1])
    order = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.6])
    assert temporal_alignment(emb, video, order) == pytest.approx((1 + 0 + 1) / 3)
    # order, not batch position, defines the neighbours
    assert temporal_alignment(emb, video, torch.tensor([0.0, 0.2, 0.1, 0.5, 0.6])) == pytest.approx(1 / 3)


def test_hyperparameters_are_plain_json() -> None:
    module = NTSSLModule({**TINY, "encoder_type": "sfe"})
    config = module.hparams["config"]
    assert json.loads(json.dumps(config)) == config
    assert config["loss_ta_lambda"] == 10.0 and config["weight_decay"] == 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_channels_last_fit_on_gpu(tmp_path: Path) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    config = {**TINY, "channels_last": True, "compile": True}
    trainer, module = fit(
        tmp_path, config, max_steps=3, callbacks=[ckpt_cb], accelerator="gpu", precision="bf16-mixed"
    )
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["val/map"].item() >= 0
    encoder, _ = load_encoder(tmp_path / "checkpoints" / "last.ckpt", map_location="cuda")
    x = val_batch(0)
    module.cuda().eval()  # the trainer moved it back to the CPU at the end of fit
    with torch.no_grad():
        want = module.encoder.embed(x["frames"].cuda(), x["mask"].cuda())
        got = encoder.embed(x["frames"].cuda(), x["mask"].cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = encoder.embed(x["frames"].cuda(), x["mask"].cuda())
    # the trained backbone ran compiled, the reloaded one eagerly: equal up to kernel numerics
    torch.testing.assert_close(got, want, rtol=0, atol=3e-3)
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9999
    assert torch.nn.functional.cosine_similarity(got_bf16.float(), got).min() > 0.99


@pytest.mark.slow
@pytest.mark.ddp
def test_validation_gathers_ranks_without_duplicates(tmp_path: Path) -> None:
    """2 CPU processes (gloo): the distributed sampler pads 5 val batches to 3 per rank (one
    duplicate); gathered and de-duplicated, the metrics equal a one-process validation."""
    torch.manual_seed(0)
    config = {**TINY, "hmve_dropout": 0.0}
    module = NTSSLModule(config)
    batches = [val_batch(i) for i in range(5)]
    kw = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    kw["default_root_dir"] = tmp_path
    one = L.Trainer(accelerator="cpu", devices=1, **kw).validate(
        module, torch.utils.data.DataLoader(batches, batch_size=None)
    )[0]
    two = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", **kw).validate(
        module, torch.utils.data.DataLoader(batches, batch_size=None)
    )[0]
    assert one["val/n_tracklets"] == two["val/n_tracklets"] == 19  # 20 rows, one not valid
    assert two["val/map"] == pytest.approx(one["val/map"], abs=1e-5)
    assert two["val/alignment"] == pytest.approx(one["val/alignment"], abs=1e-5)


def test_encoder_pooling_chooses_the_trained_fragment_vector() -> None:
    torch.manual_seed(0)
    frames = train_batch(0)["frames"]
    cls_module = NTSSLModule({**TINY, "encoder_pooling": "cls"}).eval()
    mean_module = NTSSLModule({**TINY, "encoder_pooling": "mean"}).eval()
    mean_module.load_state_dict(cls_module.state_dict())
    with torch.no_grad():
        cls, tokens = cls_module.encoder(frames)
        assert torch.equal(cls_module.fragment_vectors(frames)[0], cls)
        assert torch.allclose(mean_module.fragment_vectors(frames)[0], tokens.mean(dim=1), atol=1e-6)
        assert not torch.allclose(cls, tokens.mean(dim=1), atol=1e-3)
