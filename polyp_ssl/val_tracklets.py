"""Validation batches during training: whole val tracklets, deterministic anchor crop, padded."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from polyp_ssl.fragments import cut_tracklet, even_subsample, fragment_index_lists
from polyp_ssl.shards.sample import frame_jpeg
from polyp_ssl.shards.samples import SampleDamage, ShardError, check_sample, iter_tar_samples
from polyp_ssl.stream_index import StreamIndex, StreamParams
from polyp_ssl.tar_samples import decode_frame
from polyp_ssl.transforms import (
    CropParams,
    anchor_crop,
    decode_jpeg_bytes,
)

# ---------------------------------------------------------------- validation: whole tracklets


class ValTracklets(IterableDataset):
    """Whole val tracklets (every fragment_stride-th frame, at most max_frames, evenly spread),
    deterministic anchor crop, padded batches with `mask`; rank r takes items r, r + world, ...
    padded with copies of real items (`valid` False, same tracklet code) so every rank runs the
    same number of batches and a gather that de-duplicates by tracklet sees each tracklet once."""

    def __init__(
        self,
        index: StreamIndex,
        params: StreamParams,
        batch_size: int,
        max_frames: int = 64,
        rank: int = 0,
        world_size: int = 1,
        aug_anchorcrop: bool = False,
    ) -> None:
        self.index, self.params, self.batch_size = index, params, batch_size
        self.max_frames, self.rank, self.world_size, self.aug = max_frames, rank, world_size, aug_anchorcrop
        keys = sorted(
            index.samples, key=lambda k: (index.video_shard[index.samples[k][0]], index.samples[k][0], k)
        )
        self.per_rank = math.ceil(len(keys) / world_size)
        self.all_keys = keys
        self.keys = keys[rank::world_size]
        self.n_batches = math.ceil(self.per_rank / batch_size) if self.per_rank else 0

    def __len__(self) -> int:
        return self.n_batches

    def _items(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """(sample, valid): the rank's samples in order, then copies of the first samples of the
        split as padding (valid False; their tracklet codes repeat, so a gather de-duplicates)."""
        ix = self.index
        pads = self.all_keys[: self.per_rank - len(self.keys)]
        wanted = set(self.keys) | set(pads)
        got: dict[str, dict] = {}
        for rel in dict.fromkeys(ix.video_shard[ix.samples[k][0]] for k in [*self.keys, *pads]):
            for s in iter_tar_samples(ix.shard_url(rel), expect=ix.shard_identity.get(rel)):
                if s["__key__"] in wanted:
                    got[s["__key__"]] = s
        missing = wanted - set(got)
        if missing:
            raise RuntimeError(
                f"val samples {sorted(missing)[:3]} listed in the catalog are not in their shards"
            )
        for k in self.keys:
            yield got[k], True
        for k in pads:
            yield got[k], False

    def _item(self, sample: dict[str, Any], valid: bool) -> dict[str, Any]:
        p = self.params
        key = sample["__key__"]
        shard = self.index.shard_url(self.index.video_shard[self.index.samples[key][0]])
        try:
            meta = check_sample(sample, self.index.sample_frames.get(key))
        except SampleDamage as bad:
            raise ShardError.at(shard, key, bad.reason, str(bad)) from bad
        v, t_code, i_code = self.index.samples[meta.key]
        idx = fragment_index_lists(meta.n_frames, -1, p.fragment_stride, False)[0]
        idx = even_subsample(idx, self.max_frames)
        params = CropParams(p.bbox_scale_factor)  # the deterministic anchor crop (--eval_aug_anchorcrop)
        clip = torch.stack(
            [
                anchor_crop(
                    decode_frame(frame_jpeg(sample, i), meta, i, shard, decode_jpeg_bytes),
                    meta.boxes_in_crop[i],
                    params,
                    p.im_size,
                )
                for i in idx
            ]
        )
        pos = cut_tracklet(
            meta.frame_ids, meta.video_first_frame, meta.video_last_frame, -1, p.fragment_stride, False
        )[0].position
        return {
            "frames": clip,
            "video": int(self.index.video_codes[v]),
            "tracklet": t_code,
            "identity": i_code,
            "position": pos,
            "valid": valid,
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buf: list[dict[str, Any]] = []
        for sample, valid in self._items():
            buf.append(self._item(sample, valid))
            if len(buf) == self.batch_size:
                yield collate_padded(buf)
                buf = []
        if buf:
            yield collate_padded(buf)


def collate_padded(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    s_max = max(it["frames"].shape[0] for it in items)
    _, c, h, w = items[0]["frames"].shape
    frames = torch.zeros((len(items), s_max, c, h, w), dtype=torch.uint8)
    mask = torch.zeros((len(items), s_max), dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["frames"].shape[0]
        frames[i, :n] = it["frames"]
        mask[i, :n] = True
    return {
        "frames": frames,
        "mask": mask,
        "video": torch.tensor([it["video"] for it in items], dtype=torch.int64),
        "tracklet": torch.tensor([it["tracklet"] for it in items], dtype=torch.int64),
        "identity": torch.tensor([it["identity"] for it in items], dtype=torch.int64),
        "position": torch.tensor([it["position"] for it in items], dtype=torch.float32),
        "valid": torch.tensor([it["valid"] for it in items], dtype=torch.bool),
    }
