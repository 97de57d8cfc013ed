"""2-D projection of embeddings (PCA or t-SNE) and its scatter plot coloured by polyp."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from polyp_ssl.eval.plots import save_figure

METHODS = ("pca", "tsne")
log = logging.getLogger(__name__)
# unit vectors closer than this in every coordinate are one point (a collapsed embedding)
COLLAPSED_SPREAD = 1e-9


def is_collapsed(vectors: np.ndarray) -> bool:
    """Whether the L2-normalised rows of `vectors` ([N, D], N >= 1) are all the same point: a
    collapsed embedding (a model that maps every input to one vector). Such a set has no spread to
    project, and t-SNE's gradient or PCA's variance ratio divide by it."""
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    return bool(x.shape[0] and float(np.ptp(x, axis=0).max(initial=0.0)) <= COLLAPSED_SPREAD)


def project_2d(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, D] vectors -> [N, 2] float64 coordinates.

    Vectors are L2-normalised first (every task compares them by cosine similarity). t-SNE's
    perplexity is capped below N so that small test splits work.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"project_2d needs a non-empty [N, D] array, got shape {x.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}, choose one of {METHODS}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    n = x.shape[0]
    if n == 1:
        return np.zeros((1, 2))
    if is_collapsed(x):
        log.warning("the %d vectors are one point (a collapsed embedding): projected to the origin", n)
        return np.zeros((n, 2))
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, n, x.shape[1])
        out = PCA(n_components=k, random_state=seed).fit_transform(x)
    else:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
        # exact gradients are cheaper than Barnes-Hut's tree for a few hundred points
        algo = "exact" if n <= 150 else "barnes_hut"
        out = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=algo, max_iter=500
        ).fit_transform(x)
    if out.shape[1] < 2:  # a single feature: pad a zero axis
        out = np.concatenate([out, np.zeros((n, 2 - out.shape[1]))], axis=1)
    return np.asarray(out, dtype=np.float64)


def plot_projection(
    xy: np.ndarray,
    labels: Sequence[str],
    path: str | Path,
    title: str = "",
    max_legend: int = 20,
) -> Path:
    """Scatter of [N, 2] points, one colour per label (polyp identity), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = np.asarray(xy)
    labels = [str(v) for v in labels]
    if len(labels) != xy.shape[0]:
        raise ValueError(f"{len(labels)} labels for {xy.shape[0]} points")
    uniq = sorted(set(labels))
    cmap = plt.get_cmap("tab20" if len(uniq) <= 20 else "hsv", max(len(uniq), 1))
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    for i, lab in enumerate(uniq):
        sel = np.array([v == lab for v in labels])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=cmap(i), label=lab, alpha=0.85, edgecolors="none")
    if 0 < len(uniq) <= max_legend:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="polyp")
    ax.set_title(title or "test embeddings, coloured by polyp")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)
