"""The training configuration: every flag of `polyp-ssl train`, one dataclass.

Names and defaults follow the reference code's training command (the seed README), so the paper's
command line keeps its meaning; the extra fields cover the trainer (devices, precision, resume, ...).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SAMPLERS = ("temporaltemperaturebag", "temporalknnbag", "multipos", "tracklet")
LOSSES = ("mil-nce", "supervised", "temporally-aware")
ENCODERS = ("sfe", "mve", "hmve")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
LOGGERS = ("csv", "tensorboard", "wandb")
LR_SCHEDULES = ("none", "cosine")
POOLINGS = ("cls", "mean")
DECODE_ON = ("workers", "device")  # where training JPEGs are decoded (polyp_ssl.device_decode)
# how training batches read shards: "random" reads each frame at its catalog byte span (batches as
# diverse as a global shuffle), "sequential" streams whole shards per worker (pipe: and remote
# bases, compressed shards), "auto" = random whenever the shards are local plain tar files
SHARD_ACCESS = ("auto", "random", "sequential")
# keys a run writes into its config.yaml that are results, not settings: accepted back by --config, ignored
RUN_OUTPUT_KEYS = ("resolved_monitor",)

# The largest anchor-crop side polyp-ssl trains or embeds at (the paper: 232; the zoo's largest input:
# 518). A frame is 3 * im_size**2 bytes before the backbone, whose activations grow with its square.
MAX_IM_SIZE = 1024
_BIG = 1 << 40  # a step or frame count no run reaches


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


# numeric settings -> their plausible values; checked (`check_setting_ranges`) before any loop, any
# allocation or any model uses them, for a train config (file or flags) and for a model config read
# from a checkpoint, an exported encoder or an `init:` config (polyp_ssl.checkpoint)
SETTING_BOUNDS: dict[str, Bound] = {
    "num_workers": Bound(0, 256),
    "max_epochs": Bound(1, 1_000_000),
    "batch_size": Bound(1, 1 << 16),
    "fragment_length": Bound(1, 100_000, minus_one=True),
    "fragment_stride": Bound(1, 100_000),
    "bbox_scale_factor": Bound(0, 100, lo_open=True),
    "min_tracklet_length": Bound(0, _BIG),
    "im_size": Bound(8, MAX_IM_SIZE),
    "eval_n_views": Bound(1, 1024),
    "eval_batch_size": Bound(1, 1 << 16),
    "eval_fragment_length": Bound(1, 100_000, minus_one=True),
    "sfe_d_model": Bound(1, 1 << 16),
    "d_proj": Bound(1, 1 << 16),
    "hmve_d_model": Bound(1, 1 << 16),
    "hmve_d_feedforward": Bound(1, 1 << 20),
    "hmve_n_heads": Bound(1, 1024),
    "hmve_n_layers": Bound(1, 1024),
    "hmve_dropout": Bound(0, 1),
    "lr": Bound(0, 100),
    "loss_temperature": Bound(0, 1000, lo_open=True),
    "loss_milnce_weights": Bound(0, 1e6),
    "loss_ta_lambda": Bound(0, 1e6),
    "sampler_ttb_tmin": Bound(0, 1e6, lo_open=True),
    "sampler_ttb_tmax": Bound(0, 1e6, lo_open=True),
    "n_views": Bound(2, 1024),
    "seed": Bound(0, (1 << 32) - 1),
    "weight_decay": Bound(0, 100),
    "warmup_steps": Bound(0, _BIG),
    "open_videos": Bound(1, 1024),
    "max_steps": Bound(-1, _BIG),
    "limit_val_batches": Bound(0, _BIG),
    "val_every_n_epochs": Bound(1, 1_000_000),
    "val_max_frames": Bound(1, 100_000),
    "num_nodes": Bound(1, 65536),
    "ckpt_every_n_steps": Bound(0, _BIG),
    "log_every_n_steps": Bound(1, _BIG),
}


def setting_range_problem(name: str, value: Any) -> str | None:
    """Why `value` is not a plausible value of the numeric setting `name`, as "VALUE: needs ..."
    (None: it is, or `name` has no bound). A number is a real int or float (not a bool, not a
    string); a list setting (loss_milnce_weights) is checked value by value. The value is rendered
    in at most a few dozen characters."""
    bound = SETTING_BOUNDS.get(name)
    if bound is None or (value is None and name == "sfe_d_model"):
        return None
    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"{str(v)[:40]!r} (a {type(v).__name__}): needs {bound.text()}"
        if not bound.holds(v):
            return f"{_number_text(v)}: needs {bound.text()}"
    return None


def _number_text(v: float) -> str:
    """`v` in a few characters: 6 significant digits past 10**12, the order of magnitude of an
    integer too large for a float."""
    if isinstance(v, int) and abs(v) < 10**12:
        return str(v)
    try:
        return f"{v:.6g}"
    except OverflowError:
        return f"an integer of {v.bit_length()} bits"


def check_setting_ranges(values: dict[str, Any], where: str = "") -> None:
    """ValueError (one line: `where`, the setting, its value, its bounds) for the first numeric
    setting of `values` out of its SETTING_BOUNDS; settings without a bound are not looked at."""
    for name, value in values.items():
        problem = setting_range_problem(name, value)
        if problem:
            raise ValueError(f"{where}setting {name!r} = {problem}")


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
class TrainConfig:
    # data (seed flags)
    dataset_root: str = ""
    num_workers: int = field(default_factory=default_num_workers)  # min(8, usable CPUs)
    max_epochs: int = 50
    batch_size: int = 60
    fragment_length: int = 8
    fragment_stride: int = 4
    fragment_drop_last: bool = False
    bbox_scale_factor: float = 5.0
    min_tracklet_length: int = 30
    im_size: int = 232
    aug_anchorcrop: bool = False  # the reference's deterministic anchor crop; required (stored crops only)
    eval_n_views: int = 2
    eval_batch_size: int = 6
    eval_fragment_length: int = 8
    eval_aug_anchorcrop: bool = False  # validation's deterministic anchor crop; required, as aug_anchorcrop
    fragment_padding_mode: str | None = None  # reference flag: "repeat" (the only padding) or unset
    # random training augmentations: our extension, each off by default (polyp_ssl.transforms.Augment)
    aug_random_scale: bool = False
    aug_jitter: bool = False
    aug_hflip: bool = False
    aug_vflip: bool = False
    # encoder (seed flags)
    encoder_type: str = "hmve"
    sfe_backbone_arch: str = "resnet50"
    sfe_backbone_weights: str | None = None  # None = random init; the paper uses IMAGENET1K_V2
    sfe_d_model: int | None = None  # None: the backbone's width (2048 for resnet50)
    d_proj: int = 128
    hmve_d_model: int = 256
    hmve_d_feedforward: int = 1024
    hmve_n_heads: int = 8
    hmve_n_layers: int = 3
    hmve_dropout: float = 0.1
    hmve_use_feature_norm: bool = False  # LayerNorm after the adapter (reference flag)
    hmve_use_encoder_norm: bool = False  # final LayerNorm of the transformer encoder (reference flag)
    hmve_mask_intra_fragment_frames: bool = False  # cross-fragment frame term ignores same-fragment pairs
    # optimisation and loss (seed flags)
    lr: float = 1e-5
    loss_type: str = "mil-nce"
    loss_temperature: float = 0.07
    loss_milnce_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    loss_ta_lambda: float = 10.0  # temporally-aware loss: weights exp(-lambda |t_i - t_j|)
    encoder_pooling: str = "cls"  # tracklet embedding: the CLS output (hmve) or the mean of frame tokens
    sampler: str = "temporaltemperaturebag"
    sampler_ttb_tmin: float = 0.3
    sampler_ttb_tmax: float = 12.0
    n_views: int = 5
    exp_name: str = "default"
    exp_id: str | None = None  # reference flag: the wandb run id (with --logger wandb)
    wandb_project: str | None = None  # reference flag: the wandb project (with --logger wandb)
    mode: str = "train"  # reference flag: only "train" here (evaluation: `polyp-ssl eval`)
    seed: int = 42
    # trainer (this stack)
    weight_decay: float = 1e-4
    lr_schedule: str = "none"
    warmup_steps: int = 0
    open_videos: int = 4
    shard_access: str = "auto"
    max_steps: int = -1
    limit_val_batches: float = 1.0
    val_every_n_epochs: int = 1
    val_max_frames: int = 64
    monitor: str = "auto"  # "auto": val/map when val identities exist, else "none" (keep last)
    deterministic: bool = False
    split: str = "train"
    val_split: str = "val"
    shard_base: str | None = None  # URL prefix for the catalog's relative shard paths
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    precision: str = "32"
    compile: bool = False
    channels_last: bool = False
    resume: bool = False
    ckpt_every_n_steps: int = 0
    logger: str = "csv"
    runs_dir: str = "runs"
    log_every_n_steps: int = 10
    data_log: str | None = None  # debug: append the video ids of every batch, per rank, to this file
    on_shard_error: str = "fail"  # damaged shard/sample: "fail" stops the run, "warn" skips and counts
    decode_on: str = "workers"  # where training JPEGs are decoded: loader "workers" or the "device"
    skip_memory_check: bool = False  # start even when the memory estimate says the run cannot fit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(unknown_setting_message(unknown[0], known))
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError with a message naming the setting for a configuration that cannot work."""
        for name in SETTING_BOUNDS:
            problem = setting_range_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"--{name} {problem}")
        checks = [
            (self.sampler in SAMPLERS, f"--sampler {self.sampler!r}: choose one of {SAMPLERS}"),
            (self.loss_type in LOSSES, f"--loss_type {self.loss_type!r}: choose one of {LOSSES}"),
            (
                self.encoder_type in ENCODERS,
                f"--encoder_type {self.encoder_type!r}: choose one of {ENCODERS}",
            ),
            (self.precision in PRECISIONS, f"--precision {self.precision!r}: choose one of {PRECISIONS}"),
            (self.logger in LOGGERS, f"--logger {self.logger!r}: choose one of {LOGGERS}"),
            (
                self.encoder_pooling in POOLINGS,
                f"--encoder_pooling {self.encoder_pooling!r}: choose one of {POOLINGS}",
            ),
            (self.loss_ta_lambda >= 0, f"--loss_ta_lambda {self.loss_ta_lambda}: use >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr_schedule {self.lr_schedule!r}: one of {LR_SCHEDULES}"),
            (
                self.n_views >= 2,
                f"--n_views {self.n_views}: a bag needs the anchor and at least one more view",
            ),
            (
                self.batch_size >= self.n_views,
                f"--batch_size {self.batch_size} < --n_views {self.n_views}: a batch must hold one whole bag",
            ),
            (
                self.batch_size % self.n_views == 0,
                f"--batch_size {self.batch_size} is not a multiple of --n_views {self.n_views}",
            ),
            (
                self.fragment_length == -1 or self.fragment_length >= 1,
                f"--fragment_length {self.fragment_length}: use >= 1, or -1 for whole tracklets",
            ),
            (self.fragment_stride >= 1, f"--fragment_stride {self.fragment_stride}: use >= 1"),
            (self.im_size >= 8, f"--im_size {self.im_size}: too small"),
            (self.bbox_scale_factor > 0, f"--bbox_scale_factor {self.bbox_scale_factor}: use > 0"),
            (self.open_videos >= 1, f"--open_videos {self.open_videos}: use >= 1"),
            (
                self.shard_access in SHARD_ACCESS,
                f"--shard_access {self.shard_access!r}: choose one of {SHARD_ACCESS}",
            ),
            (
                self.on_shard_error in ("fail", "warn"),
                f"--on_shard_error {self.on_shard_error!r}: choose fail or warn",
            ),
            (
                self.decode_on in DECODE_ON,
                f"--decode_on {self.decode_on!r}: choose one of {DECODE_ON}",
            ),
            (self.num_workers >= 0, f"--num_workers {self.num_workers}: use >= 0"),
            (self.max_epochs >= 1, f"--max_epochs {self.max_epochs}: use >= 1"),
            (
                1 <= len(self.loss_milnce_weights) <= 3,
                f"--loss_milnce_weights takes 1 to 3 values, got {self.loss_milnce_weights}",
            ),
            (
                0 < self.sampler_ttb_tmin <= self.sampler_ttb_tmax,
                f"--sampler_ttb_tmin {self.sampler_ttb_tmin} / --sampler_ttb_tmax {self.sampler_ttb_tmax}: "
                "need 0 < tmin <= tmax",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.validate_reference_meaning()

    def validate_reference_meaning(self) -> None:
        """The reference code's flags that this stack can only honour one way."""
        for flag in ("aug_anchorcrop", "eval_aug_anchorcrop"):
            if not getattr(self, flag):
                raise ValueError(
                    f"--{flag} not given: without it the reference code feeds whole frames, but an "
                    "ingested root stores only the crop around each box; pass --aug_anchorcrop "
                    "--eval_aug_anchorcrop (the deterministic anchor crop, as in the paper)"
                )
        if self.fragment_padding_mode not in (None, "repeat"):
            raise ValueError(
                f"--fragment_padding_mode {self.fragment_padding_mode!r}: the only padding is 'repeat' "
                "(repeat the last frame)"
            )
        if self.fragment_drop_last and self.fragment_padding_mode is not None:
            raise ValueError(
                "--fragment_padding_mode with --fragment_drop_last: a dropped fragment is not padded "
                "(the reference refuses this pair too)"
            )
        if self.mode != "train":
            raise ValueError(
                f"--mode {self.mode!r}: `polyp-ssl train` only trains; evaluate a checkpoint with "
                "`polyp-ssl eval --task retrieval|reid --dataset_root ROOT --encoder_ckpt CKPT`"
            )


def unknown_setting_message(name: str, known: set[str] | list[str], where: str = "") -> str:
    """One line naming an unknown setting, with the closest known name when there is one."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else " (`polyp-ssl train --help` lists the settings)"
    return f"{where}unknown setting {name!r}{hint}"


_NUMBER = (int, float)


def _shown(value: Any) -> str:
    from polyp_ssl.shards.textio import shown

    return shown(value)


def _coerce(name: str, value: Any, type_text: str) -> Any:
    """`value` of a YAML setting as the field's type, or ValueError naming the key, the value and the
    expected type (the argparse wording of the same flag on the command line)."""
    optional = "None" in type_text
    base = type_text.replace("| None", "").replace("None |", "").strip()
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: invalid {base} value: None (a value is required)")

    def bad() -> ValueError:
        got = type(value).__name__
        shown = _shown(value)  # truncated: a value from a file may be a huge string or tree
        return ValueError(f"{name}: invalid {base} value: {shown} (expected {base}, got {got})")

    if base == "bool":
        if isinstance(value, bool):
            return value
        raise bad()
    if isinstance(value, bool):  # YAML true/false for a number or a string
        raise bad()
    if base == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if base == "float":
        if isinstance(value, _NUMBER):
            return float(value)
        raise bad()
    if base == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, _NUMBER):  # `precision: 32`, `devices: 2` read as numbers by YAML
            return str(value)
        raise bad()
    if base.startswith("list"):
        if isinstance(value, _NUMBER):
            return [float(value)]
        if isinstance(value, list) and all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        raise bad()
    return value


def check_setting_types(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The settings of a YAML `--config` with the types the command line would give them; ValueError
    (one line, prefixed by `where`) for a value of the wrong type. Keys that are not settings are
    passed through (the caller names unknown keys)."""
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        if key in types:
            try:
                out[key] = _coerce(key, value, types[key])
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
        else:
            out[key] = value
    check_setting_ranges(out, where)
    return out
