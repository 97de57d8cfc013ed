"""Stored crops: the box enlarged `crop_scale` times about its centre, clamped to the frame
(shards.crops.enlarge_box), resized so its longer side is at most `store_size`, JPEG-encoded."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from polyp_ssl.shards.crops import box_in_crop, enlarge_box, stored_size


@dataclass(frozen=True)
class StoredCrop:
    jpeg: bytes
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 in source-frame pixels
    size: tuple[int, int]  # stored w, h
    box_in_crop: list[float]


def crop_geometry(
    bbox: tuple[float, float, float, float], width: int, height: int, crop_scale: float, store_size: int
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    crop = enlarge_box(bbox, crop_scale, width, height)
    return crop, stored_size(crop[2] - crop[0], crop[3] - crop[1], store_size)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def stored_crop(
    frame: Image.Image,
    bbox: tuple[float, float, float, float],
    crop_scale: float,
    store_size: int,
    quality: int,
    source_wh: tuple[int, int] | None = None,
) -> StoredCrop:
    """`frame` is the source frame, or the source frame decoded at reduced size (JPEG draft)
    when `source_wh`, its full size, differs; the geometry is always in full-size pixels."""
    width, height = source_wh or frame.size
    crop, size = crop_geometry(bbox, width, height, crop_scale, store_size)
    if frame.size == (width, height):
        region = frame.crop(crop)
        if region.size != size:
            region = region.resize(size, Image.Resampling.BILINEAR)
    else:
        sx, sy = frame.width / width, frame.height / height
        x0, y0, x1, y1 = crop
        region = frame.resize(size, Image.Resampling.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    return StoredCrop(encode_jpeg(region, quality), crop, size, box_in_crop(bbox, crop, size))


def draft_reduce(
    boxes: list[tuple[float, float, float, float]],
    width: int,
    height: int,
    crop_scale: float,
    store_size: int,
) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) at which every crop of the frame still has
    at least its stored size in pixels, so that no stored crop is upsampled."""
    ratio = min(
        max(crop[2] - crop[0], crop[3] - crop[1]) / max(size)
        for crop, size in (crop_geometry(b, width, height, crop_scale, store_size) for b in boxes)
    )
    r = 1
    while r < 8 and ratio >= 2 * r:
        r *= 2
    return r
