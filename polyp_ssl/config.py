"""The training configuration: every flag of `polyp-ssl train`, one dataclass.

Names and defaults follow the reference code's training command (the seed README), so the paper's
command line keeps its meaning; the extra fields cover the trainer (devices, precision, resume, ...).
"""

from __future__ import annotations

import difflib
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
        return ValueError(f"{name}: invalid {base} value: {value!r} (expected {base}, got {got})")

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
    return out
