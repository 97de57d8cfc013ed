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
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from polyp_ssl.shards.textio import json_depth

SAMPLE_VERSION = 2  # 2: position_in_video and video_first/last_frame over the annotated frames
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
    position_in_video: float  # start frame normalised over the video's annotated span (first..last)
    video_first_frame: int  # first annotated frame_id of the video (any identity)
    video_last_frame: int  # last annotated frame_id of the video
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
        """The checked sample of a JSON member (parse_sample); SampleError (a ValueError) names the
        field that is wrong."""
        return parse_sample(data)


def encode_sample(meta: TrackletSample, jpegs: list[bytes]) -> dict[str, Any]:
    """A webdataset-writer dict (`__key__` plus member suffix -> bytes)."""
    if len(jpegs) != meta.n_frames:
        raise ValueError(f"{meta.key}: {len(jpegs)} JPEGs for {meta.n_frames} frames")
    sample: dict[str, Any] = {"__key__": meta.key, JSON_EXT: meta.to_json()}
    for i, jpeg in enumerate(jpegs):
        sample[frame_ext(i)] = jpeg
    return sample


def sample_meta(sample: dict[str, Any]) -> TrackletSample:
    """The checked TrackletSample of a raw webdataset sample dict (member suffix -> bytes);
    SampleError names the field (`json` when the member is missing)."""
    if JSON_EXT not in sample:
        raise SampleError("json", f"sample {sample.get('__key__')!r} has no .json member")
    return parse_sample(sample[JSON_EXT])


def frame_jpeg(sample: dict[str, Any], frame_index: int) -> bytes:
    ext = frame_ext(frame_index)
    if ext not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no member .{ext}")
    return sample[ext]


# start-of-frame markers (baseline, extended, progressive, lossless, ...); not DHT (C4), JPG (C8), DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers without a length field (TEM, RST0-7), which libjpeg steps over as two bytes
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, without decoding; ValueError if there is none.

    The markers are walked the way libjpeg walks them before its first SOF (standalone markers
    have no length), and anything else before it (bytes that are not a marker, a second SOI, a
    scan) is refused rather than skipped, so the size found is the size a decoder would use."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ValueError("no JPEG start-of-image marker")
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise ValueError(f"JPEG marker 0xFF{marker:02X} before the frame header at byte {pos}")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            raise ValueError(f"JPEG segment of length {length} at byte {pos}")
        if marker in _SOF:
            if pos + 9 > n:
                break
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, int.from_bytes(data[pos + 5 : pos + 7], "big")
        pos += 2 + length
    raise ValueError("no JPEG frame header")


# ---------------------------------------------------------------- validating the JSON member

MAX_JSON_BYTES = 16 << 20  # a 10,000-frame tracklet's JSON is about 2.5 MB
MAX_JSON_DEPTH = 32  # a sample nests 3 levels; `params` and `extra` may nest a little more
MAX_CROP_SIDE = 65535  # the most a JPEG side can be
MAX_FRAME_PIXELS = 4096 * 4096  # a stored crop (48 MiB decoded as RGB); ingest stores 256 px sides
MAX_COORD = float(1 << 31)  # |coordinate| of a box or crop, in pixels
MAX_ID = (1 << 63) - 1  # ids and frame numbers fit int64 (the catalog's type)
_STR_FIELDS = ("key", "tracklet_id", "split", "video_id", "sequence_id", "identity_id")
_OPT_STR_FIELDS = ("dataset_id", "histology")
_PER_FRAME = (
    "frame_ids",
    "image_ids",
    "annotation_ids",
    "file_names",
    "boxes",
    "crops",
    "crop_sizes",
    "boxes_in_crop",
)


class SampleError(ValueError):
    """A sample JSON member that is not a valid TrackletSample; `field` names the first bad field
    (`boxes[3]`, `crop_sizes[0][1]`, `json` for the document itself). Callers add shard and key."""

    def __init__(self, field: str, detail: str, kind: str = "value") -> None:
        super().__init__(f"field {field!r}: {detail}")
        self.field = field
        self.detail = detail
        self.kind = kind  # "length": a per-frame list of another length than frame_ids


def _no_constant(name: str) -> Any:
    raise SampleError("json", f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise SampleError(dup, "appears twice in one JSON object")
    return out


def _load_json(data: bytes | str) -> Any:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_JSON_BYTES:
        raise SampleError("json", f"{len(raw)} bytes, more than the {MAX_JSON_BYTES} a sample may have")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise SampleError("json", f"nested {depth} levels deep, more than {MAX_JSON_DEPTH}")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except SampleError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, 4300+ digits
        raise SampleError("json", f"not valid UTF-8 JSON ({exc})") from None


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _int(v: Any, name: str, lo: int = -MAX_ID - 1, hi: int = MAX_ID) -> int:
    if not _is_int(v):
        raise SampleError(name, f"{_show(v)} is not an integer")
    if not lo <= v <= hi:
        raise SampleError(name, f"{v} is outside [{lo}, {hi}]")
    return v


def _num(v: Any, name: str, lo: float = -MAX_COORD, hi: float = MAX_COORD) -> float:
    if not _is_num(v):
        raise SampleError(name, f"{_show(v)} is not a finite number")
    if not lo <= v <= hi:
        raise SampleError(name, f"{v} is outside [{lo:g}, {hi:g}]")
    return float(v)


def _str(v: Any, name: str) -> str:
    if type(v) is not str:
        raise SampleError(name, f"{_show(v)} is not a string")
    return v


def _list(v: Any, name: str, length: int | None = None, kind: str = "value") -> list:
    if type(v) is not list:
        raise SampleError(name, f"{_show(v)} is not a list")
    if length is not None and len(v) != length:
        raise SampleError(name, f"has {len(v)} values, {length} are needed", kind)
    return v


def _show(v: Any) -> str:
    if isinstance(v, dict | list):
        return f"a JSON {'object' if isinstance(v, dict) else 'array'}"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_sample(data: bytes | str) -> TrackletSample:
    """The TrackletSample of a sample's JSON member, checked as data: size and nesting bounded
    before parsing, no duplicate keys, exact types per field (ints are not booleans or floats,
    numbers are finite), ranges (ids and frame numbers in int64, frame numbers and crop sizes not
    negative, crop sides in [1, MAX_CROP_SIDE] and at most MAX_FRAME_PIXELS pixels), per-frame lists
    of one length, boxes of 4 numbers lying in their stored crop. Raises SampleError naming the field."""
    obj = _load_json(data)
    if type(obj) is not dict:
        raise SampleError("json", f"the document is {_show(obj)}, not an object")
    version = obj.get("version")
    if version != SAMPLE_VERSION or not _is_int(version):
        raise SampleError("version", f"{_show(version)}, this reader knows {SAMPLE_VERSION}")
    missing = [f for f in TrackletSample.__dataclass_fields__ if f not in obj]
    if missing:
        raise SampleError(missing[0], f"missing (the sample lacks {missing})")
    for name in _STR_FIELDS:
        _str(obj[name], name)
    if not obj["key"]:
        raise SampleError("key", "is empty")
    for name in _OPT_STR_FIELDS:
        if obj[name] is not None:
            _str(obj[name], name)
    if obj["size_mm"] is not None:
        _num(obj["size_mm"], "size_mm", 0.0)
    _num(obj["position_in_video"], "position_in_video", 0.0, 1.0)
    first = _int(obj["video_first_frame"], "video_first_frame", 0)
    last = _int(obj["video_last_frame"], "video_last_frame", 0)
    if last < first:
        raise SampleError("video_last_frame", f"{last} is before video_first_frame {first}")
    for name in ("params", "extra"):
        if type(obj[name]) is not dict:
            raise SampleError(name, f"{_show(obj[name])} is not an object")
    scale = obj["params"].get("crop_scale")
    if scale is not None:
        _num(scale, "params.crop_scale", 1e-6)
    n = len(_list(obj["frame_ids"], "frame_ids"))
    if n == 0:
        raise SampleError("frame_ids", "is empty: a tracklet has at least one frame")
    for name in _PER_FRAME:
        _list(obj[name], name, n, "length")
    for i in range(n):
        _int(obj["frame_ids"][i], f"frame_ids[{i}]", 0)
        _int(obj["image_ids"][i], f"image_ids[{i}]")
        _int(obj["annotation_ids"][i], f"annotation_ids[{i}]")
        _str(obj["file_names"][i], f"file_names[{i}]")
        for j, v in enumerate(_list(obj["boxes"][i], f"boxes[{i}]", 4)):
            _num(v, f"boxes[{i}][{j}]")
        crop = _list(obj["crops"][i], f"crops[{i}]", 4)
        x0, y0, x1, y1 = (_int(v, f"crops[{i}][{j}]", 0, int(MAX_COORD)) for j, v in enumerate(crop))
        if x1 <= x0 or y1 <= y0:
            raise SampleError(f"crops[{i}]", f"{crop} is empty (x1 <= x0 or y1 <= y0)")
        size = _list(obj["crop_sizes"][i], f"crop_sizes[{i}]", 2)
        cw, ch = (_int(v, f"crop_sizes[{i}][{j}]", 1, MAX_CROP_SIDE) for j, v in enumerate(size))
        if cw * ch > MAX_FRAME_PIXELS:
            raise SampleError(f"crop_sizes[{i}]", f"{cw}x{ch} is more than {MAX_FRAME_PIXELS} pixels")
        bic = _list(obj["boxes_in_crop"][i], f"boxes_in_crop[{i}]", 4)
        bx, by, bw, bh = (_num(v, f"boxes_in_crop[{i}][{j}]") for j, v in enumerate(bic))
        # the box must overlap its stored crop (it lies inside it when crop_scale >= 1)
        if bw <= 0 or bh <= 0 or bx >= cw or by >= ch or bx + bw <= 0 or by + bh <= 0:
            raise SampleError(f"boxes_in_crop[{i}]", f"{bic} does not lie in the {cw}x{ch} stored crop")
    return TrackletSample(**{k: obj[k] for k in TrackletSample.__dataclass_fields__})


class JpegSizeError(ValueError):
    """A frame JPEG whose header is missing (kind "no_header"), too large ("too_large"), or not of
    the expected size ("mismatch")."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_jpeg(data: bytes | memoryview, expected: Sequence[int] | None = None) -> tuple[int, int]:
    """(width, height) of a frame JPEG from its header, before anything decodes it: the one size
    check of every decode site. Raises JpegSizeError when the header is missing, a side is 0, the
    frame has more than MAX_FRAME_PIXELS pixels, or it is not `expected` (the JSON's crop_sizes).
    PIL's Image.MAX_IMAGE_PIXELS (about 179 M pixels) is far above what a stored crop may be."""
    try:
        w, h = jpeg_size(data)
    except ValueError as exc:
        raise JpegSizeError(f"no JPEG frame header ({exc})", "no_header") from None
    if w < 1 or h < 1 or w * h > MAX_FRAME_PIXELS:
        raise JpegSizeError(
            f"a {w}x{h} JPEG, outside the 1 to {MAX_FRAME_PIXELS} pixels a frame may have", "too_large"
        )
    if expected is not None and [w, h] != [int(v) for v in expected]:
        raise JpegSizeError(
            f"a {w}x{h} JPEG, the JSON's crop_sizes say {int(expected[0])}x{int(expected[1])}", "mismatch"
        )
    return w, h
