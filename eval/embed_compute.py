"""Running an encoder (or the hand-made descriptor) over the items of a split: batches padded
to their longest item, a tracklet longer than the frame budget embedded in chunks, one row of
metadata per item, and the tracklets left out counted and logged."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polyp_ssl.eval.embed_params import DESCRIPTOR, EmbedError, EmbedOptions, EmbedParams, EncoderSource
from polyp_ssl.eval.embed_read import (
    Item,
    anchor_frames,
    batched,
    batched_by_frames,
    iter_items,
    pad_batch,
)

log = logging.getLogger("polyp_ssl.eval.embed")  # the command's name in its log lines


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedError("--device cuda asked but CUDA is not available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise EmbedError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def encode_long_item(encoder, item: Item, params: EmbedParams, chunk: int, device: str) -> np.ndarray:
    """[1, D]: one tracklet longer than the frame budget, its backbone features computed over chunks
    of `chunk` frames (decoded chunk by chunk), then the encoder head over the whole sequence."""
    import torch

    if item.sample is None:
        raise EmbedError(f"sample {item.meta.key!r}: no frames kept to embed")
    feats = []
    cuda = device.startswith("cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for c in range(0, len(item.indices), chunk):
            frames = anchor_frames(
                item.sample, item.meta, item.indices[c : c + chunk], params.bbox_scale_factor, params.im_size
            )
            feats.append(encoder.frame_features(torch.from_numpy(frames)[None].to(device)).float())
        out = encoder.embed_features(torch.cat(feats, dim=1), pooling=params.pooling)
    item.sample = None
    return out.float().cpu().numpy().astype(np.float32)


def encode_batch(encoder, frames: np.ndarray, mask: np.ndarray, pooling: str, device: str) -> np.ndarray:
    import torch

    x = torch.from_numpy(frames).to(device, non_blocking=True)
    m = torch.from_numpy(mask).to(device)
    with torch.inference_mode():
        if device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = encoder.embed(x, pooling=pooling, mask=m)
        else:
            out = encoder.embed(x, pooling=pooling, mask=m)
    return out.float().cpu().numpy().astype(np.float32)


def _rows(items: Sequence[Item]) -> dict[str, list]:
    return {
        "tracklet_id": [it.meta.tracklet_id for it in items],
        "sample_key": [it.meta.key for it in items],
        "split": [it.meta.split for it in items],
        "video_id": [it.meta.video_id for it in items],
        "identity_id": [it.meta.identity_id for it in items],
        "fragment_index": [it.fragment_index for it in items],
        "start_frame": [int(it.meta.frame_ids[it.indices[0]]) for it in items],
    }


@dataclass
class Computed:
    """The rows of a split: metadata columns, vector blocks, and the tracklets capped or left out."""

    columns: dict[str, list] = field(default_factory=dict)
    vectors: list[np.ndarray] = field(default_factory=list)
    n_capped: int = 0
    too_short: list[str] = field(default_factory=list)
    below_min: list[str] = field(default_factory=list)


def compute_vectors(
    root: str | Path,
    params: EmbedParams,
    source: EncoderSource,
    model,
    options: EmbedOptions,
    expected: int,
    describe: Callable[[Item], np.ndarray],
) -> Computed:
    """Every item of the split through the encoder (or `describe`, the hand-made descriptor),
    `expected` tracklets on the progress bar; the tracklets capped or left out are logged."""
    from tqdm import tqdm

    out = Computed()
    seen: set[str] = set()
    bar = tqdm(
        total=expected or None,
        desc=f"embed {params.split}",
        unit="tracklet",
        disable=not options.progress,
        leave=False,
    )

    def account(batch: list[Item]) -> None:
        for it in batch:
            if it.meta.tracklet_id not in seen:
                seen.add(it.meta.tracklet_id)
                bar.update(1)
                if params.fragment_length < 0 and math.ceil(it.meta.n_frames / params.fragment_stride) > len(
                    it.indices
                ):
                    out.n_capped += 1
        for k, v in _rows(batch).items():
            out.columns.setdefault(k, []).extend(v)

    if source.kind == DESCRIPTOR:
        items = iter_items(root, params, decode=False, too_short=out.too_short, below_min=out.below_min)
        for batch in batched(items, options.batch_size):
            out.vectors.append(np.stack([describe(it) for it in batch]))
            account(batch)
    else:
        _encode_items(root, params, model, options, out, account)
    bar.close()
    _log_left_out(params, out)
    return out


def _encode_items(root, params: EmbedParams, model, options: EmbedOptions, out: Computed, account) -> None:
    import torch

    dev = resolve_device(options.device)
    model = model.to(dev)
    if dev.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    budget = options.frame_budget
    items = iter_items(
        root, params, decode=True, too_short=out.too_short, below_min=out.below_min, decode_max=budget
    )
    for batch in batched_by_frames(items, options.batch_size, budget):
        if batch[0].sample is not None:  # one tracklet longer than the budget
            out.vectors.append(encode_long_item(model, batch[0], params, budget, dev))
        else:
            frames, mask = pad_batch([it.frames for it in batch])
            out.vectors.append(encode_batch(model, frames, mask, params.pooling, dev))
        account(batch)


def _log_left_out(params: EmbedParams, out: Computed) -> None:
    if out.n_capped:
        log.info(
            "%d tracklets longer than %d strided frames were subsampled to %d",
            out.n_capped,
            params.max_frames,
            params.max_frames,
        )
    if out.below_min:
        log.info(
            "%d tracklets of split %s have fewer than %d frames and are left out (the paper's protocol; "
            "--min_tracklet_frames changes it), e.g. %s",
            len(out.below_min),
            params.split,
            params.min_tracklet_frames,
            out.below_min[0],
        )
    if out.too_short:
        log.warning(
            "%d tracklets of split %s are shorter than one fragment (%d frames at stride %d) and have "
            "no row, e.g. %s",
            len(out.too_short),
            params.split,
            params.fragment_length,
            params.fragment_stride,
            out.too_short[0],
        )
