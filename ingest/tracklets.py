"""Tracklets as docs/method.md defines them: maximal runs of one identity's boxes in near-consecutive
frames whose consecutive boxes overlap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    annotation_id: int
    image_id: int
    frame_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = min(ax0 + aw, bx0 + bw) - max(ax0, bx0)
    ih = min(ay0 + ah, by0 + bh) - max(ay0, by0)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def build_tracklets(boxes: Sequence[Box], separation: int = 1, iou_min: float = 0.1) -> list[list[Box]]:
    """Split one identity's boxes into tracklets, in time order.

    A new tracklet starts where the frame gap to the previous box exceeds `separation` or the IoU
    with the previous box is below `iou_min`. Two boxes of one identity in one frame are the
    caller's to resolve (ingest reports them); here the later one (by annotation id) follows.
    """
    ordered = sorted(boxes, key=lambda b: (b.frame_id, b.annotation_id))
    tracklets: list[list[Box]] = []
    for box in ordered:
        if tracklets:
            prev = tracklets[-1][-1]
            if box.frame_id - prev.frame_id <= separation and iou(prev.bbox, box.bbox) >= iou_min:
                tracklets[-1].append(box)
                continue
        tracklets.append([box])
    return tracklets
