"""`polyp-ssl eval | probe | count` (and the thin `embed`, `report` entry points).

Every task reads an embeddings file (ROOT/embeddings/{name}.parquet). Give one directly
(`--embeddings`, `--train_embeddings`, ...) or give `--dataset_root` and `--encoder_ckpt` and the
file is made (or reused) by `eval.embed.ensure_embeddings`. The reference code's flags are
accepted; those that only matter when an encoder runs (`--data_aug_*`) are accepted and noted.
"""

from __future__ import annotations

import argparse
import sys

from polyp_ssl.eval.cli_common import (
    CliError,
    add_encoder_flags,
    apply_reference,
    reference_flags,
)
from polyp_ssl.eval.embeddings import EmbeddingsError
from polyp_ssl.eval.errors import run_cli
from polyp_ssl.eval.task_intervals import add_ci_flags
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

BAD_INPUT = (ValueError, FileNotFoundError)  # every input problem is a ValueError subclass here


def embed_main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.embed import main

    return main(argv)


def report_main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.cli_common import track_root_refusal
    from polyp_ssl.eval.report import main

    what = "the report (retrieval, re-id, counting, probes)"
    if (line := track_root_refusal(sys.argv[1:] if argv is None else argv, what)) is not None:
        print(f"polyp-ssl report: error: {line}", file=sys.stderr)
        return 2
    return main(argv)


# -------------------------------------------------------------------------------------- eval


def eval_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl eval",
        description="Retrieval (mAP, HR@1, HR@5) or re-identification (AUROC, AUPR) on tracklet embeddings.",
    )
    p.add_argument("--task", choices=["retrieval", "reid"], required=True, help="the evaluation to run")
    p.add_argument("--embeddings", help="an embeddings file (then no encoder is needed)")
    p.add_argument("--dataset_root", help="ingested root (with --encoder_ckpt, or to check --embeddings)")
    p.add_argument("--split", default=None, help="default: test (or the embeddings file's split)")
    p.add_argument(
        "--scope",
        choices=["split", "video"],
        default="split",
        help="retrieval candidates: every other tracklet of the split (the paper) or of the query's video",
    )
    p.add_argument("--exp_name", default=None, help="name of the output folder (default: from the inputs)")
    p.add_argument("--out", default=None, help="output folder (default {runs_dir or root}/eval/{exp_name})")
    p.add_argument("--runs_dir", default=None, help="folder of runs, for the default output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="replace this command's earlier result in the output folder"
    )
    p.add_argument("--block_memory_mb", type=int, default=512, help="memory for one block of similarities")
    add_ci_flags(p)
    add_encoder_flags(p, fragment_length=-1)
    reference_flags(p, ["reid"])
    return p


def eval_main(argv: list[str] | None = None) -> int:
    p = eval_parser()
    args = p.parse_args(argv)

    def run() -> int:
        apply_reference(p, args, ["reid"])
        from polyp_ssl.eval.cli_run import run_eval

        return run_eval(args)

    return run_cli("polyp-ssl eval", run, BAD_INPUT)


# ------------------------------------------------------------------------------------- probe


def probe_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl probe",
        description="Size or histology probe on frozen fragment embeddings (MLP or linear, trained on CPU).",
    )
    p.add_argument(
        "--task",
        choices=["size", "histology"],
        default=None,
        help="default: inferred as the seed's modules imply: --class_mapping (or --gradient_clip_*) means "
        "histology, --n_classes or --dataset_type means size",
    )
    src = p.add_argument_group("data (ingested roots or embeddings files)")
    src.add_argument("--train_embeddings", help="embeddings file of the training side")
    src.add_argument("--val_embeddings", help="embeddings file of the validation side")
    src.add_argument("--dataset_root", help="ingested root; with one split only, a 70/30 split by polyp")
    src.add_argument("--train_split", default=None, help="default: train (with --dataset_root)")
    src.add_argument("--val_split", default=None, help="default: none, i.e. split --train_split 70/30")
    src.add_argument(
        "--val_dataset_root", help="ingested root of the validation side (default: --dataset_root)"
    )
    src.add_argument("--train_images", help="seed flag: accepted when it lies in an ingested root")
    src.add_argument("--train_annotations", help="seed flag: ROOT/annotations/instances_{split}.json")
    src.add_argument("--val_images", help="seed flag: as --train_images, for the validation side")
    src.add_argument("--val_annotations", help="seed flag: as --train_annotations, for the validation side")
    src.add_argument("--dataset_type", default="coco", help="accepted for compatibility (coco)")
    src.add_argument(
        "--train_fraction", type=float, default=0.7, help="share of polyps on the training side (one split)"
    )
    cls = p.add_argument_group("probe")
    cls.add_argument("--seed", type=int, default=42, help="random seed (split, probe init, data order)")
    cls.add_argument("--max_epochs", type=int, default=20, help="probe training epochs")
    cls.add_argument("--opt_type", choices=["adamw", "sgd"], default="adamw", help="probe optimizer")
    cls.add_argument("--opt_lr", type=float, default=1e-4, help="probe learning rate")
    cls.add_argument("--opt_weight_decay", type=float, default=0.0, help="probe weight decay")
    cls.add_argument(
        "--lr_sched_type", choices=["onecycle", "none"], default="onecycle", help="learning-rate schedule"
    )
    cls.add_argument("--batch_size", type=int, default=64, help="probe training batch size")
    cls.add_argument("--n_classes", type=int, default=2, help="classes of the probe")
    cls.add_argument("--class_mapping", default="ad_vs_hp", help="histology mapping (shards.labels.MAPPINGS)")
    cls.add_argument("--cls_type", choices=["mlp", "linear"], default="mlp", help="probe head")
    cls.add_argument(
        "--cls_init",
        choices=["default", "normal", "xavier", "zeros"],
        default="default",
        help="probe weight init (default: torch's)",
    )
    cls.add_argument("--cls_hidden_dim", type=int, default=256, help="hidden width of the mlp probe")
    cls.add_argument("--cls_use_layer_norm", action="store_true", help="LayerNorm before the linear probe")
    cls.add_argument("--pos_weight", type=float, default=None, help="BCE weight of the positive class")
    cls.add_argument("--gradient_clip_val", type=float, default=None, help="clip gradients at this value")
    cls.add_argument(
        "--gradient_clip_algorithm",
        choices=["norm", "value"],
        default="norm",
        help="with --gradient_clip_val",
    )
    cls.add_argument(
        "--data_fragment_padding_mode",
        choices=["repeat"],
        default=None,
        help="pad the short last fragment by repeating its last frame (also without it, unless "
        "--data_fragment_drop_last)",
    )
    p.add_argument("--exp_name", default=None, help="name of the output folder (default: from the inputs)")
    p.add_argument("--out", default=None, help="output folder (default {runs_dir or root}/eval/{exp_name})")
    p.add_argument("--runs_dir", default=None, help="folder of runs, for the default output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="replace this command's earlier result in the output folder"
    )
    add_ci_flags(p)
    add_encoder_flags(p, fragment_length=8, drop_last=False)
    reference_flags(p, ["size", "histology"])
    return p


def probe_main(argv: list[str] | None = None) -> int:
    p = probe_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)

    def run() -> int:
        if args.task is None:
            from polyp_ssl.eval.outputs import infer_probe_task

            args.task, why = infer_probe_task(argv)
            print(f"probe task: {args.task} ({why}; --task overrides)")
        apply_reference(p, args, ["size", "histology"])
        if args.data_fragment_drop_last and args.data_fragment_padding_mode:
            raise CliError(
                "--data_fragment_padding_mode with --data_fragment_drop_last: a dropped fragment "
                "is not padded (the reference refuses this pair too)"
            )
        from polyp_ssl.eval.cli_run import run_probe_command

        return run_probe_command(args)

    return run_cli("polyp-ssl probe", run, BAD_INPUT)


# ------------------------------------------------------------------------------------- count


def count_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl count",
        description="Polyp counting: cluster each video's tracklets; operating point chosen on val at "
        "pooled pairwise FPR <= --max_fpr; fragmentation rate and FPR reported on test.",
    )
    p.add_argument("--val_embeddings", help="embeddings file of the val split (chooses the operating point)")
    p.add_argument("--test_embeddings", help="embeddings file of the test split (reported)")
    p.add_argument(
        "--dataset_root", help="ingested root (with --encoder_ckpt, or for the tracklets' time spans)"
    )
    p.add_argument("--val_split", default="val", help="split choosing the operating point")
    p.add_argument("--test_split", default="test", help="split reported")
    p.add_argument(
        "--method", choices=["agglomerative", "affinity"], default="agglomerative", help="clustering method"
    )
    p.add_argument(
        "--temporal_constraint", action="store_true", help="tracklets overlapping in time: not linked"
    )
    p.add_argument("--max_fpr", type=float, default=0.05, help="pooled pairwise FPR allowed on val")
    p.add_argument(
        "--grid", type=float, nargs="+", help="thresholds (agglomerative) or preferences (affinity)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the clustering")
    p.add_argument("--exp_name", default=None, help="name of the output folder (default: from the inputs)")
    p.add_argument("--out", default=None, help="output folder (default {runs_dir or root}/eval/{exp_name})")
    p.add_argument("--runs_dir", default=None, help="folder of runs, for the default output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="replace this command's earlier result in the output folder"
    )
    add_ci_flags(p)
    add_encoder_flags(p, fragment_length=-1)
    return p


def count_main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.cli_run import run_count_command

    args = count_parser().parse_args(argv)
    return run_cli("polyp-ssl count", lambda: run_count_command(args), BAD_INPUT)


_apply_reference = apply_reference  # the name tests and scripts know

__all__ = [
    "count_main",
    "embed_main",
    "eval_main",
    "probe_main",
    "report_main",
    "CliError",
    "EmbeddingsError",
]
