"""Retrieval mean average precision over scored items, exact and in bounded memory: the one
implementation behind training's validation mAP (polyp_ssl.module), the synthetic data's
statistics (ingest.synth.stats) and evaluation (eval.metrics).

Every item is a query; the others are ranked by score; positives share the query's identity.
Average precision follows scikit-learn's `average_precision_score`: tied scores form one
threshold, AP = sum over thresholds of (recall gain) x (precision at that threshold). Hit rate
HR@k: a positive among the first k of the ranking, where ties are broken by index (the stable
order of the input rows: the earlier row ranks first). Queries without any positive are
excluded from the means and counted. Scores come from a `score_block(r0, r1, c0, c1)` callable,
so memory grows with N times a block of rows, never with N^2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ScoreBlock = Callable[[int, int, int, int], np.ndarray]
"""score_block(r0, r1, c0, c1) -> scores of rows [r0, r1) x columns [c0, c1)."""

DEFAULT_MEMORY_BYTES = 512 * 2**20


class NoPositiveError(ValueError):
    """No query has a positive (another item of its identity): retrieval is undefined."""


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
        raise NoPositiveError(
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


def matrix_blocks(scores: np.ndarray) -> tuple[ScoreBlock, int]:
    """A score_block over a given square score matrix (for tests and small inputs)."""
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"score matrix must be square, got shape {s.shape}")
    return (lambda r0, r1, c0, c1: s[r0:r1, c0:c1]), s.shape[0]


def score_map(scores: np.ndarray, identity: np.ndarray) -> tuple[float, int, int]:
    """(mAP, queries, excluded) of retrieval ranked by a given square score matrix (row i: query
    i's score of every item; the diagonal is ignored). mAP is nan when no query has a positive
    (also for fewer than two items); `excluded` counts the queries without a positive."""
    s = np.asarray(scores)
    n = int(s.shape[0]) if s.ndim else 0
    if n < 2:
        return float("nan"), 0, n
    blocks, _ = matrix_blocks(s)
    try:
        res = retrieval_metrics(blocks, n, np.asarray(identity), ks=())
    except NoPositiveError:
        return float("nan"), 0, n
    return res.mAP, res.n_queries, res.n_excluded


def cosine_map(vectors: np.ndarray, identity: np.ndarray) -> tuple[float, int, int]:
    """`score_map` of cosine similarities in float64: rows scaled to unit length (a norm below
    1e-12 counts as 1e-12), all N x N similarities computed as one product."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return score_map(x @ x.T, identity)
