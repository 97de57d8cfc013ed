"""`polyp-ssl train`: the seed's training command on an ingested root, plus trainer settings."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from polyp_ssl.config import (
    ENCODERS,
    LOGGERS,
    LOSSES,
    LR_SCHEDULES,
    POOLINGS,
    PRECISIONS,
    SAMPLERS,
    TrainConfig,
)

log = logging.getLogger(__name__)

HELP: dict[str, str] = {
    "dataset_root": "ingested root (OUT of `polyp-ssl ingest`: shards/ and catalog/)",
    "num_workers": "DataLoader worker processes per rank (each one a data stream)",
    "max_epochs": "training epochs (also the length of the bag temperature schedule)",
    "batch_size": "fragments per batch and rank; a batch holds batch_size / n_views bags",
    "fragment_length": "frames per fragment (at fragment_stride)",
    "fragment_stride": "take every N-th frame of a tracklet",
    "fragment_drop_last": "drop a tracklet's last short fragment (else pad it by repeating its last frame)",
    "bbox_scale_factor": "anchor crop = box enlarged this much about its centre",
    "min_tracklet_length": "tracklets with fewer frames (before striding) are not used for training",
    "im_size": "anchor crops are resized to im_size x im_size",
    "aug_anchorcrop": "random anchor crop (scale 0.8-1.2x, centre jitter) and flips in training",
    "eval_n_views": "views per validation bag (the reference code's validation loss; kept for compatibility)",
    "eval_batch_size": "whole tracklets per validation batch",
    "eval_fragment_length": "fragment length of the reference code's validation loss (kept for "
    "compatibility; "
    "validation here embeds whole tracklets)",
    "eval_aug_anchorcrop": "random (seeded, hence repeatable) anchor crop in validation",
    "encoder_type": f"tracklet encoder: {', '.join(ENCODERS)}",
    "sfe_backbone_arch": "torchvision ResNet of the single-frame encoder (resnet18, resnet50, ...)",
    "sfe_backbone_weights": "torchvision weight name (from the local torch cache) or a file; "
    "none = random init",
    "sfe_d_model": "backbone output width (512 for resnet18, 2048 for resnet50)",
    "d_proj": "projector output width (used by the loss only)",
    "hmve_d_model": "HMVE transformer width (the tracklet embedding size)",
    "hmve_d_feedforward": "HMVE transformer feed-forward width",
    "hmve_n_heads": "HMVE attention heads",
    "hmve_n_layers": "HMVE transformer layers",
    "hmve_dropout": "HMVE dropout",
    "lr": "AdamW learning rate",
    "loss_type": f"contrastive loss: {', '.join(LOSSES)}",
    "loss_temperature": "softmax temperature tau of the loss",
    "loss_milnce_weights": "1-3 weights of the MIL-NCE terms: fragment, frame across fragments, frame within",
    "loss_ta_lambda": "temporally-aware loss: a pair's weight is exp(-lambda |t_i - t_j|), t = position "
    "in the video in [0, 1]",
    "encoder_pooling": f"tracklet embedding, trained and evaluated: {', '.join(POOLINGS)} (cls = the HMVE "
    "CLS output; mean = the mean of the frame tokens, always for sfe and mve)",
    "sampler": f"bag sampler: {', '.join(SAMPLERS)}",
    "sampler_ttb_tmin": "bag temperature at the first epoch (temporaltemperaturebag)",
    "sampler_ttb_tmax": "bag temperature at the last epoch (temporaltemperaturebag)",
    "n_views": "bag size, anchor included (K + 1)",
    "exp_name": "run name: the run folder is {runs_dir}/{exp_name}",
    "seed": "random seed (model init, bags, data order)",
    "weight_decay": "AdamW weight decay",
    "lr_schedule": f"learning-rate schedule after warmup: {', '.join(LR_SCHEDULES)}",
    "warmup_steps": "linear learning-rate warmup steps",
    "open_videos": "videos each data stream keeps open and interleaves, so a batch spans many videos",
    "max_steps": "stop after this many optimizer steps (-1: run max_epochs)",
    "limit_val_batches": "validation batches per run (fraction if <= 1.0, count if > 1)",
    "val_every_n_epochs": "validate every N epochs",
    "val_max_frames": "validation tracklets are evenly subsampled to at most this many frames",
    "monitor": "metric choosing best.ckpt: auto (val/map when val identities exist), a metric name, or none",
    "deterministic": "deterministic algorithms (slower; for exact reproducibility)",
    "split": "catalog split to train on",
    "val_split": "catalog split to validate on",
    "shard_base": "URL prefix for the catalog's relative shard paths (object storage, http, pipe:...)",
    "devices": "devices per node: auto, a count, or a list like 0,1",
    "num_nodes": "nodes (with torchrun or SLURM)",
    "strategy": "Lightning strategy: auto, ddp, ddp_spawn, ...",
    "accelerator": "auto, cpu, gpu, ...",
    "precision": f"numeric precision: {', '.join(PRECISIONS)}",
    "compile": "torch.compile the backbone",
    "channels_last": "channels-last memory format for the backbone (faster on GPU)",
    "resume": "continue {runs_dir}/{exp_name}/checkpoints/last.ckpt: same step, optimizer, schedule, "
    "data order",
    "ckpt_every_n_steps": "also write last.ckpt every N steps (0: at epoch ends only)",
    "logger": f"metrics logger: {', '.join(LOGGERS)} (csv needs no account nor network)",
    "runs_dir": "folder of runs",
    "log_every_n_steps": "logging interval in steps",
    "data_log": "debug: append the videos of every batch to FILE.rankR",
    "decode_on": "where training JPEGs are decoded: workers = in the loader workers (CPU); device = the "
    "workers ship JPEG bytes and crop windows, the training process decodes them on its device (nvJPEG on "
    "a GPU), so few CPU cores feed a fast GPU",
    "on_shard_error": "a damaged shard or sample (truncated tar, corrupt JPEG, JSON that disagrees with "
    "the catalog): fail = stop naming shard and sample; warn = skip it, count skips by reason, report "
    "them in the run summary and checkpoints/data_skips.rankR.json",
}

STORE_TRUE = {
    "fragment_drop_last",
    "aug_anchorcrop",
    "eval_aug_anchorcrop",
    "compile",
    "resume",
    "deterministic",
    "channels_last",
}


def _type_of(f: Any) -> Any:
    t = str(f.type)
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyp-ssl train",
        description="Streaming contrastive training (NT-SSL) on an ingested root. Takes the reference "
        "code's training flags with the same names and meaning. Settings: defaults < --config YAML < flags.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of settings (keys = flag names without --); flags override it")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        help_ = HELP.get(f.name, f.name) + f" (default: {getattr(defaults, f.name)})"
        flag = f"--{f.name}"
        if f.name in STORE_TRUE:
            p.add_argument(flag, action="store_true", help=help_)
        elif f.name == "loss_milnce_weights":
            p.add_argument(flag, type=float, nargs="+", metavar="W", help=help_)
        else:
            p.add_argument(flag, type=_type_of(f), help=help_)
    return p


def resolve_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the YAML of --config, then the flags given."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"--config {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {config_file}: expected a mapping of settings")
        values.update(loaded)
    values.update(args)
    cfg = TrainConfig.from_dict(values)
    if not cfg.dataset_root:
        raise ValueError("--dataset_root is required")
    cfg.validate()
    return cfg


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def _devices(text: str) -> Any:
    if text == "auto":
        return "auto"
    if "," in text:
        return [int(x) for x in text.split(",") if x]
    return int(text)


def _logger(cfg: TrainConfig, run_dir: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if cfg.logger == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs")
    if cfg.logger == "tensorboard":
        if (
            importlib.util.find_spec("tensorboard") is None
            and importlib.util.find_spec("tensorboardX") is None
        ):
            raise ValueError(
                "--logger tensorboard needs the tensorboard package: pip install 'polyp-ssl[tensorboard]'"
            )
        return TensorBoardLogger(save_dir=str(run_dir), name="logs")
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("--logger wandb needs the wandb package (pip install wandb) and an account")
    return WandbLogger(project="polyp-ssl", name=cfg.exp_name, save_dir=str(run_dir))


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the checkpoint folder."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from polyp_ssl.callbacks import INIT_CKPT, InitialCheckpoint
    from polyp_ssl.datamodule import StreamDataModule, StreamEpochCallback
    from polyp_ssl.module import NTSSLModule
    from shards.catalog import CatalogError, read_manifest

    root = Path(cfg.dataset_root)
    try:
        read_manifest(root)
    except CatalogError as exc:
        raise ValueError(str(exc)) from exc
    run_dir = Path(cfg.runs_dir) / cfg.exp_name
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if cfg.resume and not last.exists():
        raise ValueError(f"--resume: {last} does not exist")
    if cfg.resume:
        from polyp_ssl.checkpoint import CheckpointError, check_loadable

        try:
            check_loadable(last)
        except CheckpointError as exc:
            raise ValueError(f"--resume refused: {exc}") from exc
    if not cfg.resume and last.exists() and _is_rank_zero():
        raise ValueError(f"{last} exists: continue it with --resume, or choose another --exp_name")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = StreamDataModule(cfg)
    monitor: str | None = cfg.monitor
    if monitor == "auto":
        monitor = "val/map" if dm.has_val_identities else None
    elif monitor == "none":
        monitor = None
    if _is_rank_zero():
        _write_yaml(run_dir / "config.yaml", {**cfg.to_dict(), "resolved_monitor": monitor})
    module_cfg = {**cfg.to_dict(), "lr_schedule": cfg.lr_schedule}
    model = NTSSLModule(module_cfg)
    every = cfg.ckpt_every_n_steps or None
    callbacks: list[Any] = [StreamEpochCallback(dm, run_dir), InitialCheckpoint(ckpt_dir / INIT_CKPT)]
    if monitor:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                filename="best",
                monitor=monitor,
                mode="max",
                save_top_k=1,
                save_last=False,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    callbacks.append(
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every,
            save_on_train_epoch_end=True,
        )
    )
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        deterministic=cfg.deterministic or None,
        callbacks=callbacks,
        logger=_logger(cfg, run_dir),
        default_root_dir=str(run_dir),
        log_every_n_steps=cfg.log_every_n_steps,
        limit_val_batches=int(cfg.limit_val_batches) if cfg.limit_val_batches > 1 else cfg.limit_val_batches,
        check_val_every_n_epoch=cfg.val_every_n_epochs,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=str(last) if cfg.resume else None, weights_only=True)
    write_skip_summary(ckpt_dir, trainer.global_rank, cfg.on_shard_error, dm.skip_counts())
    return ckpt_dir


def skip_summary_path(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"data_skips.rank{rank}.json"


def write_skip_summary(ckpt_dir: Path, rank: int, mode: str, counts: dict[str, int]) -> Path:
    """checkpoints/data_skips.rankR.json: what this rank's loader skipped (--on_shard_error warn).
    Counts are skip events: a damaged sample is counted each time a stream reads it (every epoch)."""
    import json

    path = skip_summary_path(ckpt_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    data = {"on_shard_error": mode, "skipped": counts, "total": sum(counts.values())}
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    if counts:
        log.warning("rank %d: the loader skipped damaged data: %s (see %s)", rank, counts, path)
    return path


def _last_line(exc: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker (whose text carries the
    worker's traceback) without that traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    name = type(exc).__name__ + ": "
    return last.split(name, 1)[1] if name in last else last


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import time

    from polyp_ssl.datamodule import read_failure_notes
    from polyp_ssl.device_decode import FrameDecodeError
    from polyp_ssl.stream import DataConfigError, ShardError

    started = time.time()
    cfg: TrainConfig | None = None
    try:
        cfg = resolve_config(argv)
        ckpt_dir = train(cfg)
    except (ShardError, FrameDecodeError) as exc:
        print(
            f"polyp-ssl train: error: damaged data: {_last_line(exc)} "
            "(--on_shard_error warn skips such samples and counts them)",
            file=sys.stderr,
        )
        return 1
    except (ValueError, DataConfigError) as exc:
        print(f"polyp-ssl train: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # another rank's failure reaches this one as a broken collective; name the failure itself
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        notes = read_failure_notes(Path(cfg.runs_dir) / cfg.exp_name, started, rank) if cfg else {}
        if not notes:
            raise
        named = "; ".join(f"rank {r} failed: {note}" for r, note in sorted(notes.items()))
        print(f"polyp-ssl train: error: {named} (this rank {rank}: {_last_line(exc)})", file=sys.stderr)
        return 1
    if _is_rank_zero():
        found = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.exists() else []
        print(f"checkpoints in {ckpt_dir}: {', '.join(found) or 'none'}")
        summary = skip_summary_path(ckpt_dir, 0)
        if summary.exists():
            import json

            skipped = json.loads(summary.read_text())["skipped"]
            mode = cfg.on_shard_error if cfg else "fail"
            print(f"damaged data skipped (rank 0, --on_shard_error {mode}): {skipped or 'none'}")
    return 0
