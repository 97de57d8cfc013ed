"""The report's files besides results.parquet: report.md and its figures (intervals, re-id
curves, retrieval galleries, 2-D projections, training curves)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from polyp_ssl.eval import embed as embed_mod
from polyp_ssl.eval.intervals import Interval
from polyp_ssl.eval.plots import intervals_png, save_figure
from polyp_ssl.eval.report_pooled import PooledDifference, pooled_table
from polyp_ssl.eval.report_subjects import ReportError
from polyp_ssl.eval.report_tables import (
    difference_table,
    markdown_table,
    table_columns,
)
from polyp_ssl.eval.report_tasks import ReportOptions, SubjectResult, report_protocol

log = logging.getLogger("polyp_ssl.eval.report")  # the command's name in its log lines


def plot_intervals(results: Sequence[SubjectResult], out_dir: Path) -> list[Path]:
    """One panel per (task, metric): every row's value with its interval as a horizontal bar."""
    panels = []
    for t, m in table_columns(results):
        labels, vals, lows, highs = [], [], [], []
        for r in results:
            for o in r.outcomes:
                if o.task == t and m in o.metrics and m in o.ci:
                    iv = o.ci[m]
                    labels.append(r.subject.label)
                    vals.append(o.metrics[m])
                    lows.append(iv.low)
                    highs.append(iv.high)
        if labels:
            scale = 1.0 if m == "fragmentation_rate" else 100.0
            arrays = [scale * np.asarray(a, dtype=np.float64) for a in (vals, lows, highs)]
            panels.append((f"{t} {m}", labels, *arrays))
    if not panels:
        return []
    return [intervals_png(out_dir / "intervals.png", panels)]


def plot_reid_curves(results: Sequence[SubjectResult], out_dir: Path) -> list[Path]:
    """ROC and PR curves of re-identification, every subject on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r.subject.label, o.extra) for r in results for o in r.outcomes if o.task == "reid" and o.extra]
    if not curves:
        return []
    paths = []
    for name, xlab, ylab, getx, gety, auc_name in (
        ("reid_roc.png", "false positive rate", "true positive rate", "fpr", "tpr", "auroc"),
        ("reid_pr.png", "recall", "precision", "recall", "precision", "aupr"),
    ):
        fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
        for label, res in curves:
            x, y = np.asarray(getattr(res, getx)), np.asarray(getattr(res, gety))
            if name == "reid_roc.png":
                x, y = np.r_[0.0, x, 1.0], np.r_[0.0, y, 1.0]
                order = np.lexsort((y, x))
                ax.plot(x[order], y[order], label=f"{label} ({100 * getattr(res, auc_name):.1f})")
            else:
                order = np.argsort(x, kind="stable")
                ax.step(
                    x[order], y[order], where="post", label=f"{label} ({100 * getattr(res, auc_name):.1f})"
                )
        if name == "reid_roc.png":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlab)
        ax.set_ylabel(ylab)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title("re-identification " + ("ROC" if "roc" in name else "precision-recall"))
        ax.legend(fontsize=7, loc="lower right" if "roc" in name else "upper right")
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / name))
    return paths


def training_curves(results: Sequence[SubjectResult], out_dir: Path) -> list[Path]:
    """The training curves (eval.curves) of every run whose checkpoint is evaluated, one PNG per
    run folder with CSV logs; a log that cannot be read is a warning, not a failed report."""
    from polyp_ssl.eval.curves import CurvesError, curves_for

    paths = []
    for run in training_runs(results):
        try:
            paths.append(curves_for(run, out_dir)[0])
        except CurvesError as e:
            log.warning("training curves of %s not drawn: %s", run, e)
    return paths


def training_runs(results: Sequence[SubjectResult]) -> list[Path]:
    """The run folders (with CSV logs) of the evaluated checkpoints, each once, in row order."""
    from polyp_ssl.eval.curves import run_of_checkpoint

    runs: list[Path] = []
    for r in results:
        run = run_of_checkpoint(r.subject.spec) if r.subject.kind in ("checkpoint", "run_init") else None
        if run is not None and run.resolve() not in [x.resolve() for x in runs]:
            runs.append(run)
    return runs


def _slug(text: str) -> str:
    return embed_mod.sanitize_name(text.replace("/", "_").replace(" ", "_").replace("(", "").replace(")", ""))


def gallery_for(res: SubjectResult, opts: ReportOptions, crop_scale: float) -> Path | None:
    from polyp_ssl.eval.gallery import pick_gallery_rows, plot_gallery, read_middle_crops

    emb = res.test
    if emb is None or len(emb) < 2:
        return None
    rows = pick_gallery_rows(emb.vectors, emb.identity_id.astype(str), opts.gallery_queries, k=5)
    if not rows:
        return None
    shard_of = _shard_of(opts.root)
    needed = sorted({i for r in rows for i in [r.query, *r.results]})
    keys = [(shard_of[str(emb.tracklet_id[i])], str(emb.sample_key[i])) for i in needed]
    crops = dict(zip(needed, read_middle_crops(opts.root, keys, crop_scale, size=64), strict=True))
    return plot_gallery(
        [crops[r.query] for r in rows],
        [[crops[i] for i in r.results] for r in rows],
        [r.correct for r in rows],
        opts.out / f"gallery_{_slug(res.subject.label)}.png",
        query_labels=[str(emb.identity_id[r.query]) for r in rows],
        title=f"retrieval top-5, {res.subject.label}: green = same polyp, red = another",
    )


def _shard_of(root: Path) -> dict[str, str]:
    from polyp_ssl.shards.locations import UnsafeLocation, check_shard_value
    from polyp_ssl.shards.tables import read_catalog_table

    path = root / "catalog" / "tracklets.parquet"
    t = read_catalog_table(root, "tracklets", ["tracklet_id", "shard"], checked=False).to_pydict()
    try:
        for tid, rel in zip(t["tracklet_id"], t["shard"], strict=True):
            check_shard_value(rel, path, f"tracklet {tid!r}")
    except UnsafeLocation as exc:
        raise ReportError(str(exc)) from None
    return dict(zip(t["tracklet_id"], t["shard"], strict=True))


def projection_xy(res: SubjectResult, opts: ReportOptions) -> tuple[str, np.ndarray] | None:
    """The 2-D map of a row's test tracklets: (method, [N, 2] coordinates); None under 3 tracklets."""
    from polyp_ssl.eval.projection import project_2d

    emb = res.test
    if emb is None or len(emb) < 3:
        return None
    method = opts.projection
    if method == "auto":
        method = "tsne" if len(emb) <= 150 else "pca"  # exact t-SNE is cheap up to a few hundred
    return method, project_2d(emb.vectors, method=method, seed=opts.seed)


def projection_for(
    res: SubjectResult, opts: ReportOptions, projection: tuple[str, np.ndarray] | None = None
) -> Path | None:
    """The projection figure of a row (`projection`: its projection_xy, computed here when not given)."""
    from polyp_ssl.eval.projection import plot_projection

    projection = projection or projection_xy(res, opts)
    if projection is None or res.test is None:
        return None
    method, xy = projection
    path = opts.out / f"projection_{_slug(res.subject.label)}.png"
    return plot_projection(
        xy,
        res.test.identity_id.astype(str),
        path,
        title=f"{res.subject.label}: test tracklets ({method.upper()}), colour = polyp",
    )


def write_report_md(
    path: Path,
    results: Sequence[SubjectResult],
    figures: dict[str, list[Path]],
    opts: ReportOptions,
    created: str,
    command: str,
    refs: dict[str, SubjectResult] | None = None,
    diffs: dict[str, dict[tuple[str, str], Interval]] | None = None,
    pooled: Sequence[PooledDifference] = (),
) -> Path:
    """report.md; `pooled`: the arms' differences pooled over seeds (eval.report_pooled)."""
    from polyp_ssl.eval.embeddings import manifest_sha256

    lines = [
        "# Evaluation report",
        "",
        f"- dataset root: `{opts.root}` (catalog manifest sha256 `{manifest_sha256(opts.root)[:16]}`)",
        f"- created: {created}",
        f"- command: `{command}`",
        f"- protocol: {report_protocol(opts)} (retrieval, re-identification, counting; probes: "
        f"fragments of {opts.probe_fragment_length} frames of the same tracklets)",
        "",
        "## Results",
        "",
        "Percentages except the fragmentation rate (predicted clusters per true polyp, lower is better,",
        "1.0 is perfect). Retrieval, re-identification: test split, whole tracklets; size and",
        f"histology: MLP probe on frozen fragment embeddings of the {'+'.join(opts.probe_splits)} "
        "polyps, 70/30 split by polyp;",
        f"counting: threshold chosen on val at pairwise FPR <= {opts.count_fpr}, measured on test.",
        "",
        markdown_table(results),
        "",
    ]
    if any(o.ci for r in results for o in r.outcomes):
        c = opts.ci
        lines += [
            f"In brackets: {round(100 * c.level)}% bootstrap interval ({c.resamples} resamples of the "
            f"test {c.unit}s, seed {c.seed}; counting resamples videos).",
            "",
        ]
    if refs and diffs and any(diffs.values()):
        bases = list(dict.fromkeys(r.subject.label for r in refs.values()))
        minus = bases[0] if len(bases) == 1 else "the row named in `minus` (each row's initialisation)"
        lines += [
            f"## Difference vs {bases[0]}" if len(bases) == 1 else "## Differences",
            "",
            f"Row minus {minus}, in percentage points (fragmentation rate: as it is), positive when "
            "the row is higher (for the columns marked lower is better, a negative difference is an "
            "improvement), with the 95% interval of the paired bootstrap (both encoders on the same "
            "resamples). An interval that excludes 0 is a difference the data supports.",
            "",
            difference_table(results, refs, diffs),
            "",
        ]
    if pooled:
        lines += [
            "## Pooled over seeds",
            "",
            "Runs with the same settings but the seed (config.yaml) are one arm. Per arm, the mean over "
            "its seeds of the paired difference (seed s minus its reference for seed s: its own "
            "initialisation, or seed s of the arm the --baseline row belongs to), in percentage points, "
            "with the 95% interval of a two-level bootstrap: each resample draws the seeds with "
            "replacement, then the test units (the same units for every seed and both sides). It says "
            "how much a retrain with another seed moves the difference, which one run's interval cannot.",
            "",
            pooled_table(pooled, table_columns(results)),
            "",
        ]
    notes = []
    for r in results:
        for o in r.outcomes:
            if o.note:
                notes.append(f"- {r.subject.label}, {o.task}: {o.note} ({o.time_s:.1f} s)")
        for task, why in r.skipped.items():
            notes.append(f"- {r.subject.label}, {task}: **skipped**: {why}")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    if any(figures.values()):
        lines += ["## Figures", ""]
        for title, paths in figures.items():
            for p in paths:
                lines += [f"### {title}: {p.stem}", "", f"![{p.stem}]({p.name})", ""]
    lines += ["## Encoders", "", "| encoder | kind | provenance | source | sha256 |", "|---|---|---|---|---|"]
    for r in results:
        s = r.subject
        lines.append(f"| {s.label} | {s.kind} | {s.provenance} | `{s.spec}` | {(s.sha256 or '-')[:16]} |")
    lines += ["", "## Embeddings files", ""]
    for r in results:
        for f in r.files:
            lines.append(f"- {r.subject.label}: `{f}`")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path
