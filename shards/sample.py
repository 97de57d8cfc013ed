"""The shard sample layout, defined once: one WebDataset sample per tracklet.

Members of a sample with key K (K uses only [A-Za-z0-9_-], webdataset cuts keys at the first dot):

    K.json          the TrackletSample below, UTF-8 JSON
    K.0000.jpg      the stored crop of the tracklet's first frame
    K.0001.jpg      ... one JPEG per frame, in time order

A stored crop is the frame's box enlarged `crop_scale` times about its centre, clamped to the
frame (shards.crops.enlarge_box), resized so its longer side is at most `store_size`. Training
takes any anchor crop of scale <= crop_scale from it via `boxes_in_crop`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

SAMPLE_VERSION = 1
JSON_EXT = "json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_key(text: str) -> str:
    """A webdataset-safe key for `text`; unsafe characters become `_` plus a hash suffix that
    keeps keys of different texts different (`a/b` and `a_b` do not collide)."""
    cleaned = _UNSAFE.sub("_", text)
    if cleaned == text and text:
        return text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}"


def frame_ext(frame_index: int) -> str:
    """Extension (member suffix after the key) of a tracklet's frame_index-th JPEG."""
    return f"{frame_index:04d}.jpg"


@dataclass
class TrackletSample:
    """The JSON member of a tracklet sample. Lists are per frame, in time order."""

    key: str
    tracklet_id: str
    split: str
    dataset_id: str | None
    video_id: str
    sequence_id: str
    identity_id: str
    size_mm: float | None
    histology: str | None
    position_in_video: float
    video_first_frame: int
    video_last_frame: int
    frame_ids: list[int]
    image_ids: list[int]
    annotation_ids: list[int]
    file_names: list[str]
    boxes: list[list[float]]  # [x, y, w, h] in source-frame pixels
    crops: list[list[int]]  # [x0, y0, x1, y1] stored region in source-frame pixels
    crop_sizes: list[list[int]]  # [w, h] of the stored JPEG
    boxes_in_crop: list[list[float]]  # [x, y, w, h] in stored-JPEG pixels
    params: dict[str, Any] = field(default_factory=dict)  # crop_scale, store_size, jpeg_quality, ...
    extra: dict[str, Any] = field(default_factory=dict)  # other annotation metadata, kept as given
    version: int = SAMPLE_VERSION

    @property
    def n_frames(self) -> int:
        return len(self.frame_ids)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> TrackletSample:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("tracklet sample JSON is not an object")
        version = obj.get("version")
        if version != SAMPLE_VERSION:
            raise ValueError(f"tracklet sample version {version!r}, this reader knows {SAMPLE_VERSION}")
        missing = [f for f in cls.__dataclass_fields__ if f not in obj]
        if missing:
            raise ValueError(f"tracklet sample JSON lacks fields {missing}")
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


def encode_sample(meta: TrackletSample, jpegs: list[bytes]) -> dict[str, Any]:
    """A webdataset-writer dict (`__key__` plus member suffix -> bytes)."""
    if len(jpegs) != meta.n_frames:
        raise ValueError(f"{meta.key}: {len(jpegs)} JPEGs for {meta.n_frames} frames")
    sample: dict[str, Any] = {"__key__": meta.key, JSON_EXT: meta.to_json()}
    for i, jpeg in enumerate(jpegs):
        sample[frame_ext(i)] = jpeg
    return sample


def sample_meta(sample: dict[str, Any]) -> TrackletSample:
    """The TrackletSample of a raw webdataset sample dict (member suffix -> bytes)."""
    if JSON_EXT not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no .json member")
    return TrackletSample.from_json(sample[JSON_EXT])


def frame_jpeg(sample: dict[str, Any], frame_index: int) -> bytes:
    ext = frame_ext(frame_index)
    if ext not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no member .{ext}")
    return sample[ext]


# start-of-frame markers (baseline, extended, progressive, lossless, ...); not DHT (C4), JPG (C8), DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, without decoding; ValueError if there is none."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF:
            if pos + 9 > n:
                break
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, int.from_bytes(data[pos + 5 : pos + 7], "big")
        pos += 2 + length
    raise ValueError("no JPEG frame header")
