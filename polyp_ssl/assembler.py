"""The batch assembler: the rows of a batch (polyp_ssl.batch_source.Row) into the batch dict of
docs/architecture.md "Batches", whichever source read them.

Each fragment's anchor crop is drawn here; then either the workers decode and crop the rows'
JPEGs (`decode_on` workers), or the distinct JPEGs are packed with their crop windows for the
training process to decode (`decode_on` device, polyp_ssl.device_decode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from polyp_ssl.batch_source import Row
from polyp_ssl.device_decode import pack_jpegs
from polyp_ssl.stream_index import StreamParams
from polyp_ssl.tar_samples import DECODE_CACHE_PIXELS, check_frame, decode_frame
from polyp_ssl.transforms import (
    Augment,
    apply_flips,
    crop_resize,
    crop_window,
    decode_jpeg_bytes,
    draw_crop_params,
)


class BatchAssembler:
    """Rows -> batch dict, under the stream's parameters (crop scale, augmentation, im_size,
    fragment_length, decode_on). ShardError for a frame that does not decode or whose size is
    not its JSON's (the source that drafted the rows decides what happens next)."""

    def __init__(
        self, params: StreamParams, decode: Callable[[bytes], torch.Tensor] = decode_jpeg_bytes
    ) -> None:
        self.params = params
        self.decode = decode

    def __call__(self, rows: list[Row], rng: np.random.Generator) -> dict:
        """The batch dict of the rows (one per fragment, bag by bag)."""
        p = self.params
        augment = Augment.from_config(p)
        for row in rows:
            row.crop = draw_crop_params(p.bbox_scale_factor, rng, row.meta.params.get("crop_scale"), augment)
        out = self.encode_rows(rows) if p.decode_on == "device" else {"frames": self.decode_rows(rows)}
        out.update(
            {
                "bag": torch.tensor([r.bag for r in rows], dtype=torch.int64),
                "video": torch.tensor([r.video for r in rows], dtype=torch.int64),
                "tracklet": torch.tensor([r.tracklet for r in rows], dtype=torch.int64),
                "identity": torch.tensor([r.identity for r in rows], dtype=torch.int64),
                "position": torch.tensor([r.position for r in rows], dtype=torch.float32),
                "videos_per_batch": torch.tensor(len({r.video_index for r in rows}), dtype=torch.int64),
            }
        )
        return out

    def decode_rows(self, rows: list[Row]) -> torch.Tensor:
        """uint8 [B, S, 3, im_size, im_size], each distinct JPEG decoded once, each resized frame
        written once into its slot of one preallocated batch (no stacking)."""
        p = self.params
        cache: dict[tuple[str, int], torch.Tensor] = {}
        cached_px = 0  # decoded images kept for reuse in this batch, bounded by DECODE_CACHE_PIXELS
        frames = batch_buffer((len(rows), p.fragment_length, 3, p.im_size, p.im_size))
        for n, row in enumerate(rows):
            meta, params = row.meta, row.crop
            for j, i in enumerate(row.frames):
                img = cache.get((meta.key, i))
                if img is None:
                    img = decode_frame(row.jpegs[i], meta, i, row.shard, self.decode)
                    if cached_px + img.shape[-1] * img.shape[-2] <= DECODE_CACHE_PIXELS:
                        cache[(meta.key, i)] = img
                        cached_px += img.shape[-1] * img.shape[-2]
                frames[n, j].copy_(crop_resize(img, meta.boxes_in_crop[i], params, p.im_size))
            if params.hflip or params.vflip:
                frames[n] = apply_flips(frames[n], params)
        return frames

    def encode_rows(self, rows: list[Row]) -> dict[str, Any]:
        """The rows' distinct JPEGs as bytes plus each frame's JPEG index, crop window and the
        rows' flips (the keys of polyp_ssl.device_decode); the windows come from the stored crop
        sizes in the sample JSON, so nothing is decoded here."""
        p = self.params
        slot: dict[tuple[str, int], int] = {}
        jpegs: list[bytes] = []
        names: list[str] = []
        which: list[list[int]] = []
        windows: list[list[tuple[int, int, int, int]]] = []
        for row in rows:
            meta = row.meta
            which.append([])
            windows.append([])
            for i in row.frames:
                m = slot.get((meta.key, i))
                if m is None:
                    m = slot[(meta.key, i)] = len(jpegs)
                    data = row.jpegs[i]
                    check_frame(data, meta, i, row.shard)
                    jpegs.append(data)
                    names.append(f"{row.shard}: sample {meta.key!r}: frame {i}")
                which[-1].append(m)
                w, h = meta.crop_sizes[i]
                windows[-1].append(crop_window(meta.boxes_in_crop[i], row.crop, w, h))
        packed, offsets = pack_jpegs(jpegs)
        return {
            "jpeg_data": packed,
            "jpeg_offsets": offsets,
            "jpeg_names": names,
            "frame_jpeg": torch.tensor(which, dtype=torch.int64).view(len(rows), p.fragment_length),
            "frame_window": torch.tensor(windows, dtype=torch.int64).view(len(rows), p.fragment_length, 4),
            "flips": torch.tensor([[r.crop.hflip, r.crop.vflip] for r in rows], dtype=torch.bool).view(-1, 2),
        }


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a loader worker, made in shared memory from the start (as
    torch's default_collate does), so that handing the batch to the main process does not copy it
    into shared memory again (a second full copy of every frame, about as slow as decoding)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    proto = torch.empty(0, dtype=torch.uint8)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)
