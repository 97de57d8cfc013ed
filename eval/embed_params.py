"""The settings and results of an embedding run: what encoder (`EncoderChoice`), how to cut and
embed a split (`EmbedOptions`, resolved into `EmbedParams`, the cache key's parameters), and what
came of it (`EmbedResult`); the constants of the paper's protocol and the errors of eval.embed."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.shards.embeddings_cache import EmbeddingsCache

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


@dataclass(frozen=True)
class EncoderChoice:
    """Which encoder makes the vectors. `ckpt`: a checkpoint path, `init:SPEC`, "descriptor" (as
    encoder="descriptor") or `zoo:NAME=PATH` (as encoder="zoo:NAME", weights=PATH)."""

    ckpt: str | Path | None = None
    encoder: str = "checkpoint"
    weights: str | Path | None = None
    init_seed: int = DEFAULT_INIT_SEED
    encoder_type: str | None = None  # expected type of a checkpoint; another is an error


@dataclass(frozen=True)
class EmbedOptions:
    """How a split is embedded (unset im_size / bbox_scale_factor: the checkpoint's) and where the
    file is cached (`cache`: eval.embed.resolve_cache; None: the rule for the root without
    --cache_dir)."""

    split: str = "test"
    fragment_length: int = -1
    fragment_stride: int = DEFAULT_STRIDE
    im_size: int | None = None
    bbox_scale_factor: float | None = None
    pooling: str = "cls"
    max_frames: int | None = DEFAULT_MAX_FRAMES
    drop_last: bool = True
    min_tracklet_frames: int = DEFAULT_MIN_TRACKLET_FRAMES
    batch_size: int = 32
    device: str = "auto"
    frame_budget: int = DEFAULT_FRAME_BUDGET
    name: str | None = None
    progress: bool = True
    cache: EmbeddingsCache | None = None

    def check(self) -> None:
        """EmbedError naming the flag of the first value out of range."""
        if self.fragment_length == 0 or self.fragment_length < -1:
            raise EmbedError(f"--data_fragment_length must be -1 or >= 1, got {self.fragment_length}")
        if self.batch_size < 1:
            raise EmbedError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.pooling not in ("cls", "mean"):
            raise EmbedError(f"--encoder_pooling must be cls or mean, got {self.pooling!r}")
        if self.min_tracklet_frames < 1:
            raise EmbedError(f"--min_tracklet_frames must be >= 1, got {self.min_tracklet_frames}")
        if self.max_frames is not None and self.max_frames < 1:
            raise EmbedError(f"--max_frames must be >= 1 (or not given: no cap), got {self.max_frames}")
        if self.frame_budget < 1:
            raise EmbedError(f"--frame_budget must be >= 1, got {self.frame_budget}")

    def params(self) -> EmbedParams:
        """The parameters before the encoder's own image size and crop scale fill the unset ones."""
        return EmbedParams(
            self.split,
            self.fragment_length,
            self.fragment_stride,
            self.im_size or DEFAULT_IM_SIZE,
            self.bbox_scale_factor or DEFAULT_BBOX_SCALE,
            self.pooling,
            self.max_frames,
            self.drop_last,
            self.min_tracklet_frames,
        )


@dataclass(frozen=True)
class EmbedResult:
    """The embeddings file of a run, and whether it was found in the cache or written now."""

    path: Path
    reused: bool
    n_rows: int = 0
    dim: int = 0
    elapsed_s: float = 0.0
    protocol: str = ""
    n_below_min: int = 0
    min_tracklet_frames: int = DEFAULT_MIN_TRACKLET_FRAMES

    def summary(self) -> str:
        """The one line a command prints about the file."""
        if self.reused:
            return f"embeddings up to date, reusing {self.path}"
        return (
            f"wrote {self.n_rows} x {self.dim} embeddings to {self.path} ({self.elapsed_s:.1f} s; protocol "
            f"{self.protocol}; {self.n_below_min} tracklets under {self.min_tracklet_frames} frames left out)"
        )


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


def cache_key(source_identity: str, params: EmbedParams, manifest_hash: str) -> str:
    payload = json.dumps(
        {"source": source_identity, "params": asdict(params), "manifest": manifest_hash, "v": EMBED_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def default_name(source: EncoderSource, params: EmbedParams, key: str) -> str:
    """A SQL-identifier-safe name (the catalog exposes the file as view `embeddings_{name}`)."""
    frag = "trk" if params.fragment_length < 0 else f"f{params.fragment_length}"
    return sanitize_name(f"{source.label}_{params.split}_{frag}_{key[:10]}")


def sanitize_name(name: str) -> str:
    return _NAME_OK.sub("_", name).strip("_") or "embeddings"
