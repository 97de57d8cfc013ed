"""`polyp-ssl embed`: run a frozen encoder once over a split, cache the vectors as {name}.parquet.

Three kinds of encoder share one path:
- a training checkpoint (`--encoder_ckpt runs/x/checkpoints/last.ckpt`);
- the same encoder at initialisation, the untrained baseline (`--encoder_ckpt init:SPEC`, SPEC a
  checkpoint, the run's `config.yaml`, or an architecture `hmve-resnet18`; random weights drawn
  with `--init_seed`, never downloaded);
- the synthetic generator's hand-made descriptor (`--encoder descriptor`), a colour/texture
  vector of the box regions of the stored crops (ingest.synth.descriptor);
- a foundation-model baseline from local weights (`--encoder zoo:NAME --weights PATH`, or the one
  string `zoo:NAME=PATH`; eval/zoo.py, docs/zoo.md), with its own preprocessing; its cache identity
  is the weights' sha256, the preprocessing and the zoo version.

The evaluation protocol is the paper's by default: only tracklets of at least
`--min_tracklet_frames` frames (30, before striding) are embedded, and a whole tracklet
(`--data_fragment_length -1`) is every `--data_fragment_stride`-th frame (4) as one sequence, with
no cap. Batches are filled by frame count (`--frame_budget` padded frames), so memory stays bounded
whatever the tracklet lengths; a tracklet longer than the budget is embedded alone, its backbone
run over chunks of `frame_budget` frames (exact: the backbone is per frame, in eval mode). An
explicit `--max_frames N` subsamples longer tracklets to N evenly spaced frames (first and last
kept). The file metadata names the protocol (`protocol`) and counts the tracklets left out or
capped.

A file is reused when it was made from the same inputs: the cache key is the sha256 of the
checkpoint's sha256 (or the init config / descriptor version), the embedding parameters and the
catalog manifest's sha256. The file is cached in ROOT/embeddings when the root is writable, else
(or always, with `--cache_dir DIR` / POLYP_SSL_CACHE) in the root's folder of a user cache
(shards/embeddings_cache.py); an existing file is found in either place, so a read-only root is
never written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.config import MAX_IM_SIZE
from polyp_ssl.eval import embeddings as emb_io
from polyp_ssl.eval.embeddings import read_metadata, write_embeddings
from polyp_ssl.fragments import even_subsample, fragment_index_lists
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser
from polyp_ssl.shards.embeddings_cache import EmbeddingsCache, embeddings_cache
from polyp_ssl.shards.files import check_regular
from polyp_ssl.shards.ids import UnsafeIdError, path_component
from polyp_ssl.shards.locations import UnsafeLocation, check_shard_value, shard_location
from polyp_ssl.shards.sample import (
    JpegSizeError,
    SampleError,
    TrackletSample,
    check_jpeg,
    frame_ext,
    sample_meta,
)

log = logging.getLogger(__name__)

DESCRIPTOR = "descriptor"
INIT_PREFIX = "init:"
ZOO_PREFIX = "zoo:"  # eval.zoo.ZOO_PREFIX
DEFAULT_IM_SIZE = 232
DEFAULT_BBOX_SCALE = 5.0
DEFAULT_STRIDE = 4
DEFAULT_MAX_FRAMES: int | None = None  # the paper: every strided frame of a tracklet
DEFAULT_MIN_TRACKLET_FRAMES = 30  # the paper's evaluation keeps tracklets of at least 30 frames
DEFAULT_FRAME_BUDGET = 1024  # padded frames per embedding batch
DEFAULT_INIT_SEED = 0
EMBED_VERSION = 3  # 3: the paper's protocol (min 30 frames, no cap), protocol in the metadata
_NAME_OK = re.compile(r"[^A-Za-z0-9_]")


class EmbedError(ValueError):
    """Inputs that cannot be embedded; the message names the file and the field."""


class NoItemsError(EmbedError):
    """The split has tracklets, but none is long enough for one fragment."""


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class EmbedParams:
    split: str = "test"
    fragment_length: int = -1
    fragment_stride: int = DEFAULT_STRIDE
    im_size: int = DEFAULT_IM_SIZE
    bbox_scale_factor: float = DEFAULT_BBOX_SCALE
    pooling: str = "cls"
    max_frames: int | None = DEFAULT_MAX_FRAMES  # None: no cap
    fragment_drop_last: bool = True
    min_tracklet_frames: int = DEFAULT_MIN_TRACKLET_FRAMES


def sha256_file(path: str | Path) -> str:
    """polyp_ssl.checkpoint.sha256_file, imported when used: that module imports torch, and
    `polyp-ssl embed --help` should not wait for it."""
    from polyp_ssl.checkpoint import sha256_file as _sha256_file

    return _sha256_file(path)


def protocol_string(params: EmbedParams | dict[str, Any]) -> str:
    """A one-line name of the evaluation protocol, e.g. `paper: min 30 frames, stride 4, all frames`."""
    p = asdict(params) if isinstance(params, EmbedParams) else dict(params)
    min_n = int(p.get("min_tracklet_frames") or 0)
    stride = p.get("fragment_stride", DEFAULT_STRIDE)
    length = p.get("fragment_length", -1)
    cap = p.get("max_frames")
    if length is not None and length > 0:
        what = f"fragments of {length} frames"
    else:
        what = "all frames" if not cap else f"at most {cap} frames"
    paper = min_n == DEFAULT_MIN_TRACKLET_FRAMES and stride == DEFAULT_STRIDE and not cap
    return f"{'paper' if paper else 'custom'}: min {min_n} frames, stride {stride}, {what}"


@dataclass
class EncoderSource:
    """What produces the vectors: kind is "checkpoint", "init" or "descriptor"."""

    kind: str
    spec: str
    identity: str  # checkpoint sha256, or a hash of the init config, or the descriptor version
    label: str  # short human name: file stem, "init-<arch>", "descriptor"
    config: dict[str, Any] = field(default_factory=dict)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_sha256(root: str | Path) -> str:
    try:
        return emb_io.manifest_sha256(root)
    except emb_io.EmbeddingsError as e:
        raise EmbedError(str(e)) from e


def cache_key(source_identity: str, params: EmbedParams, manifest_hash: str) -> str:
    payload = json.dumps(
        {"source": source_identity, "params": asdict(params), "manifest": manifest_hash, "v": EMBED_VERSION},
        sort_keys=True,
    )
    return sha256_bytes(payload.encode())


def default_name(source: EncoderSource, params: EmbedParams, key: str) -> str:
    """A SQL-identifier-safe name (the catalog exposes the file as view `embeddings_{name}`)."""
    frag = "trk" if params.fragment_length < 0 else f"f{params.fragment_length}"
    return sanitize_name(f"{source.label}_{params.split}_{frag}_{key[:10]}")


def sanitize_name(name: str) -> str:
    return _NAME_OK.sub("_", name).strip("_") or "embeddings"


# ----------------------------------------------------------------------------- frames and items


def frame_plan(
    n_frames: int, fragment_length: int, stride: int, max_frames: int | None, drop_last: bool = True
) -> list[tuple[int, list[int]]]:
    """(fragment_index, frame indices) of the items cut from a tracklet of n_frames frames
    (polyp_ssl.fragments); a whole tracklet (-1) is evenly subsampled to max_frames when longer."""
    try:
        lists = fragment_index_lists(n_frames, fragment_length, stride, drop_last)
    except ValueError as e:
        raise EmbedError(str(e)) from e
    if fragment_length == -1:
        return [(-1, even_subsample(idx, max_frames) if max_frames else list(idx)) for idx in lists]
    return list(enumerate(lists))


def decode_rgb(jpeg: bytes, expected: Sequence[int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] of a stored JPEG with PIL, its size checked from the header first
    (shards.sample.check_jpeg; PIL's own MAX_IMAGE_PIXELS guard is 179 M pixels) and again from
    what PIL reads before it decodes (JpegSizeError, a ValueError)."""
    from PIL import Image

    w, h = check_jpeg(jpeg, expected)
    with Image.open(io.BytesIO(jpeg)) as img:
        if img.size != (w, h):
            got = f"{img.size[0]}x{img.size[1]}"
            raise JpegSizeError(f"a JPEG PIL reads as {got}, its header says {w}x{h}", "mismatch")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


SHARD_KEY = "__shard__"  # the shard a sample was read from, set by _checked_samples


def checked_meta(sample: dict[str, Any], seen: dict[str, str]) -> TrackletSample:
    """The validated TrackletSample of a sample (shards.sample.parse_sample), with every frame's
    JPEG header checked against the JSON's crop_sizes before anything is decoded, and its key not
    seen before in the split (`seen`: key -> shard). EmbedError names the shard, the key and the
    field."""
    shard, key = sample.get(SHARD_KEY, "?"), sample.get("__key__")
    where = f"{shard}: sample {key!r}"
    try:
        meta = sample_meta(sample)
    except SampleError as e:
        raise EmbedError(f"{where}: {e}") from None
    if meta.key != key:
        raise EmbedError(f"{where}: field 'key': {meta.key!r} differs from the member key")
    if key in seen:
        raise EmbedError(f"{where}: appears twice in the split (also in {seen[key]})")
    seen[key] = shard
    for i in range(meta.n_frames):
        data = sample.get(frame_ext(i))
        if data is None:
            raise EmbedError(f"{where}: has no member .{frame_ext(i)}")
        try:
            check_jpeg(data, meta.crop_sizes[i])
        except JpegSizeError as e:
            raise EmbedError(f"{where}: field 'crop_sizes[{i}]': frame {i} is {e}") from None
    return meta


def anchor_frames(
    sample: dict[str, Any], meta: TrackletSample, indices: Sequence[int], scale: float, im_size: int
) -> np.ndarray:
    """uint8 [S, 3, im_size, im_size]: the deterministic anchor crop of each listed frame, from the
    stored JPEGs (polyp_ssl.transforms.load_frames); a repeated frame is decoded once."""
    from polyp_ssl.transforms import load_frames

    uniq = list(dict.fromkeys(indices))
    jpegs = []
    for i in uniq:
        ext = frame_ext(i)
        if ext not in sample:
            raise EmbedError(f"sample {meta.key!r} ({meta.tracklet_id}) has no member .{ext}")
        jpegs.append(sample[ext])
    boxes, sizes = [meta.boxes_in_crop[i] for i in uniq], [meta.crop_sizes[i] for i in uniq]
    frames = load_frames(jpegs, boxes, im_size, scale, sizes=sizes).numpy()
    pos = {i: k for k, i in enumerate(uniq)}
    return frames[[pos[i] for i in indices]]


@dataclass
class Item:
    meta: TrackletSample
    fragment_index: int
    indices: list[int]
    frames: np.ndarray | None = None  # uint8 [S, 3, H, W] for encoders
    raw: dict[int, bytes] | None = None  # frame index -> stored JPEG, for the descriptor
    sample: dict[str, Any] | None = None  # kept (not decoded) for a tracklet longer than the frame budget


# ----------------------------------------------------------------------------- split reading


def split_shards(root: str | Path, split: str) -> list[Path]:
    """The split's shard files, in catalog order (the catalog's `shards` table)."""
    import pyarrow.parquet as pq

    root = Path(root)
    table_path = root / "catalog" / "shards.parquet"
    if not table_path.is_file():
        raise EmbedError(f"{table_path}: missing; {root} is not an ingested root (run `polyp-ssl ingest`)")
    rows = pq.read_table(table_path, columns=["path", "split", "n_samples", "n_bytes"]).to_pylist()
    known = sorted({r["split"] for r in rows})
    rows = [r for r in rows if r["split"] == split]
    if not rows or sum(int(r["n_samples"]) for r in rows) == 0:
        raise EmbedError(
            f"{table_path}: split {split!r} has no tracklets (splits with data: {', '.join(known) or 'none'})"
        )
    rows = sorted(rows, key=lambda r: str(r["path"]))
    try:
        paths = []
        for r in rows:
            rel = check_shard_value(r["path"], table_path, f"shard {r['path']!r}", "path")
            paths.append(Path(shard_location(rel, root)))
    except UnsafeLocation as exc:
        raise EmbedError(str(exc)) from None
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise EmbedError(f"shards named in {table_path} are missing: {missing[:3]}")
    for r, p in zip(rows, paths, strict=True):
        size = check_regular(p, "shard").st_size  # a FIFO or device in place of a shard: refused by name
        if r["n_bytes"] is not None and size != r["n_bytes"]:
            raise EmbedError(
                f"{p}: {size} bytes, {table_path} says {r['n_bytes']}: not the shard the catalog describes "
                "(changed or replaced since ingest; `polyp-ssl verify` checks every shard)"
            )
    return paths


def split_tracklet_count(root: str | Path, split: str) -> int:
    import pyarrow.parquet as pq

    path = Path(root) / "catalog" / "tracklets.parquet"
    if not path.is_file():
        return 0
    t = pq.read_table(path, columns=["split"]).column("split").to_pylist()
    return sum(1 for s in t if s == split)


def _checked_samples(root: str | Path, paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The samples of `paths` in order; each shard's bytes are hashed while they are read and
    compared with the catalog's size and sha256 after its last sample, so a changed or replaced
    shard stops the run (naming it) before any embeddings file is written."""
    import pyarrow.parquet as pq

    from polyp_ssl.shards.locations import ShardIdentity
    from polyp_ssl.shards.reader import iter_samples

    root = Path(root)
    t = pq.read_table(root / "catalog" / "shards.parquet", columns=["path", "n_bytes", "sha256"]).to_pydict()
    recorded = {
        str(root / p): ShardIdentity(int(n), h)
        for p, n, h in zip(t["path"], t["n_bytes"], t["sha256"], strict=True)
        if h
    }
    for path in paths:
        try:
            for sample in iter_samples([path], recorded):
                sample[SHARD_KEY] = str(path)
                yield sample
        except (ValueError, tarfile.TarError, OSError) as e:  # a damaged tar, a repeated key, a changed shard
            text = str(e)
            raise EmbedError(text if text.startswith(str(path)) else f"{path}: {text}") from None


def iter_items(
    root: str | Path,
    params: EmbedParams,
    decode: bool,
    too_short: list[str] | None = None,
    below_min: list[str] | None = None,
    decode_max: int | None = None,
) -> Iterator[Item]:
    """Items of the split in shard order; ids of tracklets too short for one fragment are
    appended to `too_short`, those under `params.min_tracklet_frames` to `below_min` (counted and
    reported, never dropped silently). An item of more than `decode_max` frames is not decoded here
    (its `sample` is kept, to be decoded in chunks)."""
    seen: dict[str, str] = {}
    for sample in _checked_samples(root, split_shards(root, params.split)):
        meta = checked_meta(sample, seen)
        if meta.split != params.split:
            raise EmbedError(f"sample {meta.key!r} says split {meta.split!r}, read as {params.split!r}")
        if meta.n_frames < params.min_tracklet_frames:
            if below_min is not None:
                below_min.append(meta.tracklet_id)
            continue
        plan = frame_plan(
            meta.n_frames,
            params.fragment_length,
            params.fragment_stride,
            params.max_frames,
            params.fragment_drop_last,
        )
        if not plan and too_short is not None:
            too_short.append(meta.tracklet_id)
        for frag, indices in plan:
            item = Item(meta, frag, indices)
            if decode and decode_max is not None and len(indices) > decode_max:
                item.sample = sample
            elif decode:
                item.frames = anchor_frames(sample, meta, indices, params.bbox_scale_factor, params.im_size)
            else:
                item.frames = None
                item.raw = {i: sample[frame_ext(i)] for i in set(indices)}
            yield item


def batched(items: Iterator[Item], batch_size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for it in items:
        batch.append(it)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def batched_by_frames(items: Iterator[Item], batch_size: int, frame_budget: int) -> Iterator[list[Item]]:
    """Batches of at most `batch_size` items whose padded size (items x longest) stays within
    `frame_budget` frames; an item longer than the budget is a batch of its own."""
    batch: list[Item] = []
    longest = 0
    for it in items:
        n = len(it.indices)
        if batch and (len(batch) == batch_size or (len(batch) + 1) * max(longest, n) > frame_budget):
            yield batch
            batch, longest = [], 0
        batch.append(it)
        longest = max(longest, n)
    if batch:
        yield batch


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


def pad_batch(frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length [S_i, 3, H, W] -> (uint8 [B, S_max, 3, H, W], bool mask [B, S_max])."""
    s_max = max(f.shape[0] for f in frames)
    b = len(frames)
    out = np.zeros((b, s_max, *frames[0].shape[1:]), dtype=np.uint8)
    mask = np.zeros((b, s_max), dtype=bool)
    for i, f in enumerate(frames):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return out, mask


# ----------------------------------------------------------------------------- encoders


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedError("--device cuda asked but CUDA is not available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise EmbedError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def flat_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """A run config as one flat mapping (the train flags): nested `encoder`/`data`/... sections
    are merged into the top level, so both layouts of a saved config read the same."""
    flat: dict[str, Any] = {}
    for k, v in (config or {}).items():
        if isinstance(v, dict) and k in ("encoder", "data", "model", "train"):
            continue
        flat[k] = v
    for section in ("model", "train", "data", "encoder"):
        sub = (config or {}).get(section)
        if isinstance(sub, dict):
            flat.update(sub)
    return flat


def resolve_source(
    encoder_ckpt: str | Path | None, encoder: str = "checkpoint", weights: str | Path | None = None
) -> EncoderSource:
    """Identify the encoder without loading weights (the checkpoint is hashed, not unpickled)."""
    if str(encoder).startswith(ZOO_PREFIX) or str(encoder_ckpt).startswith(ZOO_PREFIX):
        return _zoo_source(encoder_ckpt, encoder, weights)
    if weights is not None:
        raise EmbedError("--weights is for zoo encoders (--encoder zoo:NAME); a checkpoint holds its weights")
    if encoder not in ("checkpoint", DESCRIPTOR):
        raise EmbedError(f"--encoder {encoder!r}: choose checkpoint, descriptor or zoo:NAME")
    if encoder == DESCRIPTOR or str(encoder_ckpt) == DESCRIPTOR:
        from polyp_ssl.ingest.synth import descriptor as desc

        version = str(getattr(desc, "DESCRIPTOR_VERSION", "1"))
        return EncoderSource(DESCRIPTOR, DESCRIPTOR, f"descriptor-v{version}", DESCRIPTOR)
    if encoder_ckpt is None:
        raise EmbedError("--encoder_ckpt is required (a checkpoint, init:SPEC, or use --encoder descriptor)")
    spec = str(encoder_ckpt)
    if spec.startswith(INIT_PREFIX):
        config = init_config(spec[len(INIT_PREFIX) :])
        enc = encoder_fields(config)
        ident = sha256_bytes(json.dumps(enc, sort_keys=True, default=str).encode())
        arch = enc.get("sfe_backbone_arch", "")
        etype = enc.get("encoder_type", "")
        label = sanitize_name(f"init_{etype}_{arch}".rstrip("_"))
        return EncoderSource("init", spec, f"init-{ident}", label, config)
    from polyp_ssl.checkpoint import CheckpointError, resolve_checkpoint_path

    try:  # a run folder stands for its last.ckpt; empty, text, Parquet, other folders: named here
        path = resolve_checkpoint_path(spec)
    except CheckpointError as e:
        raise EmbedError(f"--encoder_ckpt {e}") from None
    return EncoderSource("checkpoint", str(path), sha256_file(path), sanitize_name(_ckpt_label(path)))


def _zoo_source(encoder_ckpt, encoder: str, weights) -> EncoderSource:
    """A zoo encoder: `--encoder zoo:NAME --weights PATH` or `zoo:NAME=PATH` (eval.zoo)."""
    from polyp_ssl.eval.zoo import ZooError, resolve_zoo, show_notice

    text = str(encoder) if str(encoder).startswith(ZOO_PREFIX) else str(encoder_ckpt)
    if str(encoder).startswith(ZOO_PREFIX) and encoder_ckpt is not None:
        raise EmbedError(f"--encoder {encoder} and --encoder_ckpt {encoder_ckpt}: give one encoder")
    try:
        src = resolve_zoo(text, weights)
    except ZooError as e:
        raise EmbedError(str(e)) from None
    spec = src.spec
    show_notice(spec)  # once per process, also when the vectors come from the cache
    config = {"im_size": spec.input_size, "zoo": src.metadata()}
    label = sanitize_name(f"zoo_{spec.name}")
    return EncoderSource("zoo", f"{ZOO_PREFIX}{spec.name}={src.weights}", src.identity, label, config)


def _ckpt_label(path: Path) -> str:
    # runs/{exp}/checkpoints/last.ckpt -> {exp}_last
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}_{path.stem}"
    return path.stem


_ARCH_SPEC = re.compile(r"^(sfe|mve|hmve)[-_:](resnet\d+)$")


def init_config(spec: str) -> dict[str, Any]:
    """The config of the encoder to build at initialisation, from a checkpoint, a YAML/JSON
    config file (the run's resolved config) or an architecture spec such as `hmve-resnet18`."""
    from polyp_ssl.checkpoint import MAX_INIT_PARAMS, CheckpointError, check_model_config

    m = _ARCH_SPEC.match(spec)
    if m:
        config = {"encoder_type": m.group(1), "sfe_backbone_arch": m.group(2), "sfe_d_model": None}
        where = f"init:{spec}"
    else:
        config, where = _init_config_file(spec), spec
    try:  # the check of every model config, before anything is built; random weights: a tighter bound
        check_model_config({**config, "sfe_d_model": None}, where, max_params=MAX_INIT_PARAMS)
    except CheckpointError as e:
        raise EmbedError(str(e)) from None
    return config


def _init_config_file(spec: str) -> dict[str, Any]:
    """The flat config of an `init:` file: a checkpoint's (checked as every checkpoint is), or a
    YAML/JSON run config."""
    from polyp_ssl.checkpoint import CheckpointError, checkpoint_kind, load_encoder, resolve_checkpoint_path

    path = Path(spec)
    try:
        if path.is_dir():  # a run folder: its last.ckpt
            path = resolve_checkpoint_path(path)
        if not path.is_file():
            raise EmbedError(f"init:{spec}: neither a file nor an architecture spec like hmve-resnet18")
        if checkpoint_kind(path) != "text":  # a checkpoint by its contents (or a wrong kind, named)
            _, config = load_encoder(path, map_location="cpu")
            return flat_config(config)
    except CheckpointError as e:
        raise EmbedError(str(e)) from None
    from polyp_ssl.shards.textio import TextInputError, load_config_file

    try:  # bounded, aliases and python tags refused, nesting bounded: one line naming the file
        config = load_config_file(path, "init: config")
    except TextInputError as e:
        raise EmbedError(f"init:{e}") from None
    if not isinstance(config, dict):
        raise EmbedError(f"{path}: config is not a mapping")
    return flat_config(config)


def encoder_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The EncoderConfig fields of a flat config; backbone weights dropped (initialisation means
    random weights, never a pretrained file)."""
    from polyp_ssl.encoders import EncoderConfig

    known = set(EncoderConfig.__dataclass_fields__)
    enc = {k: v for k, v in flat_config(config).items() if k in known}
    enc.pop("sfe_backbone_weights", None)
    enc.pop("channels_last", None)
    return enc


def build_init_encoder(config: dict[str, Any], seed: int):
    import torch

    from polyp_ssl.encoders import EncoderConfig, build_encoder

    enc = encoder_fields(config)
    if enc.get("sfe_d_model") is not None:
        # the seed's default sfe_d_model (2048) only fits resnet50: let the backbone decide
        enc["sfe_d_model"] = None
    torch.manual_seed(seed)
    try:
        return build_encoder(EncoderConfig(**enc))
    except ValueError as e:
        raise EmbedError(f"cannot build the encoder at initialisation: {e}") from e


def load_source_encoder(source: EncoderSource, init_seed: int, expect_type: str | None, pooling: str = "cls"):
    """(encoder module, config dict) of a checkpoint, init or zoo source."""
    if source.kind == "zoo":
        from polyp_ssl.eval.zoo import ZooError, get_spec, make_zoo_encoder

        if expect_type:
            raise EmbedError(f"--encoder_type {expect_type} is for checkpoints; {source.spec} is a zoo model")
        meta = source.config["zoo"]
        try:
            encoder = make_zoo_encoder(get_spec(meta["name"]), Path(meta["weights"]), token_pooling=pooling)
        except ZooError as e:
            raise EmbedError(str(e)) from None
        return encoder, {"im_size": source.config["im_size"]}
    if source.kind == "checkpoint":
        from polyp_ssl.checkpoint import CheckpointError, load_encoder

        try:
            encoder, config = load_encoder(source.spec, map_location="cpu")
        except EmbedError:
            raise
        except CheckpointError as e:  # names the file and the field already
            raise EmbedError(f"cannot load the encoder: {e}") from None
        except Exception as e:  # a bad checkpoint is reported, not traced
            raise EmbedError(f"{source.spec}: cannot load the encoder ({type(e).__name__}: {e})") from e
        config = flat_config(config)
        etype = getattr(getattr(encoder, "cfg", None), "encoder_type", None) or config.get("encoder_type")
    else:
        config = source.config
        encoder = build_init_encoder(config, init_seed)
        etype = encoder.cfg.encoder_type
    if expect_type and etype and etype != expect_type:
        raise EmbedError(
            f"{source.spec}: holds a {etype!r} encoder, but --encoder_type {expect_type!r} was asked"
        )
    encoder.eval()
    return encoder, config


def resolve_params(
    params: EmbedParams, config: dict[str, Any], im_size: int | None, bbox_scale_factor: float | None
) -> EmbedParams:
    """Unset image size and crop scale come from the checkpoint's data config."""
    data = flat_config(config)
    im = im_size if im_size is not None else int(data.get("im_size") or DEFAULT_IM_SIZE)
    scale = (
        bbox_scale_factor
        if bbox_scale_factor is not None
        else float(data.get("bbox_scale_factor") or DEFAULT_BBOX_SCALE)
    )
    if not 8 <= im <= MAX_IM_SIZE:  # a checkpoint's im_size passed check_model_config already
        raise EmbedError(f"--data_im_size must be in [8, {MAX_IM_SIZE}], got {im}")
    if scale <= 0:
        raise EmbedError(f"--data_bbox_scale_factor must be > 0, got {scale}")
    return EmbedParams(**{**asdict(params), "im_size": im, "bbox_scale_factor": scale})


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


def describe_item(item: Item) -> np.ndarray:
    from polyp_ssl.ingest.synth.descriptor import describe_tracklet

    raw = item.raw or {}
    images = {i: decode_rgb(raw[i], item.meta.crop_sizes[i]) for i in raw}
    boxes = [item.meta.boxes_in_crop[i] for i in item.indices]
    vec = describe_tracklet([images[i] for i in item.indices], boxes)
    return np.asarray(vec, dtype=np.float32).reshape(-1)


# ----------------------------------------------------------------------------- writing


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


# ----------------------------------------------------------------------------- the job


def ensure_embeddings(
    root: str | Path,
    ckpt: str | Path | None,
    *,
    split: str = "test",
    fragment_length: int = -1,
    fragment_stride: int = DEFAULT_STRIDE,
    im_size: int | None = None,
    bbox_scale_factor: float | None = None,
    pooling: str = "cls",
    batch_size: int = 32,
    device: str = "auto",
    name: str | None = None,
    encoder: str = "checkpoint",
    encoder_type: str | None = None,
    weights: str | Path | None = None,
    init_seed: int = DEFAULT_INIT_SEED,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    drop_last: bool = True,
    progress: bool = True,
    min_tracklet_frames: int = DEFAULT_MIN_TRACKLET_FRAMES,
    frame_budget: int = DEFAULT_FRAME_BUDGET,
    cache: EmbeddingsCache | None = None,
) -> Path:
    """The cached {name}.parquet for these inputs, computed only when not already there.

    `ckpt`: a checkpoint path, `init:SPEC`, "descriptor" (same as encoder="descriptor") or
    `zoo:NAME=PATH` (same as encoder="zoo:NAME", weights=PATH). `cache`: where files are looked
    for and written (`resolve_cache`; default: the rule for `root` without --cache_dir).
    """
    root = Path(root)
    check_catalog_version(root)  # a root of an older catalog version: refused, with the re-ingest command
    mhash = manifest_sha256(root)
    split_shards(root, split)  # an unknown or empty split fails before any model is built
    if name is not None:
        try:
            path_component(name, "--name")
        except UnsafeIdError as exc:
            raise EmbedError(str(exc)) from None
    source = resolve_source(ckpt, encoder, weights)
    if fragment_length == 0 or fragment_length < -1:
        raise EmbedError(f"--data_fragment_length must be -1 or >= 1, got {fragment_length}")
    if batch_size < 1:
        raise EmbedError(f"--batch_size must be >= 1, got {batch_size}")
    if pooling not in ("cls", "mean"):
        raise EmbedError(f"--encoder_pooling must be cls or mean, got {pooling!r}")
    if min_tracklet_frames < 1:
        raise EmbedError(f"--min_tracklet_frames must be >= 1, got {min_tracklet_frames}")
    if max_frames is not None and max_frames < 1:
        raise EmbedError(f"--max_frames must be >= 1 (or not given: no cap), got {max_frames}")
    if frame_budget < 1:
        raise EmbedError(f"--frame_budget must be >= 1, got {frame_budget}")
    params = EmbedParams(
        split,
        fragment_length,
        fragment_stride,
        im_size or DEFAULT_IM_SIZE,
        bbox_scale_factor or DEFAULT_BBOX_SCALE,
        pooling,
        max_frames,
        drop_last,
        min_tracklet_frames,
    )

    model = None
    config: dict[str, Any] = {}
    if source.kind == DESCRIPTOR:
        params = EmbedParams(**{**asdict(params), "im_size": 0, "bbox_scale_factor": 0.0, "pooling": "none"})
    elif source.kind == "zoo":  # parameters known without the weights: a cached file is reused unloaded
        if encoder_type:
            raise EmbedError(f"--encoder_type {encoder_type} is for checkpoints, not {source.spec}")
        params = resolve_params(params, {"im_size": source.config["im_size"]}, im_size, bbox_scale_factor)
        if source.config["zoo"]["frame_pooling"] != "token":  # CNNs: the global average pool
            params = EmbedParams(**{**asdict(params), "pooling": source.config["zoo"]["frame_pooling"]})
        check_crop_scale(root, params.bbox_scale_factor)
    else:
        model, config = load_source_encoder(source, init_seed, encoder_type, pooling)
        params = resolve_params(params, config, im_size, bbox_scale_factor)
        check_crop_scale(root, params.bbox_scale_factor)
    identity = source.identity if source.kind != "init" else f"{source.identity}-seed{init_seed}"
    key = cache_key(identity, params, mhash)
    out_name = sanitize_name(name) if name else default_name(source, params, key)
    cache = cache or resolve_cache(root)
    found = find_cached(cache, f"{out_name}.parquet", key)
    if found is not None:
        print(f"embeddings up to date, reusing {found}")
        return found
    path = cache.prepare() / f"{out_name}.parquet"

    if source.kind == "zoo":
        model, _ = load_source_encoder(source, init_seed, None, params.pooling)
    expected = split_tracklet_count(root, split)
    t0 = time.perf_counter()
    columns, vectors, n_capped, too_short, below_min = _compute(
        root, params, source, model, batch_size, device, expected, progress, frame_budget
    )
    elapsed = time.perf_counter() - t0
    if not vectors:
        raise NoItemsError(
            f"{root}: split {split!r} gave no items to embed ({len(below_min)} tracklets have fewer "
            f"than --min_tracklet_frames {min_tracklet_frames} frames; fragment_length {fragment_length} "
            f"at stride {fragment_stride} is longer than every other tracklet?)"
        )
    mat = np.concatenate(vectors, axis=0).astype(np.float32)
    if not np.isfinite(mat).all():
        raise EmbedError(f"{source.spec}: the encoder produced non-finite values on split {split!r}")
    zoo_meta = source.config.get("zoo") if source.kind == "zoo" else None
    metadata = {
        "cache_key": key,
        "checkpoint": source.spec,
        "checkpoint_sha256": source.identity if source.kind == "checkpoint" else None,
        "encoder_kind": source.kind,
        "encoder_identity": identity,
        "encoder_config": encoder_fields(config) if config and source.kind != "zoo" else None,
        "encoder_zoo": zoo_meta,
        "license_notice": (zoo_meta or {}).get("license_notice"),
        "init_seed": init_seed if source.kind == "init" else None,
        "params": asdict(params),
        "protocol": protocol_string(params),
        "manifest_sha256": mhash,
        "dataset_root": str(root.resolve()),
        "n_rows": int(mat.shape[0]),
        "dim": int(mat.shape[1]),
        "n_tracklets_capped": n_capped,
        "n_tracklets_too_short": len(too_short),
        "n_tracklets_below_min": len(below_min),
        "elapsed_s": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": EMBED_VERSION,
    }
    write_embeddings(path, columns, mat, metadata)
    print(
        f"wrote {mat.shape[0]} x {mat.shape[1]} embeddings to {path} ({elapsed:.1f} s; protocol "
        f"{protocol_string(params)}; {len(below_min)} tracklets under {min_tracklet_frames} frames left out)"
    )
    return path


def resolve_cache(root: str | Path, cache_dir: str | Path | None = None) -> EmbeddingsCache:
    """Where the embeddings of `root` are cached (shards.embeddings_cache: ROOT/embeddings when
    writable, else the user cache; `cache_dir` always); EmbedError for a root without a catalog."""
    check_catalog_version(root)
    return embeddings_cache(root, cache_dir)


def find_cached(cache: EmbeddingsCache, file_name: str, key: str) -> Path | None:
    """The first file named `file_name` in the cache's folders made from these inputs (`key`)."""
    other = []
    for folder in cache.read_dirs:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            existing = read_metadata(path)
        except Exception:  # unreadable file: recompute it
            existing = {}
        if existing.get("cache_key") == key:
            return path
        other.append(path)
    for path in other:
        log.info("%s was made from other inputs; recomputing", path)
    return None


def _compute(root, params, source, model, batch_size, device, expected, progress, frame_budget):
    from tqdm import tqdm

    columns: dict[str, list] = {}
    vectors: list[np.ndarray] = []
    n_capped = 0
    too_short: list[str] = []
    below_min: list[str] = []
    seen_tracklets: set[str] = set()
    bar = tqdm(
        total=expected or None,
        desc=f"embed {params.split}",
        unit="tracklet",
        disable=not progress,
        leave=False,
    )

    def account(batch: list[Item]):
        nonlocal n_capped
        for it in batch:
            if it.meta.tracklet_id not in seen_tracklets:
                seen_tracklets.add(it.meta.tracklet_id)
                bar.update(1)
                if params.fragment_length < 0 and math.ceil(it.meta.n_frames / params.fragment_stride) > len(
                    it.indices
                ):
                    n_capped += 1
        for k, v in _rows(batch).items():
            columns.setdefault(k, []).extend(v)

    if source.kind == DESCRIPTOR:
        items = iter_items(root, params, decode=False, too_short=too_short, below_min=below_min)
        for batch in batched(items, batch_size):
            vectors.append(np.stack([describe_item(it) for it in batch]))
            account(batch)
    else:
        import torch

        dev = resolve_device(device)
        model = model.to(dev)
        if dev.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        items = iter_items(
            root, params, decode=True, too_short=too_short, below_min=below_min, decode_max=frame_budget
        )
        for batch in batched_by_frames(items, batch_size, frame_budget):
            if batch[0].sample is not None:  # one tracklet longer than the budget
                vectors.append(encode_long_item(model, batch[0], params, frame_budget, dev))
            else:
                frames, mask = pad_batch([it.frames for it in batch])
                vectors.append(encode_batch(model, frames, mask, params.pooling, dev))
            account(batch)
    bar.close()
    if n_capped:
        log.info(
            "%d tracklets longer than %d strided frames were subsampled to %d",
            n_capped,
            params.max_frames,
            params.max_frames,
        )
    if below_min:
        log.info(
            "%d tracklets of split %s have fewer than %d frames and are left out (the paper's protocol; "
            "--min_tracklet_frames changes it), e.g. %s",
            len(below_min),
            params.split,
            params.min_tracklet_frames,
            below_min[0],
        )
    if too_short:
        log.warning(
            "%d tracklets of split %s are shorter than one fragment (%d frames at stride %d) and have "
            "no row, e.g. %s",
            len(too_short),
            params.split,
            params.fragment_length,
            params.fragment_stride,
            too_short[0],
        )
    return columns, vectors, n_capped, too_short, below_min


def check_catalog_version(root: str | Path) -> None:
    """EmbedError when the root has no catalog or one of another version (shards.catalog.read_manifest:
    the message names the manifest and the re-ingest command). Positions and sample layout change
    between versions, so an old root is never embedded as if it were current."""
    from polyp_ssl.shards.catalog import CatalogError, read_manifest

    try:
        read_manifest(root)
    except CatalogError as e:
        raise EmbedError(str(e)) from None


def check_crop_scale(root: str | Path, bbox_scale_factor: float) -> None:
    """EmbedError when the anchor crop is wider than the root's stored crops (it would be clamped
    to the stored window without a word)."""
    from polyp_ssl.cli import check_crop_scale as check

    try:
        check(bbox_scale_factor, root, "--data_bbox_scale_factor")
    except ValueError as e:
        raise EmbedError(str(e)) from e


# ----------------------------------------------------------------------------- CLI


def encoder_choice(text: str) -> str:
    """argparse type of --encoder: checkpoint, descriptor or zoo:NAME (a known zoo entry)."""
    from polyp_ssl.eval.zoo import zoo_names

    if text in ("checkpoint", DESCRIPTOR):
        return text
    if text.startswith(ZOO_PREFIX) and text[len(ZOO_PREFIX) :].partition("=")[0] in zoo_names():
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: choose checkpoint, descriptor or zoo:NAME with NAME one of {', '.join(zoo_names())}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="polyp-ssl embed", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    p.add_argument(
        "--encoder_ckpt",
        help="checkpoint file, or init:SPEC (SPEC = checkpoint, config.yaml or "
        "an architecture like hmve-resnet18) for the encoder at initialisation",
    )
    p.add_argument(
        "--encoder",
        type=encoder_choice,
        default="checkpoint",
        help="checkpoint (--encoder_ckpt), descriptor (the synthetic generator's hand-made descriptor) or "
        "zoo:NAME, a foundation model from local --weights (docs/zoo.md)",
    )
    p.add_argument("--weights", help="zoo encoders: the locally downloaded weights file or snapshot folder")
    p.add_argument(
        "--encoder_type",
        choices=["sfe", "mve", "hmve"],
        help="expected encoder type; a checkpoint of another type is an error",
    )
    p.add_argument("--dataset_root", required=True, help="an ingested root (shards/ and catalog/)")
    p.add_argument("--split", default="test", help="catalog split to embed")
    p.add_argument("--data_fragment_length", type=int, default=-1, help="-1 = whole tracklet")
    p.add_argument(
        "--data_fragment_stride", type=int, default=DEFAULT_STRIDE, help="take every N-th frame of a tracklet"
    )
    p.add_argument(
        "--data_fragment_pad_last",
        action="store_true",
        help="pad the short last fragment by repeating its last frame instead of dropping it",
    )
    p.add_argument("--data_im_size", type=int, default=None, help="default: the checkpoint's im_size")
    p.add_argument(
        "--data_bbox_scale_factor",
        type=float,
        default=None,
        help="default: the checkpoint's bbox_scale_factor",
    )
    p.add_argument(
        "--encoder_pooling",
        choices=["cls", "mean"],
        default="cls",
        help="tracklet embedding: CLS output or mean",
    )
    p.add_argument(
        "--max_frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help="cap: whole tracklets longer than this (after striding) are evenly subsampled (default: no cap, "
        "the paper's protocol)",
    )
    p.add_argument(
        "--min_tracklet_frames",
        type=int,
        default=DEFAULT_MIN_TRACKLET_FRAMES,
        help="tracklets with fewer frames (before striding) are left out (default 30, the paper's protocol)",
    )
    p.add_argument(
        "--frame_budget",
        type=int,
        default=DEFAULT_FRAME_BUDGET,
        help="padded frames per embedding batch (memory bound; longer tracklets run in chunks)",
    )
    p.add_argument(
        "--init_seed",
        type=int,
        default=DEFAULT_INIT_SEED,
        help="seed of an init:SPEC encoder's random weights",
    )
    p.add_argument("--batch_size", type=int, default=32, help="tracklets per embedding batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--name", help="file name of the cached {name}.parquet (default: derived from the inputs)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="also write the embeddings to FILE (a copy of the cached file, written "
        "whole under a temporary name, then renamed)",
    )
    add_cache_flag(p)
    return p


def add_cache_flag(p: argparse.ArgumentParser) -> None:
    """`--cache_dir DIR` (every command that embeds)."""
    p.add_argument(
        "--cache_dir",
        metavar="DIR",
        default=None,
        help="cache the embeddings under DIR (default: POLYP_SSL_CACHE if set, else ROOT/embeddings when the "
        "root is writable, else $XDG_CACHE_HOME/polyp-ssl or ~/.cache/polyp-ssl); files already cached in "
        "ROOT/embeddings are reused",
    )


def copy_out(src: Path, dst: str | Path) -> Path:
    """Copy an embeddings file to `dst` atomically (a reader never sees half a file)."""
    dst = Path(dst)
    if dst.is_dir():
        raise EmbedError(f"--out {dst} is a folder; give a file name, e.g. {dst / src.name}")
    if dst.resolve() == src.resolve():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cache = resolve_cache(args.dataset_root, args.cache_dir)
        print(cache.describe())
        path = ensure_embeddings(
            args.dataset_root,
            args.encoder_ckpt,
            split=args.split,
            fragment_length=args.data_fragment_length,
            fragment_stride=args.data_fragment_stride,
            im_size=args.data_im_size,
            bbox_scale_factor=args.data_bbox_scale_factor,
            pooling=args.encoder_pooling,
            batch_size=args.batch_size,
            device=args.device,
            name=args.name,
            encoder=args.encoder,
            encoder_type=args.encoder_type,
            weights=args.weights,
            init_seed=args.init_seed,
            max_frames=args.max_frames,
            drop_last=not args.data_fragment_pad_last,
            min_tracklet_frames=args.min_tracklet_frames,
            frame_budget=args.frame_budget,
            cache=cache,
        )
        if args.out:
            print(f"wrote {copy_out(path, args.out)}")
    except EmbedError as e:
        print(f"polyp-ssl embed: error: {e}", file=sys.stderr)
        return 2
    return 0
