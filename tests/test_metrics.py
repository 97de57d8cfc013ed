"""Retrieval and re-identification metrics agree with scikit-learn exactly, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from polyp_ssl.eval.metrics import (
    cosine_blocks,
    matrix_blocks,
    reid_from_vectors,
    reid_metrics,
    retrieval_from_vectors,
    retrieval_metrics,
)


def quantised_scores(n: int, levels: int, seed: int) -> np.ndarray:
    """A symmetric score matrix with many exact ties."""
    rng = np.random.default_rng(seed)
    s = np.round(rng.random((n, n)) * levels) / levels
    return np.triu(s, 1) + np.triu(s, 1).T


def identities(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n)


def sklearn_retrieval(s: np.ndarray, ids: np.ndarray, video: np.ndarray | None = None, ks=(1, 5)):
    n = len(ids)
    ap, hits = {}, {k: {} for k in ks}
    for q in range(n):
        m = np.arange(n) != q
        if video is not None:
            m &= video == video[q]
        cols = np.flatnonzero(m)
        y = ids[cols] == ids[q]
        if not y.any():
            continue
        ap[q] = average_precision_score(y, s[q, cols])
        order = np.argsort(-s[q, cols], kind="stable")  # ties: lower index first
        for k in ks:
            hits[k][q] = bool(y[order[:k]].any())
    return ap, hits


@pytest.fixture(params=["candidates", "sorted"])
def retrieval_path(request, monkeypatch):
    """Run a test through both retrieval code paths (few candidates / whole-row sort)."""
    monkeypatch.setattr(
        "polyp_ssl.shards.retrieval.SORT_ABOVE", 2.0 if request.param == "candidates" else 0.0
    )
    return request.param


@pytest.mark.parametrize("levels,n_ids", [(4, 12), (16, 30), (1000, 50)])
def test_retrieval_ap_and_hits_match_direct(levels, n_ids, retrieval_path):
    n = 160
    s = quantised_scores(n, levels, seed=levels)
    ids = identities(n, n_ids, seed=levels + 1)
    res = retrieval_metrics(*matrix_blocks(s), ids, rows_per_chunk=13)
    ap, hits = sklearn_retrieval(s, ids)
    assert res.n_queries == len(ap) and res.n_excluded == n - len(ap)
    for q, a in ap.items():
        assert res.ap[q] == pytest.approx(a, abs=1e-12)
        assert res.hits[1][q] == hits[1][q] and res.hits[5][q] == hits[5][q]
    assert res.mAP == pytest.approx(np.mean(list(ap.values())), abs=1e-12)
    assert res.hr[5] == pytest.approx(np.mean(list(hits[5].values())), abs=1e-12)


def test_retrieval_within_video_scope(retrieval_path):
    n = 120
    s = quantised_scores(n, 8, seed=3)
    video = np.random.default_rng(4).integers(0, 5, n)
    ids = video * 10 + np.random.default_rng(5).integers(0, 4, n)
    res = retrieval_metrics(*matrix_blocks(s), ids, video=video, scope="video", rows_per_chunk=9)
    ap, _ = sklearn_retrieval(s, ids, video)
    for q, a in ap.items():
        assert res.ap[q] == pytest.approx(a, abs=1e-12)
    assert res.n_queries == len(ap)


def test_retrieval_chunk_size_invariance(retrieval_path):
    n = 97
    s = quantised_scores(n, 6, seed=7)
    ids = identities(n, 20, seed=8)
    results = [retrieval_metrics(*matrix_blocks(s), ids, rows_per_chunk=c) for c in (1, 5, 32, n)]
    for r in results[1:]:
        np.testing.assert_array_equal(r.ap, results[0].ap)
        np.testing.assert_array_equal(r.hits[1], results[0].hits[1])
    x = np.random.default_rng(9).normal(size=(n, 8)).astype(np.float32)
    a = retrieval_from_vectors(x, ids, rows_per_chunk=3)
    b = retrieval_from_vectors(x, ids, memory_bytes=10**9)
    np.testing.assert_allclose(a.ap, b.ap, atol=1e-12)


def test_hit_rate_tie_rule_is_index_order(retrieval_path):
    # query 0; tracklets 1 (negative) and 2 (positive) tie at the top score
    s = np.array([[0, 0.5, 0.5, 0.1], [0.5, 0, 0.2, 0.2], [0.5, 0.2, 0, 0.3], [0.1, 0.2, 0.3, 0]])
    ids = np.array(["a", "b", "a", "c"])
    res = retrieval_metrics(*matrix_blocks(s), ids)
    assert not res.hits[1][0]  # tracklet 1 ranks first by index
    assert res.hits[5][0]
    assert res.ap[0] == pytest.approx(0.5)  # one threshold holds both: precision 1/2
    ids2 = np.array(["a", "a", "b", "c"])  # now the positive has the lower index
    assert retrieval_metrics(*matrix_blocks(s), ids2).hits[1][0]


def test_retrieval_excludes_queries_without_positive_and_fails_when_none_has_one(retrieval_path):
    s = quantised_scores(6, 4, seed=1)
    res = retrieval_metrics(*matrix_blocks(s), np.array([0, 0, 1, 1, 2, 3]))
    assert res.n_queries == 4 and res.n_excluded == 2
    assert np.isnan(res.ap[4]) and not res.valid[5]
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_metrics(*matrix_blocks(s), np.arange(6))


def pair_labels(s: np.ndarray, ids: np.ndarray):
    iu = np.triu_indices(len(ids), 1)
    return ids[iu[0]] == ids[iu[1]], s[iu]


@pytest.mark.parametrize("levels,block", [(3, 7), (10, 16), (50, 1024), (10**6, 33)])
def test_reid_matches_sklearn_with_ties(levels, block):
    n = 150
    s = quantised_scores(n, levels, seed=levels % 97)
    ids = identities(n, 25, seed=2)
    y, sc = pair_labels(s, ids)
    res = reid_metrics(*matrix_blocks(s), ids, block=block)
    assert res.auroc == pytest.approx(roc_auc_score(y, sc), abs=1e-12)
    assert res.aupr == pytest.approx(average_precision_score(y, sc), abs=1e-12)
    assert res.n_pairs == len(y) and res.n_positive == int(y.sum())
    # the curves: the ROC integrates to the AUROC; PR points are sklearn's at the positive thresholds
    assert np.trapezoid(res.tpr, res.fpr) == pytest.approx(res.auroc, abs=1e-12)
    prec, rec, thr = precision_recall_curve(y, sc)
    at = {t: (p, r) for p, r, t in zip(prec[:-1], rec[:-1], thr, strict=True)}
    u = np.unique(sc[y])[::-1]
    for k, t in enumerate(u):
        assert res.precision[k] == pytest.approx(at[t][0], abs=1e-12)
        assert res.recall[k] == pytest.approx(at[t][1], abs=1e-12)


def test_reid_block_size_invariance_on_unsorted_identities():
    n = 130
    s = quantised_scores(n, 8, seed=11)
    ids = identities(n, 17, seed=12)
    results = [reid_metrics(*matrix_blocks(s), ids, block=b) for b in (5, 31, 256)]
    for r in results[1:]:
        assert r.auroc == results[0].auroc and r.aupr == results[0].aupr


def test_reid_on_cosine_vectors_matches_sklearn():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 30, 300)
    centres = rng.normal(size=(30, 12))
    x = (centres[ids] + 1.2 * rng.normal(size=(300, 12))).astype(np.float32)
    block, n = cosine_blocks(x)
    y, sc = pair_labels(block(0, n, 0, n), ids)
    for b in (64, 1024):
        res = reid_from_vectors(x, ids, block=b)
        assert res.auroc == pytest.approx(roc_auc_score(y, sc), abs=1e-6)
        assert res.aupr == pytest.approx(average_precision_score(y, sc), abs=1e-6)
    assert 0.6 < res.auroc < 1.0


def test_reid_degenerate_inputs_fail_clearly():
    s = quantised_scores(5, 4, seed=0)
    with pytest.raises(ValueError, match="no same-polyp pair"):
        reid_metrics(*matrix_blocks(s), np.arange(5))
    with pytest.raises(ValueError, match="one identity"):
        reid_metrics(*matrix_blocks(s), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="at least 2"):
        reid_metrics(*matrix_blocks(s[:1, :1]), np.zeros(1, dtype=int))
    with pytest.raises(ValueError, match="all zeros"):
        reid_from_vectors(np.zeros((3, 4)), np.array([0, 0, 1]))
