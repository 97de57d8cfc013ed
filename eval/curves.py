"""`polyp-ssl curves RUN... [--out DIR]`: training curves from a run's CSV logs.

`polyp-ssl train --logger csv` writes Lightning's `RUN/logs/version_N/metrics.csv`, one version
per start of the run (a resume starts a new one). This reads every version and stitches them by
step: a version covers the steps from its first logged step on, so where a resume went back to an
earlier checkpoint the later version wins for the steps it repeats, and each curve has strictly
increasing steps, none twice. The PNG has one panel per kind: loss (the total and each term),
learning rate, throughput (fragments/s), and validation metrics when logged. The stitched values
are also written as CSV (`curves_{run}.csv`: metric, step, value).

Only the standard library is imported up front (matplotlib when drawing), so `--help` is instant.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polyp_ssl.shards.cli_parser import FlagParser
from polyp_ssl.shards.textio import TextInputError, csv_rows, shown

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
_VERSION_RE = re.compile(r"^version_(\d+)$")
_NAME_OK = re.compile(r"[^A-Za-z0-9_.+-]+")
MAX_CSV_BYTES = 512 * 2**20  # a metrics.csv larger than this is not a Lightning log of a run
# panels: (title, y label, does this metric belong here)
PANELS = (
    ("loss", "loss", lambda m: m.startswith("train/loss")),
    ("learning rate", "lr", lambda m: m == "train/lr"),
    ("throughput", "fragments / s", lambda m: m == "train/fragments_per_s"),
    ("validation", "value", lambda m: m.startswith("val/") and m != "val/n_tracklets"),
)


class CurvesError(ValueError):
    """A run without logs, or a log that is not a Lightning metrics CSV; the message names the file."""


@dataclass
class Curves:
    """One run's stitched curves: metric -> (steps, values), steps strictly increasing."""

    run: str
    versions: list[Path] = field(default_factory=list)
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)  # first step of each later version


def version_files(run: str | Path) -> list[Path]:
    """RUN/logs/version_N/metrics.csv (or LOGS/version_N/metrics.csv), in N order."""
    run = Path(run)
    logs = run / "logs" if (run / "logs").is_dir() else run
    found = []
    if logs.is_dir():
        for d in logs.iterdir():
            m = _VERSION_RE.match(d.name)
            if m and (d / METRICS_FILE).exists():  # a FIFO here is refused by name when read
                found.append((int(m.group(1)), d / METRICS_FILE))
    if not found:
        raise CurvesError(
            f"{run}: no {logs}/version_*/{METRICS_FILE} (a run of `polyp-ssl train --logger csv`; give the "
            "run folder, e.g. runs/my_experiment)"
        )
    return [p for _, p in sorted(found)]


def read_metrics_csv(path: str | Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} of one Lightning metrics.csv. Epoch aggregates (`*_epoch`) are left
    out and the `_step` suffix dropped; a metric logged twice at one step keeps its last value."""
    path = Path(path)
    if path.stat().st_size > MAX_CSV_BYTES:
        raise CurvesError(f"{path}: {path.stat().st_size} bytes, more than a metrics log ({MAX_CSV_BYTES})")
    out: dict[str, dict[int, float]] = {}
    # strict and bounded (shards.textio): a FIFO refused, a quoting error, a line or field too long,
    # bytes that are not UTF-8, a control character: one line naming the file and the line
    rows = csv_rows(path, "metrics CSV", encoding="utf-8")
    try:
        header = next(rows, (1, None))[1]
        if not header or "step" not in header:
            raise CurvesError(f"{path}: no `step` column in the header: not a Lightning metrics.csv")
        step_col = header.index("step")
        cols = [
            (i, name[: -len("_step")] if name.endswith("_step") else name)
            for i, name in enumerate(header)
            if name not in ("step", "epoch") and not name.endswith("_epoch")
        ]
        for line, row in rows:
            if len(row) != len(header):
                raise CurvesError(f"{path}: line {line} has {len(row)} fields, the header {len(header)}")
            step = _number(row[step_col], path, line, "step")
            if step is None or step < 0 or not float(step).is_integer():
                raise CurvesError(f"{path}: line {line}, field 'step': {shown(row[step_col])} is not a step")
            for i, name in cols:
                v = _number(row[i], path, line, header[i])
                if v is not None:
                    out.setdefault(name, {})[int(step)] = v
    except TextInputError as e:
        raise CurvesError(str(e)) from None
    return out


def stitch(versions: Sequence[dict[str, dict[int, float]]]) -> dict[str, tuple[list[int], list[float]]]:
    """Versions in order -> metric -> (steps, values). A version owns every step from its first
    logged step on: steps an earlier version logged there are dropped (the resumed run repeated
    them from an earlier checkpoint), so steps are strictly increasing."""
    merged: dict[str, dict[int, float]] = {}
    for v in versions:
        steps = [s for series in v.values() for s in series]
        if not steps:
            continue
        first = min(steps)
        for name in merged:
            merged[name] = {s: x for s, x in merged[name].items() if s < first}
        for name, series in v.items():
            merged.setdefault(name, {}).update(series)
    out = {}
    for name, series in sorted(merged.items()):
        steps = sorted(series)
        if steps:
            out[name] = (steps, [series[s] for s in steps])
    return out


def run_curves(run: str | Path) -> Curves:
    files = version_files(run)
    name = Path(run).resolve().name
    if name == "logs":
        name = Path(run).resolve().parent.name
    versions = [read_metrics_csv(f) for f in files]
    firsts = [min(s for series in v.values() for s in series) for v in versions[1:] if any(v.values())]
    return Curves(name, files, stitch(versions), firsts)


def plot_curves(curves: Curves, path: str | Path) -> Path:
    """One PNG, one panel per kind of metric present (PANELS); resumes marked by dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polyp_ssl.eval.plots import save_figure

    panels = []
    for title, ylabel, belongs in PANELS:
        names = [m for m in curves.series if belongs(m)]
        if names:
            panels.append((title, ylabel, names))
    if not panels:
        raise CurvesError(f"{curves.run}: the logs hold no training metric (train/loss, train/lr, ...)")
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2.4 * len(panels)), dpi=110, sharex=True, squeeze=False
    )
    for ax, (title, ylabel, names) in zip(axes[:, 0], panels, strict=True):
        for m in names:
            steps, values = curves.series[m]
            ax.plot(steps, values, lw=1.1, marker="." if len(steps) < 30 else None, label=m)
        if title == "learning rate" and all(v > 0 for m in names for v in curves.series[m][1]):
            ax.set_yscale("log")
        for step in curves.resumed_at:
            ax.axvline(step, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    resumes = f" (resumed at step {', '.join(map(str, curves.resumed_at))})" if curves.resumed_at else ""
    title = f"{curves.run}: {len(curves.versions)} log version(s), stitched by step{resumes}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_csv(curves: Curves, path: str | Path) -> Path:
    """metric, step, value rows (under a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["metric", "step", "value"])
        for name, (steps, values) in curves.series.items():
            w.writerows((name, s, repr(v)) for s, v in zip(steps, values, strict=True))
    os.replace(tmp, path)
    return path


def curves_for(run: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Draw one run's curves into OUT/curves_{run}.png (+ .csv); returns both paths."""
    curves = run_curves(run)
    stem = f"curves_{slug(curves.run)}"
    png = plot_curves(curves, Path(out_dir) / f"{stem}.png")
    return png, write_csv(curves, Path(out_dir) / f"{stem}.csv")


def run_of_checkpoint(path: str | Path) -> Path | None:
    """The run folder of a checkpoint (RUN/checkpoints/X.ckpt) or run folder, when it has logs."""
    p = Path(path)
    run = p if p.is_dir() else (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    try:
        version_files(run)
    except CurvesError:
        return None
    return run


def slug(text: str) -> str:
    return _NAME_OK.sub("-", text).strip("-.") or "run"


def _number(text: str, path: Path, line: int, column: str) -> float | None:
    if text == "":
        return None
    try:
        v = float(text)
    except ValueError:
        where = f"{path}: line {line}, field {shown(column)}"
        raise CurvesError(f"{where}: {shown(text)} is not a number") from None
    return v if math.isfinite(v) else None


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="polyp-ssl curves",
        description="Training curves (loss per term, learning rate, throughput, validation) of runs, "
        "from their CSV logs stitched across resumes, as PNG and CSV.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (RUN/logs/version_*/metrics.csv)")
    p.add_argument("--out", default=None, help="output folder (default: each run's own folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.errors import run_cli

    args = build_parser().parse_args(argv)

    def run() -> int:
        runs = [run_curves(r) for r in args.runs]  # every log read before anything is drawn
        names = [slug(c.run) for c in runs]
        for run, curves, name in zip(args.runs, runs, names, strict=True):
            out = Path(args.out) if args.out else Path(run)
            if names.count(name) > 1:  # two runs of one name (runs/a/x, runs/b/x): told apart
                name += "-" + hashlib.sha256(str(Path(run).resolve()).encode()).hexdigest()[:6]
            stem = f"curves_{name}"
            png = plot_curves(curves, out / f"{stem}.png")
            table = write_csv(curves, out / f"{stem}.csv")
            last = curves.series.get("train/loss")
            tail = f", last train/loss {last[1][-1]:.4f} at step {last[0][-1]}" if last else ""
            print(f"{curves.run}: {len(curves.versions)} version(s){tail}; wrote {png} and {table}")
        return 0

    return run_cli("polyp-ssl curves", run, (CurvesError, OSError))
