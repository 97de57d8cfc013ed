"""Crop geometry shared by ingest (stored crops) and training (anchor crops from stored crops)."""

from __future__ import annotations

import math


def enlarge_box(
    box: tuple[float, float, float, float] | list[float], scale: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """[x, y, w, h] enlarged `scale` times in width and height about its centre, clamped to a
    width x height image, as integer [x0, y0, x1, y1) with at least one pixel each way."""
    x, y, w, h = box
    cx, cy = x + w / 2.0, y + h / 2.0
    hw, hh = w * scale / 2.0, h * scale / 2.0
    x0 = min(max(0, math.floor(cx - hw)), width - 1)
    y0 = min(max(0, math.floor(cy - hh)), height - 1)
    x1 = max(min(width, math.ceil(cx + hw)), x0 + 1)
    y1 = max(min(height, math.ceil(cy + hh)), y0 + 1)
    return x0, y0, x1, y1


def stored_size(crop_w: int, crop_h: int, store_size: int) -> tuple[int, int]:
    """Size of a stored crop: longer side at most store_size, aspect kept, never upscaled."""
    s = min(1.0, store_size / max(crop_w, crop_h))
    return max(1, round(crop_w * s)), max(1, round(crop_h * s))


def box_in_crop(
    box: tuple[float, float, float, float] | list[float],
    crop: tuple[int, int, int, int] | list[int],
    stored_wh: tuple[int, int] | list[int],
) -> list[float]:
    """The source box [x, y, w, h] in the pixel coordinates of the stored (resized) crop."""
    x, y, w, h = box
    x0, y0, x1, y1 = crop
    sx = stored_wh[0] / (x1 - x0)
    sy = stored_wh[1] / (y1 - y0)
    return [(x - x0) * sx, (y - y0) * sy, w * sx, h * sy]
