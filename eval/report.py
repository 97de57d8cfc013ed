"""`polyp-ssl report`: every downstream task for a set of checkpoints and the untrained baselines,
into one results table (OUT/results.parquet, appended) and one OUT/report.md with figures.

Each encoder is run once per split it needs (eval/embed.py caches the files under
ROOT/embeddings/, or the user cache when the root is read-only); every task then reads those
vectors. A task that the data cannot support
(no labels of that kind, a single class, no validation split for counting) is skipped with its
reason in the report; asked for explicitly with --tasks, it is an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from polyp_ssl.eval import embed as embed_mod
from polyp_ssl.eval.embed import EmbedError
from polyp_ssl.eval.embeddings import EmbeddingsError, read_embeddings
from polyp_ssl.eval.outputs import OutputExists, replacing_folder
from polyp_ssl.eval.report_html import HTML_FILE
from polyp_ssl.eval.report_pooled import report_pooled
from polyp_ssl.eval.report_subjects import (
    BASELINES,
    RUN_INIT_FILE,
    ReportError,
    Subject,
    build_subjects,
    checkpoint_label,
    checkpoint_subjects,
    fresh_init_label,
    init_subjects,
    resolve_checkpoints,
    run_init_label,
    run_name,
)
from polyp_ssl.eval.report_tables import (
    COLUMNS,
    LOWER_IS_BETTER,
    append_results,
    choose_references,
    degenerate_flags,
    difference_table,
    find_row,
    format_interval,
    format_value,
    markdown_table,
    paired_differences,
    result_rows,
    results_schema,
    task_settings,
    task_split,
)
from polyp_ssl.eval.report_tasks import (
    TASK_FUNCS,
    TASKS,
    EmbeddingSource,
    ReportOptions,
    SubjectResult,
    TaskOutcome,
    TaskSkipped,
    evaluate_subject,
    report_protocol,
)
from polyp_ssl.eval.report_write import (
    _shard_of,
    gallery_for,
    plot_intervals,
    plot_reid_curves,
    projection_for,
    projection_xy,
    training_curves,
    write_report_md,
)
from polyp_ssl.eval.task_intervals import add_ci_flags
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

RESULTS_FILE = "results.parquet"
REPORT_FILE = "report.md"


def run_report(
    checkpoints: Sequence[str | Path],
    opts: ReportOptions,
    baselines: Sequence[str] = BASELINES,
    embeddings: Sequence[str | Path] = (),
    command: str = "polyp-ssl report",
    html: bool = True,
) -> list[SubjectResult]:
    """Evaluate every row and write OUT/results.parquet, OUT/report.md with its figures and, with
    `html`, OUT/report.html (eval/report_html.py)."""
    opts.root = Path(opts.root)
    opts.out = Path(opts.out)
    for e in embeddings:  # a file of another dataset is refused before any work
        read_embeddings(e, root=opts.root)
    if not checkpoints and not embeddings and opts.baseline is None:
        raise ReportError(
            "nothing to compare: give checkpoints or run folders (RUN_OR_CKPT) or --embeddings FILE; "
            "baselines alone are compared only when --baseline names the row to compare with"
        )
    subjects = build_subjects(resolve_checkpoints(checkpoints), baselines, [Path(e) for e in embeddings])
    if not subjects:
        raise ReportError("nothing to evaluate: give checkpoints, run folders, --embeddings or --baselines")
    if opts.baseline is not None:  # a misspelt row name is refused before any work
        find_row([SubjectResult(s) for s in subjects], opts.baseline)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for i, subject in enumerate(subjects, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(subjects)}] {subject.label}", flush=True)
        res = evaluate_subject(subject, opts)
        results.append(res)
        summary = ", ".join(
            f"{o.task} {m} {format_value(m, v)}" for o in res.outcomes for m, v in o.metrics.items()
        )
        print(f"    {summary or 'no task ran'} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if degenerate_flags(res):
            print(f"    warning: degenerate probe: {degenerate_flags(res)}", flush=True)
    refs = choose_references(results, opts.baseline)
    diffs = paired_differences(results, refs, opts) if len(results) > 1 and opts.ci.enabled else {}
    pooled = report_pooled(results, refs, opts.ci)
    rows = [
        row
        for r in results
        for row in result_rows(
            r,
            created,
            report_protocol(opts),
            opts,
            diffs.get(r.subject.label),
            refs[r.subject.label].subject.label if r.subject.label in refs else None,
        )
    ]
    append_results(opts.out / RESULTS_FILE, rows)
    figures: dict[str, list[Path]] = {"intervals": plot_intervals(results, opts.out)}
    figures["re-identification curves"] = plot_reid_curves(results, opts.out)
    scale = _crop_scale(opts, results)
    figures["retrieval gallery"] = [p for r in results if (p := gallery_for(r, opts, scale))]
    projections = {r.subject.label: p for r in results if (p := projection_xy(r, opts))}
    figures["2-D projection"] = [
        p for r in results if (p := projection_for(r, opts, projections.get(r.subject.label)))
    ]
    figures["training curves"] = training_curves(results, opts.out)
    write_report_md(opts.out / REPORT_FILE, results, figures, opts, created, command, refs, diffs, pooled)
    if html:
        from polyp_ssl.eval.report_html import write_report_html

        write_report_html(
            opts.out / HTML_FILE, results, rows, opts, created, command, projections, scale, pooled
        )
    return results


def _crop_scale(opts: ReportOptions, results: Sequence[SubjectResult]) -> float:
    if opts.bbox_scale_factor:
        return opts.bbox_scale_factor
    from polyp_ssl.eval.embeddings import read_metadata

    for r in results:
        for f in r.files:
            s = (read_metadata(f).get("params") or {}).get("bbox_scale_factor")
            if s:
                return float(s)
    return embed_mod.DEFAULT_BBOX_SCALE


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="polyp-ssl report", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    p.add_argument(
        "checkpoints",
        nargs="*",
        metavar="RUN_OR_CKPT",
        help="checkpoint files or run folders (a run folder = its checkpoints/*.ckpt)",
    )
    p.add_argument("--dataset_root", required=True, help="an ingested root (shards/ and catalog/)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder for report.md, results.parquet, figures (default: report/{root}_{tasks}_"
        "{protocol}_{hash of the inputs}, so reports of other inputs never share a folder)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the output folder holds an earlier report: replace it whole (once the new one is complete)",
    )
    p.add_argument(
        "--baselines",
        default="init,descriptor",
        help="comma-separated: init (each run's step-0 weights, checkpoints/init.ckpt; a fresh init of "
        "the same config where the run has none), fresh_init (always the fresh init, seed 0), "
        "descriptor, zoo:NAME=PATH (a foundation model from local weights, docs/zoo.md); 'none' for none",
    )
    p.add_argument("--embeddings", nargs="*", default=[], help="also evaluate these embeddings files")
    p.add_argument(
        "--tasks",
        default="all",
        help=f"comma-separated from {','.join(TASKS)}, or all "
        "(with all, a task the data cannot support is skipped; named, it is an error)",
    )
    p.add_argument("--encoder_type", choices=["sfe", "mve", "hmve"], help="expected type of every checkpoint")
    p.add_argument("--data_im_size", type=int, default=None, help="default: each checkpoint's im_size")
    p.add_argument(
        "--data_bbox_scale_factor",
        type=float,
        default=None,
        help="default: each checkpoint's bbox_scale_factor",
    )
    p.add_argument("--data_fragment_stride", type=int, default=4, help="take every N-th frame of a tracklet")
    p.add_argument("--probe_fragment_length", type=int, default=8, help="fragment length for the probes")
    p.add_argument(
        "--min_tracklet_frames",
        type=int,
        default=embed_mod.DEFAULT_MIN_TRACKLET_FRAMES,
        help="tracklets with fewer frames are left out of every task (default 30, the paper's protocol)",
    )
    p.add_argument(
        "--max_frames",
        type=int,
        default=embed_mod.DEFAULT_MAX_FRAMES,
        help="cap whole tracklets at this many strided frames (default: no cap, the paper's protocol)",
    )
    p.add_argument(
        "--probe_splits",
        default="val,test",
        help="splits whose polyps the probes use (70/30 by polyp); default the held-out val,test",
    )
    p.add_argument(
        "--encoder_pooling",
        choices=["cls", "mean"],
        default="cls",
        help="tracklet embedding: CLS output or mean",
    )
    p.add_argument("--batch_size", type=int, default=32, help="tracklets per embedding batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--projection",
        choices=["auto", "pca", "tsne"],
        default="auto",
        help="2-D map of the embeddings figure",
    )
    p.add_argument(
        "--gallery_queries",
        type=int,
        default=4,
        help="query tracklets shown in the gallery figure",
    )
    p.add_argument(
        "--count_fpr",
        type=float,
        default=0.05,
        help="counting: pooled pairwise FPR allowed on val",
    )
    p.add_argument("--seed", type=int, default=42, help="random seed (probes, projection, gallery)")
    p.add_argument(
        "--html",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write report.html: one self-contained page (tables, per-query galleries, re-id pairs, "
        "embedding map, confusion matrices, training curves) to open in a browser, no server needed",
    )
    add_ci_flags(p)
    embed_mod.add_cache_flag(p)
    p.add_argument(
        "--baseline",
        default=None,
        metavar="ROW_NAME",
        help="row (its label, or a checkpoint name it lists, e.g. demo/init) the paired differences are "
        "taken against (default: each trained row's own initialisation)",
    )
    return p


def default_out(
    opts: ReportOptions, checkpoints: Sequence[str], baselines: Sequence[str], embeddings: Sequence[str]
) -> Path:
    """report/{root name}_{tasks}_{protocol tag}_{hash}: the hash covers the root, the evaluated
    checkpoints, baselines and embeddings files (resolved paths) and every option, so the same
    command names the same folder (refused there unless --overwrite) and any other gets its own."""
    from dataclasses import asdict

    from polyp_ssl.eval.outputs import protocol_tag, short_hash, slug

    settings = {k: v for k, v in asdict(opts).items() if k not in ("out", "progress", "cache")}
    inputs = {
        "settings": settings,
        "root": str(Path(opts.root).resolve()),
        "checkpoints": sorted(str(Path(c).resolve()) for c in checkpoints),
        "baselines": sorted(baselines),
        "embeddings": sorted(str(Path(e).resolve()) for e in embeddings),
    }
    tasks = "all" if set(opts.tasks) == set(TASKS) else "+".join(opts.tasks)
    tag = protocol_tag(report_protocol(opts))
    name = f"{Path(opts.root).resolve().name}_{tasks}_{tag}_{short_hash(inputs)}"
    return Path("report") / slug(name)


def parse_probe_splits(text: str) -> tuple[str, ...]:
    """`val,test` -> ("val", "test"); at least one split."""
    splits = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not splits:
        raise ReportError(f"--probe_splits: no split in {text!r} (e.g. val,test)")
    return splits


def parse_tasks(text: str) -> tuple[tuple[str, ...], bool]:
    if text.strip() == "all":
        return TASKS, False
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ReportError(f"--tasks: unknown task(s) {bad} (choose from {', '.join(TASKS)} or all)")
    return tasks, True


def options_from_args(args: argparse.Namespace) -> tuple[ReportOptions, list[str]]:
    """The report's options and baselines from its flags (the default output folder not yet set)."""
    tasks, strict = parse_tasks(args.tasks)
    baselines = (
        []
        if args.baselines.strip() in ("", "none")
        else [b.strip() for b in args.baselines.split(",") if b.strip()]
    )
    opts = ReportOptions(
        root=Path(args.dataset_root),
        out=Path(args.out) if args.out else Path("report"),
        tasks=tasks,
        strict_tasks=strict,
        device=args.device,
        batch_size=args.batch_size,
        im_size=args.data_im_size,
        bbox_scale_factor=args.data_bbox_scale_factor,
        fragment_stride=args.data_fragment_stride,
        pooling=args.encoder_pooling,
        encoder_type=args.encoder_type,
        probe_fragment_length=args.probe_fragment_length,
        probe_splits=parse_probe_splits(args.probe_splits),
        min_tracklet_frames=args.min_tracklet_frames,
        max_frames=args.max_frames,
        projection=args.projection,
        gallery_queries=args.gallery_queries,
        seed=args.seed,
        count_fpr=args.count_fpr,
        ci_unit=args.ci_unit,
        ci_resamples=args.ci_resamples,
        ci_seed=args.ci_seed,
        baseline=args.baseline,
    )
    try:
        opts.ci.validate()
    except ValueError as e:
        raise ReportError(str(e)) from None
    return opts, baselines


def main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.errors import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    def run() -> int:
        opts, baselines = options_from_args(args)
        if not args.out:
            opts.out = default_out(opts, args.checkpoints, baselines, args.embeddings)
        opts.cache = embed_mod.resolve_cache(opts.root, args.cache_dir)
        print(opts.cache.describe())
        final = opts.out  # written complete beside it, then swapped in (eval.outputs.replacing_folder)
        with replacing_folder(final, args.overwrite, (REPORT_FILE, RESULTS_FILE)) as opts.out:
            command = "polyp-ssl report " + " ".join(argv)
            results = run_report(
                args.checkpoints, opts, baselines, args.embeddings, command=command, html=args.html
            )
        opts.out = final
        print()
        print(markdown_table(results))
        print(f"\nreport: {opts.out / REPORT_FILE}\nresults: {opts.out / RESULTS_FILE}")
        if args.html:
            print(f"page: {opts.out / HTML_FILE}")
        return 0

    return run_cli("polyp-ssl report", run, (ReportError, EmbedError, EmbeddingsError, OutputExists))


__all__ = [
    "BASELINES",
    "COLUMNS",
    "HTML_FILE",
    "LOWER_IS_BETTER",
    "REPORT_FILE",
    "RESULTS_FILE",
    "RUN_INIT_FILE",
    "TASKS",
    "TASK_FUNCS",
    "EmbeddingSource",
    "ReportError",
    "ReportOptions",
    "Subject",
    "SubjectResult",
    "TaskOutcome",
    "TaskSkipped",
    "_shard_of",
    "append_results",
    "build_subjects",
    "checkpoint_label",
    "checkpoint_subjects",
    "choose_references",
    "default_out",
    "degenerate_flags",
    "difference_table",
    "evaluate_subject",
    "find_row",
    "format_interval",
    "format_value",
    "fresh_init_label",
    "gallery_for",
    "init_subjects",
    "main",
    "markdown_table",
    "paired_differences",
    "plot_intervals",
    "plot_reid_curves",
    "projection_for",
    "projection_xy",
    "report_protocol",
    "resolve_checkpoints",
    "result_rows",
    "results_schema",
    "run_init_label",
    "run_name",
    "run_report",
    "task_settings",
    "task_split",
    "training_curves",
    "write_report_md",
]
