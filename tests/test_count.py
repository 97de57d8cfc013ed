"""Polyp counting on toy videos with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from polyp_ssl.eval.count import (
    Video,
    affinity_run,
    agglomerative_labels,
    evaluate_counting,
    group_videos,
    overlaps,
    pair_counts,
    select_value,
    sweep,
)


def toy_video(name: str, n_polyps: int, per_polyp: int, seed: int, noise: float = 0.01) -> Video:
    """Polyps on orthogonal axes, tracklets one after another in time (no overlap)."""
    rng = np.random.default_rng(seed)
    dim = max(8, n_polyps)
    ident = np.repeat([f"{name}_{p}" for p in range(n_polyps)], per_polyp)
    x = np.repeat(np.eye(dim)[:n_polyps], per_polyp, axis=0) + noise * rng.normal(size=(len(ident), dim))
    start = np.arange(len(ident)) * 20
    return Video(name, ident, x, start, start + 10)


@pytest.mark.parametrize("method", ["agglomerative", "affinity"])
def test_well_separated_polyps_count_exactly(method):
    val = [toy_video(f"v{i}", 3, 4, seed=i) for i in range(3)]
    test = [toy_video(f"t{i}", 2 + i, 3, seed=10 + i) for i in range(3)]
    # polyps are orthogonal (distance 1 apart), tracklets of one polyp within ~0.01
    grid = [0.1, 0.3, 0.5] if method == "agglomerative" else [-0.5, 0.0, 0.5]
    res = evaluate_counting(val, test, method=method, grid=grid)
    assert res.value == grid[-1] if method == "agglomerative" else res.value == grid[0]
    assert res.fpr_target_met
    assert res.test_fragmentation == pytest.approx(1.0)
    assert res.test_fpr == 0.0 and res.val_fpr == 0.0
    assert [r["n_clusters"] for r in res.per_video] == [2, 3, 4]
    assert res.not_converged == 0


def test_temporal_constraint_splits_identical_overlapping_tracklets():
    x = np.tile(np.array([[1.0, 0.0, 0.0]]), (2, 1))  # identical embeddings
    video = Video("v", np.array(["a", "b"]), x, np.array([0, 5]), np.array([10, 15]))  # overlap 5..10
    assert agglomerative_labels(video, [0.5], temporal=False)[0].tolist() == [0, 0]
    lab = agglomerative_labels(video, [0.5, 1.9], temporal=True)
    assert all(np.unique(lab_k).size == 2 for lab_k in lab)
    # a third tracklet close to both, not overlapping: joins one of them, never both together
    x3 = np.vstack([x, [[1.0, 0.01, 0.0]]])
    v3 = Video("v", np.array(["a", "b", "a"]), x3, np.array([0, 5, 40]), np.array([10, 15, 50]))
    lab = agglomerative_labels(v3, [1.9], temporal=True)[0]
    assert lab[0] != lab[1] and np.unique(lab).size == 2
    aff, ok = affinity_run(video, preference=-0.5, temporal=True)
    assert ok and np.unique(aff).size == 2


def test_overlap_and_pair_counts():
    m = overlaps(np.array([0, 10, 11, 30]), np.array([10, 12, 20, 40]))
    assert m.tolist() == [
        [False, True, False, False],
        [True, False, True, False],
        [False, True, False, False],
        [False, False, False, False],
    ]
    labels = np.array([0, 0, 1, 1, 1])
    ident = np.array(["a", "b", "a", "c", "c"])
    # different pairs: ab, aa? no; pairs (0,1) diff together; (0,2) same; (0,3),(0,4) diff apart;
    # (1,2) diff apart, (1,3), (1,4) diff apart; (2,3), (2,4) diff together; (3,4) same
    assert pair_counts(labels, ident) == (3, 8)


def angle_video(name: str, angles_deg: list[float], ident: list[str]) -> Video:
    a = np.deg2rad(np.asarray(angles_deg))
    x = np.column_stack([np.cos(a), np.sin(a)])
    start = np.arange(len(a)) * 100
    return Video(name, np.asarray(ident), x, start, start + 10)


def test_threshold_is_the_loosest_grid_value_under_the_fpr():
    # a1, a2 of polyp a: 20 degrees apart (distance 0.060); b at 60 degrees from a1 (average
    # distance to {a1, a2}: (0.5 + 0.234) / 2 = 0.367).
    val = [angle_video("v", [0, 20, 60], ["a", "a", "b"])]
    grid = [0.03, 0.1, 0.2, 0.3, 0.4, 0.8]
    sw = sweep(val, "agglomerative", grid, temporal=False)
    assert sw.fpr == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert sw.fragmentation == [1.5, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert select_value("agglomerative", sw, 0.05) == (0.3, True)
    # a tighter target than any value reaches: the lowest FPR (ties: the loosest), flagged
    sw.fpr = [0.2, 0.1, 0.1, 0.3, 1.0, 1.0]
    assert select_value("agglomerative", sw, 0.05) == (0.2, False)
    # affinity: the loosest is the smallest preference
    sw.fpr = [0.0, 0.0, 0.04, 0.2, 0.0, 0.0]
    assert select_value("affinity", sw, 0.05) == (0.03, True)
    res = evaluate_counting(val, val, "agglomerative", grid=grid)
    assert res.value == 0.3 and res.test_fragmentation == 1.0 and res.test_fpr == 0.0


def test_group_videos_keeps_rows_per_video():
    vids = group_videos(["b", "a", "b"], ["x", "y", "z"], np.eye(3), [0, 1, 2], [5, 6, 7])
    assert [v.video_id for v in vids] == ["b", "a"]
    assert vids[0].identity.tolist() == ["x", "z"] and vids[0].end.tolist() == [5, 7]
