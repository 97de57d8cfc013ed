"""`polyp-ssl embed`: run a frozen encoder once over a split, write ROOT/embeddings/{name}.parquet.

Three kinds of encoder share one path:
- a training checkpoint (`--encoder_ckpt runs/x/checkpoints/last.ckpt`);
- the same encoder at initialisation, the untrained baseline (`--encoder_ckpt init:SPEC`, SPEC a
  checkpoint, the run's `config.yaml`, or an architecture `hmve-resnet18`; random weights drawn
  with `--init_seed`, never downloaded);
- the synthetic generator's hand-made descriptor (`--encoder descriptor`), a colour/texture
  vector of the box regions of the stored crops (ingest.synth.descriptor).

Whole tracklets (`--data_fragment_length -1`) are the strided frames of the tracklet as one
sequence. To keep memory bounded a tracklet longer than `--max_frames` strided frames (default
64) is subsampled to `max_frames` evenly spaced frames (first and last kept); the number of
tracklets so capped is logged and stored in the file metadata.

A file is reused when it was made from the same inputs: the cache key is the sha256 of the
checkpoint's sha256 (or the init config / descriptor version), the embedding parameters and the
catalog manifest's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval import embeddings as emb_io
from eval.embeddings import read_metadata, write_embeddings
from polyp_ssl.checkpoint import sha256_file
from polyp_ssl.fragments import even_subsample, fragment_index_lists
from shards.sample import TrackletSample, frame_ext, sample_meta

log = logging.getLogger(__name__)

DESCRIPTOR = "descriptor"
INIT_PREFIX = "init:"
DEFAULT_IM_SIZE = 232
DEFAULT_BBOX_SCALE = 5.0
DEFAULT_STRIDE = 4
DEFAULT_MAX_FRAMES = 64
DEFAULT_INIT_SEED = 0
EMBED_VERSION = 2  # 2: metadata counts tracklets shorter than one fragment
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
    max_frames: int = DEFAULT_MAX_FRAMES
    fragment_drop_last: bool = True


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
    n_frames: int, fragment_length: int, stride: int, max_frames: int, drop_last: bool = True
) -> list[tuple[int, list[int]]]:
    """(fragment_index, frame indices) of the items cut from a tracklet of n_frames frames
    (polyp_ssl.fragments); a whole tracklet (-1) is evenly subsampled to max_frames when longer."""
    try:
        lists = fragment_index_lists(n_frames, fragment_length, stride, drop_last)
    except ValueError as e:
        raise EmbedError(str(e)) from e
    if fragment_length == -1:
        return [(-1, even_subsample(idx, max_frames)) for idx in lists]
    return list(enumerate(lists))


def decode_rgb(jpeg: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.uint8)


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
    frames = load_frames(jpegs, [meta.boxes_in_crop[i] for i in uniq], im_size, scale).numpy()
    pos = {i: k for k, i in enumerate(uniq)}
    return frames[[pos[i] for i in indices]]


@dataclass
class Item:
    meta: TrackletSample
    fragment_index: int
    indices: list[int]
    frames: np.ndarray | None = None  # uint8 [S, 3, H, W] for encoders
    raw: dict[int, bytes] | None = None  # frame index -> stored JPEG, for the descriptor


# ----------------------------------------------------------------------------- split reading


def split_shards(root: str | Path, split: str) -> list[Path]:
    """The split's shard files, in catalog order (the catalog's `shards` table)."""
    import pyarrow.parquet as pq

    root = Path(root)
    table_path = root / "catalog" / "shards.parquet"
    if not table_path.is_file():
        raise EmbedError(f"{table_path}: missing; {root} is not an ingested root (run `polyp-ssl ingest`)")
    rows = pq.read_table(table_path, columns=["path", "split", "n_samples"]).to_pylist()
    known = sorted({r["split"] for r in rows})
    rows = [r for r in rows if r["split"] == split]
    if not rows or sum(int(r["n_samples"]) for r in rows) == 0:
        raise EmbedError(
            f"{table_path}: split {split!r} has no tracklets (splits with data: {', '.join(known) or 'none'})"
        )
    paths = [root / r["path"] for r in sorted(rows, key=lambda r: r["path"])]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EmbedError(f"shards named in {table_path} are missing: {missing[:3]}")
    return paths


def split_tracklet_count(root: str | Path, split: str) -> int:
    import pyarrow.parquet as pq

    path = Path(root) / "catalog" / "tracklets.parquet"
    if not path.is_file():
        return 0
    t = pq.read_table(path, columns=["split"]).column("split").to_pylist()
    return sum(1 for s in t if s == split)


def iter_items(
    root: str | Path, params: EmbedParams, decode: bool, too_short: list[str] | None = None
) -> Iterator[Item]:
    """Items of the split in shard order; ids of tracklets too short for one fragment are
    appended to `too_short` (they are counted and reported, never dropped silently)."""
    from shards.reader import iter_samples

    for sample in iter_samples(split_shards(root, params.split)):
        meta = sample_meta(sample)
        if meta.split != params.split:
            raise EmbedError(f"sample {meta.key!r} says split {meta.split!r}, read as {params.split!r}")
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
            if decode:
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


def resolve_source(encoder_ckpt: str | Path | None, encoder: str = "checkpoint") -> EncoderSource:
    """Identify the encoder without loading weights (the checkpoint is hashed, not unpickled)."""
    if encoder == DESCRIPTOR or str(encoder_ckpt) == DESCRIPTOR:
        from ingest.synth import descriptor as desc

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
    path = Path(spec)
    if not path.is_file():
        raise EmbedError(f"--encoder_ckpt {path}: no such file")
    return EncoderSource("checkpoint", str(path), sha256_file(path), sanitize_name(_ckpt_label(path)))


def _ckpt_label(path: Path) -> str:
    # runs/{exp}/checkpoints/last.ckpt -> {exp}_last
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}_{path.stem}"
    return path.stem


_ARCH_SPEC = re.compile(r"^(sfe|mve|hmve)[-_:](resnet\d+)$")


def init_config(spec: str) -> dict[str, Any]:
    """The config of the encoder to build at initialisation, from a checkpoint, a YAML/JSON
    config file (the run's resolved config) or an architecture spec such as `hmve-resnet18`."""
    m = _ARCH_SPEC.match(spec)
    if m:
        return {"encoder_type": m.group(1), "sfe_backbone_arch": m.group(2), "sfe_d_model": None}
    path = Path(spec)
    if not path.is_file():
        raise EmbedError(f"init:{spec}: neither a file nor an architecture spec like hmve-resnet18")
    if path.suffix in (".ckpt", ".pt", ".pth"):
        from polyp_ssl.checkpoint import load_encoder

        _, config = load_encoder(path, map_location="cpu")
        return flat_config(config)
    text = path.read_text()
    if path.suffix == ".json":
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text)
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


def load_source_encoder(source: EncoderSource, init_seed: int, expect_type: str | None):
    """(encoder module, config dict) of a checkpoint or init source."""
    if source.kind == "checkpoint":
        from polyp_ssl.checkpoint import load_encoder

        try:
            encoder, config = load_encoder(source.spec, map_location="cpu")
        except EmbedError:
            raise
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
    if im < 8:
        raise EmbedError(f"--data_im_size must be >= 8, got {im}")
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
    from ingest.synth.descriptor import describe_tracklet

    raw = item.raw or {}
    images = {i: decode_rgb(raw[i]) for i in raw}
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
    init_seed: int = DEFAULT_INIT_SEED,
    max_frames: int = DEFAULT_MAX_FRAMES,
    drop_last: bool = True,
    progress: bool = True,
) -> Path:
    """ROOT/embeddings/{name}.parquet for these inputs, computed only when not already there.

    `ckpt`: a checkpoint path, `init:SPEC`, or "descriptor" (same as encoder="descriptor").
    """
    root = Path(root)
    mhash = manifest_sha256(root)
    split_shards(root, split)  # an unknown or empty split fails before any model is built
    source = resolve_source(ckpt, encoder)
    if fragment_length == 0 or fragment_length < -1:
        raise EmbedError(f"--data_fragment_length must be -1 or >= 1, got {fragment_length}")
    if batch_size < 1:
        raise EmbedError(f"--batch_size must be >= 1, got {batch_size}")
    if pooling not in ("cls", "mean"):
        raise EmbedError(f"--encoder_pooling must be cls or mean, got {pooling!r}")
    params = EmbedParams(
        split,
        fragment_length,
        fragment_stride,
        im_size or DEFAULT_IM_SIZE,
        bbox_scale_factor or DEFAULT_BBOX_SCALE,
        pooling,
        max_frames,
        drop_last,
    )

    model = None
    config: dict[str, Any] = {}
    if source.kind == DESCRIPTOR:
        params = EmbedParams(**{**asdict(params), "im_size": 0, "bbox_scale_factor": 0.0, "pooling": "none"})
    else:
        model, config = load_source_encoder(source, init_seed, encoder_type)
        params = resolve_params(params, config, im_size, bbox_scale_factor)
    identity = source.identity if source.kind != "init" else f"{source.identity}-seed{init_seed}"
    key = cache_key(identity, params, mhash)
    out_name = sanitize_name(name) if name else default_name(source, params, key)
    path = root / "embeddings" / f"{out_name}.parquet"
    if path.is_file():
        try:
            existing = read_metadata(path)
        except Exception:  # unreadable file: recompute it
            existing = {}
        if existing.get("cache_key") == key:
            print(f"embeddings up to date, reusing {path}")
            return path
        log.info("%s was made from other inputs; recomputing", path)

    expected = split_tracklet_count(root, split)
    t0 = time.perf_counter()
    columns, vectors, n_capped, too_short = _compute(
        root, params, source, model, batch_size, device, expected, progress
    )
    elapsed = time.perf_counter() - t0
    if not vectors:
        raise NoItemsError(
            f"{root}: split {split!r} gave no items to embed (fragment_length {fragment_length} "
            f"at stride {fragment_stride} is longer than every tracklet?)"
        )
    mat = np.concatenate(vectors, axis=0).astype(np.float32)
    if not np.isfinite(mat).all():
        raise EmbedError(f"{source.spec}: the encoder produced non-finite values on split {split!r}")
    metadata = {
        "cache_key": key,
        "checkpoint": source.spec,
        "checkpoint_sha256": source.identity if source.kind == "checkpoint" else None,
        "encoder_kind": source.kind,
        "encoder_identity": identity,
        "encoder_config": encoder_fields(config) if config else None,
        "init_seed": init_seed if source.kind == "init" else None,
        "params": asdict(params),
        "manifest_sha256": mhash,
        "dataset_root": str(root.resolve()),
        "n_rows": int(mat.shape[0]),
        "dim": int(mat.shape[1]),
        "n_tracklets_capped": n_capped,
        "n_tracklets_too_short": len(too_short),
        "elapsed_s": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": EMBED_VERSION,
    }
    write_embeddings(path, columns, mat, metadata)
    print(f"wrote {mat.shape[0]} x {mat.shape[1]} embeddings to {path} ({elapsed:.1f} s)")
    return path


def _compute(root, params, source, model, batch_size, device, expected, progress):
    from tqdm import tqdm

    columns: dict[str, list] = {}
    vectors: list[np.ndarray] = []
    n_capped = 0
    too_short: list[str] = []
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
        for batch in batched(iter_items(root, params, decode=False, too_short=too_short), batch_size):
            vectors.append(np.stack([describe_item(it) for it in batch]))
            account(batch)
    else:
        import torch

        dev = resolve_device(device)
        model = model.to(dev)
        if dev.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        for batch in batched(iter_items(root, params, decode=True, too_short=too_short), batch_size):
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
    return columns, vectors, n_capped, too_short


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polyp-ssl embed", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--encoder_ckpt",
        help="checkpoint file, or init:SPEC (SPEC = checkpoint, config.yaml or "
        "an architecture like hmve-resnet18) for the encoder at initialisation",
    )
    p.add_argument(
        "--encoder",
        choices=["checkpoint", DESCRIPTOR],
        default="checkpoint",
        help="descriptor: the synthetic generator's hand-made descriptor instead of a network",
    )
    p.add_argument(
        "--encoder_type",
        choices=["sfe", "mve", "hmve"],
        help="expected encoder type; a checkpoint of another type is an error",
    )
    p.add_argument("--dataset_root", required=True, help="an ingested root (shards/ and catalog/)")
    p.add_argument("--split", default="test")
    p.add_argument("--data_fragment_length", type=int, default=-1, help="-1 = whole tracklet")
    p.add_argument("--data_fragment_stride", type=int, default=DEFAULT_STRIDE)
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
    p.add_argument("--encoder_pooling", choices=["cls", "mean"], default="cls")
    p.add_argument(
        "--max_frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help="whole tracklets longer than this (after striding) are evenly subsampled",
    )
    p.add_argument("--init_seed", type=int, default=DEFAULT_INIT_SEED)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--name", help="output: ROOT/embeddings/{name}.parquet (default: derived from the inputs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ensure_embeddings(
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
            init_seed=args.init_seed,
            max_frames=args.max_frames,
            drop_last=not args.data_fragment_pad_last,
        )
    except EmbedError as e:
        print(f"polyp-ssl embed: error: {e}", file=sys.stderr)
        return 2
    return 0
