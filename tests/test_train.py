import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polyp_ssl.train_cli import build_parser, main, resolve_config
from tests.shard_factory import make_raw_root, make_root
from tests.train_helpers import TINY, losses


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("root"), videos={"train": 4, "val": 2})


@pytest.fixture(scope="module")
def ingested_root(tmp_path_factory):
    """A raw COCO-layout root ingested with the real `polyp-ssl ingest`."""
    from polyp_ssl.ingest.cli import main as ingest_main

    raw = tmp_path_factory.mktemp("raw")
    make_raw_root(raw, n_videos=3, polyps=2, frames=24, wh=(160, 128), split="train")
    make_raw_root(raw, n_videos=2, polyps=2, frames=12, wh=(160, 128), split="val", seed=1)
    out = tmp_path_factory.mktemp("ingested")
    assert ingest_main([str(raw), "--out", str(out), "--no-progress", "--store-size", "48"]) == 0
    return out


SEED_COMMAND = """--dataset_root=data/rc27 --num_workers=8 --max_epochs=50 --batch_size=60 --fragment_length=8
--fragment_stride=4 --fragment_drop_last --bbox_scale_factor=5 --min_tracklet_length=30 --im_size=232
--aug_anchorcrop --eval_n_views=2 --eval_batch_size=6 --eval_fragment_length=8 --eval_aug_anchorcrop
--encoder_type=hmve --sfe_backbone_arch=resnet50 --sfe_backbone_weights=IMAGENET1K_V2 --sfe_d_model=2048
--d_proj=128 --hmve_d_model=256 --hmve_d_feedforward=1024 --hmve_n_heads=8 --hmve_n_layers=3
--hmve_dropout=0.1 --lr=0.00001 --loss_type=mil-nce --loss_temperature=0.07 --loss_milnce_weights 1.0 1.0
--sampler=temporaltemperaturebag --sampler_ttb_tmin=0.3 --sampler_ttb_tmax=12 --n_views=5
--exp_name=my_experiment"""


def test_the_papers_command_parses(tmp_path):
    cfg = resolve_config(SEED_COMMAND.split())
    assert cfg.fragment_drop_last and cfg.aug_anchorcrop and cfg.eval_aug_anchorcrop
    assert cfg.loss_milnce_weights == [1.0, 1.0] and cfg.n_views == 5 and cfg.lr == 1e-5
    (tmp_path / "c.yaml").write_text("batch_size: 30\nn_views: 3\nseed: 5\n")
    anchor = ["--aug_anchorcrop", "--eval_aug_anchorcrop"]
    cfg = resolve_config(["--dataset_root", "x", *anchor, "--config", str(tmp_path / "c.yaml"), "--seed=9"])
    assert (cfg.batch_size, cfg.n_views, cfg.seed) == (30, 3, 9)
    help_text = build_parser().format_help()
    for name in ("--fragment_drop_last", "--sampler_ttb_tmax", "--resume", "--precision", "--open_videos"):
        assert name in help_text


def test_loss_ta_lambda_and_encoder_pooling_flags(capsys):
    base = ["--dataset_root", "x", "--aug_anchorcrop", "--eval_aug_anchorcrop"]
    cfg = resolve_config(base)
    assert (cfg.loss_ta_lambda, cfg.encoder_pooling) == (10.0, "cls")
    cfg = resolve_config([*base, "--loss_ta_lambda", "2.5", "--encoder_pooling", "mean"])
    assert (cfg.loss_ta_lambda, cfg.encoder_pooling) == (2.5, "mean")
    help_text = build_parser().format_help()
    assert "--loss_ta_lambda" in help_text and "--encoder_pooling" in help_text
    assert main([*base, "--encoder_pooling", "max"]) == 2
    assert "--encoder_pooling 'max'" in capsys.readouterr().err
    assert main([*base, "--loss_ta_lambda", "-1"]) == 2
    assert "--loss_ta_lambda" in capsys.readouterr().err


def test_the_config_is_its_parts_and_reads_and_writes_flat():
    from dataclasses import fields

    from polyp_ssl import bags, encoders, losses
    from polyp_ssl.config import FLAT_ORDER, PARTS, SETTING_BOUNDS, SETTING_PART, TrainConfig
    from polyp_ssl.config_parts import ENCODER_TYPES, LOSS_TYPES, POOLINGS
    from polyp_ssl.stream import StreamParams

    # every flat name is one field of one part, in the order of --help and config.yaml
    assert list(SETTING_PART) == list(FLAT_ORDER)
    assert sum(len(fields(cls)) for cls in PARTS.values()) == len(FLAT_ORDER)
    assert PARTS["stream"] is StreamParams
    cfg = TrainConfig.from_dict({"batch_size": 30, "lr": 0.5, "sampler": "multipos", "accelerator": "cpu"})
    assert (cfg.stream.batch_size, cfg.optimizer.lr, cfg.trainer.accelerator) == (30, 0.5, "cpu")
    assert cfg.batch_size == 30 and cfg.sampler == "multipos"  # a flat name reads its part
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert list(cfg.to_dict()) == list(FLAT_ORDER)
    # each choice list has one definition, which the model modules use
    assert losses.LOSS_TYPES is LOSS_TYPES and encoders.POOLINGS is POOLINGS
    assert encoders.ENCODER_TYPES is ENCODER_TYPES and "multipos" in bags.SAMPLERS
    assert "batch_size" in SETTING_BOUNDS and "sampler" not in SETTING_BOUNDS
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict({"batchsize": 3})


def test_flags_take_the_type_of_their_field():
    p = build_parser()
    args = p.parse_args(["--sfe_d_model", "7", "--limit_val_batches", "2", "--loss_weights", "1", "2"])
    assert args.sfe_d_model == 7 and isinstance(args.limit_val_batches, float)
    assert args.loss_milnce_weights == [1.0, 2.0]
    assert p.parse_args(["--channels_last"]).channels_last is True
    with pytest.raises(SystemExit):
        p.parse_args(["--batch_size", "1.5"])


def test_clear_errors(tmp_path, capsys):
    anchor = ["--aug_anchorcrop", "--eval_aug_anchorcrop"]
    assert main(["--dataset_root", str(tmp_path), "--runs_dir", str(tmp_path / "runs"), *anchor]) == 2
    assert "polyp-ssl ingest" in capsys.readouterr().err
    assert main(["--dataset_root", str(tmp_path), "--batch_size", "7", "--n_views", "5", *anchor]) == 2
    assert "multiple of --n_views" in capsys.readouterr().err


def test_train_writes_a_checkpoint_that_reloads(ingested_root, tmp_path):
    runs = tmp_path / "runs"
    rc = main(
        [
            "--dataset_root",
            str(ingested_root),
            "--runs_dir",
            str(runs),
            "--exp_name",
            "e2e",
            "--max_steps",
            "2",
            *TINY,
        ]
    )
    assert rc == 0
    last = runs / "e2e" / "checkpoints" / "last.ckpt"
    assert last.exists() and (runs / "e2e" / "config.yaml").exists()
    from polyp_ssl.checkpoint import load_encoder

    encoder, config = load_encoder(last)
    assert config["im_size"] == 32
    emb = encoder.embed(torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    assert len(losses(runs / "e2e")) == 2
    # the run's own initialisation is kept beside it, and training moved away from it
    start, _ = load_encoder(runs / "e2e" / "checkpoints" / "init.ckpt")
    trained = encoder.state_dict()
    moved = [
        k for k, v in start.state_dict().items() if v.is_floating_point() and not torch.equal(v, trained[k])
    ]
    assert moved, "init.ckpt holds the trained weights"


@pytest.mark.slow
def test_resume_equivalence(root, tmp_path):
    """4 steps straight vs 2 steps, stop, --resume to 4: same steps, same losses (mid-epoch)."""
    runs = tmp_path / "runs"
    args = [
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(runs),
        "--deterministic",
        "--limit_val_batches",
        "0",
        *TINY,
    ]
    assert main([*args, "--exp_name", "straight", "--max_steps", "4"]) == 0
    assert main([*args, "--exp_name", "cut", "--max_steps", "2"]) == 0
    assert main([*args, "--exp_name", "cut", "--max_steps", "4", "--resume"]) == 0
    a, b = losses(runs / "straight"), losses(runs / "cut")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    ckpt = torch.load(runs / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("access", ["random", "sequential"])
def test_ddp_two_cpu_processes(root, tmp_path, access):
    data_log = tmp_path / "seen"
    cmd = [
        sys.executable,
        "-m",
        "polyp_ssl",
        "train",
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--exp_name",
        "ddp",
        "--max_epochs",
        "1",
        "--strategy",
        "ddp",
        "--data_log",
        str(data_log),
        "--shard_access",
        access,
        *TINY,
    ]
    cmd[cmd.index("--devices") + 1] = "2"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [Path(f"{data_log}.rank{r}").read_text().splitlines() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0  # the same number of steps
    if access == "sequential":  # each rank reads its own videos
        videos = [{v for line in lines for v in line.split()[4:]} for lines in ranks]
        assert videos[0] and videos[1] and not videos[0] & videos[1]
    else:  # rank r takes the plan's batches r, r + 2, ...: together the plan, no batch twice
        plan = [[int(line.split()[3]) for line in lines] for lines in ranks]
        assert plan[0] == list(range(0, 2 * len(plan[0]), 2))
        assert all(b == a + 1 or b == 0 for a, b in zip(plan[0], plan[1], strict=True))  # 0: wrapped
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt").exists()
