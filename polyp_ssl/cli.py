"""`polyp-ssl train`: the seed's training command on an ingested root, plus trainer settings."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from polyp_ssl.config import (
    ENCODERS,
    LOGGERS,
    LOSSES,
    LR_SCHEDULES,
    POOLINGS,
    PRECISIONS,
    RUN_OUTPUT_KEYS,
    SAMPLERS,
    TrainConfig,
    check_setting_types,
    unknown_setting_message,
)
from polyp_ssl.reference_flags import TRAIN_FLAGS, add_flag, apply_reference_values, flag_help
from polyp_ssl.run_folder import RunFolder, check_run_folder
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser
from polyp_ssl.shards.textio import TextInputError, load_json, load_yaml

log = logging.getLogger(__name__)

HELP: dict[str, str] = {
    "dataset_root": "ingested root (OUT of `polyp-ssl ingest`: shards/ and catalog/)",
    "num_workers": "DataLoader worker processes per rank (each one a data stream); by default 8 (the "
    "paper's), at most the CPUs this process may use",
    "max_epochs": "training epochs (also the length of the bag temperature schedule)",
    "batch_size": "fragments per batch and rank; a batch holds batch_size / n_views bags",
    "fragment_length": "frames per fragment (at fragment_stride)",
    "fragment_stride": "take every N-th frame of a tracklet",
    "fragment_drop_last": "drop a tracklet's last short fragment (else pad it by repeating its last frame)",
    "bbox_scale_factor": "anchor crop = box enlarged this much about its centre",
    "min_tracklet_length": "tracklets with fewer frames (before striding) are not used for training",
    "im_size": "anchor crops are resized to im_size x im_size",
    "aug_anchorcrop": "the anchor crop, as in the reference: the box enlarged bbox_scale_factor times about "
    "its centre, clamped, resized to im_size; deterministic. Required: the root stores crops, not frames",
    "eval_n_views": "views per validation bag (the reference code's validation loss; kept for compatibility)",
    "eval_batch_size": "whole tracklets per validation batch",
    "eval_fragment_length": "fragment length of the reference code's validation loss (kept for "
    "compatibility; "
    "validation here embeds whole tracklets)",
    "eval_aug_anchorcrop": "the same deterministic anchor crop in validation; required, as --aug_anchorcrop",
    "fragment_padding_mode": "padding of a tracklet's short last fragment: repeat (its last frame; also the "
    "padding when unset); not with --fragment_drop_last",
    "aug_random_scale": "our extension, off by default: anchor-crop scale x U(0.8, 1.2) per training "
    "fragment (capped at the root's crop scale)",
    "aug_jitter": "our extension, off by default: anchor-crop centre shifted by up to 10%% of the box per "
    "training fragment",
    "aug_hflip": "our extension, off by default: horizontal flip of a training fragment with probability 0.5",
    "aug_vflip": "our extension, off by default: vertical flip of a training fragment with probability 0.5",
    "hmve_use_feature_norm": "LayerNorm on the frame features after the adapter (as the reference)",
    "hmve_use_encoder_norm": "final LayerNorm after the transformer layers (as the reference)",
    "hmve_mask_intra_fragment_frames": "the cross-fragment frame MIL-NCE term ignores pairs of frames of the "
    "same fragment, in its positives and its denominator (as the reference)",
    "exp_id": "wandb run id (with --logger wandb)",
    "wandb_project": "wandb project (with --logger wandb; default polyp-ssl)",
    "mode": "train (the reference's --mode eval is `polyp-ssl eval`)",
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
    "loss_milnce_weights": "1-3 weights of the loss terms of every --loss_type: fragment, frame across "
    "fragments, frame within (alias --loss_weights)",
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
    "open_videos": "--shard_access sequential: videos each data stream keeps open and interleaves",
    "shard_access": "auto (random for local tar shards), random (read each frame at its catalog offset: "
    "batches drawn from a global shuffle of the epoch's bags) or sequential (stream whole shards)",
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
    "data_log": "debug: append a line per batch to FILE.rankR: epoch, stream, batch, plan batch "
    "(-1 with sequential access), the batch's videos",
    "decode_on": "where training JPEGs are decoded: workers = in the loader workers (CPU); device = the "
    "workers ship JPEG bytes and crop windows, the training process decodes them on its device (nvJPEG on "
    "a GPU), so few CPU cores feed a fast GPU",
    "skip_memory_check": "start even when the estimated peak memory (polyp_ssl.memory, measured per "
    "backbone) exceeds what this machine has; the check refuses such a run before building the model",
    "on_shard_error": "a damaged shard or sample (truncated tar, corrupt JPEG, JSON that disagrees with "
    "the catalog): fail = stop naming shard and sample; warn = skip it, count skips by reason, report "
    "them in the run summary and checkpoints/data_skips.rankR.json",
}

STORE_TRUE = {
    "fragment_drop_last",
    "aug_anchorcrop",
    "eval_aug_anchorcrop",
    "aug_random_scale",
    "aug_jitter",
    "aug_hflip",
    "aug_vflip",
    "hmve_use_feature_norm",
    "hmve_use_encoder_norm",
    "hmve_mask_intra_fragment_frames",
    "compile",
    "resume",
    "deterministic",
    "channels_last",
    "skip_memory_check",
}


def _type_of(f: Any) -> Any:
    t = str(f.type)
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl train",
        description="Streaming contrastive training (NT-SSL) on an ingested root. Takes the reference "
        "code's training flags with the same names and meaning. Settings: defaults < --config YAML < flags.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of settings (keys = flag names without --); flags override it")
    p.add_argument("--debug", action="store_true", help="on an error, also show the traceback")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        help_ = HELP.get(f.name, f.name) + f" (default: {getattr(defaults, f.name)})"
        flag = f"--{f.name}"
        if f.name in STORE_TRUE:
            p.add_argument(flag, action="store_true", help=help_)
        elif f.name == "loss_milnce_weights":
            # --loss_weights: the same weights for every --loss_type (the reference checkpoints' name)
            p.add_argument(flag, "--loss_weights", type=float, nargs="+", metavar="W", help=help_)
        else:
            p.add_argument(flag, type=_type_of(f), help=help_)
    own = {f.name for f in fields(TrainConfig)}
    g = p.add_argument_group("other flags of the reference training command (see docs/training.md)")
    for ref in TRAIN_FLAGS.values():
        if ref.name not in own:
            add_flag(g, ref, flag_help(ref))
    return p


def check_crop_scale(bbox_scale_factor: float, root: str | Path, flag: str = "--bbox_scale_factor") -> None:
    """ValueError when the anchor crop is wider than the stored crop of an ingested root (the crop
    would be clamped to the stored window without a word)."""
    manifest = Path(root) / "catalog" / "manifest.json"
    try:
        params = load_json(manifest, "catalog manifest", max_bytes=16 << 20).get("parameters") or {}
    except (OSError, ValueError, AttributeError):  # TextInputError (too deep, not JSON) included
        return  # no readable catalog: the run's own checks name the problem
    crop_scale = params.get("crop_scale")
    if isinstance(crop_scale, int | float) and bbox_scale_factor > crop_scale + 1e-9:
        raise ValueError(
            f"{flag} {bbox_scale_factor:g} is larger than the crop scale {crop_scale:g} that {root} was "
            f"ingested with ({manifest}: parameters.crop_scale): re-ingest with "
            f"`polyp-ssl ingest RAW_ROOT --out {root} --overwrite --crop-scale {bbox_scale_factor:g}` or "
            f"pass {flag} <= {crop_scale:g}"
        )


def check_config_file(loaded: dict[Any, Any], name: str) -> dict[str, Any]:
    """The settings of a `--config` YAML, checked as the command line checks its flags: an unknown
    key (with the closest setting), a value of the wrong type (key, value, expected type). The keys
    a run writes as results (`resolved_monitor`) are accepted and dropped, so a run's own
    config.yaml is accepted back."""
    where = f"--config {name}: "
    known = {f.name for f in fields(TrainConfig)} | set(TRAIN_FLAGS)
    out: dict[str, Any] = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}key {key!r} is not a setting name")
        if key in RUN_OUTPUT_KEYS:
            continue
        if key not in known:
            raise ValueError(unknown_setting_message(key, known, where))
        out[key] = value
    return check_setting_types(out, where)


def resolve_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the YAML of --config, then the flags given."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        try:  # a FIFO refused by name; size, nesting, aliases and python tags bounded/refused
            loaded = load_yaml(config_file, "config file") or {}
        except TextInputError as exc:  # names the file and the line
            raise ValueError(f"--config {exc}") from None
        except OSError as exc:
            raise ValueError(f"--config {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {config_file}: expected a mapping of settings")
        values.update(check_config_file(loaded, str(config_file)))
    values.update(args)
    own = {f.name for f in fields(TrainConfig)}
    values = apply_reference_values(values, TRAIN_FLAGS, "polyp-ssl train", own)
    exp_source = (
        "--exp_name" if "exp_name" in args or not config_file else f"--config {config_file}: exp_name"
    )
    saved, run = None, None
    if values.get("resume"):
        # settings not given (flags or --config) come from the run's config.yaml, not the defaults
        runs_dir, exp_name = values.get("runs_dir", TrainConfig.runs_dir), values.get("exp_name", "default")
        run = RunFolder(runs_dir, exp_name, exp_source)
        saved = run.saved_settings()
        if saved is not None:
            # the run's own keys as they are (no second notice of a reference flag it holds)
            other = {k: v for k, v in saved.items() if k not in own}
            saved = {k: v for k, v in saved.items() if k in own}
            saved.update(apply_reference_values(other, TRAIN_FLAGS, "polyp-ssl train", own))
            values = {**saved, **values}
    cfg = TrainConfig.from_dict(values)
    check_run_folder(cfg.runs_dir, cfg.exp_name, exp_source)
    if not cfg.dataset_root:
        raise ValueError("--dataset_root is required")
    cfg.validate()
    if run is not None and saved is not None:
        run.check_resume_settings(TrainConfig.from_dict(saved), cfg)  # before anything is written
    from polyp_ssl.checkpoint import check_model_config  # imports torch: not for --help

    # the allow-listed backbones and the size estimate of every model config (CheckpointError: exit 2)
    settings = f"--config {config_file} with the flags" if config_file else "the flags"
    check_model_config(cfg.to_dict(), settings)
    check_crop_scale(cfg.bbox_scale_factor, cfg.dataset_root)
    return cfg


def single_log_output() -> None:
    """Each log line once. Lightning adds its own console handler to the `lightning` logger (and to
    `lightning.pytorch` / `lightning.fabric` when the root logger has none) while still propagating to
    the root logger, so with our root handler every Lightning INFO line was printed twice. When the
    root logger has a handler, Lightning's loggers that propagate lose their own handlers."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        if lg.propagate:
            for handler in list(lg.handlers):
                if type(handler) is logging.StreamHandler:
                    lg.removeHandler(handler)


# Messages that every run printed and that say nothing about it: warnings about what this stack
# does on purpose, and advertisements. Filtered here, for every train process (DDP ranks included).
KNOWN_HARMLESS_WARNINGS = (
    # the streaming dataset's __len__ is its batches per rank; each worker takes its own share
    r"Your `IterableDataset` has `__len__` defined",
    # a resumed run's checkpoint folder holds its checkpoints: last.ckpt is managed here
    r"Checkpoint directory .* exists and is not empty",
    # validation embeds a few whole tracklets in the main process, on purpose
    r"The 'val_dataloader' does not have many workers",
    # Lightning's own pytree helper on a newer torch: nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
KNOWN_HARMLESS_LOG_PREFIXES = ("\N{ELECTRIC LIGHT BULB} Tip:",)  # Lightning's product advertisements


class _DropKnownHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KNOWN_HARMLESS_LOG_PREFIXES)


def quiet_known_messages() -> None:
    """Filter the known harmless warnings and log lines of Lightning and torch (the one place)."""
    import warnings

    for pattern in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownHarmless) for f in logger.filters):
            logger.addFilter(_DropKnownHarmless())


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _val_batches(limit: float) -> int | float | None:
    """Lightning's limit_val_batches: a count above 1, a fraction up to 1; None for all of them
    (Lightning's default, without its "configured so 100% of the batches will be used" line)."""
    if limit > 1:
        return int(limit)
    return None if limit == 1.0 else limit


def _devices(text: str) -> Any:
    if text == "auto":
        return "auto"
    if "," in text:
        return [int(x) for x in text.split(",") if x]
    return int(text)


def _logger(cfg: TrainConfig, run_dir: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if cfg.logger == "csv":
        # written as logged (not every 100 steps): an interrupted segment keeps its metrics
        return CSVLogger(save_dir=str(run_dir), name="logs", flush_logs_every_n_steps=1)
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
    return WandbLogger(
        project=cfg.wandb_project or "polyp-ssl", name=cfg.exp_name, id=cfg.exp_id, save_dir=str(run_dir)
    )


def last_checkpoint_callbacks(ckpt_dir: Path, every_n_steps: int) -> list[Any]:
    """ModelCheckpoints writing ``last.ckpt`` at every epoch end and, with `every_n_steps`, every N
    training steps (Lightning allows one trigger per callback, hence two callbacks on one file).

    ``save_last=True`` with ``save_top_k=0`` would write ``last.ckpt`` only when training ends (in
    Lightning 2.6 "last" follows a top-k save, and there is none); a top-1 save without a monitor
    named "last" is what keeps the newest checkpoint under that name."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    common: dict[str, Any] = {
        "dirpath": str(ckpt_dir),
        "filename": "last",
        "monitor": None,
        "save_top_k": 1,
        "save_last": False,
        "auto_insert_metric_name": False,
        "enable_version_counter": False,
        "save_on_train_epoch_end": True,
    }
    out = [ModelCheckpoint(every_n_epochs=1, **common)]
    if every_n_steps:
        out.append(ModelCheckpoint(every_n_train_steps=every_n_steps, **common))
    return out


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the checkpoint folder. Rank 0 holds the run folder's lock throughout
    (a second train on the folder is refused, naming the holder). A run that fails before training
    starts removes the run folder it created."""
    from polyp_ssl.shards.catalog import CatalogError, read_manifest

    root = Path(cfg.dataset_root)
    try:
        read_manifest(root)
    except CatalogError as exc:
        raise ValueError(str(exc)) from exc
    if _is_rank_zero():
        from polyp_ssl.memory import check_before_training

        # before anything is built or written: our message, not the kernel's OOM killer or a CUDA error
        check_before_training(cfg, skip_memory=cfg.skip_memory_check)
    run = RunFolder(cfg.runs_dir, cfg.exp_name)
    if not _is_rank_zero():  # the other ranks of a DDP run: rank 0 holds the lock for them all
        return _train_in(run, cfg)
    with run.lock():
        return _train_in(run, cfg)


def _train_in(run: RunFolder, cfg: TrainConfig) -> Path:
    """The training of `train`, in its run folder (locked by rank 0)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from polyp_ssl.callbacks import INIT_CKPT, FlushLogs, InitialCheckpoint, RngStateCallback, TrainingStarted
    from polyp_ssl.ckpt_io import AtomicCheckpointIO, temporaries
    from polyp_ssl.datamodule import StreamDataModule, StreamEpochCallback
    from polyp_ssl.module import NTSSLModule
    from polyp_ssl.run_folder import check_checkpoint_fits

    run_dir, ckpt_dir = run.path, run.ckpt_dir
    plan = run.resume_plan(cfg.resume, rank_zero=_is_rank_zero())
    if plan.line:
        print(f"polyp-ssl train: {plan.line}", file=sys.stderr)
    resume_from = plan.checkpoint
    started = TrainingStarted()
    try:
        if _is_rank_zero():
            for tmp in temporaries(ckpt_dir):
                log.info("removing %s (a checkpoint write that never finished)", tmp)
                tmp.unlink()
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = StreamDataModule(cfg)
        monitor: str | None = cfg.monitor
        if monitor == "auto":
            monitor = "val/map" if dm.has_val_identities else None
        elif monitor == "none":
            monitor = None
        logger = _logger(cfg, run_dir)
        module_cfg = {**cfg.to_dict(), "lr_schedule": cfg.lr_schedule}
        model = NTSSLModule(module_cfg)
        if resume_from is not None:
            check_checkpoint_fits(resume_from, model)  # one line naming the key, before any write
        if _is_rank_zero():
            run.write_config(cfg, monitor)
        callbacks: list[Any] = [
            StreamEpochCallback(dm, run_dir),
            InitialCheckpoint(ckpt_dir / INIT_CKPT),
            RngStateCallback(),
            FlushLogs(),
            started,
        ]
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
        callbacks.extend(last_checkpoint_callbacks(ckpt_dir, cfg.ckpt_every_n_steps))
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
            logger=logger,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=str(run_dir),
            log_every_n_steps=cfg.log_every_n_steps,
            limit_val_batches=_val_batches(cfg.limit_val_batches),
            check_val_every_n_epoch=cfg.val_every_n_epochs,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
        )
        ckpt_path = str(resume_from) if resume_from else None
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    except BaseException:
        if not started.started and _is_rank_zero():
            run.remove_new_dirs()
        raise
    write_skip_summary(ckpt_dir, trainer.global_rank, cfg.on_shard_error, dm.skip_counts())
    if _is_rank_zero():  # every rank finished (a failed rank breaks rank 0's fit): the notes are stale
        run.remove_failure_notes()
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


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM reached `polyp-ssl train`. A BaseException, so that no
    ``except Exception`` on the way swallows it; Lightning still runs its on_exception hooks."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_HANDLER_PID: list[int] = []  # the process that installed the handlers (forked workers inherit them)


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _HANDLER_PID and os.getpid() != _HANDLER_PID[0]:
        # a forked DataLoader worker: behave as Python's defaults (torch ends a worker quietly on
        # KeyboardInterrupt; SIGTERM ends it)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


def _install_interrupt_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise `Interrupted` (from the main thread only; returns the old handlers)."""
    import threading

    old: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    _HANDLER_PID[:] = [os.getpid()]
    for signum in (signal.SIGINT, signal.SIGTERM):
        old[signum] = signal.signal(signum, _raise_interrupted)
    return old


OS_ERROR_HINTS = {
    errno.ENOSPC: "disk full; the checkpoints written before are kept: free space and rerun with --resume",
    errno.EDQUOT: "disk quota exceeded; the checkpoints written before are kept: rerun with --resume",
    errno.EROFS: "the runs folder must be writable: choose another --runs_dir",
    errno.EACCES: "the runs folder must be writable: choose another --runs_dir",
    errno.EPERM: "the runs folder must be writable: choose another --runs_dir",
}


def os_error_line(exc: OSError) -> str:
    """One line naming the path and the cause of an I/O failure (disk full, read-only folder, ...)."""
    where = f"{exc.filename}: " if exc.filename else ""
    cause = exc.strerror or _last_line(exc)
    hint = OS_ERROR_HINTS.get(exc.errno or 0)
    return f"{where}{cause}" + (f" ({hint})" if hint else "")


def _kept_line(cfg: TrainConfig | None) -> str:
    """Which checkpoint a failed run leaves to continue from (its last.ckpt, never overwritten
    by the failure), for the end of its one error line."""
    from polyp_ssl.ckpt_io import LAST

    if cfg is None:
        return ""
    last = Path(cfg.runs_dir) / cfg.exp_name / "checkpoints" / LAST
    return f" ({last} is the last good checkpoint)" if last.is_file() else ""


def _interrupted_line(cfg: TrainConfig | None) -> str:
    from polyp_ssl.ckpt_io import LAST, previous_path

    if cfg is not None:
        last = Path(cfg.runs_dir) / cfg.exp_name / "checkpoints" / LAST
        if last.is_file() or previous_path(last).is_file():
            return "polyp-ssl train: interrupted; rerun with --resume"
    return "polyp-ssl train: interrupted before the first checkpoint; rerun the same command"


def main(argv: list[str] | None = None) -> int:
    """`polyp-ssl train`. Every failure ends with one line on stderr (no traceback unless --debug):
    exit 2 for a configuration or input refused before training, 1 for a failure while training
    (damaged data, disk full, read-only runs folder, another rank's failure), 130 for Ctrl-C/SIGTERM."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # --help, and usage errors (an unknown flag: one line), before torch or Lightning is imported
    build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import time

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    single_log_output()
    quiet_known_messages()

    from polyp_ssl.datamodule import read_failure_notes
    from polyp_ssl.device_decode import FrameDecodeError
    from polyp_ssl.module import NonFiniteLossError
    from polyp_ssl.stream import DataConfigError, ShardError

    started = time.time()
    cfg: TrainConfig | None = None
    old_handlers = _install_interrupt_handlers()
    try:
        cfg = resolve_config(argv)
        ckpt_dir = train(cfg)
    except (ShardError, FrameDecodeError) as exc:
        print(
            f"polyp-ssl train: error: damaged data: {_last_line(exc)} "
            "(--on_shard_error warn skips such samples and counts them)",
            file=sys.stderr,
        )
        if debug:
            raise
        return 1
    except (ValueError, DataConfigError) as exc:
        print(f"polyp-ssl train: error: {exc}", file=sys.stderr)
        if debug:
            raise
        return 2
    except NonFiniteLossError as exc:
        print(f"polyp-ssl train: error: {exc}{_kept_line(cfg)}", file=sys.stderr)
        if debug:
            raise
        return 1
    except (Interrupted, KeyboardInterrupt, SIGTERMException):
        print(_interrupted_line(cfg), file=sys.stderr)
        if debug:
            raise
        return 130
    except OSError as exc:
        print(f"polyp-ssl train: error: {os_error_line(exc)}", file=sys.stderr)
        if debug:
            raise
        return 1
    except Exception as exc:
        # another rank's failure reaches this one as a broken collective; name the failure itself
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        notes = read_failure_notes(Path(cfg.runs_dir) / cfg.exp_name, started, rank) if cfg else {}
        if notes:
            named = "; ".join(f"rank {r} failed: {note}" for r, note in sorted(notes.items()))
            print(f"polyp-ssl train: error: {named} (this rank {rank}: {_last_line(exc)})", file=sys.stderr)
        else:
            print(
                f"polyp-ssl train: error: {type(exc).__name__}: {_last_line(exc)} "
                "(--debug shows the traceback)",
                file=sys.stderr,
            )
        if debug:
            raise
        return 1
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
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
