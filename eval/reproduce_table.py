"""The last stage of `polyp-ssl reproduce`: the reports' rows as one results table, and the paper's
table beside the published numbers.

    OUT/results.parquet   every row of the three reports (the report's schema; `dataset_root`
                          names rc19, rsp or rspp per row)
    OUT/table.md          one row per encoder, the paper's four headline metrics with 95% intervals,
                          the published numbers as the first row; a cell whose dataset could not be
                          built says which input it needs
    OUT/report.html       the rc19 report's page (retrieval galleries, re-id pairs, embedding map);
                          the size and histology pages are OUT/reports/{rsp,rspp}/report.html
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

# (task, metric, dataset, column title); the paper's Table: retrieval and re-identification on
# rc19, size on rsp, histology on rspp
HEADLINE: list[tuple[str, str, str, str]] = [
    ("retrieval", "mAP", "rc19", "retrieval mAP (rc19)"),
    ("reid", "AUROC", "rc19", "re-id AUROC (rc19)"),
    ("size", "F1", "rsp", "size F1 (rsp)"),
    ("histology", "accuracy", "rspp", "histology accuracy (rspp)"),
]
PAPER = {"retrieval": 63.13, "reid": 94.17, "size": 70.24, "histology": 82.38}
RESULTS = "results.parquet"
TABLE = "table.md"
HTML = "report.html"


def latest_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a report's results.parquet from its latest run."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    if not rows:
        return []
    last = max(r["created"] for r in rows)
    return [r for r in rows if r["created"] == last]


def collect(out: Path, datasets: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for d in datasets:
        rows += latest_rows(out / "reports" / d / RESULTS)
    return rows


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows in the report's schema, written under a temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from polyp_ssl.eval.report_tables import results_schema

    schema = results_schema()
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    text = _pct(row["value"])
    lo, hi = row.get("value_ci_low"), row.get("value_ci_high")
    if lo is not None and hi is not None:
        text += f" [{_pct(lo)}, {_pct(hi)}]"
    return text


def _order(label: str) -> tuple[int, str]:
    """Trained encoders first, then their initialisations, then the baselines."""
    if label.endswith("/last"):
        return 0, label
    return (1 if label.endswith("/init") else 2), label


def dataset_counts(root: Path) -> str:
    """`19 videos, 47 polyps, 180 tracklets` from an ingested root's catalog ('' when unreadable)."""
    import pyarrow.parquet as pq

    parts = []
    for table, column in (("videos", "video_id"), ("polyps", "identity_id"), ("tracklets", "tracklet_id")):
        try:
            values = pq.read_table(root / "catalog" / f"{table}.parquet", columns=[column]).column(0)
        except (OSError, ValueError, KeyError):
            return ""
        parts.append(f"{len(set(values.to_pylist()))} {table}")
    return ", ".join(parts)


def table_md(
    rows: list[dict[str, Any]], not_run: dict[str, str], header: list[str], counts: dict[str, str]
) -> str:
    """The paper's table: one row per encoder, the published numbers first."""
    cells = {(r["checkpoint"], r["task"], r["metric"]): r for r in rows}
    labels = sorted({r["checkpoint"] for r in rows}, key=_order)
    ran = {r["task"] for r in rows}
    lines = [*header, ""]
    lines.append("| encoder | " + " | ".join(h[3] for h in HEADLINE) + " |")
    lines.append("|---|" + "---:|" * len(HEADLINE))
    lines.append("| paper (published) | " + " | ".join(f"{PAPER[h[0]]:.2f}" for h in HEADLINE) + " |")
    for label in labels:
        out = []
        for task, metric, dataset, _ in HEADLINE:
            if dataset in not_run:
                out.append(f"not run ({not_run[dataset]})")
            elif task not in ran:
                out.append(f"skipped (reports/{dataset}/report.md says why)")
            else:
                out.append(cell(cells.get((label, task, metric))))
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    if not labels:
        lines.append(
            "| (nothing evaluated) | "
            + " | ".join(f"not run ({not_run.get(h[2], 'no rows')})" for h in HEADLINE)
            + " |"
        )
    lines += [
        "",
        "Values in percent; [low, high] is the 95% bootstrap interval over polyps (the report's "
        "`value_ci_low`, `value_ci_high`). `/last` is the trained encoder, `/init` its initialisation.",
        "",
    ]
    for dataset, text in counts.items():
        page = f" (reports/{dataset}/report.md, report.html)" if text and dataset != "rc27" else ""
        lines.append(f"- {dataset}: {text or 'not built'}{page}")
    return "\n".join(lines) + "\n"


def write_table(
    out: Path, datasets: list[str], not_run: dict[str, str], header: list[str], data_roots: dict[str, Path]
) -> list[Path]:
    """results.parquet, table.md and report.html from the reports of `datasets`; returns the files."""
    rows = collect(out, datasets)
    write_results(out / RESULTS, rows)
    counts = {d: dataset_counts(root) if d not in not_run else "" for d, root in data_roots.items()}
    tmp = out / f".{TABLE}.tmp"
    tmp.write_text(table_md(rows, not_run, header, counts))
    tmp.replace(out / TABLE)
    written = [out / RESULTS, out / TABLE]
    page = out / "reports" / "rc19" / HTML
    if "rc19" in datasets and page.is_file():
        tmp_html = out / f".{HTML}.tmp"
        shutil.copyfile(page, tmp_html)
        tmp_html.replace(out / HTML)
        written.append(out / HTML)
    elif (out / HTML).exists():  # a page of an earlier run that this one did not make
        (out / HTML).unlink()
    return written
