"""The data of report.html as plain values, computed without a browser: the results table from the
rows of results.parquet, each retrieval query's top-k, re-identification pairs at the operating
point, the 2-D map's points, probe confusion matrices and training curves; and the escaping that
keeps data from being read as markup or script.

Every function here is pure (arrays and rows in, dicts and lists out), so the page's numbers are
tested against results.parquet and an independent computation without opening a page.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polyp_ssl.eval.report_tables import LOWER_IS_BETTER, format_value

# Bounds of the page (what it holds whatever the size of the test split)
MAX_QUERIES = 100  # retrieval queries per encoder, spread evenly over the queries with a positive
TOP_K = 5  # results shown per query (the gallery figure's k)
MAX_MAP_POINTS = 600  # tracklets on the 2-D map per encoder (evenly spaced beyond)
PAIRS_PER_GROUP = 8  # re-identification pairs shown per group (false positives, ...)
MAX_PAIR_TRACKLETS = 3000  # re-id pairs are listed for test splits up to this many tracklets
REID_FPR = 0.05  # operating point: the lowest threshold whose pairwise FPR on test is at most this

SIZE_CLASSES = {0: "<= 5 mm", 1: "> 5 mm"}
HISTOLOGY_CLASSES = {0: "non-adenoma", 1: "adenoma"}


def esc(value: object) -> str:
    """Text from data (ids, labels, file names) as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def script_json(obj: Any) -> str:
    """JSON for a `<script type="application/json">` element: `<`, `>` and `&` written as \\u escapes
    (so no `</script>` or `<!--` can end or change the element, whatever a string holds), and the
    line separators U+2028/9 escaped. JSON.parse reads it back unchanged."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028")):
        text = text.replace(ch, code)
    return text.replace("\u2029", "\\u2029")


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------ results table


@dataclass
class Cell:
    """One table cell: the value and its interval (fractions, as results.parquet holds them)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    flag: str | None = None  # degenerate probe: why

    def parts(self, metric: str, signed: bool = False) -> tuple[str, str | None]:
        """(`47.0`, `[41.2, 52.9]`) as report.md writes them (eval.report_tables.format_interval);
        the interval None without one."""

        def one(x: float | None) -> str:
            t = format_value(metric, x)
            return f"+{t}" if signed and x is not None and x > 0 else t

        if self.low is None or self.high is None:
            return one(self.value), None
        return one(self.value), f"[{one(self.low)}, {one(self.high)}]"

    def text(self, metric: str, signed: bool = False) -> str:
        value, interval = self.parts(metric, signed)
        return value if interval is None else f"{value} {interval}"


@dataclass
class PooledRow:
    """One arm's difference pooled over its seeds, as the page shows it."""

    arm: str
    minus: str
    seeds: list[int]
    cells: dict[tuple[str, str], Cell]


@dataclass
class ResultsTable:
    """Rows (encoders, in the report's order) x columns (task, metric): value cells and, for the
    rows compared with another, difference cells."""

    columns: list[tuple[str, str]]
    labels: list[str]
    values: dict[tuple[str, str, str], Cell] = field(default_factory=dict)  # (label, task, metric)
    diffs: dict[tuple[str, str, str], Cell] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)  # label -> the row it is compared with
    kinds: dict[str, str] = field(default_factory=dict)
    # per arm of two or more seeds (eval.report_pooled): (arm, minus, seeds, (task, metric) -> Cell)
    pooled: list[PooledRow] = field(default_factory=list)


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> ResultsTable:
    """The table of report.md from the rows written to results.parquet (so the page shows the file's
    numbers): one row per `checkpoint`, in first-seen order."""
    table = ResultsTable(list(columns), [])
    for r in rows:
        label = str(r["checkpoint"])
        if label not in table.labels:
            table.labels.append(label)
            table.kinds[label] = str(r.get("kind") or "")
        key = (label, str(r["task"]), str(r["metric"]))
        table.values[key] = Cell(
            _num(r["value"]),
            _num(r.get("value_ci_low")),
            _num(r.get("value_ci_high")),
            r.get("probe_degenerate"),
        )
        if r.get("diff_vs_baseline") is not None:
            table.diffs[key] = Cell(
                _num(r["diff_vs_baseline"]), _num(r.get("diff_ci_low")), _num(r.get("diff_ci_high"))
            )
            table.baselines[label] = str(r.get("baseline"))
    return table


def add_pooled(table: ResultsTable, pooled: Sequence[Any]) -> None:
    """The differences pooled over seeds (eval.report_pooled.PooledDifference), one row per arm."""
    for d in pooled:
        cells = {key: Cell(_num(iv.estimate), _num(iv.low), _num(iv.high)) for key, iv in d.intervals.items()}
        table.pooled.append(PooledRow(d.arm, d.versus, list(d.seeds), cells))


def lower_is_better(task: str, metric: str) -> bool:
    return (task, metric) in LOWER_IS_BETTER


# ------------------------------------------------------------------ retrieval gallery


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def spread(items: Sequence[int], n: int) -> list[int]:
    """At most `n` of `items`, evenly spaced, first and last included, in order."""
    if len(items) <= n:
        return list(items)
    if n <= 1:
        return list(items[:n])
    return list(dict.fromkeys(items[int(round(j * (len(items) - 1) / (n - 1)))] for j in range(n)))


def gallery_queries(
    vectors: np.ndarray, identities: Sequence[str], n_queries: int = MAX_QUERIES, k: int = TOP_K
) -> list[dict[str, Any]]:
    """Per query (a tracklet whose polyp has another test tracklet; at most `n_queries`, evenly
    spread over the split): its top-k other tracklets by cosine similarity, best first (ties by row),
    each `[row, similarity, same polyp]`, and `first_hit`: the rank (1-based) of the first tracklet of
    the same polyp in the whole ranking."""
    ids = [str(v) for v in identities]
    counts: dict[str, int] = defaultdict(int)
    for v in ids:
        counts[v] += 1
    eligible = [i for i, v in enumerate(ids) if counts[v] > 1]
    x = unit_rows(vectors)
    out = []
    for q in spread(eligible, n_queries):
        sims = x @ x[q]
        sims[q] = -np.inf
        order = np.lexsort((np.arange(len(sims)), -sims))[: len(sims) - 1]
        same = np.array([ids[i] == ids[q] for i in order], dtype=bool)
        top = [[int(i), round(float(sims[i]), 4), bool(s)] for i, s in zip(order[:k], same[:k], strict=True)]
        out.append({"q": int(q), "top": top, "first_hit": int(np.argmax(same)) + 1})
    return out


# ------------------------------------------------------------------ re-identification pairs


def reid_operating_point(
    vectors: np.ndarray,
    identities: Sequence[str],
    max_fpr: float = REID_FPR,
    per_group: int = PAIRS_PER_GROUP,
) -> dict[str, Any] | None:
    """Every unordered test pair's cosine similarity; the operating point is the threshold t of the
    highest true positive rate with pairwise FPR <= max_fpr (a pair is called "same polyp" when its
    similarity is above t). Returns t, the counts and rates there, and per group (false positives,
    highest first; false negatives, lowest first; true positives and true negatives nearest the
    threshold) at most `per_group` pairs `[row a, row b, similarity]`. None with more than
    MAX_PAIR_TRACKLETS tracklets, or without both kinds of pair."""
    n = len(identities)
    if n < 2 or n > MAX_PAIR_TRACKLETS:
        return None
    ids = np.asarray([str(v) for v in identities])
    x = unit_rows(vectors)
    a, b = np.triu_indices(n, k=1)
    s = (x @ x.T)[a, b]  # n x n similarities (n <= MAX_PAIR_TRACKLETS), never a row per pair and dimension
    same = ids[a] == ids[b]
    neg = s[~same]
    if not same.any() or not len(neg):
        return None
    k = min(int(math.floor(max_fpr * len(neg))), len(neg) - 1)
    t = float(np.partition(neg, len(neg) - 1 - k)[len(neg) - 1 - k])  # the (k+1)-th highest: k lie above
    called = s > t
    groups = {
        "false positives": np.flatnonzero(called & ~same),
        "false negatives": np.flatnonzero(~called & same),
        "true positives": np.flatnonzero(called & same),
        "true negatives": np.flatnonzero(~called & ~same),
    }
    sign = {  # most similar different polyps first, least similar views of one polyp first, and the
        "false positives": -1.0,  # correct calls nearest the threshold first
        "false negatives": 1.0,
        "true positives": 1.0,
        "true negatives": -1.0,
    }
    counts = {g: int(len(v)) for g, v in groups.items()}
    shown = {}
    for g, idx in groups.items():
        pick = _smallest(idx, sign[g] * s[idx], per_group)
        shown[g] = [[int(a[i]), int(b[i]), round(float(s[i]), 4)] for i in pick]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    return {
        "threshold": t,
        "max_fpr": max_fpr,
        "tpr": counts["true positives"] / n_pos,
        "fpr": counts["false positives"] / n_neg,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "counts": counts,
        "pairs": shown,
    }


def _smallest(idx: np.ndarray, key: np.ndarray, n: int) -> np.ndarray:
    """The `n` entries of `idx` of smallest `key`, in key order, ties by index (without sorting them all)."""
    if len(idx) > n > 0:
        keep = key <= np.partition(key, n - 1)[n - 1]
        idx, key = idx[keep], key[keep]
    return idx[np.lexsort((idx, key))][:n]


# ------------------------------------------------------------------ map, confusion, curves


def map_points(xy: np.ndarray, max_points: int = MAX_MAP_POINTS) -> list[list[float]]:
    """`[row, x, y]` of at most `max_points` rows (evenly spaced), x and y scaled into [0, 1]
    (one scale for both axes, so distances keep their ratio)."""
    xy = np.asarray(xy, dtype=np.float64)
    rows = spread(list(range(len(xy))), max_points)
    if not rows:
        return []
    pts = xy[rows]
    lo = pts.min(axis=0)
    span = float((pts.max(axis=0) - lo).max())
    scaled = (pts - lo) / span if span > 0 else np.full_like(pts, 0.5)
    if span > 0:  # centre the shorter axis
        scaled += (1.0 - scaled.max(axis=0)) / 2
    return [[int(r), round(float(p[0]), 4), round(float(p[1]), 4)] for r, p in zip(rows, scaled, strict=True)]


def confusion(y_true: Iterable[int], y_pred: Iterable[int], classes: Mapping[int, str]) -> dict[str, Any]:
    """Counts [true class][predicted class] over the classes named in `classes` plus any other seen."""
    yt = [int(v) for v in y_true]
    yp = [int(v) for v in y_pred]
    labels = sorted(set(classes) | set(yt) | set(yp))
    pos = {c: i for i, c in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for t, p in zip(yt, yp, strict=True):
        m[pos[t]][pos[p]] += 1
    return {"classes": [classes.get(c, str(c)) for c in labels], "counts": m, "n": len(yt)}


def curve_panels(series: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> list[dict[str, Any]]:
    """The panels of eval.curves (loss, learning rate, throughput, validation) present in a run's
    stitched series: title, whether the y axis is logarithmic, and each metric's (steps, values)."""
    from polyp_ssl.eval.curves import PANELS

    panels = []
    for title, ylabel, belongs in PANELS:
        names = [m for m in series if belongs(m)]
        if not names:
            continue
        lines = {m: ([int(s) for s in series[m][0]], [float(v) for v in series[m][1]]) for m in names}
        log_y = title == "learning rate" and all(v > 0 for _, vs in lines.values() for v in vs)
        panels.append({"title": title, "ylabel": ylabel, "log": log_y, "lines": lines})
    return panels
