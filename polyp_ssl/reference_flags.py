"""The reference code's command-line flags and what polyp-ssl does with each, defined once.

The paper's public code (package `polypsense`) has four command lines: training
(`polypsense.e2e.cli`), retrieval / re-identification (`polypsense.reid.cli`) and the size and
histology probes (`polypsense.downstream.size.cli`, `.histology.cli`). Every one of their flags is
accepted by the matching polyp-ssl command, with one of three outcomes:

- ``same``: same name, same meaning (possibly a wider set of values);
- ``notice``: accepted with a one-line notice and no effect: the reference parses it and never
  reads it (or reads it only in an encoder its own factory cannot build), or it only names a
  logging run;
- ``refused``: a clear error saying why (an encoder this stack does not build, or data that an
  ingested root does not hold, such as whole frames).

The training table is here; the evaluation tables are in `eval.reference_flags`. The test
`tests/test_reference_parity.py` checks every flag of `tests/fixtures/reference_flags.json`
against the parsers.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

STATUSES = ("same", "notice", "refused")


@dataclass(frozen=True)
class RefFlag:
    """One flag of a reference command line."""

    name: str  # without the leading --
    kind: str  # str | int | float | store_true | float+ (nargs +) | float*2 (nargs 2) | json
    default: Any
    status: str  # same | notice | refused
    reason: str = ""  # notice / refused: why (printed); same: what differs, if anything
    target: str | None = None  # `same` under another name here (an alias)
    refused_values: tuple[tuple[str, str], ...] = ()  # (value, why) pairs refused for a `same` flag


def add_flag(p: argparse._ActionsContainer, f: RefFlag, help_: str) -> None:
    """Add a reference-only flag to a parser (defaults suppressed: absent means not given)."""
    flag = f"--{f.name}"
    kw: dict[str, Any] = {"help": help_, "default": argparse.SUPPRESS}
    if f.kind == "store_true":
        p.add_argument(flag, action="store_true", **kw)
    elif f.kind == "float+":
        p.add_argument(flag, type=float, nargs="+", **kw)
    elif f.kind == "float*2":
        p.add_argument(flag, type=float, nargs=2, **kw)
    else:
        p.add_argument(flag, type={"int": int, "float": float}.get(f.kind, str), **kw)


def flag_help(f: RefFlag) -> str:
    if f.status == "notice":
        return f"reference flag, accepted, no effect: {f.reason}"
    if f.status == "refused":
        return f"reference flag, refused: {f.reason}"
    return f"reference flag: {f.reason or 'same meaning'}"


def notice(prog: str, f: RefFlag) -> str:
    """The one-line notice of an accepted flag without effect."""
    return f"{prog}: --{f.name} accepted, no effect: {f.reason}"


def refusal(f: RefFlag) -> str:
    return f"--{f.name} is not supported: {f.reason}"


def check_value(f: RefFlag, value: Any) -> None:
    """ValueError for a value of a `same` flag that is refused (e.g. an encoder we do not build)."""
    for bad, why in f.refused_values:
        if str(value) == bad:
            raise ValueError(f"--{f.name} {bad}: {why}")


def apply_reference_values(
    values: dict[str, Any], table: dict[str, RefFlag], prog: str, own: set[str]
) -> dict[str, Any]:
    """Handle the reference-only keys of `values` (flags or YAML settings): notices are logged and
    dropped, refusals raise ValueError, aliases move to their target. Keys in `own` (the command's
    own settings) are left as they are, apart from a refused value."""
    out = dict(values)
    for name, f in table.items():
        if name not in out:
            continue
        check_value(f, out[name])
        if f.status == "refused":
            raise ValueError(refusal(f))
        if f.status == "notice":
            log.warning(notice(prog, f))
        if name in own:
            continue
        value = out.pop(name)
        if f.target:
            out.setdefault(f.target, value)
    return out


_NOT_HMVE = "read only by the reference's sfe-v2 / mve-v2 encoders, which its own factory cannot build"
_WHOLE_FRAME = (
    "it resizes the whole frame to im_size before the anchor crop, and an ingested root stores only "
    "the crop around each box (not the whole frame); leave it out: the anchor crop is taken from the "
    "stored crop"
)
_WANDB = "a wandb logging setting; here it names the wandb run when --logger wandb is chosen"
_ENCODERS_NOT_BUILT = (
    (
        "sfe-v2",
        "the reference's factory cannot build it (it reads --loss_gamma, which its parser lacks); "
        "use --encoder_type sfe (a per-frame ResNet, mean of frame features)",
    ),
    (
        "mve-v2",
        "the reference's factory cannot build it (it reads --loss_gamma, which its parser lacks); "
        "use --encoder_type mve (transformer over frame features, no CLS) or hmve",
    ),
    ("shmve", "the reference has no factory for it either ('Unknown encoder type'); use hmve"),
)


def _t(*flags: RefFlag) -> dict[str, RefFlag]:
    return {f.name: f for f in flags}


S, N, R = "same", "notice", "refused"

# polypsense.e2e.cli, in its order: 67 flags.
TRAIN_FLAGS: dict[str, RefFlag] = _t(
    RefFlag("dataset_root", "str", None, S, "an ingested root (`polyp-ssl ingest`)"),
    RefFlag(
        "mode",
        "str",
        None,
        S,
        "train only",
        refused_values=(("eval", "`polyp-ssl train` only trains; evaluate with `polyp-ssl eval`"),),
    ),
    RefFlag("lr", "float", None, S),
    RefFlag(
        "weight_decay",
        "float",
        None,
        S,
        "the reference parses it but its hmve optimiser always uses 1e-4 (our default); here the "
        "value given is used",
    ),
    RefFlag("max_epochs", "int", None, S),
    RefFlag("warmup_epochs", "int", None, N, "the reference parses it and never reads it"),
    RefFlag("resume", "store_true", None, S, "continues {runs_dir}/{exp_name}/checkpoints/last.ckpt"),
    RefFlag(
        "ckpt_path",
        "str",
        None,
        R,
        "a run continues only its own last checkpoint: use --resume with the run's --exp_name "
        "(and --runs_dir)",
    ),
    RefFlag("devices", "str", "auto", S),
    RefFlag("num_nodes", "int", 1, S),
    RefFlag("num_workers", "int", 4, S, "default min(8, usable CPUs) here (8: the seed command's value)"),
    RefFlag("seed", "int", 42, S),
    RefFlag("wandb_project", "str", None, S, _WANDB),
    RefFlag("batch_size", "int", None, S),
    RefFlag("fragment_length", "int", None, S),
    RefFlag("fragment_stride", "int", None, S),
    RefFlag("fragment_drop_last", "store_true", False, S),
    RefFlag("fragment_padding_mode", "str", None, S, "'repeat' only (also the padding when not given)"),
    RefFlag("bbox_scale_factor", "float", None, S, "at most the root's ingest --crop-scale"),
    RefFlag("bbox_scale_range", "float*2", None, N, "the reference parses it and never reads it"),
    RefFlag("min_tracklet_length", "int", None, S),
    RefFlag("im_size", "int", None, S),
    RefFlag("n_views", "int", None, S, "bag size K + 1"),
    RefFlag(
        "eval_n_views",
        "int",
        None,
        N,
        "views of the reference's validation loss; validation here is retrieval mAP on whole val tracklets",
    ),
    RefFlag("eval_batch_size", "int", None, S, "whole validation tracklets per batch"),
    RefFlag(
        "eval_fragment_length",
        "int",
        None,
        N,
        "fragment length of the reference's validation loss; validation here embeds whole tracklets",
    ),
    RefFlag("train_subset_ratio", "float", None, N, "the reference parses it and never reads it"),
    RefFlag("do_upsample", "store_true", False, N, "the reference parses it and never reads it"),
    RefFlag("sampler", "str", None, S, "also 'tracklet' here"),
    RefFlag("sampler_ttb_tmin", "float", None, S),
    RefFlag("sampler_ttb_tmax", "float", None, S),
    RefFlag("aug_resize", "store_true", False, R, _WHOLE_FRAME),
    RefFlag(
        "aug_anchorcrop",
        "store_true",
        False,
        S,
        "the deterministic anchor crop; required (the whole frame is not stored)",
    ),
    RefFlag(
        "aug_normalize",
        "store_true",
        False,
        N,
        "the reference's training never passes it to its data module; here the encoder always "
        "normalises (mean 0.45, std 0.225)",
    ),
    RefFlag("eval_aug_resize", "store_true", False, R, _WHOLE_FRAME),
    RefFlag(
        "eval_aug_anchorcrop",
        "store_true",
        False,
        S,
        "the deterministic anchor crop in validation; required (the whole frame is not stored)",
    ),
    RefFlag("encoder_type", "str", None, S, "hmve (also sfe, mve here)", refused_values=_ENCODERS_NOT_BUILT),
    RefFlag("d_proj", "int", None, S),
    RefFlag("sfe_ckpt", "str", None, N, _NOT_HMVE),
    RefFlag("sfe_freeze", "store_true", None, N, _NOT_HMVE),
    RefFlag("sfe_backbone_arch", "str", None, S, "any torchvision ResNet here"),
    RefFlag("sfe_backbone_weights", "str", None, S, "from the local torch cache or a file, never downloaded"),
    RefFlag("sfe_d_model", "int", None, S),
    RefFlag("sfe_d_proj", "int", None, N, _NOT_HMVE),
    RefFlag("mve_d_proj", "int", None, N, _NOT_HMVE),
    RefFlag("mve_d_model", "int", None, N, _NOT_HMVE),
    RefFlag("mve_d_feedforward", "int", None, N, _NOT_HMVE),
    RefFlag("mve_n_heads", "int", None, N, _NOT_HMVE),
    RefFlag("mve_n_layers", "int", None, N, _NOT_HMVE),
    RefFlag("mve_dropout", "float", None, N, _NOT_HMVE),
    RefFlag("mve_pooling", "str", None, N, _NOT_HMVE),
    RefFlag("mve_use_positional_encoding", "store_true", False, N, _NOT_HMVE),
    RefFlag("hmve_d_proj", "int", None, N, "the reference parses it and never reads it (hmve uses --d_proj)"),
    RefFlag("hmve_d_model", "int", None, S),
    RefFlag("hmve_d_feedforward", "int", None, S),
    RefFlag("hmve_n_heads", "int", None, S),
    RefFlag("hmve_n_layers", "int", None, S),
    RefFlag("hmve_dropout", "float", None, S),
    RefFlag("hmve_use_feature_norm", "store_true", False, S, "LayerNorm after the adapter"),
    RefFlag("hmve_use_encoder_norm", "store_true", False, S, "final LayerNorm of the transformer encoder"),
    RefFlag(
        "hmve_mask_intra_fragment_frames",
        "store_true",
        False,
        S,
        "the cross-fragment frame MIL-NCE term ignores pairs of frames of the same fragment",
    ),
    RefFlag(
        "loss_type",
        "str",
        None,
        S,
        "the reference's hmve always trains MIL-NCE; supervised / temporally-aware here are our losses",
    ),
    RefFlag("loss_temperature", "float", None, S),
    RefFlag(
        "loss_lambda",
        "float",
        None,
        S,
        "the temporally-aware loss's lambda (stored as loss_ta_lambda); the reference reads it "
        "only in its sfe-v2 / mve-v2 encoders",
        target="loss_ta_lambda",
    ),
    RefFlag(
        "loss_milnce_weights",
        "float+",
        None,
        S,
        "1 to 3 weights (missing = 0); the reference's hmve needs exactly 3",
    ),
    RefFlag("exp_id", "str", None, S, _WANDB.replace("names the wandb run", "is the wandb run id")),
    RefFlag("exp_name", "str", None, S),
)
