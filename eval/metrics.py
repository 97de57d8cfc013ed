"""Retrieval and re-identification metrics over tracklet embeddings, exact and in bounded memory.

Scores are cosine similarities. Both tasks read the [N, N] similarity matrix one block at a time,
so memory grows with N (times a block), never with N^2.

Retrieval: every tracklet is a query; the others are ranked by score; positives share the
query's identity. Average precision follows scikit-learn's `average_precision_score` exactly:
tied scores form one threshold, AP = sum over thresholds of (recall gain) x (precision at that
threshold). Hit rate HR@k: a positive among the first k of the ranking, where ties are broken
by index (the stable order of the input rows: the earlier row ranks first). Queries without any
positive are excluded from the means and counted.

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

ScoreBlock = Callable[[int, int, int, int], np.ndarray]
"""score_block(r0, r1, c0, c1) -> scores of rows [r0, r1) x columns [c0, c1)."""

DEFAULT_MEMORY_BYTES = 512 * 2**20
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


def matrix_blocks(scores: np.ndarray) -> tuple[ScoreBlock, int]:
    """A score_block over a given square score matrix (for tests and small inputs)."""
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"score matrix must be square, got shape {s.shape}")
    return (lambda r0, r1, c0, c1: s[r0:r1, c0:c1]), s.shape[0]


def encode_labels(labels: np.ndarray | list) -> np.ndarray:
    """Integer codes (int64) of arbitrary hashable labels; equal labels, equal codes."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iub":  # strings, objects (None included): compare as text
        arr = arr.astype(object).astype(str)
    _, codes = np.unique(arr, return_inverse=True)  # order-preserving for integer labels
    return codes.astype(np.int64).reshape(-1)


def rows_per_block(n: int, bytes_per_cell: int = 96, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> int:
    """How many query rows of an [rows, n] working set fit in `memory_bytes`."""
    return max(1, min(n, memory_bytes // max(1, n * bytes_per_cell)))


# ----------------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalResult:
    mAP: float
    hr: dict[int, float]  # k -> HR@k
    n_queries: int  # queries with at least one positive (the ones averaged)
    n_excluded: int  # queries without a positive
    ap: np.ndarray = field(repr=False)  # per query, NaN where excluded
    hits: dict[int, np.ndarray] = field(repr=False)  # k -> bool per query (False where excluded)
    valid: np.ndarray = field(repr=False)  # bool per query

    def as_dict(self) -> dict:
        out = {"mAP": self.mAP, "n_queries": self.n_queries, "n_excluded": self.n_excluded}
        out.update({f"HR@{k}": v for k, v in self.hr.items()})
        return out


def _retrieval_rows(
    s: np.ndarray, rows: np.ndarray, ident: np.ndarray, video: np.ndarray | None, ks: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """AP, validity and hits of the query rows `rows` whose scores against all N are `s`."""
    c, n = s.shape
    local = np.arange(c)
    pos = ident[None, :] == ident[rows][:, None]
    pos[local, rows] = False
    allowed = None
    if video is not None:
        allowed = video[None, :] == video[rows][:, None]
        pos &= allowed
    pr, pc = np.nonzero(pos)
    n_pos = np.bincount(pr, minlength=c)
    valid = n_pos > 0
    ap = np.full(c, np.nan)
    hits = {k: np.zeros(c, dtype=bool) for k in ks}
    if not valid.any():
        return ap, valid, hits
    # Only items scoring at least the query's lowest positive can precede or tie a positive.
    lowest = np.full(c, np.inf)
    np.minimum.at(lowest, pr, s[pr, pc])
    cand = s >= lowest[:, None].astype(s.dtype)  # rows without a positive: +inf, no candidate
    cand[local, rows] = False
    if allowed is not None:
        cand &= allowed
    if np.count_nonzero(cand) > SORT_ABOVE * c * n:  # weak embeddings: most items are candidates
        return _retrieval_rows_sorted(s, rows, pr, pc, n_pos, allowed, ks)
    rr, cc = np.nonzero(cand)
    sc = s[rr, cc].astype(np.float64)
    y = pos[rr, cc]
    order = np.lexsort((cc, -sc, rr))  # by row, score descending, then index ascending
    rr, cc, sc, y = rr[order], cc[order], sc[order], y[order]
    starts = np.flatnonzero(np.r_[True, rr[1:] != rr[:-1]])
    seg_len = np.diff(np.r_[starts, rr.size])
    row_of_seg = rr[starts]
    pos_in_row = np.arange(rr.size) - np.repeat(starts, seg_len)  # 0-based rank within the query
    # hits: stable order (ties by index)
    for k in ks:
        hit_rr = rr[y & (pos_in_row < k)]
        hits[k][np.unique(hit_rr)] = True
    # AP with tied scores as one threshold
    cum_tp = np.cumsum(y)
    cum_tp_row = cum_tp - np.repeat(np.r_[0, cum_tp[starts[1:] - 1]], seg_len)
    group_end = np.r_[(rr[1:] != rr[:-1]) | (sc[1:] != sc[:-1]), True]
    ends = np.flatnonzero(group_end)
    tp_end = cum_tp_row[ends].astype(np.float64)
    prec_end = tp_end / (pos_in_row[ends] + 1)
    row_end = rr[ends]
    first_of_row = np.r_[True, row_end[1:] != row_end[:-1]]
    gained = tp_end - np.where(first_of_row, 0.0, np.r_[0.0, tp_end[:-1]])
    contrib = np.bincount(row_end, weights=gained * prec_end, minlength=c)
    ap[row_of_seg] = contrib[row_of_seg] / n_pos[row_of_seg]
    return ap, valid, hits


SORT_ABOVE = 0.05
"""Above this fraction of candidates in a block, retrieval sorts whole rows instead."""


def _retrieval_rows_sorted(
    s: np.ndarray,
    rows: np.ndarray,
    pr: np.ndarray,
    pc: np.ndarray,
    n_pos: np.ndarray,
    allowed: np.ndarray | None,
    ks: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Same result as the candidate path, by sorting each row once.

    AP = mean over positives p of (positives scoring >= s_p) / (items scoring >= s_p): every
    positive of a tied group gets the precision at the group's end, as in scikit-learn. The rank
    of p under the index tie-break = items scoring > s_p + tied items of lower index."""
    c, n = s.shape
    local = np.arange(c)
    s = np.array(s, copy=True)
    s[local, rows] = -np.inf
    if allowed is not None:
        s[~allowed] = -np.inf
    srt = np.sort(s, axis=1)
    ps = s[pr, pc]
    ap = np.full(c, np.nan)
    valid = n_pos > 0
    hits = {k: np.zeros(c, dtype=bool) for k in ks}
    kmax = max(ks) if ks else 0
    bounds = np.r_[0, np.cumsum(n_pos)]
    for r in np.flatnonzero(valid):
        a, b = bounds[r], bounds[r + 1]
        sp, cols = ps[a:b], pc[a:b]
        all_ge = n - np.searchsorted(srt[r], sp, side="left")
        sp_sorted = np.sort(sp)
        pos_ge = sp.size - np.searchsorted(sp_sorted, sp, side="left")
        ap[r] = float(np.mean(pos_ge / all_ge))
        gt = n - np.searchsorted(srt[r], sp, side="right")
        near = np.flatnonzero(gt < kmax)
        if near.size:
            rank = min(int(gt[i]) + int(np.count_nonzero(s[r, : cols[i]] == sp[i])) for i in near)
            for k in ks:
                hits[k][r] = rank < k
    return ap, valid, hits


def retrieval_metrics(
    score_block: ScoreBlock,
    n: int,
    identity: np.ndarray,
    video: np.ndarray | None = None,
    scope: str = "split",
    ks: tuple[int, ...] = (1, 5),
    rows_per_chunk: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    progress: Callable[[int], None] | None = None,
) -> RetrievalResult:
    """Retrieval over N tracklets; `scope` "split" ranks all others, "video" only those of the
    query's video (then `video` is required)."""
    ident = encode_labels(identity)
    if ident.size != n:
        raise ValueError(f"{ident.size} identities for {n} tracklets")
    if scope not in ("split", "video"):
        raise ValueError(f"scope must be 'split' or 'video', got {scope!r}")
    vid = None
    if scope == "video":
        if video is None:
            raise ValueError("scope='video' needs the video of each tracklet")
        vid = encode_labels(video)
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 tracklets, got {n}")
    chunk = rows_per_chunk or rows_per_block(n, memory_bytes=memory_bytes)
    ap = np.full(n, np.nan)
    valid = np.zeros(n, dtype=bool)
    hits = {k: np.zeros(n, dtype=bool) for k in ks}
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        s = np.asarray(score_block(r0, r1, 0, n))
        a, v, h = _retrieval_rows(s, np.arange(r0, r1), ident, vid, ks)
        ap[r0:r1], valid[r0:r1] = a, v
        for k in ks:
            hits[k][r0:r1] = h[k]
        if progress:
            progress(r1 - r0)
    n_q = int(valid.sum())
    if n_q == 0:
        raise ValueError(
            f"no query has a positive (another tracklet of its identity) among {n} tracklets; "
            "retrieval is undefined"
        )
    return RetrievalResult(
        mAP=float(np.mean(ap[valid])),
        hr={k: float(hits[k][valid].mean()) for k in ks},
        n_queries=n_q,
        n_excluded=n - n_q,
        ap=ap,
        hits=hits,
        valid=valid,
    )


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
