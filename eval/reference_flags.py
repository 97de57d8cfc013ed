"""The reference code's evaluation flags and what `polyp-ssl eval` / `probe` do with each.

Tables for `polypsense.reid.cli` (retrieval, re-identification: `polyp-ssl eval`) and
`polypsense.downstream.size.cli` / `.histology.cli` (`polyp-ssl probe`); the outcomes (`same`,
`notice`, `refused`) are those of `polyp_ssl.reference_flags`, where the training table is.
"""

from __future__ import annotations

import argparse

from polyp_ssl.reference_flags import RefFlag, add_flag, apply_reference_values, check_value, flag_help

S, N, R = "same", "notice", "refused"

_ENCODERS_HERE = ("hmve", "sfe", "mve")
_OTHER_ENCODERS = (
    "sfe-v2", "mve-v2", "timesformer", "surgenet", "videomae", "dinov2", "vjepa2", "shmve", "endofm",
    "endofmlv", "endovit", "hendofm", "dinov3",
)  # fmt: skip
ENCODER_CHOICES = (*_ENCODERS_HERE, *_OTHER_ENCODERS)
_NOT_BUILT = tuple(
    (e, "an encoder polyp-ssl does not build (it evaluates its own sfe / mve / hmve checkpoints); compute "
     "that encoder's vectors elsewhere and pass them with --embeddings")
    for e in _OTHER_ENCODERS
)  # fmt: skip
POOLING_CHOICES = ("cls", "mean", "none", "patchmean", "cat", "mean-mean", "cls-mean")
_POOL_REFUSED = tuple(
    (v, "a pooling of the reference's other encoders (patch tokens); hmve embeds with cls or mean")
    for v in POOLING_CHOICES[2:]
)
_WHOLE_FRAME = (
    "it resizes the whole frame before the anchor crop, and an ingested root stores only the crop around "
    "each box; leave it out: the anchor crop is taken from the stored crop"
)
_LOGGING = "a wandb logging setting; the evaluation writes JSON files and no wandb run"
_NEVER_READ = "the reference parses it and never reads it"

_ENCODER = (
    RefFlag("encoder_type", "str", None, S, "hmve (also sfe, mve here)", refused_values=_NOT_BUILT),
    RefFlag("encoder_ckpt", "str", None, S),
    RefFlag("encoder_out_dim", "int", None, S, "checked against the embedding size"),
    RefFlag("encoder_pooling", "str", None, S, "cls or mean", refused_values=_POOL_REFUSED),
)


def _t(*flags: RefFlag) -> dict[str, RefFlag]:
    return {f.name: f for f in flags}


# polypsense.reid.cli: 22 flags
REID_FLAGS: dict[str, RefFlag] = _t(
    RefFlag("exp_id", "str", None, N, _LOGGING),
    RefFlag("exp_name", "str", None, S, "names the output folder {runs_dir or root}/eval/{exp_name}"),
    RefFlag("wandb_project", "str", None, N, _LOGGING),
    RefFlag("task", "str", None, S),
    RefFlag(
        "stages",
        "str+",
        None,
        S,
        "test (default) = the test split, validate = the val split; one stage",
        refused_values=(("fit", "retrieval and re-identification train nothing"),),
    ),
    RefFlag("dataset_root", "str", None, S, "an ingested root"),
    _ENCODER[0],
    _ENCODER[1],
    RefFlag(
        "encoder_features_source",
        "str",
        None,
        S,
        "encoder only",
        refused_values=(
            (
                "projector",
                "the embeddings are the encoder's output; the projector is "
                "part of the training loss and is not kept in the encoder",
            ),
        ),
    ),
    _ENCODER[3],
    _ENCODER[2],
    RefFlag("counting_algorithm", "str", None, N, _NEVER_READ + " (counting: `polyp-ssl count`)"),
    RefFlag("counting_hparams", "json", None, N, _NEVER_READ + " (counting: `polyp-ssl count`)"),
    RefFlag("tracking_workdir", "str", None, N, _NEVER_READ),
    RefFlag("data_fragment_length", "int", None, S, "-1 = whole tracklets (at stride 4)"),
    RefFlag("data_aug_resize", "store_true", False, R, _WHOLE_FRAME),
    RefFlag(
        "data_aug_anchorcrop",
        "store_true",
        False,
        S,
        "the deterministic anchor crop; required when an encoder runs (the whole frame is not stored)",
    ),
    RefFlag("data_bbox_scale_factor", "int", None, S, "fractional too; <= the ingest --crop-scale"),
    RefFlag("data_im_size", "int", None, S),
    RefFlag("data_aug_normalize", "store_true", False, S, "the encoder always normalises (0.45, 0.225)"),
    RefFlag("surgenet_arch", "str", None, N, _NEVER_READ),
    RefFlag("timesformer_pooling", "str", None, N, _NEVER_READ),
)

_PROBE_COMMON = (
    RefFlag("exp_id", "str", None, N, _LOGGING),
    RefFlag("exp_name", "str", None, S, "names the output folder"),
    RefFlag("wandb_project", "str", None, N, _LOGGING),
    RefFlag("wandb_entity", "str", None, N, _LOGGING),
    RefFlag("train_images", "str", None, S, "inside an ingested root"),
    RefFlag("train_annotations", "str", None, S, "ROOT/annotations/instances_{split}.json, ingested"),
    RefFlag("val_images", "str", None, S),
    RefFlag("val_annotations", "str", None, S),
    RefFlag("data_fragment_length", "int", None, S),
    RefFlag("data_fragment_stride", "int", None, S),
    RefFlag("data_fragment_drop_last", "store_true", False, S),
    RefFlag("data_fragment_padding_mode", "str", None, S, "repeat (also the padding when not given)"),
    RefFlag("data_aug_resize", "store_true", False, R, _WHOLE_FRAME),
    RefFlag(
        "data_aug_anchorcrop",
        "store_true",
        False,
        S,
        "the deterministic anchor crop; required when an encoder runs",
    ),
    RefFlag("data_aug_normalize", "store_true", False, S, "the encoder always normalises"),
    RefFlag("data_im_size", "int", None, S),
    RefFlag("data_bbox_scale_factor", "int", None, S, "fractional too; <= the ingest --crop-scale"),
    RefFlag("seed", "int", 42, S),
    RefFlag("max_epochs", "int", None, S),
    RefFlag("opt_type", "str", None, S),
    RefFlag("opt_lr", "float", None, S),
    RefFlag("opt_weight_decay", "float", None, S),
    RefFlag("lr_sched_type", "str", None, S),
    RefFlag("batch_size", "int", None, S),
    RefFlag("num_workers", "int", None, N, "the embedding run reads shards in one process"),
    RefFlag("n_classes", "int", None, S),
    RefFlag("pos_weight", "float", None, S, "BCE positive-class weight (2 classes)"),
    RefFlag("cls_type", "str", None, S),
    RefFlag("cls_hidden_dim", "int", None, S),
    RefFlag("cls_init", "str", None, S, "default / normal (linear probe; also xavier, zeros here)"),
    RefFlag("cls_use_layer_norm", "store_true", False, S, "LayerNorm before the linear probe"),
    RefFlag("stages", "str+", None, N, "the reference's probes never read it (always fit, then test)"),
    RefFlag(
        "train_encoder",
        "store_true",
        False,
        R,
        "the probe trains on frozen, cached embeddings; fine-tuning the encoder is not supported",
    ),
    *_ENCODER,
)

# polypsense.downstream.size.cli: 38 flags
SIZE_FLAGS: dict[str, RefFlag] = _t(
    *_PROBE_COMMON, RefFlag("dataset_type", "str", None, S, "coco (the only type)")
)
# polypsense.downstream.histology.cli: 41 flags
HISTOLOGY_FLAGS: dict[str, RefFlag] = _t(
    *_PROBE_COMMON,
    RefFlag("gradient_clip_val", "float", None, S),
    RefFlag("gradient_clip_algorithm", "str", None, S, "norm or value"),
    RefFlag("class_mapping", "str", None, S),
    RefFlag("videomae_pretrained", "str", None, N, _NEVER_READ),
)

TABLES = {"reid": REID_FLAGS, "size": SIZE_FLAGS, "histology": HISTOLOGY_FLAGS}


def add_missing_flags(p: argparse.ArgumentParser, tables: list[dict[str, RefFlag]]) -> None:
    """Add to `p` every reference flag of `tables` that it does not define yet."""
    have = {opt for a in p._actions for opt in a.option_strings}
    g = p.add_argument_group("other flags of the reference command (docs/evaluation.md)")
    for table in tables:
        for f in table.values():
            if f"--{f.name}" in have:
                continue
            have.add(f"--{f.name}")
            if f.kind == "str+":
                g.add_argument(f"--{f.name}", nargs="+", default=argparse.SUPPRESS, help=flag_help(f))
            elif f.kind == "json":
                g.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=flag_help(f))
            else:
                add_flag(g, f, flag_help(f))


def apply(
    p: argparse.ArgumentParser, args: argparse.Namespace, tables: list[dict[str, RefFlag]], prog: str
) -> None:
    """Notices, refusals and refused values of the reference flags given (in place): a flag the
    parser already had (`own`) keeps its value; a reference-only flag is removed after its notice."""
    merged: dict[str, RefFlag] = {}
    for t in tables:
        merged.update(t)
    own = set(OWN.get(p.prog, ()))
    given = {
        k: v
        for k, v in vars(args).items()
        if k in merged and v is not None and v is not False and not (k in own and v == p.get_default(k))
    }
    for k, v in given.items():
        if isinstance(v, list):
            for item in v:
                check_value(merged[k], item)
    rest = apply_reference_values(
        {k: v for k, v in given.items() if not isinstance(v, list) or k not in own}, merged, prog, own
    )
    for k in given:
        if k not in rest and k not in own and hasattr(args, k):
            delattr(args, k)


OWN: dict[str, set[str]] = {}  # parser prog -> the flags it defines itself (filled by `own_flags`)


def own_flags(p: argparse.ArgumentParser) -> None:
    """Record the flags `p` defines before the reference-only ones are added."""
    OWN[p.prog] = {a.dest for a in p._actions}
