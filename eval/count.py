"""Polyp counting: per video, cluster the tracklet embeddings into polyps.

Methods (distance = 1 - cosine similarity of the tracklet vectors):
- agglomerative: average linkage, cut at a distance threshold t (larger t, fewer clusters);
- affinity: affinity propagation on the cosine similarities with a preference p (smaller p,
  fewer clusters).
Temporal constraint (optional): two tracklets of a video whose [start_frame, end_frame] intersect
are seen at the same time, so they are different polyps. Agglomerative: their distance is set to
`CANNOT_LINK`, so no average-linkage merge joining them stays under any threshold (a hard
constraint for clusters of fewer than ~1e5 tracklets). Affinity: their similarity is set to
`-CANNOT_LINK_SIM`, so neither takes the other as exemplar (a soft constraint: both may still
follow a third exemplar).

Pairwise FPR of a clustering: among the pairs of tracklets of one video that show different
polyps, the fraction put in the same cluster; pooled over videos (sum of merged different pairs /
sum of different pairs). Fragmentation rate: predicted clusters / true polyps, averaged over videos.
The operating point is chosen on validation videos: the loosest grid value whose pooled FPR is at
most `max_fpr`, then applied unchanged to the test videos.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

METHODS = ("agglomerative", "affinity")
CANNOT_LINK = 1e12
CANNOT_LINK_SIM = 1e3
DEFAULT_DISTANCE_GRID = tuple(float(v) for v in np.round(np.arange(0.0, 2.0 + 1e-9, 0.01), 4))
DEFAULT_PREFERENCE_GRID = tuple(float(v) for v in np.round(np.arange(-3.0, 1.0 + 1e-9, 0.05), 4))


class CountError(ValueError):
    pass


@dataclass
class Video:
    video_id: str
    identity: np.ndarray  # str [n], the true polyp of each tracklet
    vectors: np.ndarray  # float [n, D]
    start: np.ndarray  # int [n]
    end: np.ndarray  # int [n]

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])


def group_videos(
    video_id: Sequence[str],
    identity: Sequence[str],
    vectors: np.ndarray,
    start: Sequence[int],
    end: Sequence[int],
) -> list[Video]:
    """Tracklet rows -> one Video per video_id, in first-seen order."""
    vid = np.asarray(video_id, dtype=object).astype(str)
    ident = np.asarray(identity, dtype=object).astype(str)
    s, e = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
    x = np.asarray(vectors, dtype=np.float64)
    out = []
    for v in dict.fromkeys(vid):
        m = vid == v
        out.append(Video(v, ident[m], x[m], s[m], e[m]))
    return out


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise CountError("a tracklet vector is all zeros; cosine similarity is undefined")
    u = x / norms
    return np.clip(u @ u.T, -1.0, 1.0)


def overlaps(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """[n, n] bool: intervals [start, end] intersect (diagonal False)."""
    s, e = np.asarray(start), np.asarray(end)
    m = (s[:, None] <= e[None, :]) & (s[None, :] <= e[:, None])
    np.fill_diagonal(m, False)
    return m


def agglomerative_labels(
    video: Video, thresholds: Sequence[float], temporal: bool = False
) -> list[np.ndarray]:
    """Cluster labels for each threshold (one linkage, cut at every threshold)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = video.n
    if n == 1:
        return [np.zeros(1, dtype=np.int64) for _ in thresholds]
    d = 1.0 - cosine_similarity(video.vectors)
    if temporal:
        d[overlaps(video.start, video.end)] = CANNOT_LINK
    np.fill_diagonal(d, 0.0)
    d = np.maximum((d + d.T) / 2, 0.0)
    z = linkage(squareform(d, checks=False), method="average")
    return [fcluster(z, t=float(t), criterion="distance").astype(np.int64) - 1 for t in thresholds]


def affinity_run(
    video: Video, preference: float, temporal: bool = False, seed: int = 0
) -> tuple[np.ndarray, bool]:
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    n = video.n
    if n == 1:
        return np.zeros(1, dtype=np.int64), True
    s = cosine_similarity(video.vectors)
    if temporal:
        s[overlaps(video.start, video.end)] = -CANNOT_LINK_SIM
    ap = AffinityPropagation(
        affinity="precomputed", preference=preference, damping=0.7, max_iter=1000, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="All samples have mutually equal similarities")
        labels = ap.fit_predict(s)
    if (labels < 0).any():
        return np.arange(n, dtype=np.int64), False
    return labels.astype(np.int64), True


def pair_counts(labels: np.ndarray, identity: np.ndarray) -> tuple[int, int]:
    """(different-polyp pairs put together, different-polyp pairs) within one video."""
    labels = np.asarray(labels)
    ident = np.asarray(identity)
    iu = np.triu_indices(labels.size, 1)
    diff = ident[iu[0]] != ident[iu[1]]
    together = labels[iu[0]] == labels[iu[1]]
    return int((diff & together).sum()), int(diff.sum())


@dataclass
class Sweep:
    values: list[float]
    fpr: list[float]  # pooled pairwise FPR per value
    fragmentation: list[float]  # mean over videos of clusters / polyps, per value
    not_converged: list[int] = field(default_factory=list)  # affinity: videos not converged per value


def cluster_all(
    videos: Sequence[Video], method: str, values: Sequence[float], temporal: bool, seed: int = 0
) -> tuple[list[list[np.ndarray]], list[int]]:
    """labels[v][k]: video v clustered at values[k]; plus per-value count of non-converged runs."""
    if method not in METHODS:
        raise CountError(f"method must be one of {METHODS}, got {method!r}")
    out: list[list[np.ndarray]] = []
    not_conv = [0] * len(values)
    for video in videos:
        if method == "agglomerative":
            out.append(agglomerative_labels(video, values, temporal))
        else:
            row = []
            for k, p in enumerate(values):
                labels, ok = affinity_run(video, p, temporal, seed)
                row.append(labels)
                not_conv[k] += int(not ok)
            out.append(row)
    return out, not_conv


def sweep(
    videos: Sequence[Video], method: str, values: Sequence[float], temporal: bool, seed: int = 0
) -> Sweep:
    if not videos:
        raise CountError("no videos to cluster")
    labels, not_conv = cluster_all(videos, method, values, temporal, seed)
    fpr, frag = [], []
    for k in range(len(values)):
        merged = total = 0
        ratios = []
        for v, video in enumerate(videos):
            a, b = pair_counts(labels[v][k], video.identity)
            merged, total = merged + a, total + b
            ratios.append(np.unique(labels[v][k]).size / np.unique(video.identity).size)
        fpr.append(merged / total if total else 0.0)
        frag.append(float(np.mean(ratios)))
    return Sweep([float(x) for x in values], fpr, frag, not_conv)


def select_value(method: str, sw: Sweep, max_fpr: float) -> tuple[float, bool]:
    """The loosest grid value whose pooled FPR <= max_fpr (agglomerative: the largest threshold;
    affinity: the smallest preference). When none qualifies: the value with the lowest FPR (ties:
    the loosest of them) and False."""
    ok = [i for i, f in enumerate(sw.fpr) if f <= max_fpr]
    if ok:
        pick = (
            max(ok, key=lambda i: sw.values[i])
            if method == "agglomerative"
            else min(ok, key=lambda i: sw.values[i])
        )
        return sw.values[pick], True
    sign = -1.0 if method == "agglomerative" else 1.0
    best = min(range(len(sw.values)), key=lambda i: (sw.fpr[i], sign * sw.values[i]))
    return sw.values[best], False


@dataclass
class CountResult:
    method: str
    temporal_constraint: bool
    value: float  # threshold (agglomerative) or preference (affinity)
    fpr_target_met: bool
    max_fpr: float
    val_fpr: float
    val_fragmentation: float
    test_fpr: float
    test_fragmentation: float
    per_video: list[dict]
    val_sweep: Sweep | None = None
    not_converged: int = 0

    def summary(self) -> dict:
        return {
            "method": self.method,
            "temporal_constraint": self.temporal_constraint,
            "value": self.value,
            "fpr_target_met": self.fpr_target_met,
            "max_fpr": self.max_fpr,
            "val_fpr": self.val_fpr,
            "val_fragmentation_rate": self.val_fragmentation,
            "test_fpr": self.test_fpr,
            "test_fragmentation_rate": self.test_fragmentation,
            "n_test_videos": len(self.per_video),
            "test_not_converged": self.not_converged,
        }


def evaluate_counting(
    val: Sequence[Video],
    test: Sequence[Video],
    method: str = "agglomerative",
    temporal: bool = False,
    max_fpr: float = 0.05,
    grid: Sequence[float] | None = None,
    seed: int = 0,
) -> CountResult:
    """Choose the operating point on `val`, report on `test`."""
    if grid is None:
        grid = DEFAULT_DISTANCE_GRID if method == "agglomerative" else DEFAULT_PREFERENCE_GRID
    if not test:
        raise CountError("no test videos")
    sw = sweep(val, method, grid, temporal, seed)
    value, met = select_value(method, sw, max_fpr)
    k = sw.values.index(value)
    labels, not_conv = cluster_all(test, method, [value], temporal, seed)
    rows = []
    merged = total = 0
    for video, lab in zip(test, labels, strict=True):
        a, b = pair_counts(lab[0], video.identity)
        merged, total = merged + a, total + b
        n_pred = int(np.unique(lab[0]).size)
        n_true = int(np.unique(video.identity).size)
        rows.append(
            {
                "video_id": video.video_id,
                "n_tracklets": video.n,
                "n_polyps": n_true,
                "n_clusters": n_pred,
                "fragmentation": n_pred / n_true,
                "false_merges": a,
                "different_pairs": b,
            }
        )
    return CountResult(
        method=method,
        temporal_constraint=temporal,
        value=value,
        fpr_target_met=met,
        max_fpr=max_fpr,
        val_fpr=sw.fpr[k],
        val_fragmentation=sw.fragmentation[k],
        test_fpr=merged / total if total else 0.0,
        test_fragmentation=float(np.mean([r["fragmentation"] for r in rows])),
        per_video=rows,
        val_sweep=sw,
        not_converged=not_conv[0],
    )
