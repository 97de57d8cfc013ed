"""The loader's side of reading samples: the sequential reader and the sample checks live in
polyp_ssl.shards.samples (re-exported here); this module keeps what the loader adds, the checks of
a frame right before it is decoded or shipped (`check_frame`, `decode_frame`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from polyp_ssl.loader_errors import ShardError
from polyp_ssl.shards.sample import JpegSizeError, TrackletSample, check_jpeg
from polyp_ssl.shards.samples import SampleDamage, check_sample, iter_tar_samples

__all__ = [
    "DECODE_CACHE_PIXELS",
    "PARSED_META",
    "SampleDamage",
    "check_frame",
    "check_sample",
    "check_size",
    "decode_frame",
    "iter_tar_samples",
]

PARSED_META = "__meta__"  # a checked sample carries its parsed TrackletSample under this key
# decoded frames a worker keeps for reuse within one batch (a 256 x 256 batch of 480 frames is 31 M);
# past it frames are decoded again, so memory stays bounded whatever sizes the JSON declares
DECODE_CACHE_PIXELS = 64 << 20


def check_frame(data: bytes, meta: TrackletSample, i: int, shard: str) -> tuple[int, int]:
    """Frame i's JPEG header against the JSON's crop_sizes (and shards.sample.MAX_FRAME_PIXELS),
    before anything decodes it: ShardError `corrupt_jpeg` when it has no readable header,
    `json_mismatch` when its size differs."""
    try:
        return check_jpeg(data, meta.crop_sizes[i])
    except JpegSizeError as exc:
        if exc.kind == "no_header":
            detail = f"frame {i} does not decode ({exc})"
            raise ShardError.at(shard, meta.key, "corrupt_jpeg", detail) from None
        raise ShardError.at(shard, meta.key, "json_mismatch", f"frame {i} is {exc}") from None


def decode_frame(
    data: bytes, meta: TrackletSample, i: int, shard: str, decode: Callable[[bytes], torch.Tensor]
) -> torch.Tensor:
    """Frame i decoded, its header checked first (check_frame) and its decoded size after."""
    check_frame(data, meta, i, shard)
    try:
        img = decode(data)
    except (RuntimeError, ValueError) as exc:
        raise ShardError.at(shard, meta.key, "corrupt_jpeg", f"frame {i} does not decode ({exc})") from exc
    check_size(img.shape[-1], img.shape[-2], meta, i, shard)
    return img


def check_size(width: int, height: int, meta: TrackletSample, i: int, shard: str) -> None:
    """A frame's JPEG must have the size its JSON gives (crop_sizes), which the anchor-crop windows
    are computed from; ShardError (json_mismatch) otherwise."""
    if [width, height] != list(meta.crop_sizes[i]):
        raise ShardError.at(
            shard,
            meta.key,
            "json_mismatch",
            f"frame {i} is a {width}x{height} JPEG, the JSON's crop_sizes say "
            f"{meta.crop_sizes[i][0]}x{meta.crop_sizes[i][1]}",
        )
