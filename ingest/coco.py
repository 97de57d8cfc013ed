"""Load and validate one annotation file (the seed's COCO extension) into videos of annotations.

Everything the main process can check without decoding a frame is checked here, up front: the
file's structure (fatal), and per annotation its keys, image, box and identity. A bad
annotation is reported through the ErrorSink (an error in `fail` mode, a skipped row otherwise),
so every annotation of the file ends up either in a `VideoPlan` or in an error row.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from polyp_ssl.ingest.errors import ErrorRow, ErrorSink, IngestError
from polyp_ssl.shards.files import NotRegularFileError
from polyp_ssl.shards.ids import id_problem, path_component
from polyp_ssl.shards.textio import MAX_ANNOTATION_BYTES, TextInputError, loads_json, read_bounded

log = logging.getLogger(__name__)

IMAGE_KEYS = ("id", "file_name", "width", "height", "frame_id", "sequence_id")
ANNOTATION_KEYS = ("id", "image_id", "bbox", "identity_id")
# annotation fields ingest consumes; the rest is kept per frame in the sample's `extra`
_CONSUMED = {"id", "image_id", "bbox", "identity_id", "size", "histology", "segmentation", "area"}


@dataclass(frozen=True)
class Annotation:
    annotation_id: int
    image_id: int
    frame_id: int
    file_name: str
    width: int
    height: int
    bbox: tuple[float, float, float, float]  # clamped to the frame
    identity_id: str
    size_mm: float | None
    histology: str | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VideoPlan:
    """One video's valid annotations (sorted by frame_id, annotation_id) and its frame span."""

    video_id: str
    dataset_id: str | None
    sequence_id: str
    split: str
    first_frame: int
    last_frame: int
    n_images: int
    annotations: list[Annotation] = field(default_factory=list)


def video_id_of(sequence_id: str, dataset_id: str | None) -> str:
    """`{dataset_id}/{sequence_id}`, or `sequence_id` without a dataset id. Both parts are single
    path components (shards.ids: no `/`, not empty, ...), so the `/` is only ever the separator and
    distinct (dataset_id, sequence_id) pairs never give one video id; UnsafeIdError otherwise."""
    path_component(sequence_id, "sequence_id")
    if dataset_id:
        path_component(dataset_id, "dataset_id")
        return f"{dataset_id}/{sequence_id}"
    return sequence_id


INT64_LIMIT = 2**63  # ids and frame ids are int64 columns of the catalog
SIDE_LIMIT = 2**31  # frame sides: crop corners are int32 columns


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -INT64_LIMIT <= v < INT64_LIMIT


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fatal(source: str, reason: str, detail: str, field_: str | None = None) -> IngestError:
    return IngestError(ErrorRow(source, None, field_, reason, detail))


def read_annotation_file(path: str) -> dict[str, Any]:
    """The parsed file; a structural problem raises IngestError whatever the error policy."""
    try:
        raw = read_bounded(path, "annotation file", MAX_ANNOTATION_BYTES, "JSON")
        obj = loads_json(raw, path, MAX_ANNOTATION_BYTES)  # size and depth bounded before parsing
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise _fatal(path, "missing_file", "annotation file not found") from None
    except NotRegularFileError as e:  # a FIFO or device: refused by name, never waited on
        raise _fatal(path, "not_regular_file", e.strerror) from None
    except TextInputError as e:  # not UTF-8 JSON, too large, nested too deep
        raise _fatal(path, "bad_json", e.detail if e.line is None else f"line {e.line}: {e.detail}") from None
    if not isinstance(obj, dict):
        raise _fatal(path, "bad_json", f"top level is a {type(obj).__name__}, not an object")
    where = _lone_surrogate(obj, "") if _MAYBE_SURROGATE.search(text) else None
    if where is not None:
        raise _fatal(path, "bad_text", f"{where} holds an escaped lone surrogate (\\udXXX), not text")
    for key in ("images", "annotations"):
        if key not in obj:
            raise _fatal(path, "missing_key", f"no {key!r} list", key)
        if not isinstance(obj[key], list):
            raise _fatal(path, "bad_type", f"{key!r} is a {type(obj[key]).__name__}, not a list", key)
    return obj


_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: Any, where: str) -> str | None:
    """Where in the parsed JSON a string (key or value) is not encodable as UTF-8, or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "a string"
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _lone_surrogate(k, f"{where}.{k!r}") or _lone_surrogate(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _image_problem(img: Any) -> tuple[str, str, str] | None:
    """(field, reason, detail) of the first problem of an image record, or None."""
    if not isinstance(img, dict):
        return "", "bad_image", f"image record is a {type(img).__name__}, not an object"
    for key in IMAGE_KEYS:
        if key not in img:
            return key, "missing_key", f"image has no {key!r}"
    if not _is_int(img["id"]):
        return "id", "bad_type", f"image id {img['id']!r} is not a 64-bit integer"
    if not isinstance(img["file_name"], str) or not img["file_name"]:
        return "file_name", "bad_type", f"file_name {img['file_name']!r} is not a non-empty string"
    name = img["file_name"].replace("\\", "/")
    if name.startswith("/") or ".." in name.split("/") or "\0" in name:
        return "file_name", "unsafe_path", f"file_name {img['file_name']!r} leaves the images folder"
    for key in ("width", "height"):
        if not _is_int(img[key]) or not 0 < img[key] < SIDE_LIMIT:
            return key, "bad_type", f"{key} {img[key]!r} is not a positive integer below 2**31"
    if not _is_int(img["frame_id"]) or img["frame_id"] < 0:
        return "frame_id", "bad_type", f"frame_id {img['frame_id']!r} is not a non-negative integer"
    if not isinstance(img["sequence_id"], str | int) or isinstance(img["sequence_id"], bool):
        return "sequence_id", "bad_type", f"sequence_id {img['sequence_id']!r} is not a string"
    ds = img.get("dataset_id")
    if ds is not None and (not isinstance(ds, str | int) or isinstance(ds, bool)):
        return "dataset_id", "bad_type", f"dataset_id {ds!r} is not a string"
    # ids that become the video id `{dataset_id}/{sequence_id}` and the file `{sequence_id}.mp4`
    for key, value in (("sequence_id", img["sequence_id"]), ("dataset_id", ds)):
        if key == "dataset_id" and value in (None, ""):
            continue
        problem = id_problem(str(value))
        if problem is not None:
            return key, "unsafe_id", f"{key} {str(value)!r} {problem}; it must be one plain name"
    return None


def _check_box(
    bbox: Any, width: int, height: int
) -> tuple[tuple[float, float, float, float] | None, str, str]:
    """(clamped box or None, reason, detail); reason "" = fine, "box_outside_frame" with a box = fixed."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
        return None, "bad_bbox", f"bbox {bbox!r} is not a list of 4 numbers"
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, "nan_box", f"bbox {bbox!r} has a NaN or infinite value"
    if w <= 0 or h <= 0:
        return None, "zero_area_box", f"bbox {bbox!r} has zero or negative width or height"
    if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
        return (x, y, w, h), "", ""  # kept exactly as given
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0:
        return None, "box_outside_frame", f"bbox {bbox!r} lies outside the {width}x{height} frame"
    clamped = (x0, y0, x1 - x0, y1 - y0)
    return (
        clamped,
        "box_outside_frame",
        f"bbox {bbox!r} clamped to the {width}x{height} frame: {list(clamped)}",
    )


def load_split(path: str, split: str, sink: ErrorSink) -> tuple[list[VideoPlan], int]:
    """The videos of one annotation file (sorted by video_id) and its number of annotations.

    Videos include those whose images carry no (valid) annotation, with an empty list."""
    obj = read_annotation_file(path)
    source = os.fspath(path)
    index = _SplitIndex()
    _check_images(obj["images"], source, sink, index)
    videos = _group_videos(index, split)
    per_video: dict[str, list[Annotation]] = defaultdict(list)
    annotations = obj["annotations"]
    for i, ann in enumerate(annotations):
        found = _check_annotation(ann, i, source, sink, index)
        if found is not None:
            per_video[found[0]].append(found[1])
    out = []
    for vid in sorted(videos):
        v = videos[vid]
        v.annotations = sorted(per_video.get(vid, []), key=lambda a: (a.frame_id, a.annotation_id))
        out.append(v)
    return out, len(annotations)


@dataclass
class _SplitIndex:
    """What the checks of one annotation file have seen so far."""

    images: dict[int, dict[str, Any]] = field(default_factory=dict)  # usable image records by id
    bad_images: dict[int, str] = field(default_factory=dict)  # image id -> why it is unusable
    image_video: dict[int, str] = field(default_factory=dict)  # image id -> video id
    seen_ann: set[int] = field(default_factory=set)
    kept_at: dict[tuple[str, int, str], int] = field(default_factory=dict)  # (video, frame, identity) -> ann


def _check_images(records: list[Any], source: str, sink: ErrorSink, index: _SplitIndex) -> None:
    """The usable image records into `index.images`, the unusable ones (by id) into
    `index.bad_images`; IngestError for the first bad one in fail mode."""
    images, bad_images = index.images, index.bad_images
    n_unusable = 0  # image records without a usable id: no annotation can point at them
    for i, img in enumerate(records):
        problem = _image_problem(img)
        img_id = img.get("id") if isinstance(img, dict) else None
        if problem is not None:
            field_, reason, detail = problem
            if not _is_int(img_id):
                # no usable id: no annotation can point at it; fatal in fail mode
                if sink.on_error == "fail":
                    raise IngestError(ErrorRow(source, f"images[{i}]", field_ or None, reason, detail))
                n_unusable += 1
                continue
            bad_images[img_id] = f"image {img_id} field {field_!r}: {detail}"
            if sink.on_error == "fail":
                raise IngestError(ErrorRow(source, f"image {img_id}", field_ or None, reason, detail))
            continue
        if img_id in images or img_id in bad_images:
            bad_images[img_id] = f"image id {img_id} appears more than once"
            images.pop(img_id, None)
            if sink.on_error == "fail":
                raise IngestError(
                    ErrorRow(
                        source,
                        f"image {img_id}",
                        "id",
                        "duplicate_image_id",
                        f"image id {img_id} appears more than once",
                    )
                )
            continue
        images[img_id] = img
    if n_unusable:
        log.warning(
            "%s: %d image records without a usable id left out (their annotations, if any, "
            "are reported as missing_image)",
            source,
            n_unusable,
        )


def _group_videos(index: _SplitIndex, split: str) -> dict[str, VideoPlan]:
    """The videos of the usable images (their frame range and image count); fills
    `index.image_video`."""
    videos: dict[str, VideoPlan] = {}
    for img_id, img in index.images.items():
        ds = img.get("dataset_id")
        ds = str(ds) if ds not in (None, "") else None
        seq = str(img["sequence_id"])
        vid = video_id_of(seq, ds)
        index.image_video[img_id] = vid
        v = videos.get(vid)
        if v is None:
            videos[vid] = VideoPlan(vid, ds, seq, split, img["frame_id"], img["frame_id"], 1)
        else:
            v.first_frame = min(v.first_frame, img["frame_id"])
            v.last_frame = max(v.last_frame, img["frame_id"])
            v.n_images += 1
    return videos


def _check_annotation(
    ann: Any, i: int, source: str, sink: ErrorSink, index: _SplitIndex
) -> tuple[str, Annotation] | None:
    """(video id, annotation) of one annotation record, or None when it is skipped (a row in
    `sink`; IngestError in fail mode)."""
    checked = _annotation_id(ann, i, source, sink, index)
    if checked is None:
        return None
    ann_label, ann_id = checked
    image_id = ann["image_id"]
    if image_id in index.bad_images:
        detail = f"its image is unusable: {index.bad_images[image_id]}"
        sink.skip(source, ann_label, "image_id", "bad_image", detail)
        return None
    if not _is_int(image_id) or image_id not in index.images:
        sink.skip(
            source,
            ann_label,
            "image_id",
            "missing_image",
            f"image_id {image_id!r} is not an image of this file",
        )
        return None
    img = index.images[image_id]
    values = _annotation_values(ann, ann_label, img, source, sink)
    if values is None:
        return None
    identity, box, reason, detail, size = values
    histology = ann.get("histology")
    histology = None if histology in (None, "") else str(histology)
    vid = index.image_video[image_id]
    slot = (vid, img["frame_id"], identity)
    if slot in index.kept_at:
        sink.skip(
            source,
            ann_label,
            "identity_id",
            "duplicate_identity_in_frame",
            f"identity {identity!r} already has annotation {index.kept_at[slot]} in frame {img['frame_id']} "
            f"of video {vid!r}",
        )
        return None
    index.kept_at[slot] = ann_id
    if reason:
        sink.fixed(source, ann_label, "bbox", reason, detail)
    extra = {k: v for k, v in ann.items() if k not in _CONSUMED}
    frame = (image_id, img["frame_id"], img["file_name"], img["width"], img["height"])
    return vid, Annotation(ann_id, *frame, box, identity, size, histology, extra)


def _annotation_id(
    ann: Any, i: int, source: str, sink: ErrorSink, index: _SplitIndex
) -> tuple[str, int] | None:
    """(label, id) of an annotation record that is an object with the keys and a new integer id."""
    if not isinstance(ann, dict):
        sink.skip(
            source,
            f"annotations[{i}]",
            None,
            "bad_annotation",
            f"annotation record is a {type(ann).__name__}, not an object",
        )
        return None
    ann_label = f"annotation {ann['id']}" if _is_int(ann.get("id")) else f"annotations[{i}]"
    missing = [k for k in ANNOTATION_KEYS if k not in ann]
    if missing:
        sink.skip(source, ann_label, missing[0], "missing_key", f"annotation has no {missing[0]!r}")
        return None
    if not _is_int(ann["id"]):
        sink.skip(source, ann_label, "id", "bad_type", f"annotation id {ann['id']!r} is not a 64-bit integer")
        return None
    ann_id = ann["id"]
    if ann_id in index.seen_ann:
        sink.skip(
            source,
            ann_label,
            "id",
            "duplicate_annotation_id",
            f"annotation id {ann_id} appears more than once",
        )
        return None
    index.seen_ann.add(ann_id)
    return ann_label, ann_id


def _annotation_values(
    ann: dict[str, Any], ann_label: str, img: dict[str, Any], source: str, sink: ErrorSink
) -> tuple[str, Any, str, str, float | None] | None:
    """(identity, box, fix reason, fix detail, size) of an annotation, or None when one is
    unusable (skipped)."""
    identity = ann["identity_id"]
    if not isinstance(identity, str | int) or isinstance(identity, bool) or identity == "":
        sink.skip(source, ann_label, "identity_id", "bad_type", f"identity_id {identity!r} is not a string")
        return None
    identity = str(identity)
    box, reason, detail = _check_box(ann["bbox"], img["width"], img["height"])
    if box is None:
        sink.skip(source, ann_label, "bbox", reason, detail)
        return None
    size = ann.get("size")
    if size is not None:
        try:
            size = float(size)
        except (TypeError, ValueError):
            sink.skip(source, ann_label, "size", "bad_type", f"size {size!r} is not a number")
            return None
        if not math.isfinite(size):
            size = None
        elif size < 0:
            sink.skip(source, ann_label, "size", "bad_value", f"size {size!r} mm is negative")
            return None
    return identity, box, reason, detail, size


def drop_shared_identities(videos: list[VideoPlan], sink: ErrorSink, source_of: dict[str, str]) -> None:
    """An identity is one polyp of one video: annotations of an identity_id already seen in an
    earlier video (in split, video order) are reported and removed, keeping tracklet ids unique."""
    owner: dict[str, str] = {}
    for v in videos:
        for identity in sorted({a.identity_id for a in v.annotations}):
            owner.setdefault(identity, f"{v.split}:{v.video_id}")
    for v in videos:
        here = f"{v.split}:{v.video_id}"
        keep = []
        for a in v.annotations:
            if owner[a.identity_id] != here:
                sink.skip(
                    source_of[v.split],
                    f"annotation {a.annotation_id}",
                    "identity_id",
                    "identity_in_several_videos",
                    f"identity {a.identity_id!r} already belongs to video {owner[a.identity_id]}",
                )
                continue
            keep.append(a)
        v.annotations = keep
