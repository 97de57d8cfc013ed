"""A fixed hand-made tracklet descriptor: the colour histogram of the box crops, averaged over the
tracklet. It measures how much of a polyp's identity plain colour gives away (the appearance
difficulty of a dataset) and serves as a non-learned retrieval baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BINS = 6  # per channel: a joint 6 x 6 x 6 RGB histogram
DIM = BINS**3


def crop_histogram(crop: np.ndarray) -> np.ndarray:
    """Joint RGB histogram of an H x W x 3 uint8 crop, normalised to sum 1 (float64, DIM)."""
    q = (crop.reshape(-1, 3).astype(np.int32) * BINS) >> 8
    idx = (q[:, 0] * BINS + q[:, 1]) * BINS + q[:, 2]
    hist = np.bincount(idx, minlength=DIM).astype(np.float64)
    return hist / max(1.0, hist.sum())


def box_crop(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The pixels of [x, y, w, h] (outward-rounded, clamped to the image; at least one pixel)."""
    h, w = image.shape[:2]
    x, y, bw, bh = box
    x0 = min(max(0, math.floor(x)), w - 1)
    y0 = min(max(0, math.floor(y)), h - 1)
    x1 = max(min(w, math.ceil(x + bw)), x0 + 1)
    y1 = max(min(h, math.ceil(y + bh)), y0 + 1)
    return image[y0:y1, x0:x1]


def describe_tracklet(images: Sequence[np.ndarray], boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """Mean of the per-frame crop histograms (images RGB uint8, boxes [x, y, w, h]), L2-normalised,
    float32 of length DIM."""
    if len(images) != len(boxes):
        raise ValueError(f"describe_tracklet: {len(images)} images but {len(boxes)} boxes")
    if not images:
        raise ValueError("describe_tracklet: empty tracklet")
    mean = np.mean([crop_histogram(box_crop(im, b)) for im, b in zip(images, boxes, strict=True)], axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
