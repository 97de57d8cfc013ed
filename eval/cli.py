"""`polyp-ssl eval | probe | count` (and the thin `embed`, `report` entry points).

Every task reads an embeddings file (ROOT/embeddings/{name}.parquet). Give one directly
(`--embeddings`, `--train_embeddings`, ...) or give `--dataset_root` and `--encoder_ckpt` and the
file is made (or reused) by `eval.embed.ensure_embeddings`. The reference code's flags are
accepted; those that only matter when an encoder runs (`--data_aug_*`) are accepted and noted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval.embeddings import (
    Embeddings,
    EmbeddingsError,
    infer_root,
    polyp_labels,
    read_embeddings,
    read_metadata,
    require_identities,
    tracklet_spans,
)
from polyp_ssl.eval.task_intervals import CiOptions, add_ci_flags, ci_options
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

log = logging.getLogger(__name__)


class CliError(ValueError):
    pass


def embed_main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.embed import main

    return main(argv)


def report_main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.report import main

    return main(argv)


# ------------------------------------------------------------------------------------ shared


def _add_encoder_flags(p: argparse.ArgumentParser, fragment_length: int, drop_last: bool = True) -> None:
    from polyp_ssl.eval.embed import (
        DEFAULT_FRAME_BUDGET,
        DEFAULT_MAX_FRAMES,
        DEFAULT_MIN_TRACKLET_FRAMES,
        add_cache_flag,
    )
    from polyp_ssl.eval.reference_flags import ENCODER_CHOICES, POOLING_CHOICES

    g = p.add_argument_group("encoder (when embeddings are computed here)")
    g.add_argument(
        "--encoder_ckpt",
        help="checkpoint; embeddings are computed once and cached (ROOT/embeddings, or the user cache "
        "when the root is read-only: --cache_dir)",
    )
    g.add_argument(
        "--encoder",
        type=_encoder_choice,
        default=None,
        help="zoo:NAME: a foundation-model baseline from local --weights instead of --encoder_ckpt "
        "(docs/zoo.md); descriptor: the synthetic data's hand-made descriptor",
    )
    g.add_argument("--weights", help="zoo encoders: the locally downloaded weights file or snapshot folder")
    g.add_argument(
        "--encoder_type", choices=ENCODER_CHOICES, help="expected type (sfe, mve, hmve); another is an error"
    )
    g.add_argument("--encoder_pooling", choices=POOLING_CHOICES, default="cls", help="cls or mean")
    g.add_argument("--encoder_out_dim", type=int, help="expected embedding size; another is an error")
    g.add_argument("--data_fragment_length", type=int, default=fragment_length, help="-1 = whole tracklet")
    g.add_argument("--data_fragment_stride", type=int, default=4, help="take every N-th frame of a tracklet")
    g.add_argument(
        "--data_fragment_drop_last",
        action="store_true",
        default=drop_last,
        help="drop a tracklet's short last fragment (else pad it by repeating its last frame)",
    )
    g.add_argument("--data_im_size", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--data_bbox_scale_factor", type=float, default=None, help="default: the checkpoint's")
    g.add_argument(
        "--data_aug_anchorcrop",
        action="store_true",
        help="the deterministic anchor crop (the reference's meaning); required when an encoder runs: "
        "the root stores crops, not whole frames",
    )
    g.add_argument(
        "--data_aug_normalize", action="store_true", help="accepted: the encoder always normalises"
    )
    g.add_argument(
        "--min_tracklet_frames",
        type=int,
        default=DEFAULT_MIN_TRACKLET_FRAMES,
        help="tracklets with fewer frames are left out (default 30, the paper's protocol)",
    )
    g.add_argument(
        "--max_frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help="cap whole tracklets at this many strided frames (default: no cap, the paper's protocol)",
    )
    g.add_argument(
        "--frame_budget", type=int, default=DEFAULT_FRAME_BUDGET, help="padded frames per embedding batch"
    )
    g.add_argument("--batch_size_embed", type=int, default=32, help="batch size of the embedding run")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (embedding run)")
    g.add_argument("--num_workers", type=int, default=0, help="accepted for compatibility; unused")
    add_cache_flag(g)


def _encoder_choice(text: str) -> str:
    from polyp_ssl.eval.embed import encoder_choice

    return encoder_choice(text)


def _has_encoder(args: argparse.Namespace) -> bool:
    """An encoder to run: --encoder_ckpt, or --encoder zoo:NAME / descriptor."""
    return bool(args.encoder_ckpt or getattr(args, "encoder", None) not in (None, "checkpoint"))


def _ensure(args: argparse.Namespace, root: str | Path, split: str) -> Path:
    """The embeddings file of (root, split) for args.encoder_ckpt (or --encoder), computed when missing."""
    from polyp_ssl.eval.embed import DESCRIPTOR, ensure_embeddings

    encoder = getattr(args, "encoder", None) or "checkpoint"
    # the hand-made descriptor reads the stored crops' box regions: no anchor crop to choose
    if not args.data_aug_anchorcrop and DESCRIPTOR not in (str(args.encoder_ckpt), encoder):
        raise CliError(
            "--data_aug_anchorcrop not given: without it the reference code embeds whole frames, but an "
            "ingested root stores only the crop around each box; pass --data_aug_anchorcrop (the "
            "deterministic anchor crop, as in the paper's commands)"
        )
    if args.encoder_type not in (None, "sfe", "mve", "hmve"):
        raise CliError(f"--encoder_type {args.encoder_type}: an encoder polyp-ssl does not build")
    return ensure_embeddings(
        root,
        args.encoder_ckpt,
        split=split,
        fragment_length=args.data_fragment_length,
        fragment_stride=args.data_fragment_stride,
        im_size=args.data_im_size,
        bbox_scale_factor=args.data_bbox_scale_factor,
        pooling=args.encoder_pooling,
        batch_size=args.batch_size_embed,
        device=args.device,
        encoder_type=args.encoder_type,
        encoder=encoder,
        weights=getattr(args, "weights", None),
        drop_last=args.data_fragment_drop_last,
        min_tracklet_frames=args.min_tracklet_frames,
        max_frames=args.max_frames,
        frame_budget=args.frame_budget,
        cache=_cache(args, root),
    )


def _cache(args: argparse.Namespace, root: str | Path):
    """Where `root`'s embeddings are cached (eval.embed.resolve_cache), said in one line the first
    time a command asks for that root."""
    from polyp_ssl.eval.embed import resolve_cache

    said = vars(args).setdefault("_caches", {})
    key = str(Path(root).resolve())
    if key not in said:
        said[key] = resolve_cache(root, args.cache_dir)
        print(said[key].describe())
    return said[key]


def _check_root(root: str | Path) -> Path:
    from polyp_ssl.shards.catalog import NoCatalogError, require_catalog

    root = Path(root)
    try:
        require_catalog(root)
    except NoCatalogError as e:  # the one "no catalog" message of every command, exit 2
        raise CliError(str(e)) from None
    return root


def _load(path: str | Path, split: str | None, root: str | Path | None) -> tuple[Embeddings, Path | None]:
    """Read a file, checked against `root` (or the root it lives in / names)."""
    if root is None:
        meta = read_metadata(path) if Path(path).is_file() else {}
        root = infer_root(path, meta)
    emb = read_embeddings(path, split=split, root=root)
    return emb, (Path(root) if root is not None else None)


def _default_split(path: str | Path) -> str | None:
    """The split recorded in a file's parameters (None: use every row)."""
    try:
        meta = read_metadata(path)
    except Exception:  # unreadable: read_embeddings will say why
        return None
    return (meta.get("params") or {}).get("split") or meta.get("split")


def _out_dir(
    args: argparse.Namespace, root: Path | None, emb_path: str | Path | None, default_name: str
) -> Path:
    """--out as given; else a folder named by what produced the result (eval.outputs.output_name),
    prefixed by --exp_name: two runs that differ in any input never share a folder. --exp_name
    is one plain name (shards.ids), so the folder stays inside `{runs_dir or root}/eval`."""
    if args.out:
        return Path(args.out)
    if args.exp_name:
        from polyp_ssl.shards.ids import path_component

        path_component(args.exp_name, "--exp_name")  # UnsafeIdError (a ValueError): exit 2
    name = f"{args.exp_name}_{default_name}" if args.exp_name else default_name
    if args.runs_dir:
        return Path(args.runs_dir) / "eval" / name
    if root is not None:
        return _writable_default(root / "eval" / name)
    return _writable_default(Path(emb_path).resolve().parent / "eval" / name)


def _writable_default(out: Path) -> Path:
    """The default output folder (in the dataset root, or beside the embeddings file) when it can
    be written; on a read-only mount an error naming --out / --runs_dir (a root is never written)."""
    from polyp_ssl.shards.embeddings_cache import writable_folder

    existing = next((p for p in (out, *out.parents) if p.is_dir()), None)
    if existing is not None and not writable_folder(existing):
        raise CliError(
            f"{existing} is not writable (a read-only dataset root?): give --out DIR or --runs_dir DIR "
            "for the outputs"
        )
    return out


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _write_result(out: Path, name: str, obj: Any, overwrite: bool, stage: Path | None = None) -> Path:
    """The result JSON `name` (with the figures already in `stage`) put into `out` complete; an
    earlier run's result there is refused unless --overwrite (eval.outputs)."""
    from polyp_ssl.eval.outputs import new_stage, publish, refuse_existing

    refuse_existing(out, [name], overwrite)
    stage = stage or new_stage(out)
    _write_json(stage / name, obj)
    return publish(stage, out, name)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    out = []
    for k, v in rows:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        out.append(f"  {k:<{width}}  {text}")
    return "\n".join(out)


def _run(prog: str, fn: Callable[[], int]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except (ValueError, FileNotFoundError) as e:  # every input problem is a ValueError subclass here
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _protocol(emb: Embeddings) -> str:
    """The evaluation protocol that produced an embeddings file (older files: from its parameters)."""
    from polyp_ssl.eval.embed import protocol_string

    if emb.meta.get("protocol"):
        return str(emb.meta["protocol"])
    params = emb.meta.get("params") or {}
    return protocol_string({**params, "min_tracklet_frames": params.get("min_tracklet_frames", 0)})


def _check_dim(args: argparse.Namespace, emb: Embeddings) -> None:
    if args.encoder_out_dim is not None and emb.dim != args.encoder_out_dim:
        raise CliError(f"{emb.path}: vectors are {emb.dim}-d but --encoder_out_dim is {args.encoder_out_dim}")


_TRAINING: dict[str, dict[str, Any]] = {}


def _training_config(emb: Embeddings) -> dict[str, Any]:
    """The flat training config of the checkpoint that made `emb` ({} for other encoders, or when
    the checkpoint is no longer where the file says)."""
    spec = emb.meta.get("checkpoint")
    if not spec or emb.meta.get("encoder_kind") not in (None, "checkpoint") or not Path(spec).is_file():
        return {}
    key = str(Path(spec).resolve())
    if key not in _TRAINING:
        from polyp_ssl.checkpoint import read_encoder_state
        from polyp_ssl.eval.embed import flat_config

        try:
            _TRAINING[key] = flat_config(read_encoder_state(spec)[1])
        except Exception as e:  # the embeddings are already made: comparing settings is a courtesy
            log.warning("%s: training settings not readable (%s); not compared", spec, e)
            _TRAINING[key] = {}
    return _TRAINING[key]


def _provenance(prog: str, side: str, emb: Embeddings, root: Path | None) -> dict[str, Any]:
    """Where one side's vectors come from (root, split, encoder), its settings that differ from the
    checkpoint's training settings and whether it is the encoder's own training split; the
    differences and the overlap are printed as one warning line each."""
    from polyp_ssl.eval.outputs import setting_mismatches, training_split_overlap

    splits = sorted({str(s) for s in emb.split})
    training = _training_config(emb)
    differ = setting_mismatches(emb.meta.get("params") or {}, training)
    overlap = [o for s in splits if (o := training_split_overlap(root, s, training))]
    for line in differ:
        print(f"{prog}: warning: {side}: {line}", file=sys.stderr)
    for o in overlap:
        print(
            f"{prog}: warning: {side} split {o} is the split the encoder was trained on "
            f"({emb.meta.get('checkpoint')}); its numbers are not held-out results",
            file=sys.stderr,
        )
    return {
        "dataset_root": str(root.resolve()) if root is not None else emb.meta.get("dataset_root"),
        "split": splits,
        "embeddings": str(emb.path),
        "settings_differ_from_training": differ,
        "encoder_training_split": bool(overlap),
    }


def _name_inputs(emb: Embeddings) -> dict[str, Any]:
    """What identifies an embeddings file's vectors in an output name."""
    key = emb.meta.get("cache_key") or str(Path(emb.path).resolve())
    return {"key": key, "root": emb.meta.get("dataset_root")}


def _with_intervals(
    metrics: dict[str, Any],
    stats: dict[str, Any],
    ci: CiOptions,
    rows: list[tuple[str, Any]],
    row_metric: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`metrics` plus {name_ci: [low, high]} for every statistic, and the interval settings under
    "ci"; the table row of a metric (named as the metric, or by `row_metric`: row label -> metric)
    gets its interval appended. Nothing changes when the intervals are disabled."""
    from polyp_ssl.eval.intervals import interval_entries
    from polyp_ssl.eval.task_intervals import intervals

    ivs = intervals(stats, ci)
    if not ivs:
        return metrics
    n_units = {iv.n_units for iv in ivs.values()}
    out = {**metrics, **interval_entries(ivs)}
    out["ci"] = {**ci.as_dict(), "n_units": max(n_units)}
    for i, (k, v) in enumerate(rows):
        key = (row_metric or {}).get(k, k)
        if key in ivs and isinstance(v, float):
            rows[i] = (k, f"{v:.4f} [{ivs[key].low:.4f}, {ivs[key].high:.4f}]")
    return out


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())
    return bar


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
    _add_encoder_flags(p, fragment_length=-1)
    _reference_flags(p, ["reid"])
    return p


def _reference_flags(p: argparse.ArgumentParser, clis: list[str]) -> None:
    from polyp_ssl.eval.reference_flags import TABLES, add_missing_flags, own_flags

    own_flags(p)
    add_missing_flags(p, [TABLES[c] for c in clis])


def _apply_reference(p: argparse.ArgumentParser, args: argparse.Namespace, clis: list[str]) -> None:
    """The reference flags' notices and refusals (eval.reference_flags), then their meaning here."""
    from polyp_ssl.eval.reference_flags import TABLES, apply

    stages = getattr(args, "stages", None)
    apply(p, args, [TABLES[c] for c in clis], p.prog)
    if stages and "reid" in clis:
        splits = {"test": "test", "validate": "val"}
        bad = [s for s in stages if s not in splits]
        if bad or len(stages) != 1:
            raise CliError(f"--stages {' '.join(stages)}: give one of test, validate (one run per stage)")
        if args.split and args.split != splits[stages[0]]:
            raise CliError(f"--stages {stages[0]} and --split {args.split} disagree")
        args.split = splits[stages[0]]
    if getattr(args, "encoder_features_source", None) not in (None, "encoder"):
        raise CliError("--encoder_features_source projector: not supported (embeddings are the encoder's)")
    if args.encoder_pooling not in ("cls", "mean"):
        raise CliError(
            f"--encoder_pooling {args.encoder_pooling}: a pooling of the reference's other encoders; "
            "hmve embeds with cls or mean"
        )


def eval_main(argv: list[str] | None = None) -> int:
    p = eval_parser()
    args = p.parse_args(argv)

    def run() -> int:
        _apply_reference(p, args, ["reid"])
        return _eval(args)

    return _run("polyp-ssl eval", run)


def _eval_source(args: argparse.Namespace) -> tuple[Embeddings, Path | None, Path]:
    if args.embeddings:
        root = _check_root(args.dataset_root) if args.dataset_root else None
        split = args.split or _default_split(args.embeddings)
        emb, root = _load(args.embeddings, split, root)
        return emb, root, Path(args.embeddings)
    if not (args.dataset_root and _has_encoder(args)):
        raise CliError(
            "give --embeddings FILE, or --dataset_root ROOT with --encoder_ckpt CKPT (or --encoder zoo:NAME "
            "--weights PATH)"
        )
    root = _check_root(args.dataset_root)
    split = args.split or "test"
    path = _ensure(args, root, split)
    emb, root = _load(path, split, root)
    return emb, root, path


def _eval(args: argparse.Namespace) -> int:
    from polyp_ssl.eval.metrics import reid_from_vectors, retrieval_from_vectors, rows_per_block

    ci = ci_options(args)
    emb, root, path = _eval_source(args)
    _check_dim(args, emb)
    from polyp_ssl.eval.outputs import encoder_label, output_name

    trk = emb.tracklet_level()
    require_identities(trk)
    source = _provenance("polyp-ssl eval", "evaluation", emb, root)
    protocol = _protocol(emb)
    name_inputs = {**_name_inputs(emb), "scope": args.scope if args.task == "retrieval" else None}
    name = output_name(args.task, encoder_label(emb.meta, path), source["split"], protocol, name_inputs)
    out = _out_dir(args, root, path, name)
    from polyp_ssl.eval.outputs import new_stage, refuse_existing

    refuse_existing(out, [f"metrics_{args.task}.json"], args.overwrite)  # before any work
    stage = None
    n = len(trk)
    base = {
        "task": args.task,
        "embeddings": str(path),
        "dataset_root": source["dataset_root"],
        "settings_differ_from_training": source["settings_differ_from_training"],
        "encoder_training_split": source["encoder_training_split"],
        "split": sorted({str(s) for s in trk.split}),
        "n_tracklets": n,
        "n_identities": int(np.unique(trk.identity_id.astype(str)).size),
        "n_videos": int(np.unique(trk.video_id.astype(str)).size),
        "embedding_meta": {k: emb.meta.get(k) for k in ("checkpoint_sha256", "manifest_sha256", "params")},
        "protocol": protocol,
    }
    if args.task == "retrieval":
        memory = args.block_memory_mb * 2**20
        bar = _progress(n, "retrieval queries")
        res = retrieval_from_vectors(
            trk.vectors,
            trk.identity_id,
            video=trk.video_id,
            scope=args.scope,
            memory_bytes=memory,
            rows_per_chunk=rows_per_block(n, memory_bytes=memory),
            progress=bar.update,
        )
        bar.close()
        metrics = {**base, "scope": args.scope, **res.as_dict()}
        rows = [
            ("mAP", res.mAP),
            ("HR@1", res.hr[1]),
            ("HR@5", res.hr[5]),
            ("queries", res.n_queries),
            ("excluded (no positive)", res.n_excluded),
        ]
        if ci.enabled:
            from polyp_ssl.eval.task_intervals import retrieval_stats

            stats = retrieval_stats(res.ap, res.hits, res.valid, trk.identity_id, trk.video_id, ci.unit)
            metrics = _with_intervals(metrics, stats, ci, rows)
    else:
        from polyp_ssl.eval.plots import pr_png, roc_png

        nb = -(-n // 1024)
        bar = _progress(nb * (nb + 1) // 2, "re-id pair blocks")
        res = reid_from_vectors(trk.vectors, trk.identity_id, progress=bar.update)
        bar.close()
        stage = new_stage(out)  # the figures and the JSON go in together (eval.outputs.publish)
        roc = roc_png(stage / "reid_roc.png", res.fpr, res.tpr, res.auroc)
        pr = pr_png(stage / "reid_pr.png", res.recall, res.precision, res.aupr, res.n_positive / res.n_pairs)
        metrics = {**base, **res.as_dict(), "figures": [roc.name, pr.name]}
        rows = [
            ("AUROC", res.auroc),
            ("AUPR", res.aupr),
            ("pairs", res.n_pairs),
            ("same-polyp pairs", res.n_positive),
        ]
        if ci.enabled:
            from polyp_ssl.eval.task_intervals import reid_stats

            stats = reid_stats(trk.vectors, trk.identity_id, trk.video_id, ci.unit)
            metrics = _with_intervals(metrics, stats, ci, rows)
    rows = [("protocol", base["protocol"]), ("tracklets", n), ("identities", base["n_identities"]), *rows]
    mpath = _write_result(out, f"metrics_{args.task}.json", metrics, args.overwrite, stage)
    print(f"{args.task} on {path.name}:")
    print(_table(rows))
    print(f"wrote {mpath}")
    return 0


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
    _add_encoder_flags(p, fragment_length=8, drop_last=False)
    _reference_flags(p, ["size", "histology"])
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
        _apply_reference(p, args, ["size", "histology"])
        if args.data_fragment_drop_last and args.data_fragment_padding_mode:
            raise CliError(
                "--data_fragment_padding_mode with --data_fragment_drop_last: a dropped fragment "
                "is not padded (the reference refuses this pair too)"
            )
        return _probe(args)

    return _run("polyp-ssl probe", run)


def _raw_to_ingested(images: str | None, annotations: str | None, flag: str) -> tuple[Path, str] | None:
    """Map the seed's --*_images/--*_annotations to (ingested root, split)."""
    if not annotations and not images:
        return None
    if annotations:
        ann = Path(annotations)
        name = ann.stem
        if not name.startswith("instances_"):
            raise CliError(f"--{flag}_annotations {ann}: expected a file named instances_{{split}}.json")
        split = name[len("instances_") :]
        root = ann.parent.parent
    else:
        raise CliError(f"--{flag}_images needs --{flag}_annotations (the split is read from its name)")
    if not (root / "catalog" / "manifest.json").is_file():
        raise CliError(
            f"--{flag}_annotations {ann} is a raw dataset file; the probe reads ingested roots. Run "
            f"`polyp-ssl ingest {root} --out OUT` first, then pass --dataset_root OUT "
            f"(--train_split/--val_split) or --train_embeddings/--val_embeddings"
        )
    return root, split


def _side(args: argparse.Namespace, path: str | None, root: Path | None, split: str | None):
    """(Embeddings, root) of one side: a given file, or embedded here from (root, split)."""
    if path:
        return _load(path, _default_split(path), root)
    if root is None or split is None:
        return None, None
    if not _has_encoder(args):
        raise CliError(
            f"embedding split {split!r} of {root} needs --encoder_ckpt (or pass *_embeddings files)"
        )
    f = _ensure(args, root, split)
    return _load(f, split, root)


def _probe(args: argparse.Namespace) -> int:
    from collections import Counter

    from polyp_ssl.eval.probe import (
        OneClassError,
        ProbeConfig,
        ProbeData,
        count_by_vocabulary,
        protocol_hint,
        run_probe,
        split_by_identity,
        task_labels,
    )

    ci = ci_options(args)
    train_raw = _raw_to_ingested(args.train_images, args.train_annotations, "train")
    val_raw = _raw_to_ingested(args.val_images, args.val_annotations, "val")
    root = _check_root(args.dataset_root) if args.dataset_root else None
    train_root, train_split = train_raw or (root, args.train_split or "train")
    val_root = _check_root(args.val_dataset_root) if args.val_dataset_root else root
    val_root, val_split = val_raw or (val_root, args.val_split)
    if args.train_embeddings is None and train_root is None:
        raise CliError(
            "give --train_embeddings FILE, or --dataset_root ROOT (or the seed's --train_annotations)"
        )
    train_emb, train_root = _side(args, args.train_embeddings, train_root, train_split)
    val_emb, val_root = _side(args, args.val_embeddings, val_root, val_split)
    _check_dim(args, train_emb)
    if val_emb is not None and val_emb.dim != train_emb.dim:
        raise CliError(
            f"train embeddings {train_emb.path} are {train_emb.dim}-d but val embeddings {val_emb.path} "
            f"are {val_emb.dim}-d"
        )
    cfg = ProbeConfig(
        n_classes=args.n_classes,
        cls_type=args.cls_type,
        cls_hidden_dim=args.cls_hidden_dim,
        cls_init=args.cls_init,
        opt_type=args.opt_type,
        opt_lr=args.opt_lr,
        opt_weight_decay=args.opt_weight_decay,
        lr_sched_type=args.lr_sched_type,
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        cls_use_layer_norm=args.cls_use_layer_norm,
        pos_weight=args.pos_weight,
        gradient_clip_val=args.gradient_clip_val,
        gradient_clip_algorithm=args.gradient_clip_algorithm,
    )
    cfg.validate()

    vocab_counts: dict[str, Counter] = {}

    def labelled(emb: Embeddings, r: Path | None) -> tuple[Embeddings, np.ndarray, dict]:
        if r is None:
            raise CliError(f"{emb.path}: cannot find its ingested root for labels; pass --dataset_root")
        labels = polyp_labels(r)
        y, skipped = task_labels(
            [str(i) for i in emb.identity_id],
            args.task,
            labels.size_mm,
            labels.histology,
            labels.dataset_id,
            args.class_mapping,
        )
        if args.task == "histology":  # polyps per dataset vocabulary and class, printed below
            ids = [str(i) for i in emb.identity_id]
            for vocab, c in count_by_vocabulary(ids, y, labels.dataset_id).items():
                vocab_counts.setdefault(vocab, Counter()).update(c)
        keep = y >= 0
        if not keep.any():
            raise CliError(
                f"{emb.path}: no row has a {args.task} label (left out: {dict(skipped) or 'none'}); "
                f"the split has no {args.task} labels"
            )
        return emb.subset(keep), y[keep], dict(skipped)

    tr, ytr, skipped_tr = labelled(train_emb, train_root)
    if val_emb is None:
        mtr, mva = split_by_identity(tr.identity_id, ytr, args.train_fraction, args.seed)
        train = ProbeData(tr.vectors[mtr], ytr[mtr], tr.identity_id[mtr])
        val = ProbeData(tr.vectors[mva], ytr[mva], tr.identity_id[mva])
        val_video = tr.video_id[mva]
        skipped = {"train+val": skipped_tr}
        how = f"{round(args.train_fraction * 100)}/{round((1 - args.train_fraction) * 100)} split by polyp"
    else:
        va, yva, skipped_va = labelled(val_emb, val_root)
        train = ProbeData(tr.vectors, ytr, tr.identity_id)
        val = ProbeData(va.vectors, yva, va.identity_id)
        val_video = va.video_id
        skipped = {"train": skipped_tr, "val": skipped_va}
        how = "train and val as given"
    from dataclasses import asdict

    from polyp_ssl.eval.outputs import encoder_label, output_name

    prog = "polyp-ssl probe"
    train_src = _provenance(prog, "probe train side", train_emb, train_root)
    val_src = _provenance(prog, "probe val side", val_emb, val_root) if val_emb is not None else None
    trains_on = f"{train_src['dataset_root']} split {'+'.join(train_src['split'])}"
    if val_src is None:
        evaluates_on = f"the other {round((1 - args.train_fraction) * 100)}% of its polyps"
        trains_on += f" ({round(args.train_fraction * 100)}% of its polyps)"
    else:
        evaluates_on = f"{val_src['dataset_root']} split {'+'.join(val_src['split'])}"
    print(f"{args.task} probe trains on {trains_on} and evaluates on {evaluates_on}")
    try:
        res = run_probe(train, val, cfg)
    except OneClassError as e:  # name what the protocol left and the flag that keeps more
        raise CliError(f"{train_emb.path}: {e}; {protocol_hint([train_emb])}") from None
    val_part = val_src["split"] if val_src else [f"{round(args.train_fraction * 100)}pct"]
    splits = [*train_src["split"], *val_part]
    name_inputs = {
        "train": _name_inputs(train_emb),
        "val": _name_inputs(val_emb) if val_emb is not None else None,
        "probe": asdict(cfg),
        "train_fraction": args.train_fraction if val_emb is None else None,
        "class_mapping": args.class_mapping if args.task == "histology" else None,
    }
    out = _out_dir(
        args,
        train_root,
        train_emb.path,
        output_name(
            args.task,
            encoder_label(train_emb.meta, train_emb.path),
            splits,
            _protocol(train_emb),
            name_inputs,
            prefix="probe",
        ),
    )
    result = {
        "task": args.task,
        "split_rule": how,
        "trains_on": trains_on,
        "evaluates_on": evaluates_on,
        "train_side": train_src,
        "val_side": val_src,
        "train_embeddings": str(train_emb.path),
        "val_embeddings": str(val_emb.path) if val_emb is not None else None,
        "left_out": skipped,
        "polyps_by_vocabulary": {v: dict(sorted(c.items())) for v, c in sorted(vocab_counts.items())},
        "protocol": _protocol(train_emb),
        **res.as_dict(),
    }
    m = res.metrics
    rows = [
        ("train rows / polyps", f"{res.n_train} / {res.n_train_polyps}"),
        ("val rows / polyps", f"{res.n_val} / {res.n_val_polyps}"),
        ("accuracy", m["accuracy"]),
        ("balanced accuracy", m["balanced_accuracy"]),
        ("macro F1", m["macro_f1"]),
        ("identity-weighted macro F1", m["identity_weighted_macro_f1"]),
    ]
    if ci.enabled:
        from polyp_ssl.eval.task_intervals import probe_stats

        stats = probe_stats(res.y_true, res.y_pred, val.identity, val_video, ci.unit)
        names = {
            "balanced accuracy": "balanced_accuracy",
            "macro F1": "macro_f1",
            "identity-weighted macro F1": "identity_weighted_macro_f1",
        }
        with_ci = _with_intervals(result["metrics"], stats, ci, rows, names)
        result["ci"] = with_ci.pop("ci")
        result["metrics"] = with_ci
    mpath = _write_result(out, f"probe_{args.task}.json", result, args.overwrite)
    left = sum(sum(c.values()) for c in skipped.values())
    for vocab, c in sorted(vocab_counts.items()):
        rows.append((f"polyps, {vocab} vocabulary", ", ".join(f"{k} {n}" for k, n in sorted(c.items()))))
    if left:
        rows.append(("rows left out (no label)", f"{left} {skipped}"))
    if res.degenerate:  # numbers that say nothing about the embeddings are flagged, not just printed
        rows.append(("DEGENERATE", res.degenerate))
    print(f"{args.task} probe ({how}):")
    print(_table(rows))
    if res.degenerate:
        print(f"warning: degenerate probe ({res.degenerate}); its metrics say nothing about the embeddings")
    print(f"wrote {mpath}")
    return 0


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
    _add_encoder_flags(p, fragment_length=-1)
    return p


def count_main(argv: list[str] | None = None) -> int:
    args = count_parser().parse_args(argv)
    return _run("polyp-ssl count", lambda: _count(args))


def _videos(emb: Embeddings, root: Path | None, temporal: bool):
    from polyp_ssl.eval.count import group_videos

    trk = emb.tracklet_level()
    require_identities(trk)
    ends = trk.start_frame
    if root is not None:
        spans = tracklet_spans(root)
        missing = [t for t in trk.tracklet_id if t not in spans]
        if missing:
            raise CliError(
                f"{emb.path}: {len(missing)} tracklets not in {root}/catalog (first: {missing[0]!r})"
            )
        ends = np.array([spans[t][1] for t in trk.tracklet_id], dtype=np.int64)
    elif temporal:
        raise CliError(
            f"{emb.path}: --temporal_constraint needs the tracklets' end frames: pass --dataset_root"
        )
    return group_videos(trk.video_id, trk.identity_id, trk.vectors, trk.start_frame, ends)


def _count(args: argparse.Namespace) -> int:
    from polyp_ssl.eval.count import evaluate_counting

    ci = ci_options(args)
    if not 0 <= args.max_fpr <= 1:
        raise CliError(f"--max_fpr must be in [0, 1], got {args.max_fpr}")
    root = _check_root(args.dataset_root) if args.dataset_root else None
    sides = {}
    for side, path, split in (
        ("val", args.val_embeddings, args.val_split),
        ("test", args.test_embeddings, args.test_split),
    ):
        if path:
            sides[side] = _load(path, _default_split(path), root)
        elif root is not None and _has_encoder(args):
            sides[side] = _load(_ensure(args, root, split), split, root)
        else:
            raise CliError(f"give --{side}_embeddings FILE, or --dataset_root ROOT with --encoder_ckpt CKPT")
    (val_emb, val_root), (test_emb, test_root) = sides["val"], sides["test"]
    if val_emb.dim != test_emb.dim:
        raise CliError(f"val embeddings are {val_emb.dim}-d but test embeddings are {test_emb.dim}-d")
    val = _videos(val_emb, val_root, args.temporal_constraint)
    test = _videos(test_emb, test_root, args.temporal_constraint)
    res = evaluate_counting(
        val, test, args.method, args.temporal_constraint, args.max_fpr, args.grid, args.seed
    )
    from polyp_ssl.eval.outputs import encoder_label, output_name

    val_src = _provenance("polyp-ssl count", "val side", val_emb, val_root)
    test_src = _provenance("polyp-ssl count", "test side", test_emb, test_root)
    name_inputs = {
        "val": _name_inputs(val_emb),
        "test": _name_inputs(test_emb),
        "method": args.method,
        "temporal_constraint": args.temporal_constraint,
        "max_fpr": args.max_fpr,
        "grid": args.grid,
        "seed": args.seed,
    }
    out = _out_dir(
        args,
        test_root,
        test_emb.path,
        output_name(
            f"count-{args.method}",
            encoder_label(test_emb.meta, test_emb.path),
            [*val_src["split"], *test_src["split"]],
            _protocol(test_emb),
            name_inputs,
        ),
    )
    sw = res.val_sweep
    summary = res.summary()
    label = "threshold" if args.method == "agglomerative" else "preference"
    rows = [
        (f"{label} (val FPR <= {args.max_fpr})", res.value),
        ("FPR target met on val", res.fpr_target_met),
        ("val FPR / fragmentation", f"{res.val_fpr:.4f} / {res.val_fragmentation:.4f}"),
        ("test FPR", res.test_fpr),
        ("test fragmentation rate", res.test_fragmentation),
    ]
    if ci.enabled:  # counting clusters within a video: the unit is the video whatever --ci_unit says
        from dataclasses import replace

        from polyp_ssl.eval.task_intervals import count_stats

        stats = {f"test_{k.lower()}": v for k, v in count_stats(res.per_video).items()}
        names = {"test FPR": "test_fpr", "test fragmentation rate": "test_fragmentation_rate"}
        summary = _with_intervals(summary, stats, replace(ci, unit="video"), rows, names)
    result = {
        **summary,
        "val_side": val_src,
        "test_side": test_src,
        "val_embeddings": str(val_emb.path),
        "test_embeddings": str(test_emb.path),
        "protocol": _protocol(test_emb),
        "per_video": res.per_video,
        "val_sweep": {"values": sw.values, "fpr": sw.fpr, "fragmentation": sw.fragmentation},
    }
    mpath = _write_result(out, "count.json", result, args.overwrite)
    print(
        f"polyp counting ({args.method}, temporal constraint {'on' if args.temporal_constraint else 'off'}):"
    )
    print(_table(rows))
    print("  video             tracklets  polyps  clusters  fragmentation")
    for r in res.per_video:
        print(
            f"  {r['video_id']:<16}  {r['n_tracklets']:>9}  {r['n_polyps']:>6}  {r['n_clusters']:>8}  "
            f"{r['fragmentation']:>13.3f}"
        )
    print(f"wrote {mpath}")
    return 0


__all__ = ["count_main", "embed_main", "eval_main", "probe_main", "report_main", "EmbeddingsError"]
