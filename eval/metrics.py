"""Retrieval and re-identification metrics over tracklet embeddings, exact and in bounded memory.

Scores are cosine similarities. Both tasks read the [N, N] similarity matrix one block at a time,
so memory grows with N (times a block), never with N^2.

Retrieval (polyp_ssl.shards.retrieval, the one mean-average-precision implementation): every
tracklet is a query; the others are ranked by score; positives share the query's identity; tied
scores form one threshold, as in scikit-learn's `average_precision_score`.

Re-identification: every unordered pair i < j, label = same identity. AUROC and AP equal
scikit-learn's `roc_auc_score` / `average_precision_score` on the list of all pair scores, ties
included, but the list is never built: a first pass collects the (few) positive-pair scores,
a second counts, for each distinct positive score u, how many pairs score exactly u and how many
fall strictly between consecutive distinct positive scores. Those counts determine both metrics
exactly (AP only moves at thresholds holding a positive; AUROC is the Mann-Whitney statistic,
ties counted one half). Both passes score pairs with the same fixed-shape tiles, so a pair's score
is bit-identical in the two passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from polyp_ssl.shards.retrieval import (
    DEFAULT_MEMORY_BYTES,
    SORT_ABOVE,
    NoPositiveError,
    RetrievalResult,
    ScoreBlock,
    encode_labels,
    matrix_blocks,
    retrieval_metrics,
    rows_per_block,
)

TILE = 1024


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row is an error (its cosine is undefined)."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"vector {bad} has a non-finite value")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms == 0).any():
        raise ValueError(f"vector {int(np.flatnonzero(norms == 0)[0])} is all zeros; cosine is undefined")
    return (x / norms[:, None]).astype(np.float32)


def cosine_blocks(vectors: np.ndarray, tile: int | None = TILE) -> tuple[ScoreBlock, int]:
    """A score_block over cosine similarities of `vectors`, and N.

    With `tile`, each block is assembled from fixed tile x tile matrix products (rows
    zero-padded), so the score of a pair does not depend on which block asked for it. With
    tile=None a block is one plain product (faster; bits may vary with the block's shape)."""
    xn = l2_normalize(vectors)
    n, d = xn.shape
    if tile is None:
        return (lambda r0, r1, c0, c1: xn[r0:r1] @ xn[c0:c1].T), n
    n_pad = -(-n // tile) * tile
    padded = np.zeros((n_pad, d), dtype=np.float32)
    padded[:n] = xn

    def block(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        out = np.empty((r1 - r0, c1 - c0), dtype=np.float32)
        for tr in range(r0 // tile, -(-r1 // tile)):
            a = padded[tr * tile : (tr + 1) * tile]
            ra0, ra1 = max(r0, tr * tile), min(r1, (tr + 1) * tile)
            for tc in range(c0 // tile, -(-c1 // tile)):
                b = padded[tc * tile : (tc + 1) * tile]
                ca0, ca1 = max(c0, tc * tile), min(c1, (tc + 1) * tile)
                s = a @ b.T
                out[ra0 - r0 : ra1 - r0, ca0 - c0 : ca1 - c0] = s[
                    ra0 - tr * tile : ra1 - tr * tile, ca0 - tc * tile : ca1 - tc * tile
                ]
        return out

    return block, n


# ------------------------------------------------------------------------------------------ reid


@dataclass
class ReidResult:
    auroc: float
    aupr: float
    n_pairs: int
    n_positive: int
    # curves at every distinct positive score (enough for exact ROC and PR plots)
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)

    def as_dict(self) -> dict:
        return {
            "AUROC": self.auroc,
            "AUPR": self.aupr,
            "n_pairs": self.n_pairs,
            "n_positive_pairs": self.n_positive,
        }


def _upper_pairs(s: np.ndarray, r0: int, c0: int) -> np.ndarray:
    """Mask of the pairs i < j within block rows r0.., columns c0.."""
    rows = np.arange(r0, r0 + s.shape[0])[:, None]
    cols = np.arange(c0, c0 + s.shape[1])[None, :]
    return cols > rows


def reid_metrics(
    score_block: ScoreBlock,
    n: int,
    identity: np.ndarray,
    block: int = TILE,
    progress: Callable[[int], None] | None = None,
) -> ReidResult:
    """Re-identification over all unordered pairs; exact, memory O(block^2 + positive pairs)."""
    codes = encode_labels(identity)
    if codes.size != n:
        raise ValueError(f"{codes.size} identities for {n} tracklets")
    if n < 2:
        raise ValueError(f"re-identification needs at least 2 tracklets, got {n}")
    if np.unique(codes).size == 1:
        raise ValueError("all tracklets share one identity: no different-polyp pair, AUROC is undefined")
    # Pass 1: positive-pair scores. Sorting by identity puts each identity's tracklets in one
    # run of indices, so only blocks near the diagonal hold positives.
    perm = np.argsort(codes, kind="stable")
    sc = codes[perm]

    if _is_identity(perm):
        blk = score_block
    else:

        def blk(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
            return _permuted_block(score_block, perm, r0, r1, c0, c1)

    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    ends = np.r_[starts[1:], n]
    wanted: set[tuple[int, int]] = set()
    for a, b in zip(starts, ends, strict=True):
        if b - a < 2:
            continue
        for br in range(a // block, (b - 1) // block + 1):
            for bc in range(br, (b - 1) // block + 1):
                wanted.add((br, bc))
    pos_scores = []
    for br, bc in sorted(wanted):
        r0, r1, c0, c1 = br * block, min(n, (br + 1) * block), bc * block, min(n, (bc + 1) * block)
        s = blk(r0, r1, c0, c1)
        m = _upper_pairs(s, r0, c0) & (sc[r0:r1, None] == sc[None, c0:c1])
        pos_scores.append(np.asarray(s)[m])
    pos_all = np.concatenate(pos_scores) if pos_scores else np.empty(0)
    n_pairs = n * (n - 1) // 2
    n_pos = int(pos_all.size)
    if n_pos == 0:
        raise ValueError(
            f"no two of the {n} tracklets share an identity: no same-polyp pair, "
            "re-identification is undefined"
        )
    u = np.unique(pos_all)  # ascending, the scores' own dtype
    m = u.size
    # Pass 2: for every pair, its place relative to u.
    eq_all = np.zeros(m, dtype=np.int64)  # pairs scoring exactly u[k]
    between = np.zeros(m + 1, dtype=np.int64)  # pairs in (u[k-1], u[k]); index m: above u[-1]
    eq_pos = np.zeros(m, dtype=np.int64)
    lo = u[0]
    nb = -(-n // block)
    for br in range(nb):
        r0, r1 = br * block, min(n, (br + 1) * block)
        for bc in range(br, nb):
            c0, c1 = bc * block, min(n, (bc + 1) * block)
            s = np.asarray(blk(r0, r1, c0, c1))
            keep = s >= lo
            if bc == br:
                keep &= _upper_pairs(s, r0, c0)
            x = s[keep]
            same = (sc[r0:r1, None] == sc[None, c0:c1])[keep]
            left = np.searchsorted(u, x, side="left")
            is_eq = (left < m) & (u[np.minimum(left, m - 1)] == x)
            eq_all += np.bincount(left[is_eq], minlength=m)
            eq_pos += np.bincount(left[is_eq & same], minlength=m)
            between += np.bincount(left[~is_eq], minlength=m + 1)
            if progress:
                progress(1)
    pos_count = np.bincount(np.searchsorted(u, pos_all), minlength=m)
    if not np.array_equal(pos_count, eq_pos):  # pragma: no cover - guards the tiling invariant
        raise RuntimeError("positive-pair scores differ between passes: score blocks are not deterministic")
    # counts at or above each u[k]
    above_eq = np.cumsum(eq_all[::-1])[::-1]
    above_between = np.r_[np.cumsum(between[::-1])[::-1][1:], 0][:m]  # sum of between[k+1..m]
    all_ge = above_eq + above_between
    pos_ge = np.cumsum(pos_count[::-1])[::-1]
    neg_total = n_pairs - n_pos
    if neg_total == 0:
        raise ValueError("every pair is a same-polyp pair: AUROC is undefined")
    neg_ge = all_ge - pos_ge
    neg_eq = eq_all - pos_count
    neg_lt = neg_total - neg_ge
    u_stat = float(np.sum(pos_count * (neg_lt + 0.5 * neg_eq)))
    auroc = u_stat / (float(n_pos) * float(neg_total))
    precision_at = pos_ge / all_ge
    aupr = float(np.sum(pos_count * precision_at)) / n_pos
    # curves, thresholds descending
    order = np.arange(m)[::-1]
    neg_gt = neg_ge - neg_eq
    pos_gt = pos_ge - pos_count
    fpr = np.r_[0.0, np.column_stack([neg_gt[order], neg_ge[order]]).ravel() / neg_total, 1.0]
    tpr = np.r_[0.0, np.column_stack([pos_gt[order], pos_ge[order]]).ravel() / n_pos, 1.0]
    return ReidResult(
        auroc=auroc,
        aupr=aupr,
        n_pairs=n_pairs,
        n_positive=n_pos,
        fpr=fpr,
        tpr=tpr,
        precision=precision_at[order].astype(np.float64),
        recall=(pos_ge[order] / n_pos).astype(np.float64),
    )


def _permuted_block(
    score_block: ScoreBlock, perm: np.ndarray, r0: int, r1: int, c0: int, c1: int
) -> np.ndarray:
    """Scores of permuted rows/columns, fetched from the covering original block. Meant for small
    inputs (a given matrix); `reid_from_vectors` permutes the vectors instead."""
    ri, ci = perm[r0:r1], perm[c0:c1]
    rlo, rhi, clo, chi = int(ri.min()), int(ri.max()) + 1, int(ci.min()), int(ci.max()) + 1
    s = np.asarray(score_block(rlo, rhi, clo, chi))
    return s[np.ix_(ri - rlo, ci - clo)]


def _is_identity(perm: np.ndarray) -> bool:
    return bool(np.array_equal(perm, np.arange(perm.size)))


def reid_from_vectors(vectors: np.ndarray, identity: np.ndarray, block: int = TILE, **kw) -> ReidResult:
    """Re-identification on cosine similarities; rows are first ordered by identity so the
    first pass touches only near-diagonal tiles."""
    codes = encode_labels(identity)
    perm = np.argsort(codes, kind="stable")
    blocks, n = cosine_blocks(np.asarray(vectors)[perm], tile=block)
    return reid_metrics(blocks, n, codes[perm], block=block, **kw)


def retrieval_from_vectors(
    vectors: np.ndarray, identity: np.ndarray, video: np.ndarray | None = None, **kw
) -> RetrievalResult:
    blocks, n = cosine_blocks(vectors, tile=None)  # one pass per row: no cross-block agreement needed
    return retrieval_metrics(blocks, n, identity, video=video, **kw)


def reid_pairs(
    vectors: np.ndarray, identity: np.ndarray, unit: np.ndarray | None = None, block: int = TILE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair's cosine score, same-identity label and the two rows' unit codes
    (units default to the identities), for bootstrap intervals of re-identification
    (eval.intervals.PairRanking). Rows are ordered and tiled exactly as in `reid_from_vectors`, so
    each score is bit-identical to the one the metric ranks. Memory O(pairs): about 21 bytes a pair
    here (float32 score, bool, two int64 codes), e.g. 1 GB for 10k tracklets."""
    codes = encode_labels(identity)
    units = codes if unit is None else encode_labels(unit)
    if units.size != codes.size:
        raise ValueError(f"{units.size} units for {codes.size} tracklets")
    perm = np.argsort(codes, kind="stable")
    blocks, n = cosine_blocks(np.asarray(vectors)[perm], tile=block)
    codes, units = codes[perm], units[perm]
    scores, same, ua, ub = [], [], [], []
    nb = -(-n // block)
    for br in range(nb):
        r0, r1 = br * block, min(n, (br + 1) * block)
        for bc in range(br, nb):
            c0, c1 = bc * block, min(n, (bc + 1) * block)
            s = np.asarray(blocks(r0, r1, c0, c1))
            i, j = np.nonzero(_upper_pairs(s, r0, c0))
            scores.append(s[i, j])
            same.append(codes[r0 + i] == codes[c0 + j])
            ua.append(units[r0 + i])
            ub.append(units[c0 + j])
    return np.concatenate(scores), np.concatenate(same), np.concatenate(ua), np.concatenate(ub)


__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "SORT_ABOVE",
    "NoPositiveError",
    "ReidResult",
    "RetrievalResult",
    "ScoreBlock",
    "TILE",
    "cosine_blocks",
    "encode_labels",
    "l2_normalize",
    "matrix_blocks",
    "reid_from_vectors",
    "reid_metrics",
    "reid_pairs",
    "retrieval_from_vectors",
    "retrieval_metrics",
    "rows_per_block",
]
