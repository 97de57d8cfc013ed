"""report.html's markup from its data (eval/report_html.py `PageData`): the tables as HTML, the map
and the training curves as inline SVG, the galleries and pairs as elements whose thumbnails the
inline script fills from the page's JSON. Every string that comes from data is escaped
(`esc`); the JSON is escaped for its `<script>` element (`script_json`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from polyp_ssl.eval.report_html_assets import CSS, SCRIPT
from polyp_ssl.eval.report_html_data import (
    PAIRS_PER_GROUP,
    TOP_K,
    Cell,
    ResultsTable,
    esc,
    lower_is_better,
    script_json,
)

METHOD_NAMES = {"tsne": "t-SNE", "pca": "PCA"}
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
SECTIONS = (
    ("results", "Results"),
    ("retrieval", "Retrieval"),
    ("reid", "Re-identification"),
    ("map", "Embedding map"),
    ("probes", "Probes"),
    ("curves", "Training curves"),
    ("notes", "Notes"),
)


def _attr(name: str, value: float | None) -> str:
    return f' data-{name}="{value!r}"' if value is not None else ""


def _cell(cell: Cell | None, task: str, metric: str, kind: str) -> str:
    if cell is None:
        return f'<td class="num" data-task="{esc(task)}" data-metric="{esc(metric)}">-</td>'
    cls = ["num"]
    if cell.flag:
        cls.append("flag")
    if (
        kind in ("diff", "pooled")
        and cell.low is not None
        and cell.high is not None
        and (cell.low > 0 or cell.high < 0)
    ):
        better = ((cell.value or 0) > 0) != lower_is_better(task, metric)
        cls.append("better" if better else "worse")
    attrs = _attr("value", cell.value) + _attr("low", cell.low) + _attr("high", cell.high)
    title = f' title="degenerate probe: {esc(cell.flag)}"' if cell.flag else ""
    value, interval = cell.parts(metric, signed=kind in ("diff", "pooled"))
    text = f'<span class="v">{esc(value)}{" (!)" if cell.flag else ""}</span>'
    if interval is not None:
        text += f' <span class="ci">{esc(interval)}</span>'

    return (
        f'<td class="{" ".join(cls)}" data-kind="{kind}" data-task="{esc(task)}" data-metric="{esc(metric)}"'
        f"{attrs}{title}>{text}</td>"
    )


def results_tables(table: ResultsTable) -> str:
    """The results table (value [interval]) and, when rows are compared, the differences table."""
    head = "".join(
        f"<th>{esc(t)} {esc(m)}{' (lower is better)' if lower_is_better(t, m) else ''}</th>"
        for t, m in table.columns
    )
    body = []
    for label in table.labels:
        cells = "".join(_cell(table.values.get((label, t, m)), t, m, "value") for t, m in table.columns)
        body.append(f'<tr data-label="{esc(label)}"><th>{esc(label)}</th>{cells}</tr>')
    out = [
        '<div class="scroll"><table class="grid" id="results-table">',
        f"<thead><tr><th>encoder</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>",
    ]
    compared = [label for label in table.labels if label in table.baselines]
    if compared:
        rows = []
        for label in compared:
            cells = "".join(_cell(table.diffs.get((label, t, m)), t, m, "diff") for t, m in table.columns)
            base = esc(table.baselines[label])
            rows.append(f'<tr data-label="{esc(label)}"><th>{esc(label)}</th><td>{base}</td>{cells}</tr>')
        out += [
            "<h3>Paired differences</h3>",
            '<p class="help">Row minus the row named in <i>minus</i>, in percentage points (fragmentation '
            "rate: as it is), with the 95% interval of the paired bootstrap (both encoders on the same "
            "resamples). Green: an interval above 0 where higher is better (below 0 where lower is); red: "
            "the reverse. An interval containing 0 is a difference the test data does not settle.</p>",
            '<div class="scroll"><table class="grid" id="diff-table">',
            f"<thead><tr><th>encoder</th><th>minus</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody>",
            "</table></div>",
        ]
    if table.pooled:
        body = []
        for p in table.pooled:
            cells = "".join(_cell(p.cells.get((t, m)), t, m, "pooled") for t, m in table.columns)
            seeds = ", ".join(map(str, p.seeds))
            body.append(
                f'<tr data-label="{esc(p.arm)}"><th>{esc(p.arm)}</th><td>{esc(p.minus)}</td>'
                f"<td>{esc(seeds)}</td>{cells}</tr>"
            )
        out += [
            "<h3>Pooled over seeds</h3>",
            '<p class="help">Runs with the same settings but the seed form one arm. Per arm, the mean '
            "over its seeds of the paired difference (seed s minus its reference for seed s), with the 95% "
            "interval of a two-level bootstrap (the seeds drawn with replacement, then the test units, the "
            "same for every seed and both sides).</p>",
            '<div class="scroll"><table class="grid" id="pooled-table">',
            f"<thead><tr><th>arm</th><th>minus</th><th>seeds</th>{head}</tr></thead><tbody>",
            *body,
            "</tbody></table></div>",
        ]
    return "\n".join(out)


def _thumb(t: int, caption: str, cls: str, tracklets: Sequence[Sequence[str]]) -> str:
    tid = tracklets[t][0]
    return (
        f'<figure class="thumb {cls}"><img data-t="{t}" alt="tracklet {esc(tid)}" width="72" height="72">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def gallery_block(rows: list[dict[str, Any]], tracklets: Sequence[Sequence[str]]) -> str:
    out = []
    for r in rows:
        q = r["q"]
        tid, video, polyp = tracklets[q]
        right = [ok for _, _, ok in r["top"]]
        figs = [
            _thumb(q, f"query<br>{esc(tid)}<br>polyp {esc(polyp)}", "query-thumb", tracklets),
            '<div class="sep"></div>',
        ]
        for rank, (t, sim, ok) in enumerate(r["top"], 1):
            cap = f"<b>#{rank} {sim:.3f}</b><br>{esc(tracklets[t][2])}<br>{esc(tracklets[t][1])}"
            figs.append(_thumb(t, cap, "right" if ok else "wrong", tracklets))
        n_right = sum(right)
        info = f"{n_right} of {len(right)} same polyp; first same-polyp tracklet at rank {r['first_hit']}"
        search = esc(" ".join((tid, video, polyp)).lower())
        out.append(
            f'<div class="query" data-video="{esc(video)}" data-polyp="{esc(polyp)}" data-search="{search}" '
            f'data-top1="{int(bool(right and right[0]))}" data-allright="{int(all(right))}">'
            f'{"".join(figs)}<div class="info">video {esc(video)}<br>{info}</div></div>'
        )
    return "\n".join(out)


def pairs_block(pairs: dict[str, Any], tracklets: Sequence[Sequence[str]]) -> str:
    c = pairs["counts"]
    out = [
        f'<p class="help">Operating point: similarity above <b>{pairs["threshold"]:.4f}</b> is called '
        f"the same polyp (the threshold with the highest true positive rate at pairwise FPR &lt;= "
        f"{100 * pairs['max_fpr']:.0f}% on the test pairs): TPR {100 * pairs['tpr']:.1f}%, FPR "
        f"{100 * pairs['fpr']:.1f}%; {c['true positives']} true positives, {c['false positives']} false "
        f"positives, {c['false negatives']} false negatives, {c['true negatives']} true negatives of "
        f"{pairs['n_positive'] + pairs['n_negative']} pairs. Up to {PAIRS_PER_GROUP} pairs per group.</p>"
    ]
    order = {
        "false positives": "false positives (different polyps called the same; most similar first)",
        "false negatives": "false negatives (one polyp called two; least similar first)",
        "true positives": "true positives nearest the threshold",
        "true negatives": "true negatives nearest the threshold",
    }
    for group, title in order.items():
        shown = pairs["pairs"].get(group, [])
        ok = group.startswith("true")
        out.append(f'<h3>{esc(title)} ({c[group]})</h3><div class="pairs" data-group="{esc(group)}">')
        for a, b, sim in shown:
            cls = "right" if ok else "wrong"
            cap_a = f"{esc(tracklets[a][2])}<br>{esc(tracklets[a][1])}"
            cap_b = f"{esc(tracklets[b][2])}<br>{esc(tracklets[b][1])}"
            out.append(
                f'<div class="pair">{_thumb(a, cap_a, cls, tracklets)}<div class="sim">{sim:.3f}</div>'
                f"{_thumb(b, cap_b, cls, tracklets)}</div>"
            )
        out.append("</div>" if shown else "<i>none</i></div>")
    return "\n".join(out)


def polyp_colour(i: int) -> str:
    return f"hsl({(i * 137.508) % 360:.1f},65%,{48 + 10 * ((i // 7) % 2)}%)"


def map_svg(
    projection: dict[str, Any], tracklets: Sequence[Sequence[str]], polyp_index: dict[str, int]
) -> str:
    """The 2-D map: one circle per tracklet, coloured by polyp (data-p: the polyp's index)."""
    size, pad = 560, 16
    span = size - 2 * pad
    dots = []
    for t, x, y in projection["points"]:
        p = polyp_index.setdefault(tracklets[t][2], len(polyp_index))
        cx, cy = pad + x * span, pad + (1 - y) * span
        dots.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{polyp_colour(p)}" data-t="{t}" data-p="{p}"/>'
        )
    n, shown = projection.get("n", len(dots)), len(dots)
    method = str(projection["method"])
    more = f", {shown} of {n} shown (evenly spaced)" if shown < n else ""
    return (
        f'<p class="help">{esc(METHOD_NAMES.get(method, method))} of the test tracklet embeddings{more}; '
        "colour = polyp. Point at a dot to see the tracklet's frames and its polyp's other tracklets.</p>"
        f'<svg class="map" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
        f'aria-label="embedding map">{"".join(dots)}</svg>'
    )


def confusion_table(task: str, conf: dict[str, Any]) -> str:
    classes, counts = conf["classes"], conf["counts"]
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    rows = []
    for name, row in zip(classes, counts, strict=True):
        total = max(sum(row), 1)
        cells = "".join(
            f'<td class="num" style="background: rgba(40,100,200,{0.08 + 0.6 * v / total:.2f})">{v}</td>'
            for v in row
        )
        rows.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return (
        f'<table class="grid confusion" data-task="{esc(task)}"><caption>{esc(task)}: {conf["n"]} validation '
        f"fragments</caption><thead><tr><th>true \\ predicted</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo, (lo + hi) / 2, hi] if not log else [lo, hi]


def _fmt(v: float, log: bool) -> str:
    x = 10**v if log else v
    return f"{x:.3g}"


def curve_panel_svg(panel: dict[str, Any], resumed_at: Sequence[int]) -> str:
    """One panel of training curves: each metric a polyline, steps on x, resumes dotted."""
    w, h, left, right, top, bottom = 720, 190, 62, 12, 20, 26
    log = panel["log"]
    lines = {
        m: (s, [math.log10(v) for v in vs] if log else list(vs)) for m, (s, vs) in panel["lines"].items()
    }
    xs = [x for s, _ in lines.values() for x in s]
    ys = [y for _, vs in lines.values() for y in vs]
    if not xs:
        return ""
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)

    parts = [
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="none" stroke="#ccc"/>'
    ]
    for y in _ticks(y0, y1, log):
        parts.append(f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{_fmt(y, log)}</text>')
    for x in (x0, x1):
        parts.append(f'<text x="{px(x):.1f}" y="{h - 8}" text-anchor="middle">{int(x)}</text>')
    parts.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 8}" text-anchor="middle">step</text>')
    for step in resumed_at:
        if x0 <= step <= x1:
            parts.append(
                f'<line x1="{px(step):.1f}" x2="{px(step):.1f}" y1="{top}" y2="{h - bottom}" '
                'stroke="#888" stroke-dasharray="2,3"/>'
            )
    legend = []
    for i, (m, (s, vs)) in enumerate(lines.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s, vs, strict=True))
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.4" '
            f'data-metric="{esc(m)}"/>'
        )
        legend.append(f'<span><i style="background:{colour}"></i>{esc(m)}</span>')
    title = f"{panel['title']}" + (" (log scale)" if log else "")
    parts.append(f'<text x="{left}" y="14">{esc(title)}</text>')
    return (
        f'<svg class="curve" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{esc(title)}">'
        f'{"".join(parts)}</svg><div class="legend">{"".join(legend)}</div>'
    )


def _blocks(page: Any, part: str, draw: Any) -> str:
    """One `subject-block` per encoder (the picker shows one); `draw(view)` gives its markup."""
    out = ['<div class="blocks">']
    for v in page.subjects:
        inner = draw(v)
        if not inner:
            why = v.why_not.get(part) or v.why_not.get("tracklets") or "not available"
            inner = f'<p class="help">{esc(v.label)}: {esc(why)}</p>'
        out.append(f'<div class="subject-block" data-subject="{esc(v.label)}">{inner}</div>')
    out.append("</div>")
    return "\n".join(out)


def retrieval_section(page: Any) -> str:
    videos = sorted({page.tracklets[r["q"]][1] for v in page.subjects for r in v.gallery or []})
    options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in videos)
    filters = (
        '<div class="filters">'
        '<input id="q-search" type="search" placeholder="search video, polyp or tracklet" '
        'aria-label="search queries">'
        f'<select id="q-video" aria-label="video"><option value="">all videos</option>{options}</select>'
        '<select id="q-correct" aria-label="correctness"><option value="">all queries</option>'
        '<option value="top1-right">top-1 right</option><option value="top1-wrong">top-1 wrong</option>'
        f'<option value="any-wrong">a wrong result in the top-{TOP_K}</option>'
        f'<option value="all-right">all top-{TOP_K} right</option></select>'
        '<span class="count" id="q-count"></span></div>'
    )

    def galleries(v: Any) -> str:
        return gallery_block(v.gallery, page.tracklets) if v.gallery else ""

    return (
        f'<section id="retrieval"><h2>Retrieval: top-{TOP_K} per query</h2>'
        '<p class="help">Each query tracklet (blue) and the test tracklets most similar to it (cosine '
        "similarity of the tracklet embeddings, every other test tracklet ranked, as retrieval mAP "
        "counts them): green = the same polyp, red = another. Anchor crop of each tracklet's middle "
        f"frame. Queries are those with another tracklet of their polyp, evenly spread over the split.</p>"
        f"{filters}{_blocks(page, 'gallery', galleries)}"
        "</section>"
    )


def render_page(page: Any) -> str:
    """The whole report.html."""
    meta = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in page.header.items())
    if page.missing:
        first = next(iter(page.missing.items()))
        why = f"{len(page.missing)} tracklets without: {first[0]}: {first[1]}"
        meta += f"<dt>thumbnails</dt><dd>{esc(why)}</dd>"
    labels = [v.label for v in page.subjects]
    picker = "".join(f'<option value="{esc(x)}">{esc(x)}</option>' for x in labels)
    nav = "".join(f'<a href="#{k}">{t}</a>' for k, t in SECTIONS)
    nav += f'<label>encoder <select id="subject" aria-label="encoder">{picker}</select></label>'
    polyp_index: dict[str, int] = {}
    pairs = _blocks(page, "pairs", lambda v: pairs_block(v.pairs, page.tracklets) if v.pairs else "")
    maps = _blocks(
        page, "map", lambda v: map_svg(v.projection, page.tracklets, polyp_index) if v.projection else ""
    )
    probes = _blocks(
        page, "probes", lambda v: "".join(confusion_table(t, c) for t, c in v.confusions.items())
    )
    curves = (
        "".join(
            f"<h3>{esc(c.run)}</h3>" + "".join(curve_panel_svg(p, c.resumed_at) for p in c.panels)
            for c in page.curves
        )
        or '<p class="help">No evaluated run folder has CSV logs (train --logger csv).</p>'
    )
    notes = "".join(f"<li>{esc(n.replace('**', ''))}</li>" for n in page.notes) or "<li>none</li>"
    data = {"tracklets": page.tracklets, "images": {str(k): v for k, v in page.images.items()}}
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<link rel="icon" href="data:,"><title>Evaluation report</title>',
            f"<style>{CSS}</style></head><body>",
            f'<header><h1>Evaluation report</h1><dl class="meta">{meta}</dl></header>',
            f"<nav>{nav}</nav>",
            '<section id="results"><h2>Results</h2><p class="help">Percentages except the fragmentation rate '
            "(predicted clusters per true polyp; 1.0 is perfect). In brackets: the 95% bootstrap interval. "
            "(!) marks a probe whose numbers say nothing (hover the cell for why). The numbers are those of "
            "results.parquet.</p>",
            results_tables(page.table),
            "</section>",
            retrieval_section(page),
            f'<section id="reid"><h2>Re-identification pairs</h2>{pairs}</section>',
            f'<section id="map"><h2>Embedding map</h2>{maps}</section>',
            '<section id="probes"><h2>Probe confusion matrices</h2>'
            '<p class="help">Rows: true class; columns: '
            f"predicted class; shade: share of the row.</p>{probes}</section>",
            f'<section id="curves"><h2>Training curves</h2>{curves}</section>',
            f'<section id="notes"><h2>Notes</h2><ul class="notes">{notes}</ul></section>',
            '<div id="tip" role="tooltip"></div>',
            f'<script type="application/json" id="report-data">{script_json(data)}</script>',
            f"<script>{SCRIPT}</script>",
            "</body></html>",
            "",
        ]
    )
