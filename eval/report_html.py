"""report.html: one self-contained page of a report run (no network, no server: open the file).

It holds the results table with intervals and paired differences (from the rows written to
results.parquet), per retrieval query its top-k with similarities, re-identification pairs at the
operating point, the 2-D map of the test tracklets with each tracklet's frames on hover, the
probes' confusion matrices and the training curves. Thumbnails are JPEG data: URIs inside the
page, each tracklet's once (eval/report_html_thumbs.py), so the one file can be copied, mailed or
attached as it is. Plain HTML, CSS, inline SVG and a small inline script: nothing to install,
nothing fetched.

This module gathers the page's data from the report's results (`page_data`) and writes the file
(`write_report_html`); eval/report_html_data.py computes each part, eval/report_html_render.py
turns the data into markup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval import report_html_data as data
from polyp_ssl.eval.report_pooled import PooledDifference
from polyp_ssl.eval.report_tables import table_columns
from polyp_ssl.eval.report_tasks import ReportOptions, SubjectResult, report_protocol

log = logging.getLogger("polyp_ssl.eval.report")

HTML_FILE = "report.html"
CLASS_NAMES = {"size": data.SIZE_CLASSES, "histology": data.HISTOLOGY_CLASSES}


@dataclass
class SubjectView:
    """One encoder's interactive parts; tracklets are indices into `PageData.tracklets`."""

    label: str
    gallery: list[dict[str, Any]] | None = None
    pairs: dict[str, Any] | None = None
    projection: dict[str, Any] | None = None  # {"method": "tsne", "points": [[t, x, y], ...]}
    confusions: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> confusion
    why_not: dict[str, str] = field(default_factory=dict)  # section -> why it is empty


@dataclass
class CurvesView:
    run: str
    panels: list[dict[str, Any]]
    resumed_at: list[int] = field(default_factory=list)


@dataclass
class PageData:
    """Everything the page shows (eval/report_html_render.py draws it)."""

    header: dict[str, str]  # dataset root, created, command, protocol, intervals
    table: data.ResultsTable
    subjects: list[SubjectView] = field(default_factory=list)
    tracklets: list[list[str]] = field(default_factory=list)  # [tracklet id, video id, polyp id]
    images: dict[int, dict[str, Any]] = field(default_factory=dict)  # tracklet index -> thumbnails
    missing: dict[str, str] = field(default_factory=dict)  # tracklet id -> why it has no thumbnail
    curves: list[CurvesView] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Index:
    """Global tracklet indices of the rows of each encoder's test embeddings."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.pos: dict[str, int] = {}

    def add(self, tracklet: str, video: str, polyp: str) -> int:
        if tracklet not in self.pos:
            self.pos[tracklet] = len(self.rows)
            self.rows.append([tracklet, video, polyp])
        return self.pos[tracklet]


def _ids(values: np.ndarray) -> list[str]:
    return ["" if v is None else str(v) for v in values]


def subject_view(
    res: SubjectResult, index: _Index, projection: tuple[str, np.ndarray] | None = None
) -> SubjectView:
    """The gallery, pairs, map and confusion matrices of one encoder, in global tracklet indices."""
    view = SubjectView(res.subject.label)
    tasks = {o.task: o for o in res.outcomes}
    for task in ("size", "histology"):
        probe = getattr(tasks.get(task), "extra", None)
        if probe is not None and getattr(probe, "y_true", None) is not None:
            view.confusions[task] = data.confusion(probe.y_true, probe.y_pred, CLASS_NAMES[task])
    emb = res.test
    if emb is None or len(emb) < 2:
        view.why_not["tracklets"] = "no test embeddings"
        return view
    ids = _ids(emb.identity_id)
    glob = [index.add(str(t), str(v), p) for t, v, p in zip(emb.tracklet_id, emb.video_id, ids, strict=True)]
    if "retrieval" in tasks:
        rows = data.gallery_queries(emb.vectors, ids)
        view.gallery = [
            {**r, "q": glob[r["q"]], "top": [[glob[i], s, ok] for i, s, ok in r["top"]]} for r in rows
        ]
    else:
        view.why_not["gallery"] = res.skipped.get("retrieval", "retrieval did not run")
    if "reid" in tasks:
        pairs = data.reid_operating_point(emb.vectors, ids)
        if pairs is None:
            view.why_not["pairs"] = f"more than {data.MAX_PAIR_TRACKLETS} test tracklets: pairs not listed"
        else:
            pairs["pairs"] = {g: [[glob[a], glob[b], s] for a, b, s in p] for g, p in pairs["pairs"].items()}
            view.pairs = pairs
    else:
        view.why_not["pairs"] = res.skipped.get("reid", "re-identification did not run")
    if projection is not None:
        method, xy = projection
        pts = data.map_points(xy)
        view.projection = {"method": method, "points": [[glob[r], x, y] for r, x, y in pts], "n": len(xy)}
    return view


def referenced(views: Sequence[SubjectView]) -> set[int]:
    """Tracklet indices any part of the page shows a picture of."""
    out: set[int] = set()
    for v in views:
        for r in v.gallery or []:
            out.add(r["q"])
            out.update(t for t, _, _ in r["top"])
        for pairs in (v.pairs or {}).get("pairs", {}).values():
            for a, b, _ in pairs:
                out.update((a, b))
        out.update(p[0] for p in (v.projection or {}).get("points", []))
    return out


def curves_views(results: Sequence[SubjectResult]) -> list[CurvesView]:
    """The stitched training curves of every evaluated run with CSV logs (eval.curves)."""
    from polyp_ssl.eval.curves import CurvesError, run_curves
    from polyp_ssl.eval.report_write import training_runs

    out = []
    for run in training_runs(results):
        try:
            c = run_curves(run)
        except CurvesError as e:  # report.md's figure already warned
            log.debug("training curves of %s not on the page: %s", run, e)
            continue
        panels = data.curve_panels(c.series)
        if panels:
            out.append(CurvesView(c.run, panels, list(c.resumed_at)))
    return out


def header(opts: ReportOptions, created: str, command: str) -> dict[str, str]:
    from polyp_ssl.eval.embeddings import manifest_sha256

    c = opts.ci
    ci = (
        f"{round(100 * c.level)}% bootstrap intervals ({c.resamples} resamples of the test {c.unit}s, "
        f"seed {c.seed}; counting resamples videos)"
        if c.enabled
        else "intervals disabled (--ci_resamples 0)"
    )
    return {
        "dataset root": f"{opts.root} (catalog manifest sha256 {manifest_sha256(opts.root)[:16]})",
        "created": created,
        "command": command,
        "protocol": report_protocol(opts),
        "intervals": ci,
        "probes": f"MLP on frozen fragment embeddings of the {'+'.join(opts.probe_splits)} polyps, "
        "70/30 split by polyp; confusion counts are validation fragments",
    }


def page_data(
    results: Sequence[SubjectResult],
    rows: Sequence[Mapping[str, Any]],
    opts: ReportOptions,
    created: str,
    command: str,
    projections: Mapping[str, tuple[str, np.ndarray]] | None = None,
    crop_scale: float | None = None,
    pooled: Sequence[PooledDifference] = (),
) -> PageData:
    """Everything on the page; thumbnails read from ROOT's shards when `crop_scale` is given;
    `pooled`: the arms' differences pooled over seeds (eval.report_pooled)."""
    page = PageData(header(opts, created, command), data.results_table(rows, table_columns(results)))
    if pooled:
        data.add_pooled(page.table, pooled)
    index = _Index()
    for r in results:
        page.subjects.append(subject_view(r, index, (projections or {}).get(r.subject.label)))
        for task, why in r.skipped.items():
            page.notes.append(f"{r.subject.label}, {task}: skipped: {why}")
        page.notes += [f"{r.subject.label}, {o.task}: {o.note}" for o in r.outcomes if o.note]
    page.tracklets = index.rows
    if crop_scale is not None:
        from polyp_ssl.eval.report_html_thumbs import read_thumbs

        shown = sorted(referenced(page.subjects))
        thumbs = read_thumbs(Path(opts.root), [index.rows[i][0] for i in shown], crop_scale)
        page.images = {i: thumbs.images[index.rows[i][0]] for i in shown if index.rows[i][0] in thumbs.images}
        page.missing = thumbs.missing
    page.curves = curves_views(results)
    return page


def write_report_html(
    path: Path,
    results: Sequence[SubjectResult],
    rows: Sequence[Mapping[str, Any]],
    opts: ReportOptions,
    created: str,
    command: str,
    projections: Mapping[str, tuple[str, np.ndarray]] | None = None,
    crop_scale: float | None = None,
    pooled: Sequence[PooledDifference] = (),
) -> Path:
    """Write report.html (under a temporary name, then renamed)."""
    from polyp_ssl.eval.report_html_render import render_page

    page = page_data(results, rows, opts, created, command, projections, crop_scale, pooled)
    text = render_page(page)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    log.info("report.html: %d tracklets pictured, %.1f MB", len(page.images), len(text.encode()) / 2**20)
    return path
