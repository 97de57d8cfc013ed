"""ROC and precision-recall curve PNGs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Write a figure as PNG under a temporary name, rename it into place, close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def roc_png(path: str | Path, fpr: np.ndarray, tpr: np.ndarray, auroc: float, title: str = "") -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(fpr, tpr, lw=1.5, label=f"AUROC {auroc:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title or "re-identification ROC")
    ax.legend(loc="lower right")
    try:
        return save_figure(fig, path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def pr_png(
    path: str | Path,
    recall: np.ndarray,
    precision: np.ndarray,
    aupr: float,
    prevalence: float,
    title: str = "",
) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.step(
        np.r_[0.0, recall],
        np.r_[precision[:1] if len(precision) else [1.0], precision],
        where="pre",
        lw=1.5,
        label=f"AUPR {aupr:.4f}",
    )
    ax.axhline(prevalence, ls="--", lw=0.8, color="grey", label=f"chance {prevalence:.4f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title or "re-identification precision-recall")
    ax.legend(loc="upper right")
    try:
        return save_figure(fig, path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def intervals_png(
    path: str | Path,
    panels: list[tuple[str, list[str], np.ndarray, np.ndarray, np.ndarray]],
    title: str = "95% bootstrap intervals",
) -> Path:
    """One panel per metric (title, row labels, values, lows, highs): each row's value as a dot
    with its interval as a horizontal error bar, rows top to bottom in the order given."""
    plt = _figure()
    n_rows = max(len(p[1]) for p in panels)
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(2.6 * ncol + 1.6, nrow * (0.45 * n_rows + 1.2) + 0.4), squeeze=False
    )
    flat = axes.ravel()
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    for i, (ax, (name, labels, vals, lows, highs)) in enumerate(zip(flat, panels, strict=False)):
        y = np.arange(len(labels))[::-1]
        v, lo, hi = (np.asarray(a, dtype=np.float64) for a in (vals, lows, highs))
        err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        ax.errorbar(v, y, xerr=err, fmt="o", ms=4, capsize=3, lw=1.2)
        ax.set_yticks(y)
        same_rows = i % ncol > 0 and list(labels) == list(panels[i - 1][1])
        ax.set_yticklabels([""] * len(labels) if same_rows else labels, fontsize=7)
        ax.set_ylim(-0.7, len(labels) - 0.3)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", lw=0.4, alpha=0.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
