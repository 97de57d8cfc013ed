"""How spread a batch's bags are over videos: every other bag of a batch is a negative, and two
bags of one video often show the same polyp (a likely false negative). No I/O.

`same_video_pair_rate` measures a batch; `global_shuffle_pair_rate` is what a global shuffle of
every bag of the epoch (the reference code's batches) gives on average for the same index, the
yardstick a streaming loader is compared with.
"""

from __future__ import annotations

import numpy as np
import torch


def bag_videos(bag: np.ndarray, video: np.ndarray) -> np.ndarray:
    """The video of each bag of a batch (per-fragment `bag` and `video` codes; a bag's fragments
    all come from its anchor's video)."""
    bag, video = np.asarray(bag), np.asarray(video)
    order = np.unique(bag)
    return np.array([video[np.flatnonzero(bag == b)[0]] for b in order], dtype=np.int64)


def same_video_pair_rate(videos_of_bags: np.ndarray) -> float:
    """Fraction of unordered bag pairs of one batch whose bags come from the same video."""
    v = np.asarray(videos_of_bags)
    n = len(v)
    if n < 2:
        return 0.0
    _, counts = np.unique(v, return_counts=True)
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def global_shuffle_pair_rate(anchors_per_video: np.ndarray) -> float:
    """Expected same-video pair rate of a batch whose bag anchors are drawn without replacement
    from every anchor of the split (a global shuffle): sum_v a_v (a_v - 1) / (A (A - 1)), the
    chance that two distinct anchors share a video; the batch size does not change it."""
    a = np.asarray(anchors_per_video, dtype=np.float64)
    total = a.sum()
    if total < 2:
        return 0.0
    return float((a * (a - 1)).sum() / (total * (total - 1)))


def batch_same_video_pair_rate(bag: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """`same_video_pair_rate` of a training batch from its per-fragment `bag` and `video` tensors,
    computed with tensor operations on their device (no host synchronisation): pairs of fragments
    in different bags of one video, divided by the fragment pairs of all distinct bag pairs
    (bags of a batch are equally large)."""
    n = bag.shape[0]
    n_bags = int(bag.max()) + 1 if n else 0
    if n_bags < 2:
        return torch.zeros((), device=video.device)
    views = n // n_bags
    same = (video[:, None] == video[None, :]) & (bag[:, None] != bag[None, :])
    return same.sum().float() / float(views * views * n_bags * (n_bags - 1))


def bag_positive_rates(bags: np.ndarray, identity: np.ndarray, tracklet: np.ndarray) -> dict[str, float]:
    """How noisy a sampler's bags are as positives: over the members other than the anchor (bags
    [N, n_views] of fragment ids, anchor first; per-fragment identity codes, -1 unknown, and
    tracklet codes), the fraction that show the anchor's polyp (`same_identity`, members and
    anchors of known identity only) and the fraction from the anchor's own tracklet
    (`same_tracklet`). A temporal bag is right when `same_identity` is high, and informative
    beyond the tracklet sampler's positives when `same_tracklet` is well below 1."""
    bags = np.asarray(bags, dtype=np.int64)
    if bags.size == 0 or bags.shape[1] < 2:
        return {"same_identity": float("nan"), "same_tracklet": float("nan"), "members": 0}
    identity, tracklet = np.asarray(identity), np.asarray(tracklet)
    anchor, members = bags[:, :1], bags[:, 1:]
    a_id, m_id = identity[anchor], identity[members]
    known = (a_id >= 0) & (m_id >= 0)
    same_id = (a_id == m_id) & known
    same_trk = tracklet[anchor] == tracklet[members]
    return {
        "same_identity": float(same_id.sum() / max(known.sum(), 1)),
        "same_tracklet": float(same_trk.mean()),
        "members": int(members.size),
    }
