"""The parts of the training configuration: each a dataclass owning its settings, their help text,
bounds and choice lists, and its checks. `polyp_ssl.config.TrainConfig` composes them with the
stream part (`polyp_ssl.stream_index.StreamParams`).

Field names are the paper's flat flag names (`--batch_size`, `--lr`, ...): a flag, a YAML key and a
checkpoint's hyper-parameter all name one field of one part. Importing this module imports no torch
(`polyp-ssl train --help` stays fast); the model modules import their choice lists from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The largest anchor-crop side polyp-ssl trains or embeds at (the paper: 232; the zoo's largest input:
# 518). A frame is 3 * im_size**2 bytes before the backbone, whose activations grow with its square.
MAX_IM_SIZE = 1024
BIG = 1 << 40  # a step or frame count no run reaches


@dataclass(frozen=True)
class Bound:
    """The plausible values of a numeric setting: a finite number in [lo, hi] (`lo_open`: > lo), or
    exactly -1 where `minus_one` (the settings whose -1 means "whole tracklet" or "no limit")."""

    lo: float
    hi: float
    lo_open: bool = False
    minus_one: bool = False

    def text(self) -> str:
        low = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        return f"a finite number {low} and <= {self.hi:g}" + (", or -1" if self.minus_one else "")

    def holds(self, value: float) -> bool:
        if self.minus_one and value == -1:
            return True
        finite = isinstance(value, int) or math.isfinite(value)  # an int of 400 digits is no float
        above = value > self.lo if self.lo_open else value >= self.lo
        return finite and above and value <= self.hi


def setting(
    default: Any = None,
    help: str = "",
    bound: Bound | None = None,
    factory: Callable[[], Any] | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
) -> Any:
    """A setting of a part: its default, its `--help` text, its plausible values (`bound`, checked
    before anything uses the value), other spellings of its flag (`aliases`) and the name of its
    values in `--help` (`metavar`)."""
    metadata = {"help": help, "bound": bound, "aliases": aliases, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{flag} {value!r}: choose one of {choices}")


def default_num_workers(cpus: int | None = None) -> int:
    """Loader workers by default: 8 (the paper's), but never more than the CPUs this process may use
    (each worker is a process decoding JPEGs; more workers than cores only add memory and contention)."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


@dataclass
class DataSettings:
    """Where the data is (root, splits, shard base), how many loader workers, and validation's data."""

    dataset_root: str = setting("", "ingested root (OUT of `polyp-ssl ingest`: shards/ and catalog/)")
    num_workers: int = setting(
        help="DataLoader worker processes per rank (each one a data stream); by default 8 (the paper's), at "
        "most the CPUs this process may use",
        bound=Bound(0, 256),
        factory=default_num_workers,
    )
    eval_n_views: int = setting(
        2,
        "views per validation bag (the reference code's validation loss; kept for compatibility)",
        Bound(1, 1024),
    )
    eval_batch_size: int = setting(6, "whole tracklets per validation batch", Bound(1, 1 << 16))
    eval_fragment_length: int = setting(
        8,
        "fragment length of the reference code's validation loss (kept for compatibility; validation "
        "here embeds whole tracklets)",
        Bound(1, 100_000, minus_one=True),
    )
    # validation's deterministic anchor crop; required, as aug_anchorcrop
    eval_aug_anchorcrop: bool = setting(
        False, "the same deterministic anchor crop in validation; required, as --aug_anchorcrop"
    )
    # reference flag: "repeat" (the only padding) or unset
    fragment_padding_mode: str | None = setting(
        None,
        "padding of a tracklet's short last fragment: repeat (its last frame; also the padding when unset); "
        "not with --fragment_drop_last",
    )
    val_max_frames: int = setting(
        64, "validation tracklets are evenly subsampled to at most this many frames", Bound(1, 100_000)
    )
    split: str = setting("train", "catalog split to train on")
    val_split: str = setting("val", "catalog split to validate on")
    shard_base: str | None = setting(
        None, "URL prefix for the catalog's relative shard paths (object storage, http, pipe:...)"
    )
    storage_options: str | None = setting(
        None,
        "a dataset root or --shard_base in an object store (s3://, gs://, https://): a JSON object of "
        "fsspec storage options, beyond what the standard environment and config files give (endpoint, "
        "credentials, region: AWS_ENDPOINT_URL, AWS_PROFILE, ...); config.yaml keeps no secret values",
        metavar="JSON",
    )
    cache_dir: str | None = setting(
        None,
        "object-store shards: a node-local folder for a block cache shared by the loader workers and "
        "ranks of this machine (with --cache_size)",
    )
    cache_size: str = setting(
        "0", "the block cache's size on disk: bytes, or a number with K, M, G or T (e.g. 20G); 0: no cache"
    )

    def check(self) -> None:
        """ValueError naming the flag for object-store settings that cannot work."""
        from polyp_ssl.shards.remote import parse_storage_options

        parse_storage_options(self.storage_options)
        size = parse_size(self.cache_size, "--cache_size")
        if size and not self.cache_dir:
            raise ValueError(f"--cache_size {self.cache_size}: give the cache's folder with --cache_dir")
        if self.cache_dir and not size:
            raise ValueError(
                f"--cache_dir {self.cache_dir}: give the cache's size with --cache_size (e.g. 20G)"
            )

    def read_options(self) -> Any:
        """How remote shards are read (shards.object_store.ObjectReadOptions): the storage options
        and the block cache of these settings."""
        from polyp_ssl.shards.object_store import ObjectReadOptions
        from polyp_ssl.shards.remote import parse_storage_options

        return ObjectReadOptions(
            storage_options=parse_storage_options(self.storage_options),
            cache_dir=self.cache_dir or None,
            cache_bytes=parse_size(self.cache_size, "--cache_size") if self.cache_dir else 0,
        )

    def check_reference_meaning(self) -> None:
        """The reference's flags that this stack can only honour one way (a part of
        `TrainConfig.validate_reference_meaning`)."""
        if not self.eval_aug_anchorcrop:
            raise ValueError(anchorcrop_required("eval_aug_anchorcrop"))
        if self.fragment_padding_mode not in (None, "repeat"):
            raise ValueError(
                f"--fragment_padding_mode {self.fragment_padding_mode!r}: the only padding is 'repeat' "
                "(repeat the last frame)"
            )


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size like `0`, `4096`, `512M`, `20G`, `1.5T` (binary units; a trailing `B` or
    `iB` is accepted); ValueError naming the flag otherwise."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS and value[-1:] else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        n = float(number)
    except ValueError:
        n = float("nan")
    if not math.isfinite(n) or n < 0 or n * _SIZE_UNITS[unit] > BIG * 1024:
        raise ValueError(f"--{flag.lstrip('-')} {str(text)[:40]!r}: give a size such as 0, 4096, 512M or 20G")
    return int(n * _SIZE_UNITS[unit])


def anchorcrop_required(flag: str) -> str:
    return (
        f"--{flag} not given: without it the reference code feeds whole frames, but an "
        "ingested root stores only the crop around each box; pass --aug_anchorcrop "
        "--eval_aug_anchorcrop (the deterministic anchor crop, as in the paper)"
    )


ENCODER_TYPES = ("sfe", "mve", "hmve")
POOLINGS = ("cls", "mean")


@dataclass
class EncoderSettings:
    """The tracklet encoder and its projector (`polyp_ssl.encoders.EncoderConfig` is built from it)."""

    encoder_type: str = setting("hmve", f"tracklet encoder: {', '.join(ENCODER_TYPES)}")
    sfe_backbone_arch: str = setting(
        "resnet50", "torchvision ResNet of the single-frame encoder (resnet18, resnet50, ...)"
    )
    # None = random init; the paper uses IMAGENET1K_V2
    sfe_backbone_weights: str | None = setting(
        None, "torchvision weight name (from the local torch cache) or a file; none = random init"
    )
    # None: the backbone's width (2048 for resnet50)
    sfe_d_model: int | None = setting(
        None, "backbone output width (512 for resnet18, 2048 for resnet50)", Bound(1, 1 << 16)
    )
    d_proj: int = setting(128, "projector output width (used by the loss only)", Bound(1, 1 << 16))
    hmve_d_model: int = setting(
        256, "HMVE transformer width (the tracklet embedding size)", Bound(1, 1 << 16)
    )
    hmve_d_feedforward: int = setting(1024, "HMVE transformer feed-forward width", Bound(1, 1 << 20))
    hmve_n_heads: int = setting(8, "HMVE attention heads", Bound(1, 1024))
    hmve_n_layers: int = setting(3, "HMVE transformer layers", Bound(1, 1024))
    hmve_dropout: float = setting(0.1, "HMVE dropout", Bound(0, 1))
    hmve_use_feature_norm: bool = setting(
        False, "LayerNorm on the frame features after the adapter (as the reference)"
    )
    hmve_use_encoder_norm: bool = setting(
        False, "final LayerNorm after the transformer layers (as the reference)"
    )
    # tracklet embedding: the CLS output (hmve) or the mean of frame tokens
    encoder_pooling: str = setting(
        "cls",
        f"tracklet embedding, trained and evaluated: {', '.join(POOLINGS)} (cls = the HMVE CLS output; "
        "mean = the mean of the frame tokens, always for sfe and mve)",
    )
    channels_last: bool = setting(False, "channels-last memory format for the backbone (faster on GPU)")

    def check(self) -> None:
        check_choice("encoder_type", self.encoder_type, ENCODER_TYPES)
        check_choice("encoder_pooling", self.encoder_pooling, POOLINGS)

    def encoder_config(self) -> Any:
        """The network's own config (`polyp_ssl.encoders.EncoderConfig`, imports torch)."""
        from dataclasses import fields

        from polyp_ssl.encoders import EncoderConfig

        return EncoderConfig(**{f.name: getattr(self, f.name) for f in fields(EncoderConfig)})


LOSS_TYPES = ("mil-nce", "supervised", "temporally-aware")


@dataclass
class LossSettings:
    """The contrastive loss: its type, temperature and term weights."""

    loss_type: str = setting("mil-nce", f"contrastive loss: {', '.join(LOSS_TYPES)}")
    loss_temperature: float = setting(
        0.07, "softmax temperature tau of the loss", Bound(0, 1000, lo_open=True)
    )
    loss_milnce_weights: list[float] = setting(
        help="1-3 weights of the loss terms of every --loss_type: fragment, frame across fragments, frame "
        "within (alias --loss_weights)",
        bound=Bound(0, 1e6),
        factory=lambda: [1.0, 1.0],
        # --loss_weights: the same weights for every --loss_type (the reference checkpoints' name)
        aliases=("--loss_weights",),
        metavar="W",
    )
    # temporally-aware loss: weights exp(-lambda |t_i - t_j|)
    loss_ta_lambda: float = setting(
        10.0,
        "temporally-aware loss: a pair's weight is exp(-lambda |t_i - t_j|), t = position in the video in "
        "[0, 1]",
        Bound(0, 1e6),
    )
    # the cross-fragment frame term ignores same-fragment pairs (an HMVE flag of the reference)
    hmve_mask_intra_fragment_frames: bool = setting(
        False,
        "the cross-fragment frame MIL-NCE term ignores pairs of frames of the same fragment, in its "
        "positives and its denominator (as the reference)",
    )

    def check(self) -> None:
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        if not self.loss_ta_lambda >= 0:
            raise ValueError(f"--loss_ta_lambda {self.loss_ta_lambda}: use >= 0")
        if not 1 <= len(self.loss_milnce_weights) <= 3:
            raise ValueError(f"--loss_milnce_weights takes 1 to 3 values, got {self.loss_milnce_weights}")


LR_SCHEDULES = ("none", "cosine")
LR_SCHEDULE_ALIASES = {"constant": "none"}  # accepted in a model config (older checkpoints)


@dataclass
class OptimizerSettings:
    """AdamW and its learning-rate schedule."""

    lr: float = setting(1e-5, "AdamW learning rate", Bound(0, 100))
    weight_decay: float = setting(1e-4, "AdamW weight decay", Bound(0, 100))
    lr_schedule: str = setting("none", f"learning-rate schedule after warmup: {', '.join(LR_SCHEDULES)}")
    warmup_steps: int = setting(0, "linear learning-rate warmup steps", Bound(0, BIG))

    def check(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule {self.lr_schedule!r}: one of {LR_SCHEDULES}")


PRECISIONS = ("32", "bf16-mixed", "16-mixed")


@dataclass
class TrainerSettings:
    """The Lightning trainer: devices, precision, steps, validation and checkpoint cadence."""

    max_steps: int = setting(-1, "stop after this many optimizer steps (-1: run max_epochs)", Bound(-1, BIG))
    limit_val_batches: float = setting(
        1.0, "validation batches per run (fraction if <= 1.0, count if > 1)", Bound(0, BIG)
    )
    val_every_n_epochs: int = setting(1, "validate every N epochs", Bound(1, 1_000_000))
    # "auto": val/map when val identities exist, else "none" (keep last)
    monitor: str = setting(
        "auto", "metric choosing best.ckpt: auto (val/map when val identities exist), a metric name, or none"
    )
    deterministic: bool = setting(False, "deterministic algorithms (slower; for exact reproducibility)")
    devices: str = setting("auto", "devices per node: auto, a count, or a list like 0,1")
    num_nodes: int = setting(1, "nodes (with torchrun or SLURM)", Bound(1, 65536))
    strategy: str = setting("auto", "Lightning strategy: auto, ddp, ddp_spawn, ...")
    accelerator: str = setting("auto", "auto, cpu, gpu, ...")
    precision: str = setting("32", f"numeric precision: {', '.join(PRECISIONS)}")
    compile: bool = setting(False, "torch.compile the backbone")
    ckpt_every_n_steps: int = setting(
        0, "also write last.ckpt every N steps (0: at epoch ends only)", Bound(0, BIG)
    )
    log_every_n_steps: int = setting(10, "logging interval in steps", Bound(1, BIG))
    # start even when the memory estimate says the run cannot fit
    skip_memory_check: bool = setting(
        False,
        "start even when the estimated peak memory (polyp_ssl.memory, measured per backbone) exceeds what "
        "this machine has; the check refuses such a run before building the model",
    )

    def check(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)


LOGGERS = ("csv", "tensorboard", "wandb")


@dataclass
class RunSettings:
    """The run: its folder `{runs_dir}/{exp_name}`, resuming it, its logger."""

    exp_name: str = setting("default", "run name: the run folder is {runs_dir}/{exp_name}")
    exp_id: str | None = setting(None, "wandb run id (with --logger wandb)")  # reference flag
    wandb_project: str | None = setting(None, "wandb project (with --logger wandb; default polyp-ssl)")
    # reference flag: only "train" here (evaluation: `polyp-ssl eval`)
    mode: str = setting("train", "train (the reference's --mode eval is `polyp-ssl eval`)")
    resume: bool = setting(
        False,
        "continue {runs_dir}/{exp_name}/checkpoints/last.ckpt: same step, optimizer, schedule, data order",
    )
    logger: str = setting("csv", f"metrics logger: {', '.join(LOGGERS)} (csv needs no account nor network)")
    runs_dir: str = setting("runs", "folder of runs")

    def check(self) -> None:
        check_choice("logger", self.logger, LOGGERS)

    def check_mode(self) -> None:
        if self.mode != "train":
            raise ValueError(
                f"--mode {self.mode!r}: `polyp-ssl train` only trains; evaluate a checkpoint with "
                "`polyp-ssl eval --task retrieval|reid --dataset_root ROOT --encoder_ckpt CKPT`"
            )
