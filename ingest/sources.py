"""Frame sources: the source frames of one video, decoded once each, in frame order.

`JpegFolder` reads `images/{file_name}` with PIL; `DecordVideo` reads frame `frame_id` of
`{videos_dir}/{sequence_id}.mp4` with decord (sorted frame order, `get_batch` on chunks). A
reader is created inside the worker that uses it. A frame that cannot be had is yielded as a
`FrameProblem` instead of an image, so the caller decides (fail, or skip its boxes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

DECORD_CHUNK = 16


@dataclass(frozen=True)
class FrameRequest:
    frame_id: int
    file_name: str
    reduce: int = 1  # JPEG only: decode at 1/reduce size (DCT scaling, PIL draft) when > 1


@dataclass(frozen=True)
class FrameProblem:
    source: str
    field: str
    reason: str
    detail: str


def iter_jpeg_folder(
    images_dir: str, requests: Sequence[FrameRequest]
) -> Iterator[tuple[FrameRequest, Image.Image | FrameProblem]]:
    for req in requests:
        path = os.path.join(images_dir, req.file_name)
        if not os.path.isfile(path):
            yield (
                req,
                FrameProblem(
                    path, "file_name", "missing_frame", f"frame file of frame_id {req.frame_id} not found"
                ),
            )
            continue
        try:
            img = Image.open(path)
            if req.reduce > 1 and img.format == "JPEG":
                img.draft("RGB", (-(-img.width // req.reduce), -(-img.height // req.reduce)))
            img.load()  # reads the file and closes it
            if img.mode != "RGB":
                img = img.convert("RGB")
        except Exception as e:  # PIL raises many types for a corrupt file
            yield (
                req,
                FrameProblem(
                    path, "file_name", "unreadable_frame", f"cannot decode frame_id {req.frame_id}: {e}"
                ),
            )
            continue
        yield req, img


def iter_decord_video(
    video_path: str, requests: Sequence[FrameRequest], chunk: int = DECORD_CHUNK
) -> Iterator[tuple[FrameRequest, Image.Image | FrameProblem]]:
    """Requests must be sorted by frame_id (decoding forward is what a video reader does fast)."""
    if not os.path.isfile(video_path):
        for req in requests:
            yield req, FrameProblem(video_path, "sequence_id", "missing_video", "video file not found")
        return
    try:
        import decord

        reader = decord.VideoReader(video_path, ctx=decord.cpu(0), num_threads=1)
        n_frames = len(reader)
    except Exception as e:
        for req in requests:
            yield req, FrameProblem(video_path, "sequence_id", "unreadable_video", f"cannot open video: {e}")
        return
    inside = [r for r in requests if r.frame_id < n_frames]
    for i in range(0, len(inside), chunk):
        part = inside[i : i + chunk]
        try:
            batch = reader.get_batch([r.frame_id for r in part]).asnumpy()
        except Exception as e:
            for req in part:
                yield (
                    req,
                    FrameProblem(
                        video_path,
                        "frame_id",
                        "unreadable_frame",
                        f"cannot decode frame_id {req.frame_id}: {e}",
                    ),
                )
            continue
        for req, arr in zip(part, batch, strict=True):
            yield req, Image.fromarray(arr)
    for req in requests:
        if req.frame_id >= n_frames:
            yield (
                req,
                FrameProblem(
                    video_path,
                    "frame_id",
                    "video_too_short",
                    f"frame_id {req.frame_id} is past the video's {n_frames} frames",
                ),
            )
