"""The report's numbers as tables: the rows of results.parquet (one per task and metric, with
intervals and paired differences), the Markdown results and difference tables, and the choice of
the row each row is compared with."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval.intervals import Interval
from polyp_ssl.eval.report_subjects import ReportError
from polyp_ssl.eval.report_tasks import ReportOptions, SubjectResult
from polyp_ssl.shards.remote import remote_root

# lower is better: a negative difference is an improvement
LOWER_IS_BETTER = {("count", "fragmentation_rate"), ("count", "FPR")}
# (task, metric) columns of the table, in order; value formatting per metric
COLUMNS: list[tuple[str, str]] = [
    ("retrieval", "mAP"),
    ("retrieval", "HR@1"),
    ("retrieval", "HR@5"),
    ("reid", "AUROC"),
    ("reid", "AUPR"),
    ("size", "F1"),
    ("size", "accuracy"),
    ("histology", "accuracy"),
    ("histology", "balanced_accuracy"),
    ("count", "fragmentation_rate"),
    ("count", "FPR"),
]


def task_split(task: str, opts: ReportOptions) -> str:
    """The split(s) a task's numbers come from: test (retrieval, re-id), the probe splits (70/30
    by polyp inside them), val+test for counting (threshold on val, measured on test)."""
    if task in ("size", "histology"):
        return "+".join(opts.probe_splits)
    return "val+test" if task == "count" else "test"


def task_settings(task: str, opts: ReportOptions) -> str:
    """The settings behind a task's numbers, as sorted JSON (one string column of results)."""
    settings: dict[str, Any] = {
        "im_size": opts.im_size,  # None: each checkpoint's own
        "bbox_scale_factor": opts.bbox_scale_factor,
        "fragment_stride": opts.fragment_stride,
        "pooling": opts.pooling,
        "min_tracklet_frames": opts.min_tracklet_frames,
        "max_frames": opts.max_frames,
        "seed": opts.seed,
    }
    if task in ("size", "histology"):
        settings["fragment_length"] = opts.probe_fragment_length
    if task == "count":
        settings["max_fpr"] = opts.count_fpr
    return json.dumps(settings, sort_keys=True)


def result_rows(
    res: SubjectResult,
    created: str,
    protocol: str | None = None,
    opts: ReportOptions | None = None,
    diffs: dict[tuple[str, str], Interval] | None = None,
    baseline: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, metric): the value, its interval (value_ci_low/high, null without one) and,
    for a row other than the baseline, the paired difference to `baseline` with its interval."""
    rows = []
    for o in res.outcomes:
        for metric, value in o.metrics.items():
            iv = o.ci.get(metric)
            d = (diffs or {}).get((o.task, metric))
            ci_unit = None
            if iv is not None and opts is not None:
                ci_unit = "video" if o.task == "count" else opts.ci_unit
            rows.append(
                {
                    "checkpoint": res.subject.label,
                    "checkpoint_path": res.subject.spec,
                    "checkpoint_sha256": res.subject.sha256,
                    "task": o.task,
                    "metric": metric,
                    "value": float(value),
                    "time_s": round(o.time_s, 4),
                    "created": created,
                    "protocol": protocol,
                    "dataset_root": (
                        (remote_root(opts.root) or str(Path(opts.root).resolve())) if opts else None
                    ),
                    "split": task_split(o.task, opts) if opts else None,
                    "settings": task_settings(o.task, opts) if opts else None,
                    "value_ci_low": iv.low if iv is not None else None,
                    "value_ci_high": iv.high if iv is not None else None,
                    "ci_level": iv.level if iv is not None else None,
                    "ci_unit": ci_unit,
                    "ci_n_units": iv.n_units if iv is not None else None,
                    "ci_resamples": iv.n_resamples if iv is not None else None,
                    "ci_seed": opts.ci_seed if iv is not None and opts is not None else None,
                    "baseline": baseline if d is not None else None,
                    "diff_vs_baseline": d.estimate if d is not None else None,
                    "diff_ci_low": d.low if d is not None else None,
                    "diff_ci_high": d.high if d is not None else None,
                    "kind": res.subject.kind,
                    "provenance": res.subject.provenance,
                    "checkpoint_names": list(res.subject.names) or None,
                    "probe_degenerate": o.degenerate,
                }
            )
    return rows


def results_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("checkpoint", pa.string()),
            ("checkpoint_path", pa.string()),
            ("checkpoint_sha256", pa.string()),
            ("task", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("time_s", pa.float64()),
            ("created", pa.string()),
            ("protocol", pa.string()),  # the evaluation protocol (eval.embed.protocol_string)
            ("dataset_root", pa.string()),  # the ingested root, resolved
            ("split", pa.string()),  # the split(s) the numbers come from (task_split)
            ("settings", pa.string()),  # JSON of the embedding and task settings (task_settings)
            # bootstrap interval of value (null: disabled, or a file from before the intervals)
            ("value_ci_low", pa.float64()),
            ("value_ci_high", pa.float64()),
            ("ci_level", pa.float64()),
            ("ci_unit", pa.string()),  # polyp | video (what a resample draws)
            ("ci_n_units", pa.int64()),
            ("ci_resamples", pa.int64()),
            ("ci_seed", pa.int64()),
            # paired difference value - baseline's value, same resamples (null on the baseline row)
            ("baseline", pa.string()),
            ("diff_vs_baseline", pa.float64()),
            ("diff_ci_low", pa.float64()),
            ("diff_ci_high", pa.float64()),
            # what the row is: checkpoint | run_init | init (fresh) | descriptor | zoo | embeddings,
            # in words, and every checkpoint name with these bytes (one row per distinct sha256)
            ("kind", pa.string()),
            ("provenance", pa.string()),
            ("checkpoint_names", pa.list_(pa.string())),
            # size/histology: why the probe's numbers say nothing (one class predicted or on a side)
            ("probe_degenerate", pa.string()),
        ]
    )


def append_results(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Append rows to results.parquet (rewritten whole under a temporary name, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = results_schema()
    new = pa.Table.from_pylist(rows, schema=schema)
    if path.is_file():
        try:
            old = pq.read_table(path)
            for name in schema.names:  # a file from before a column: null there
                if name not in old.schema.names:
                    old = old.append_column(name, pa.nulls(len(old), schema.field(name).type))
            old = old.select(schema.names).cast(schema)
        except Exception as e:
            raise ReportError(f"{path}: existing results file is not a results table ({e})") from e
        new = pa.concat_tables([old, new])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(new, tmp)
    tmp.replace(path)
    return path


def format_value(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if metric == "fragmentation_rate":
        return f"{value:.2f}"
    return f"{100 * value:.1f}"


def format_interval(metric: str, value: float | None, iv: Interval | None, signed: bool = False) -> str:
    """`47.0 [41.2, 52.9]` (percent; the fragmentation rate as it is); without an interval, the value."""

    def one(x: float | None) -> str:
        text = format_value(metric, x)
        return f"+{text}" if signed and x is not None and np.isfinite(x) and x > 0 else text

    if iv is None or not (np.isfinite(iv.low) and np.isfinite(iv.high)):
        return one(value)
    return f"{one(value)} [{one(iv.low)}, {one(iv.high)}]"


def table_columns(results: Sequence[SubjectResult]) -> list[tuple[str, str]]:
    have = {(o.task, m) for r in results for o in r.outcomes for m in o.metrics}
    return [c for c in COLUMNS if c in have] + sorted(have - set(COLUMNS))


def degenerate_flags(res: SubjectResult) -> str:
    """`size: majority class only: predicts class 0 for all 21 rows; histology: ...` ('' if none)."""
    return "; ".join(f"{o.task}: {o.degenerate}" for o in res.outcomes if o.degenerate)


def markdown_table(results: Sequence[SubjectResult]) -> str:
    """One row per subject, one column per (task, metric) that any subject has; with intervals,
    each cell is `value [low, high]`. A probe whose numbers say nothing (one class predicted, or one
    class on a side) has its cells marked `(!)` and its reason in a last `flags` column."""
    cols = table_columns(results)
    flagged = any(degenerate_flags(r) for r in results)
    head = "| encoder | " + " | ".join(f"{t} {m}" for t, m in cols) + (" | flags |" if flagged else " |")
    sep = "|---|" + "|".join("---:" for _ in cols) + ("|---|" if flagged else "|")
    lines = [head, sep]
    for r in results:
        vals = {(o.task, m): (v, o.ci.get(m)) for o in r.outcomes for m, v in o.metrics.items()}
        bad = {o.task for o in r.outcomes if o.degenerate}
        cells = " | ".join(
            format_interval(m, *vals.get((t, m), (None, None))) + (" (!)" if t in bad else "")
            for t, m in cols
        )
        flags = f" | {degenerate_flags(r) or '-'} |" if flagged else " |"
        lines.append(f"| {r.subject.label} | {cells}{flags}")
    return "\n".join(lines)


def find_row(results: Sequence[SubjectResult], name: str) -> SubjectResult:
    """The row whose label, or one of whose checkpoint names (e.g. `demo/init`), is `name`."""
    for r in results:
        if name == r.subject.label or name in r.subject.names:
            return r
    labels = ", ".join(repr(r.subject.label) for r in results)
    raise ReportError(f"--baseline {name!r}: no such row (rows: {labels})")


def choose_references(results: Sequence[SubjectResult], name: str | None) -> dict[str, SubjectResult]:
    """Row label -> the row its differences are taken against: `name` for every other row when the
    user names one (--baseline); by default a trained row's own initialisation (its run's step-0
    weights, else the fresh init of its config) and, for the other rows, the first initialisation
    row (else the first reference row: descriptor or zoo; else the first row). Initialisation rows
    themselves get no difference by default."""
    if not results:
        return {}
    if name is not None:
        base = find_row(results, name)
        return {r.subject.label: base for r in results if r is not base}
    by_label = {r.subject.label: r for r in results}
    inits = [r for r in results if r.subject.kind in ("run_init", "init")]
    others = [r for r in results if not r.subject.is_trained]
    fallback = (inits or others or list(results))[0]
    refs: dict[str, SubjectResult] = {}
    for r in results:
        if r in inits:
            continue
        ref = by_label.get(r.subject.reference or "", fallback)
        if ref is not r:
            refs[r.subject.label] = ref
    return refs


def paired_differences(
    results: Sequence[SubjectResult], refs: dict[str, SubjectResult], opts: ReportOptions
) -> dict[str, dict[tuple[str, str], Interval]]:
    """Per row with a reference (choose_references): (task, metric) -> interval of row - reference,
    both on the same resamples (eval.intervals.paired_interval)."""
    from polyp_ssl.eval.task_intervals import paired

    out: dict[str, dict[tuple[str, str], Interval]] = {}
    for r in results:
        ref = refs.get(r.subject.label)
        if ref is None:
            continue
        base = {o.task: o for o in ref.outcomes}
        diffs: dict[tuple[str, str], Interval] = {}
        for o in r.outcomes:
            b = base.get(o.task)
            if b is None or not o.stats or not b.stats:
                continue
            ci = replace(opts.ci, unit="video") if o.task == "count" else opts.ci
            for metric, iv in paired(o.stats, b.stats, ci).items():
                diffs[(o.task, metric)] = iv
        out[r.subject.label] = diffs
    return out


def difference_table(
    results: Sequence[SubjectResult],
    refs: dict[str, SubjectResult],
    diffs: dict[str, dict[tuple[str, str], Interval]],
) -> str:
    """Row - reference per metric, `+3.1 [0.5, 5.8]` (percentage points; an interval excluding 0 is a
    difference the resampled units support); a `minus` column when the rows have different
    references. Lower-is-better columns say so in their header."""
    cols = table_columns(results)
    several = len({id(ref) for ref in refs.values()}) > 1
    names = [f"{t} {m}" + (" (lower is better)" if (t, m) in LOWER_IS_BETTER else "") for t, m in cols]
    head = "| encoder | " + ("minus | " if several else "") + " | ".join(names) + " |"
    sep = "|---|" + ("---|" if several else "") + "|".join("---:" for _ in cols) + "|"
    lines = [head, sep]
    for r in results:
        ref = refs.get(r.subject.label)
        if ref is None:
            continue
        d = diffs.get(r.subject.label, {})
        cells = " | ".join(
            format_interval(m, d[(t, m)].estimate, d[(t, m)], signed=True) if (t, m) in d else "-"
            for t, m in cols
        )
        minus = f"{ref.subject.label} | " if several else ""
        lines.append(f"| {r.subject.label} | {minus}{cells} |")
    return "\n".join(lines)
