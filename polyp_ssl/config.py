"""The training configuration: every flag of `polyp-ssl train`, as a `TrainConfig` of parts.

    TrainConfig
      data       DataSettings       root, splits, shard base, loader workers, validation data
      stream     StreamParams       batches, bags, fragments, anchor crops, shard access (stream_index)
      encoder    EncoderSettings    tracklet encoder and projector (-> encoders.EncoderConfig)
      loss       LossSettings       contrastive loss type, temperature, term weights
      optimizer  OptimizerSettings  AdamW, learning-rate schedule
      trainer    TrainerSettings    devices, precision, steps, validation and checkpoint cadence
      run        RunSettings        run folder, resume, logger

Each part (polyp_ssl.config_parts, polyp_ssl.stream_index.StreamParams) owns its fields, their help,
bounds and choice lists, and its checks. Names and defaults follow the reference code's training
command (the seed README): every field keeps the paper's flat flag name, unique over the parts, so
`SETTING_PART` maps a flag, a YAML key or a checkpoint hyper-parameter to its part, and a config
reads and writes as the flat mapping it always was (`from_dict`, `to_dict`).
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from polyp_ssl.bags import SAMPLERS
from polyp_ssl.config_parts import (
    ENCODER_TYPES,
    LOGGERS,
    LOSS_TYPES,
    LR_SCHEDULES,
    MAX_IM_SIZE,
    POOLINGS,
    PRECISIONS,
    Bound,
    DataSettings,
    EncoderSettings,
    LossSettings,
    OptimizerSettings,
    RunSettings,
    TrainerSettings,
    anchorcrop_required,
    default_num_workers,
)
from polyp_ssl.reference_flags import TRAIN_FLAGS, apply_reference_values
from polyp_ssl.stream_index import StreamParams

LOSSES = LOSS_TYPES
ENCODERS = ENCODER_TYPES
DECODE_ON = StreamParams.DECODE_ON  # where training JPEGs are decoded (polyp_ssl.device_decode)
SHARD_ACCESS = StreamParams.SHARD_ACCESS
# keys a run writes into its config.yaml that are results, not settings: accepted back by --config, ignored
RUN_OUTPUT_KEYS = ("resolved_monitor",)

# the parts of a TrainConfig: attribute name -> dataclass
PARTS: dict[str, type] = {
    "data": DataSettings,
    "stream": StreamParams,
    "encoder": EncoderSettings,
    "loss": LossSettings,
    "optimizer": OptimizerSettings,
    "trainer": TrainerSettings,
    "run": RunSettings,
}

# The flat settings in the order of `--help`, of config.yaml and of a checkpoint's hyper-parameters
# (the reference command's order, then this stack's trainer settings).
FLAT_ORDER = (
    *("dataset_root", "num_workers", "max_epochs", "batch_size", "fragment_length", "fragment_stride"),
    *("fragment_drop_last", "bbox_scale_factor", "min_tracklet_length", "im_size", "aug_anchorcrop"),
    *("eval_n_views", "eval_batch_size", "eval_fragment_length", "eval_aug_anchorcrop"),
    *("fragment_padding_mode", "aug_random_scale", "aug_jitter", "aug_hflip", "aug_vflip"),
    *("encoder_type", "sfe_backbone_arch", "sfe_backbone_weights", "sfe_d_model", "d_proj"),
    *("hmve_d_model", "hmve_d_feedforward", "hmve_n_heads", "hmve_n_layers", "hmve_dropout"),
    *("hmve_use_feature_norm", "hmve_use_encoder_norm", "hmve_mask_intra_fragment_frames"),
    *("lr", "loss_type", "loss_temperature", "loss_milnce_weights", "loss_ta_lambda", "encoder_pooling"),
    *("sampler", "sampler_ttb_tmin", "sampler_ttb_tmax", "sampler_ttb_schedule", "n_views", "exp_name"),
    "exp_id",
    *("wandb_project", "mode", "seed", "weight_decay", "lr_schedule", "warmup_steps", "open_videos"),
    *("shard_access", "max_steps", "limit_val_batches", "val_every_n_epochs", "val_max_frames"),
    *("monitor", "deterministic", "split", "val_split", "shard_base", "devices", "num_nodes", "strategy"),
    *("accelerator", "precision", "compile", "channels_last", "resume", "ckpt_every_n_steps", "logger"),
    *("runs_dir", "log_every_n_steps", "data_log", "on_shard_error", "decode_on", "skip_memory_check"),
    *("storage_options", "cache_dir", "cache_size"),
)


def _name_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for part, cls in PARTS.items():
        for f in fields(cls):
            if f.name in out:
                raise AssertionError(f"setting {f.name!r} is in parts {out[f.name]!r} and {part!r}")
            out[f.name] = part
    if sorted(out) != sorted(FLAT_ORDER) or len(FLAT_ORDER) != len(out):
        raise AssertionError(f"FLAT_ORDER and the parts differ: {sorted(set(out) ^ set(FLAT_ORDER))}")
    return {name: out[name] for name in FLAT_ORDER}


# flat flag name -> the part holding it (the field has the flat name)
SETTING_PART: dict[str, str] = _name_map()
SETTING_FIELDS = {f.name: f for cls in PARTS.values() for f in fields(cls)}
SETTING_TYPES: dict[str, Any] = {
    name: hint
    for cls in PARTS.values()
    for name, hint in typing.get_type_hints(cls).items()
    if name in SETTING_PART
}

# numeric settings -> their plausible values (the `bound` of each field); checked (`check_setting_ranges`)
# before any loop, any allocation or any model uses them, for a train config (file or flags) and for a
# model config read from a checkpoint, an exported encoder or an `init:` config (polyp_ssl.checkpoint)
SETTING_BOUNDS: dict[str, Bound] = {
    name: SETTING_FIELDS[name].metadata["bound"]
    for name in FLAT_ORDER
    if SETTING_FIELDS[name].metadata.get("bound")
}


def setting_help(name: str) -> str:
    return SETTING_FIELDS[name].metadata.get("help") or name


def setting_range_problem(name: str, value: Any) -> str | None:
    """Why `value` is not a plausible value of the numeric setting `name`, as "VALUE: needs ..."
    (None: it is, or `name` has no bound). A number is a real int or float (not a bool, not a
    string); a list setting (loss_milnce_weights) is checked value by value. The value is rendered
    in at most a few dozen characters."""
    bound = SETTING_BOUNDS.get(name)
    if bound is None or (value is None and type_parts(SETTING_TYPES[name])[1]):  # None where allowed
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


@dataclass
class TrainConfig:
    """A training run's settings, by part. A flat name (`cfg.batch_size`) reads the field of its part
    (`cfg.stream.batch_size`); `from_dict` / `to_dict` convert from and to the flat mapping of flags,
    config.yaml and checkpoints."""

    data: DataSettings = field(default_factory=DataSettings)
    stream: StreamParams = field(default_factory=StreamParams)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __getattr__(self, name: str) -> Any:
        part = SETTING_PART.get(name)
        if part is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, part), name)

    def to_dict(self) -> dict[str, Any]:
        """The flat settings (flag name -> value), in FLAT_ORDER. What a run records (config.yaml,
        checkpoints) comes from here: `storage_options` with every value that may be a secret
        replaced by `***` (shards.remote.public_options)."""
        out = {}
        for name, part in SETTING_PART.items():
            value = getattr(getattr(self, part), name)
            out[name] = list(value) if isinstance(value, list) else value
        out["storage_options"] = public_storage_options(out["storage_options"])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from flat settings (defaults for those not given); ValueError naming an unknown one."""
        unknown = sorted(set(values) - set(SETTING_PART))
        if unknown:
            raise ValueError(unknown_setting_message(unknown[0], set(SETTING_PART)))
        by_part: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for name, value in values.items():
            by_part[SETTING_PART[name]][name] = value
        return cls(**{part: PARTS[part](**kw) for part, kw in by_part.items()})

    def validate(self) -> None:
        """Raise ValueError with a message naming the setting for a configuration that cannot work:
        the bounds of every numeric setting first, then each part's checks, then the reference
        flags' meaning."""
        for name in SETTING_BOUNDS:
            problem = setting_range_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"--{name} {problem}")
        for part in (self.data, self.stream, self.loss, self.encoder, self.trainer, self.run, self.optimizer):
            part.check()
        self.validate_reference_meaning()

    def validate_reference_meaning(self) -> None:
        """The reference code's flags that this stack can only honour one way."""
        if not self.stream.aug_anchorcrop:
            raise ValueError(anchorcrop_required("aug_anchorcrop"))
        self.data.check_reference_meaning()
        if self.stream.fragment_drop_last and self.data.fragment_padding_mode is not None:
            raise ValueError(
                "--fragment_padding_mode with --fragment_drop_last: a dropped fragment is not padded "
                "(the reference refuses this pair too)"
            )
        self.run.check_mode()


def public_storage_options(text: str | None) -> str | None:
    """--storage_options as a run records it: a JSON object whose secret-looking values are `***`
    (shards.remote.public_options); text that is not a JSON object is not recorded at all."""
    if not text:
        return text
    from polyp_ssl.shards.remote import REDACTED, StorageOptionsError, parse_storage_options, public_options

    try:
        return json.dumps(public_options(parse_storage_options(text)), sort_keys=True)
    except StorageOptionsError:
        return json.dumps(REDACTED)


def unknown_setting_message(name: str, known: set[str] | list[str], where: str = "") -> str:
    """One line naming an unknown setting, with the closest known name when there is one."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else " (`polyp-ssl train --help` lists the settings)"
    return f"{where}unknown setting {name!r}{hint}"


_NUMBER = (int, float)


def _shown(value: Any) -> str:
    from polyp_ssl.shards.textio import shown

    return shown(value)


def type_parts(hint: Any) -> tuple[Any, bool]:
    """The type of a setting without its None, and whether None is allowed (`int | None` -> int, True)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def type_name(base: Any) -> str:
    """`int`, `str`, `list[float]`: a setting's type as its annotation spells it."""
    if typing.get_origin(base) is list:
        return f"list[{typing.get_args(base)[0].__name__}]"
    return base.__name__


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` of a YAML setting as the field's type, or ValueError naming the key, the value and the
    expected type (the argparse wording of the same flag on the command line)."""
    base, optional = type_parts(hint)
    text = type_name(base)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: invalid {text} value: None (a value is required)")

    def bad() -> ValueError:
        got = type(value).__name__
        shown = _shown(value)  # truncated: a value from a file may be a huge string or tree
        return ValueError(f"{name}: invalid {text} value: {shown} (expected {text}, got {got})")

    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if isinstance(value, bool):  # YAML true/false for a number or a string
        raise bad()
    if base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if base is float:
        if isinstance(value, _NUMBER):
            return float(value)
        raise bad()
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, _NUMBER):  # `precision: 32`, `devices: 2` read as numbers by YAML
            return str(value)
        raise bad()
    if typing.get_origin(base) is list:
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
    out = {}
    for key, value in values.items():
        if key in SETTING_TYPES:
            try:
                out[key] = _coerce(key, value, SETTING_TYPES[key])
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
        else:
            out[key] = value
    check_setting_ranges(out, where)
    return out


def check_config_file(loaded: dict[Any, Any], name: str) -> dict[str, Any]:
    """The settings of a `--config` YAML, checked as the command line checks its flags: an unknown
    key (with the closest setting), a value of the wrong type (key, value, expected type). The keys
    a run writes as results (`resolved_monitor`) are accepted and dropped, so a run's own
    config.yaml is accepted back."""
    where = f"--config {name}: "
    known = set(SETTING_PART) | set(TRAIN_FLAGS)
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


def apply_reference_settings(values: dict[str, Any], keep_own: bool = False) -> dict[str, Any]:
    """`values` with the reference training command's own flags handled (`reference_flags`: notices
    logged, refusals raised, aliases moved to their setting). `keep_own`: the settings of this
    command pass as they are (a run's own config.yaml: no second notice of a reference flag it holds)."""
    own = set(SETTING_PART)
    if not keep_own:
        return apply_reference_values(values, TRAIN_FLAGS, "polyp-ssl train", own)
    out = {k: v for k, v in values.items() if k in own}
    other = {k: v for k, v in values.items() if k not in own}
    out.update(apply_reference_values(other, TRAIN_FLAGS, "polyp-ssl train", own))
    return out


__all__ = [
    "DECODE_ON",
    "ENCODERS",
    "FLAT_ORDER",
    "LOGGERS",
    "LOSSES",
    "LR_SCHEDULES",
    "MAX_IM_SIZE",
    "PARTS",
    "POOLINGS",
    "PRECISIONS",
    "RUN_OUTPUT_KEYS",
    "SAMPLERS",
    "SETTING_BOUNDS",
    "SETTING_PART",
    "SHARD_ACCESS",
    "Bound",
    "TrainConfig",
    "apply_reference_settings",
    "check_config_file",
    "check_setting_ranges",
    "check_setting_types",
    "default_num_workers",
    "setting_help",
    "setting_range_problem",
    "unknown_setting_message",
]
