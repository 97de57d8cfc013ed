"""The bodies of `polyp-ssl eval | probe | count`: read (or make) the embeddings, call the task
(eval.tasks), write the result JSON and print the table."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval.cli_common import (
    CliError,
    check_dim,
    check_root,
    default_split,
    ensure_file,
    eval_source,
    file_name_inputs,
    format_rows,
    has_encoder,
    load_file,
    output_dir,
    probe_side,
    progress_bar,
    protocol_of,
    raw_to_ingested,
    refuse_track_root,
    side_provenance,
    with_intervals,
    write_result,
)
from polyp_ssl.eval.embeddings import Embeddings, polyp_labels, require_identities, tracklet_spans
from polyp_ssl.eval.task_intervals import CiOptions, ci_options

# ------------------------------------------------------------------------------------ eval


def run_eval(args: argparse.Namespace) -> int:
    from polyp_ssl.eval.outputs import encoder_label, output_name, refuse_existing

    ci = ci_options(args)
    refuse_track_root(args.dataset_root, f"{args.task} scoring")
    emb, root, path = eval_source(args)
    check_dim(args, emb)
    trk = emb.tracklet_level()
    require_identities(trk)
    source = side_provenance("polyp-ssl eval", "evaluation", emb, root)
    protocol = protocol_of(emb)
    name_inputs = {**file_name_inputs(emb), "scope": args.scope if args.task == "retrieval" else None}
    name = output_name(args.task, encoder_label(emb.meta, path), source["split"], protocol, name_inputs)
    out = output_dir(args, root, path, name)
    refuse_existing(out, [f"metrics_{args.task}.json"], args.overwrite)  # before any work
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
    stage = None
    if args.task == "retrieval":
        metrics, rows = _retrieval(args, ci, trk, base)
    else:
        metrics, rows, stage = _reid(ci, trk, base, out)
    rows = [("protocol", base["protocol"]), ("tracklets", n), ("identities", base["n_identities"]), *rows]
    mpath = write_result(out, f"metrics_{args.task}.json", metrics, args.overwrite, stage)
    print(f"{args.task} on {path.name}:")
    print(format_rows(rows))
    print(f"wrote {mpath}")
    return 0


def _retrieval(args: argparse.Namespace, ci: CiOptions, trk: Embeddings, base: dict) -> tuple[dict, list]:
    from polyp_ssl.eval.tasks import run_retrieval

    bar = progress_bar(len(trk), "retrieval queries")
    task = run_retrieval(trk, ci, args.scope, memory_bytes=args.block_memory_mb * 2**20, progress=bar.update)
    bar.close()
    res = task.result
    metrics = {**base, "scope": args.scope, **res.as_dict()}
    rows = [
        ("mAP", res.mAP),
        ("HR@1", res.hr[1]),
        ("HR@5", res.hr[5]),
        ("queries", res.n_queries),
        ("excluded (no positive)", res.n_excluded),
    ]
    return with_intervals(metrics, task.intervals(), task.ci, rows), rows


def _reid(ci: CiOptions, trk: Embeddings, base: dict, out: Path) -> tuple[dict, list, Path]:
    from polyp_ssl.eval.outputs import new_stage
    from polyp_ssl.eval.plots import pr_png, roc_png
    from polyp_ssl.eval.tasks import run_reid

    nb = -(-len(trk) // 1024)
    bar = progress_bar(nb * (nb + 1) // 2, "re-id pair blocks")
    task = run_reid(trk, ci, progress=bar.update)
    bar.close()
    res = task.result
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
    return with_intervals(metrics, task.intervals(), task.ci, rows), rows, stage


# ------------------------------------------------------------------------------------- probe


@dataclass
class ProbeInputs:
    """The two sides of a probe command, read and labelled."""

    train_emb: Embeddings
    train_root: Path | None
    val_emb: Embeddings | None
    val_root: Path | None
    vocab_counts: dict[str, Counter] = field(default_factory=dict)


def run_probe_command(args: argparse.Namespace) -> int:
    """Phases: read both sides, label them and split, say what trains and what evaluates, run the
    probe (eval.tasks.run_probe), write the result, print the table."""
    from polyp_ssl.eval.probe import OneClassError, protocol_hint
    from polyp_ssl.eval.tasks import require_polyps, run_probe

    ci = ci_options(args)
    inputs = _probe_inputs(args)
    for side in (inputs.train_emb, inputs.val_emb):  # files given without their root
        if side is not None:
            require_polyps(side, f"the {args.task} probe")
    cfg = _probe_config(args)
    sides, skipped, how = _probe_sides(args, inputs)
    prog = "polyp-ssl probe"
    train_src = side_provenance(prog, "probe train side", inputs.train_emb, inputs.train_root)
    val_src = None
    if inputs.val_emb is not None:
        val_src = side_provenance(prog, "probe val side", inputs.val_emb, inputs.val_root)
    trains_on, evaluates_on = _probe_where(args, train_src, val_src)
    print(f"{args.task} probe trains on {trains_on} and evaluates on {evaluates_on}")
    try:
        task = run_probe(args.task, sides, cfg, ci, {"train_side": train_src, "val_side": val_src})
    except OneClassError as e:  # name what the protocol left and the flag that keeps more
        raise CliError(f"{inputs.train_emb.path}: {e}; {protocol_hint([inputs.train_emb])}") from None
    res = task.result
    out = _probe_out_dir(args, inputs, cfg, train_src, val_src)
    result = {
        "task": args.task,
        "split_rule": how,
        "trains_on": trains_on,
        "evaluates_on": evaluates_on,
        "train_side": train_src,
        "val_side": val_src,
        "train_embeddings": str(inputs.train_emb.path),
        "val_embeddings": str(inputs.val_emb.path) if inputs.val_emb is not None else None,
        "left_out": skipped,
        "polyps_by_vocabulary": {v: dict(sorted(c.items())) for v, c in sorted(inputs.vocab_counts.items())},
        "protocol": protocol_of(inputs.train_emb),
        **res.as_dict(),
    }
    rows = _probe_rows(res)
    names = {
        "balanced accuracy": "balanced_accuracy",
        "macro F1": "macro_f1",
        "identity-weighted macro F1": "identity_weighted_macro_f1",
    }
    ivs = task.intervals()
    if ivs:
        with_ci = with_intervals(result["metrics"], ivs, task.ci, rows, names)
        result["ci"] = with_ci.pop("ci")
        result["metrics"] = with_ci
    mpath = write_result(out, f"probe_{args.task}.json", result, args.overwrite)
    _print_probe(args, res, rows, skipped, inputs.vocab_counts, how)
    print(f"wrote {mpath}")
    return 0


def _probe_inputs(args: argparse.Namespace) -> ProbeInputs:
    """Both sides' embeddings and roots (given files, or embedded here from the roots)."""
    train_raw = raw_to_ingested(args.train_images, args.train_annotations, "train")
    val_raw = raw_to_ingested(args.val_images, args.val_annotations, "val")
    root = check_root(args.dataset_root) if args.dataset_root else None
    train_root, train_split = train_raw or (root, args.train_split or "train")
    val_root = check_root(args.val_dataset_root) if args.val_dataset_root else root
    for where in (train_root, val_root):
        refuse_track_root(where, f"the {args.task} probe")
    val_root, val_split = val_raw or (val_root, args.val_split)
    if args.train_embeddings is None and train_root is None:
        raise CliError(
            "give --train_embeddings FILE, or --dataset_root ROOT (or the seed's --train_annotations)"
        )
    train_emb, train_root = probe_side(args, args.train_embeddings, train_root, train_split)
    val_emb, val_root = probe_side(args, args.val_embeddings, val_root, val_split)
    check_dim(args, train_emb)
    if val_emb is not None and val_emb.dim != train_emb.dim:
        raise CliError(
            f"train embeddings {train_emb.path} are {train_emb.dim}-d but val embeddings {val_emb.path} "
            f"are {val_emb.dim}-d"
        )
    return ProbeInputs(train_emb, train_root, val_emb, val_root)


def _probe_config(args: argparse.Namespace):
    from polyp_ssl.eval.probe import ProbeConfig

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
    return cfg


def _labelled(
    args: argparse.Namespace, emb: Embeddings, root: Path | None, vocab_counts: dict[str, Counter]
) -> tuple[Embeddings, np.ndarray, dict]:
    """The rows of `emb` with a label of the task, their labels and the rows left out by reason."""
    from polyp_ssl.eval.probe import count_by_vocabulary, task_labels

    if root is None:
        raise CliError(f"{emb.path}: cannot find its ingested root for labels; pass --dataset_root")
    labels = polyp_labels(root)
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


def _probe_sides(args: argparse.Namespace, inputs: ProbeInputs):
    """(eval.tasks.ProbeSides, rows left out per side, the split rule in words)."""
    from polyp_ssl.eval.probe import ProbeData, split_by_identity
    from polyp_ssl.eval.tasks import ProbeSides

    tr, ytr, skipped_tr = _labelled(args, inputs.train_emb, inputs.train_root, inputs.vocab_counts)
    if inputs.val_emb is None:
        mtr, mva = split_by_identity(tr.identity_id, ytr, args.train_fraction, args.seed)
        train = ProbeData(tr.vectors[mtr], ytr[mtr], tr.identity_id[mtr])
        val = ProbeData(tr.vectors[mva], ytr[mva], tr.identity_id[mva])
        how = f"{round(args.train_fraction * 100)}/{round((1 - args.train_fraction) * 100)} split by polyp"
        return ProbeSides(train, val, tr.video_id[mva]), {"train+val": skipped_tr}, how
    va, yva, skipped_va = _labelled(args, inputs.val_emb, inputs.val_root, inputs.vocab_counts)
    sides = ProbeSides(
        ProbeData(tr.vectors, ytr, tr.identity_id), ProbeData(va.vectors, yva, va.identity_id), va.video_id
    )
    return sides, {"train": skipped_tr, "val": skipped_va}, "train and val as given"


def _probe_where(args: argparse.Namespace, train_src: dict, val_src: dict | None) -> tuple[str, str]:
    """What the probe trains on and what it evaluates on, in words."""
    trains_on = f"{train_src['dataset_root']} split {'+'.join(train_src['split'])}"
    if val_src is None:
        evaluates_on = f"the other {round((1 - args.train_fraction) * 100)}% of its polyps"
        trains_on += f" ({round(args.train_fraction * 100)}% of its polyps)"
    else:
        evaluates_on = f"{val_src['dataset_root']} split {'+'.join(val_src['split'])}"
    return trains_on, evaluates_on


def _probe_out_dir(
    args: argparse.Namespace, inputs: ProbeInputs, cfg, train_src: dict, val_src: dict | None
) -> Path:
    from polyp_ssl.eval.outputs import encoder_label, output_name

    train_emb, val_emb = inputs.train_emb, inputs.val_emb
    val_part = val_src["split"] if val_src else [f"{round(args.train_fraction * 100)}pct"]
    splits = [*train_src["split"], *val_part]
    name_inputs = {
        "train": file_name_inputs(train_emb),
        "val": file_name_inputs(val_emb) if val_emb is not None else None,
        "probe": asdict(cfg),
        "train_fraction": args.train_fraction if val_emb is None else None,
        "class_mapping": args.class_mapping if args.task == "histology" else None,
    }
    name = output_name(
        args.task,
        encoder_label(train_emb.meta, train_emb.path),
        splits,
        protocol_of(train_emb),
        name_inputs,
        prefix="probe",
    )
    return output_dir(args, inputs.train_root, train_emb.path, name)


def _probe_rows(res) -> list[tuple[str, Any]]:
    m = res.metrics
    return [
        ("train rows / polyps", f"{res.n_train} / {res.n_train_polyps}"),
        ("val rows / polyps", f"{res.n_val} / {res.n_val_polyps}"),
        ("accuracy", m["accuracy"]),
        ("balanced accuracy", m["balanced_accuracy"]),
        ("macro F1", m["macro_f1"]),
        ("identity-weighted macro F1", m["identity_weighted_macro_f1"]),
    ]


def _print_probe(args, res, rows: list, skipped: dict, vocab_counts: dict[str, Counter], how: str) -> None:
    left = sum(sum(c.values()) for c in skipped.values())
    for vocab, c in sorted(vocab_counts.items()):
        rows.append((f"polyps, {vocab} vocabulary", ", ".join(f"{k} {n}" for k, n in sorted(c.items()))))
    if left:
        rows.append(("rows left out (no label)", f"{left} {skipped}"))
    if res.degenerate:  # numbers that say nothing about the embeddings are flagged, not just printed
        rows.append(("DEGENERATE", res.degenerate))
    print(f"{args.task} probe ({how}):")
    print(format_rows(rows))
    if res.degenerate:
        print(f"warning: degenerate probe ({res.degenerate}); its metrics say nothing about the embeddings")


# ------------------------------------------------------------------------------------- count


def count_side_videos(emb: Embeddings, root: Path | None, temporal: bool) -> list:
    """The videos of one side, each tracklet ending at its catalog end frame (with a root)."""
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


def _count_sides(args: argparse.Namespace) -> dict[str, tuple[Embeddings, Path | None]]:
    root = check_root(args.dataset_root) if args.dataset_root else None
    refuse_track_root(root, "polyp counting")
    sides = {}
    for side, path, split in (
        ("val", args.val_embeddings, args.val_split),
        ("test", args.test_embeddings, args.test_split),
    ):
        if path:
            sides[side] = load_file(path, default_split(path), root)
        elif root is not None and has_encoder(args):
            sides[side] = load_file(ensure_file(args, root, split), split, root)
        else:
            raise CliError(f"give --{side}_embeddings FILE, or --dataset_root ROOT with --encoder_ckpt CKPT")
    return sides


def run_count_command(args: argparse.Namespace) -> int:
    from polyp_ssl.eval.outputs import encoder_label, output_name
    from polyp_ssl.eval.tasks import require_polyps, run_count

    ci = ci_options(args)
    if not 0 <= args.max_fpr <= 1:
        raise CliError(f"--max_fpr must be in [0, 1], got {args.max_fpr}")
    sides = _count_sides(args)
    (val_emb, val_root), (test_emb, test_root) = sides["val"], sides["test"]
    require_polyps(val_emb, "polyp counting")
    require_polyps(test_emb, "polyp counting")
    if val_emb.dim != test_emb.dim:
        raise CliError(f"val embeddings are {val_emb.dim}-d but test embeddings are {test_emb.dim}-d")
    val = count_side_videos(val_emb, val_root, args.temporal_constraint)
    test = count_side_videos(test_emb, test_root, args.temporal_constraint)
    task = run_count(val, test, ci, args.method, args.temporal_constraint, args.max_fpr, args.grid, args.seed)
    res = task.result
    val_src = side_provenance("polyp-ssl count", "val side", val_emb, val_root)
    test_src = side_provenance("polyp-ssl count", "test side", test_emb, test_root)
    task.provenance.update(val_side=val_src, test_side=test_src)
    name_inputs = {
        "val": file_name_inputs(val_emb),
        "test": file_name_inputs(test_emb),
        "method": args.method,
        "temporal_constraint": args.temporal_constraint,
        "max_fpr": args.max_fpr,
        "grid": args.grid,
        "seed": args.seed,
    }
    name = output_name(
        f"count-{args.method}",
        encoder_label(test_emb.meta, test_emb.path),
        [*val_src["split"], *test_src["split"]],
        protocol_of(test_emb),
        name_inputs,
    )
    out = output_dir(args, test_root, test_emb.path, name)
    label = "threshold" if args.method == "agglomerative" else "preference"
    rows = [
        (f"{label} (val FPR <= {args.max_fpr})", res.value),
        ("FPR target met on val", res.fpr_target_met),
        ("val FPR / fragmentation", f"{res.val_fpr:.4f} / {res.val_fragmentation:.4f}"),
        ("test FPR", res.test_fpr),
        ("test fragmentation rate", res.test_fragmentation),
    ]
    # counting clusters within a video: the unit is the video whatever --ci_unit says
    ivs = task.intervals({"test_fragmentation_rate": "fragmentation_rate", "test_fpr": "FPR"})
    names = {"test FPR": "test_fpr", "test fragmentation rate": "test_fragmentation_rate"}
    summary = with_intervals(res.summary(), ivs, task.ci, rows, names)
    sw = res.val_sweep
    result = {
        **summary,
        "val_side": val_src,
        "test_side": test_src,
        "val_embeddings": str(val_emb.path),
        "test_embeddings": str(test_emb.path),
        "protocol": protocol_of(test_emb),
        "per_video": res.per_video,
        "val_sweep": {"values": sw.values, "fpr": sw.fpr, "fragmentation": sw.fragmentation},
    }
    mpath = write_result(out, "count.json", result, args.overwrite)
    _print_count(args, res, rows)
    print(f"wrote {mpath}")
    return 0


def _print_count(args: argparse.Namespace, res, rows: list) -> None:
    print(
        f"polyp counting ({args.method}, temporal constraint {'on' if args.temporal_constraint else 'off'}):"
    )
    print(format_rows(rows))
    print("  video             tracklets  polyps  clusters  fragmentation")
    for r in res.per_video:
        print(
            f"  {r['video_id']:<16}  {r['n_tracklets']:>9}  {r['n_polyps']:>6}  {r['n_clusters']:>8}  "
            f"{r['fragmentation']:>13.3f}"
        )
