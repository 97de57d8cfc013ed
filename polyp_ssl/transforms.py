"""Anchor crops from stored crops (docs/architecture.md "Crops"): decode, crop, resize, flip.

Frames stay uint8; normalisation (mean 0.45, std 0.225) happens on the device inside the encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.io
import torchvision.transforms.v2.functional as TF

from polyp_ssl.shards.crops import enlarge_box
from polyp_ssl.shards.sample import check_jpeg
from polyp_ssl.shards.textio import load_json


def decode_jpeg_bytes(data: bytes, expected: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 [3, H, W] RGB from JPEG bytes. The header is checked first (shards.sample.check_jpeg:
    at most MAX_FRAME_PIXELS, and `expected` = [w, h] when given), so a small file that declares a
    huge frame is refused (JpegSizeError, a ValueError) before the decoder allocates it."""
    check_jpeg(data, expected)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return torchvision.io.decode_jpeg(buf, mode=torchvision.io.ImageReadMode.RGB)


def resize_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """[3, h, w] uint8 -> [3, size, size] uint8 (aspect not kept), bilinear with antialiasing."""
    if img.shape[-2:] == (size, size):
        return img
    # torchvision's uint8 path (antialiased bilinear without a float copy) is ~5x faster on CPU
    return TF.resize(img, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


@dataclass(frozen=True)
class CropParams:
    """One anchor-crop draw, shared by all frames of a fragment (so the clip stays coherent)."""

    scale: float
    shift_x: float = 0.0  # centre shift, as a fraction of the box width
    shift_y: float = 0.0
    hflip: bool = False
    vflip: bool = False


@dataclass(frozen=True)
class Augment:
    """Random training augmentations, each off unless asked (our extension; the reference's
    `--aug_anchorcrop` is the deterministic anchor crop alone). All draws are per fragment."""

    random_scale: bool = False  # crop scale x U(0.8, 1.2), capped at the stored crop's scale
    jitter: bool = False  # crop centre shifted by U(-0.1, 0.1) x box width / height
    hflip: bool = False  # horizontal flip with probability 0.5
    vflip: bool = False  # vertical flip with probability 0.5

    @property
    def enabled(self) -> bool:
        return self.random_scale or self.jitter or self.hflip or self.vflip

    @classmethod
    def from_config(cls, cfg: object) -> Augment:
        """From an object with `aug_random_scale`, `aug_jitter`, `aug_hflip`, `aug_vflip` attributes."""
        return cls(
            bool(getattr(cfg, "aug_random_scale", False)),
            bool(getattr(cfg, "aug_jitter", False)),
            bool(getattr(cfg, "aug_hflip", False)),
            bool(getattr(cfg, "aug_vflip", False)),
        )


NO_AUGMENT = Augment()


def draw_crop_params(
    base_scale: float,
    rng: np.random.Generator | None,
    max_scale: float | None = None,
    augment: Augment = NO_AUGMENT,
) -> CropParams:
    """The anchor crop of one fragment: deterministic (box enlarged `base_scale` times about its
    centre) unless `augment` asks for random scale, jitter or flips, drawn from `rng`. Only the
    draws that are asked for consume random numbers, in the order scale, jitter, flips."""
    if rng is None or not augment.enabled:
        return CropParams(base_scale)
    scale = base_scale
    if augment.random_scale:
        scale = base_scale * rng.uniform(0.8, 1.2)
        if max_scale is not None:
            scale = min(scale, max_scale)
    sx = sy = 0.0
    if augment.jitter:
        sx, sy = rng.uniform(-0.1, 0.1, size=2)
    hflip = augment.hflip and bool(rng.random() < 0.5)
    vflip = augment.vflip and bool(rng.random() < 0.5)
    return CropParams(float(scale), float(sx), float(sy), bool(hflip), bool(vflip))


def crop_window(
    box: Sequence[float], params: CropParams, width: int, height: int
) -> tuple[int, int, int, int]:
    """The anchor crop's [x0, y0, x1, y1) in a width x height stored crop whose box is `box`."""
    x, y, bw, bh = box
    return enlarge_box(
        (x + params.shift_x * bw, y + params.shift_y * bh, bw, bh), params.scale, width, height
    )


def crop_resize(img: torch.Tensor, box: Sequence[float], params: CropParams, im_size: int) -> torch.Tensor:
    """The anchor crop of one decoded stored crop [3, H, W] around its box, resized to im_size,
    without the flips (a view of `img` when no resize is needed)."""
    _, h, w = img.shape
    x0, y0, x1, y1 = crop_window(box, params, w, h)
    return resize_uint8(img[:, y0:y1, x0:x1], im_size)


def apply_flips(frames: torch.Tensor, params: CropParams) -> torch.Tensor:
    """The flips of `params` on [..., H, W] (one call for a whole fragment)."""
    dims = [d for d, on in ((-1, params.hflip), (-2, params.vflip)) if on]
    return frames.flip(dims) if dims else frames


def anchor_crop(img: torch.Tensor, box: Sequence[float], params: CropParams, im_size: int) -> torch.Tensor:
    """The anchor crop of one decoded stored crop [3, H, W] around its box, resized to im_size."""
    return apply_flips(crop_resize(img, box, params, im_size), params)


def load_frames(
    jpegs: Sequence[bytes],
    boxes_in_crop: Sequence[Sequence[float]],
    im_size: int,
    scale: float,
    params: CropParams | None = None,
    decode: Callable[[bytes], torch.Tensor] = decode_jpeg_bytes,
    sizes: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """uint8 [S, 3, im_size, im_size]: each stored JPEG decoded and anchor-cropped around its box
    (enlarge_box with `scale`, or with `params` when given). With `sizes` (the JSON's crop_sizes)
    every JPEG's header must give its size before any of them is decoded (JpegSizeError)."""
    if len(jpegs) != len(boxes_in_crop):
        raise ValueError(f"{len(jpegs)} JPEGs for {len(boxes_in_crop)} boxes")
    if sizes is not None:
        if len(sizes) != len(jpegs):
            raise ValueError(f"{len(jpegs)} JPEGs for {len(sizes)} crop sizes")
        for j, wh in zip(jpegs, sizes, strict=True):
            check_jpeg(j, wh)
    params = params or CropParams(scale)
    frames = [anchor_crop(decode(j), b, params, im_size) for j, b in zip(jpegs, boxes_in_crop, strict=False)]
    if not frames:
        return torch.zeros((0, 3, im_size, im_size), dtype=torch.uint8)
    return torch.stack(frames)


def check_crop_scale(bbox_scale_factor: float, root: str | Path, flag: str = "--bbox_scale_factor") -> None:
    """ValueError when the anchor crop is wider than the stored crop of an ingested root (the crop
    would be clamped to the stored window without a word)."""
    manifest = Path(root) / "catalog" / "manifest.json"
    try:
        params = load_json(manifest, "catalog manifest", max_bytes=16 << 20).get("parameters") or {}
    except (OSError, ValueError, AttributeError):  # TextInputError (too deep, not JSON) included
        return  # no readable catalog: the run's own checks name the problem
    crop_scale = params.get("crop_scale")
    if isinstance(crop_scale, int | float) and bbox_scale_factor > crop_scale + 1e-9:
        raise ValueError(
            f"{flag} {bbox_scale_factor:g} is larger than the crop scale {crop_scale:g} that {root} was "
            f"ingested with ({manifest}: parameters.crop_scale): re-ingest with "
            f"`polyp-ssl ingest RAW_ROOT --out {root} --overwrite --crop-scale {bbox_scale_factor:g}` or "
            f"pass {flag} <= {crop_scale:g}"
        )
