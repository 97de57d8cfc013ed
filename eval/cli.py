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

from eval.embeddings import (
    Embeddings,
    EmbeddingsError,
    infer_root,
    polyp_labels,
    read_embeddings,
    read_metadata,
    require_identities,
    tracklet_spans,
)

log = logging.getLogger(__name__)


class CliError(ValueError):
    pass


def embed_main(argv: list[str] | None = None) -> int:
    from eval.embed import main

    return main(argv)


def report_main(argv: list[str] | None = None) -> int:
    from eval.report import main

    return main(argv)


# ------------------------------------------------------------------------------------ shared


def _add_encoder_flags(p: argparse.ArgumentParser, fragment_length: int) -> None:
    g = p.add_argument_group("encoder (when embeddings are computed here)")
    g.add_argument(
        "--encoder_ckpt", help="checkpoint; embeddings are computed once and cached in ROOT/embeddings"
    )
    g.add_argument(
        "--encoder_type", choices=["sfe", "mve", "hmve"], help="expected type; another is an error"
    )
    g.add_argument("--encoder_pooling", choices=["cls", "mean"], default="cls")
    g.add_argument("--encoder_out_dim", type=int, help="expected embedding size; another is an error")
    g.add_argument("--data_fragment_length", type=int, default=fragment_length, help="-1 = whole tracklet")
    g.add_argument("--data_fragment_stride", type=int, default=4)
    g.add_argument("--data_fragment_drop_last", action="store_true", default=True)
    g.add_argument("--data_im_size", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--data_bbox_scale_factor", type=float, default=None, help="default: the checkpoint's")
    g.add_argument(
        "--data_aug_anchorcrop", action="store_true", help="accepted: evaluation always anchor-crops"
    )
    g.add_argument(
        "--data_aug_normalize", action="store_true", help="accepted: the encoder always normalises"
    )
    g.add_argument("--batch_size_embed", type=int, default=32, help="batch size of the embedding run")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (embedding run)")
    g.add_argument("--num_workers", type=int, default=0, help="accepted for compatibility; unused")


def _ensure(args: argparse.Namespace, root: str | Path, split: str) -> Path:
    """The embeddings file of (root, split) for args.encoder_ckpt, computed when missing."""
    from eval.embed import ensure_embeddings

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
        drop_last=args.data_fragment_drop_last,
    )


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not (root / "catalog" / "manifest.json").is_file():
        raise CliError(
            f"{root} is not an ingested root (no catalog/manifest.json); the evaluation reads ingested "
            f"roots: run `polyp-ssl ingest {root} --out OUT` first and pass --dataset_root OUT"
        )
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
    if args.out:
        return Path(args.out)
    name = args.exp_name or default_name
    if args.runs_dir:
        return Path(args.runs_dir) / "eval" / name
    if root is not None:
        return root / "eval" / name
    return Path(emb_path).resolve().parent / "eval" / name


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


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


def _check_dim(args: argparse.Namespace, emb: Embeddings) -> None:
    if args.encoder_out_dim is not None and emb.dim != args.encoder_out_dim:
        raise CliError(f"{emb.path}: vectors are {emb.dim}-d but --encoder_out_dim is {args.encoder_out_dim}")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())
    return bar


# -------------------------------------------------------------------------------------- eval


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyp-ssl eval",
        description="Retrieval (mAP, HR@1, HR@5) or re-identification (AUROC, AUPR) on tracklet embeddings.",
    )
    p.add_argument("--task", choices=["retrieval", "reid"], required=True)
    p.add_argument("--embeddings", help="an embeddings file (then no encoder is needed)")
    p.add_argument("--dataset_root", help="ingested root (with --encoder_ckpt, or to check --embeddings)")
    p.add_argument("--split", default=None, help="default: test (or the embeddings file's split)")
    p.add_argument(
        "--scope",
        choices=["split", "video"],
        default="split",
        help="retrieval candidates: every other tracklet of the split (the paper) or of the query's video",
    )
    p.add_argument("--exp_name", default=None)
    p.add_argument("--out", default=None, help="output folder (default {runs_dir or root}/eval/{exp_name})")
    p.add_argument("--runs_dir", default=None)
    p.add_argument("--block_memory_mb", type=int, default=512, help="memory for one block of similarities")
    _add_encoder_flags(p, fragment_length=-1)
    return p


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    return _run("polyp-ssl eval", lambda: _eval(args))


def _eval_source(args: argparse.Namespace) -> tuple[Embeddings, Path | None, Path]:
    if args.embeddings:
        root = _check_root(args.dataset_root) if args.dataset_root else None
        split = args.split or _default_split(args.embeddings)
        emb, root = _load(args.embeddings, split, root)
        return emb, root, Path(args.embeddings)
    if not (args.dataset_root and args.encoder_ckpt):
        raise CliError("give --embeddings FILE, or --dataset_root ROOT with --encoder_ckpt CKPT")
    root = _check_root(args.dataset_root)
    split = args.split or "test"
    path = _ensure(args, root, split)
    emb, root = _load(path, split, root)
    return emb, root, path


def _eval(args: argparse.Namespace) -> int:
    from eval.metrics import reid_from_vectors, retrieval_from_vectors, rows_per_block

    emb, root, path = _eval_source(args)
    _check_dim(args, emb)
    trk = emb.tracklet_level()
    require_identities(trk)
    out = _out_dir(args, root, path, f"{args.task}_{path.stem}")
    n = len(trk)
    base = {
        "task": args.task,
        "embeddings": str(path),
        "split": sorted({str(s) for s in trk.split}),
        "n_tracklets": n,
        "n_identities": int(np.unique(trk.identity_id.astype(str)).size),
        "n_videos": int(np.unique(trk.video_id.astype(str)).size),
        "embedding_meta": {k: emb.meta.get(k) for k in ("checkpoint_sha256", "manifest_sha256", "params")},
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
    else:
        from eval.plots import pr_png, roc_png

        nb = -(-n // 1024)
        bar = _progress(nb * (nb + 1) // 2, "re-id pair blocks")
        res = reid_from_vectors(trk.vectors, trk.identity_id, progress=bar.update)
        bar.close()
        roc = roc_png(out / "reid_roc.png", res.fpr, res.tpr, res.auroc)
        pr = pr_png(out / "reid_pr.png", res.recall, res.precision, res.aupr, res.n_positive / res.n_pairs)
        metrics = {**base, **res.as_dict(), "figures": [roc.name, pr.name]}
        rows = [
            ("AUROC", res.auroc),
            ("AUPR", res.aupr),
            ("pairs", res.n_pairs),
            ("same-polyp pairs", res.n_positive),
        ]
    rows = [("tracklets", n), ("identities", base["n_identities"]), *rows]
    mpath = _write_json(out / f"metrics_{args.task}.json", metrics)
    print(f"{args.task} on {path.name}:")
    print(_table(rows))
    print(f"wrote {mpath}")
    return 0


# ------------------------------------------------------------------------------------- probe


def probe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyp-ssl probe",
        description="Size or histology probe on frozen fragment embeddings (MLP or linear, trained on CPU).",
    )
    p.add_argument("--task", choices=["size", "histology"], required=True)
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
    src.add_argument("--val_images")
    src.add_argument("--val_annotations")
    src.add_argument("--dataset_type", default="coco", help="accepted for compatibility (coco)")
    src.add_argument("--train_fraction", type=float, default=0.7)
    cls = p.add_argument_group("probe")
    cls.add_argument("--seed", type=int, default=42)
    cls.add_argument("--max_epochs", type=int, default=20)
    cls.add_argument("--opt_type", choices=["adamw", "sgd"], default="adamw")
    cls.add_argument("--opt_lr", type=float, default=1e-4)
    cls.add_argument("--opt_weight_decay", type=float, default=0.0)
    cls.add_argument("--lr_sched_type", choices=["onecycle", "none"], default="onecycle")
    cls.add_argument("--batch_size", type=int, default=64)
    cls.add_argument("--n_classes", type=int, default=2)
    cls.add_argument("--class_mapping", default="ad_vs_hp", help="histology mapping (shards.labels.MAPPINGS)")
    cls.add_argument("--cls_type", choices=["mlp", "linear"], default="mlp")
    cls.add_argument("--cls_init", choices=["default", "xavier", "zeros"], default="default")
    cls.add_argument("--cls_hidden_dim", type=int, default=256)
    p.add_argument("--exp_name", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--runs_dir", default=None)
    _add_encoder_flags(p, fragment_length=8)
    return p


def probe_main(argv: list[str] | None = None) -> int:
    args = probe_parser().parse_args(argv)
    return _run("polyp-ssl probe", lambda: _probe(args))


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
    if not args.encoder_ckpt:
        raise CliError(
            f"embedding split {split!r} of {root} needs --encoder_ckpt (or pass *_embeddings files)"
        )
    f = _ensure(args, root, split)
    return _load(f, split, root)


def _probe(args: argparse.Namespace) -> int:
    from eval.probe import ProbeConfig, ProbeData, run_probe, split_by_identity, task_labels

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
    )
    cfg.validate()

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
        skipped = {"train+val": skipped_tr}
        how = f"{round(args.train_fraction * 100)}/{round((1 - args.train_fraction) * 100)} split by polyp"
    else:
        va, yva, skipped_va = labelled(val_emb, val_root)
        train = ProbeData(tr.vectors, ytr, tr.identity_id)
        val = ProbeData(va.vectors, yva, va.identity_id)
        skipped = {"train": skipped_tr, "val": skipped_va}
        how = "train and val as given"
    res = run_probe(train, val, cfg)
    out = _out_dir(args, train_root, train_emb.path, f"probe_{args.task}_{Path(train_emb.path).stem}")
    result = {
        "task": args.task,
        "split_rule": how,
        "train_embeddings": str(train_emb.path),
        "val_embeddings": str(val_emb.path) if val_emb is not None else None,
        "left_out": skipped,
        **res.as_dict(),
    }
    mpath = _write_json(out / f"probe_{args.task}.json", result)
    m = res.metrics
    rows = [
        ("train rows / polyps", f"{res.n_train} / {res.n_train_polyps}"),
        ("val rows / polyps", f"{res.n_val} / {res.n_val_polyps}"),
        ("accuracy", m["accuracy"]),
        ("balanced accuracy", m["balanced_accuracy"]),
        ("macro F1", m["macro_f1"]),
        ("identity-weighted macro F1", m["identity_weighted_macro_f1"]),
    ]
    left = sum(sum(c.values()) for c in skipped.values())
    if left:
        rows.append(("rows left out (no label)", f"{left} {skipped}"))
    print(f"{args.task} probe ({how}):")
    print(_table(rows))
    print(f"wrote {mpath}")
    return 0


# ------------------------------------------------------------------------------------- count


def count_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyp-ssl count",
        description="Polyp counting: cluster each video's tracklets; operating point chosen on val at "
        "pooled pairwise FPR <= --max_fpr; fragmentation rate and FPR reported on test.",
    )
    p.add_argument("--val_embeddings")
    p.add_argument("--test_embeddings")
    p.add_argument(
        "--dataset_root", help="ingested root (with --encoder_ckpt, or for the tracklets' time spans)"
    )
    p.add_argument("--val_split", default="val")
    p.add_argument("--test_split", default="test")
    p.add_argument("--method", choices=["agglomerative", "affinity"], default="agglomerative")
    p.add_argument(
        "--temporal_constraint", action="store_true", help="tracklets overlapping in time: not linked"
    )
    p.add_argument("--max_fpr", type=float, default=0.05)
    p.add_argument(
        "--grid", type=float, nargs="+", help="thresholds (agglomerative) or preferences (affinity)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exp_name", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--runs_dir", default=None)
    _add_encoder_flags(p, fragment_length=-1)
    return p


def count_main(argv: list[str] | None = None) -> int:
    args = count_parser().parse_args(argv)
    return _run("polyp-ssl count", lambda: _count(args))


def _videos(emb: Embeddings, root: Path | None, temporal: bool):
    from eval.count import group_videos

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
    from eval.count import evaluate_counting

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
        elif root is not None and args.encoder_ckpt:
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
    out = _out_dir(args, test_root, test_emb.path, f"count_{args.method}_{Path(test_emb.path).stem}")
    sw = res.val_sweep
    result = {
        **res.summary(),
        "val_embeddings": str(val_emb.path),
        "test_embeddings": str(test_emb.path),
        "per_video": res.per_video,
        "val_sweep": {"values": sw.values, "fpr": sw.fpr, "fragmentation": sw.fragmentation},
    }
    mpath = _write_json(out / "count.json", result)
    label = "threshold" if args.method == "agglomerative" else "preference"
    print(
        f"polyp counting ({args.method}, temporal constraint {'on' if args.temporal_constraint else 'off'}):"
    )
    print(
        _table(
            [
                (f"{label} (val FPR <= {args.max_fpr})", res.value),
                ("FPR target met on val", res.fpr_target_met),
                ("val FPR / fragmentation", f"{res.val_fpr:.4f} / {res.val_fragmentation:.4f}"),
                ("test FPR", res.test_fpr),
                ("test fragmentation rate", res.test_fragmentation),
            ]
        )
    )
    print("  video             tracklets  polyps  clusters  fragmentation")
    for r in res.per_video:
        print(
            f"  {r['video_id']:<16}  {r['n_tracklets']:>9}  {r['n_polyps']:>6}  {r['n_clusters']:>8}  "
            f"{r['fragmentation']:>13.3f}"
        )
    print(f"wrote {mpath}")
    return 0


__all__ = ["count_main", "embed_main", "eval_main", "probe_main", "report_main", "EmbeddingsError"]
