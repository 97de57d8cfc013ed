"""Frame sources: the source frames of one video, decoded once each, in frame order.

`JpegFolder` reads `images/{file_name}` with PIL; `DecordVideo` reads frame `frame_id` of
`{videos_dir}/{sequence_id}.mp4` with decord (sorted frame order, `get_batch` on chunks). A
reader is created inside the worker that uses it. A frame that cannot be had is yielded as a
`FrameProblem` instead of an image, so the caller decides (fail, or skip its boxes).

Both read only regular files (a FIFO or device is a `not_regular_file` problem, never waited on)
whose bytes are what they must be (ingest.media: JPEG/PNG frames; MP4/MOV, Matroska or AVI
videos, decoded from the checked descriptor): anything else, a playlist named `.mp4` say, is a
`wrong_media_type` problem naming the file and what it looks like.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from polyp_ssl.ingest.media import MediaTypeError, check_image_file, open_video_reader
from polyp_ssl.shards.files import NotRegularFileError, open_regular

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


LinkPolicy = bool | tuple[str, ...]


def _refusal_reason(exc: Exception) -> str:
    """The error-row reason of a refused input file: not a regular file, or not what its name says."""
    return "not_regular_file" if isinstance(exc, NotRegularFileError) else "wrong_media_type"


def link_targets(dirs: list[str] | None) -> LinkPolicy:
    """The link policy of a `--follow-symlinks [DIR ...]` flag: False when absent, True (inside the
    root only) when given alone, else the named folders (absolute), where links may lead too."""
    if dirs is None:
        return False
    return tuple(os.path.abspath(d) for d in dirs) or True


def link_problem(root: str, rel: str, follow_symlinks: LinkPolicy = False) -> str | None:
    """Why the raw input file root/rel may not be read, or None.

    Raw input is read from regular files and folders only: a symbolic link anywhere below `root`
    on the way to the file (a linked frame, a linked `images/` folder) is refused, so a dataset
    cannot make ingest copy a host file (`/etc/shadow`) into its shards. With `follow_symlinks`
    a link is followed when its target (every link resolved) stays inside `root`, or inside one
    of the folders `follow_symlinks` names (folders the user typed, never a value from data).
    A missing path is not a problem here (the caller reports it as missing).
    """
    path = root
    for part in rel.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            continue
        if not follow_symlinks:
            return (
                f"is a symbolic link (to {os.readlink(path)}): raw input is read from regular files "
                f"only (--follow-symlinks follows links that stay inside {root})"
            )
        extra = follow_symlinks if isinstance(follow_symlinks, tuple) else ()
        bases = [os.path.realpath(b) for b in (root, *extra)]
        real = os.path.realpath(path)
        if not any(os.path.commonpath([base, real]) == base for base in bases):
            where = " or ".join([root, *extra])
            return f"is a symbolic link to {real}, outside {where}: never followed"
    return None


def iter_jpeg_folder(
    images_dir: str, requests: Sequence[FrameRequest], follow_symlinks: LinkPolicy = False
) -> Iterator[tuple[FrameRequest, Image.Image | FrameProblem]]:
    """Frames `images_dir/{file_name}`; the dataset root (the folder above `images_dir`) bounds
    where symbolic links may lead (`link_problem`)."""
    root, sub = os.path.split(os.path.normpath(images_dir))
    for req in requests:
        path = os.path.join(images_dir, req.file_name)
        problem = link_problem(root, os.path.join(sub, req.file_name), follow_symlinks)
        if problem is not None:
            detail = f"frame file of frame_id {req.frame_id} {problem}"
            yield req, FrameProblem(path, "file_name", "symlink", detail)
            continue
        if not os.path.lexists(path):
            yield (
                req,
                FrameProblem(
                    path, "file_name", "missing_frame", f"frame file of frame_id {req.frame_id} not found"
                ),
            )
            continue
        try:
            with open_regular(path, f"frame file of frame_id {req.frame_id}") as f:
                check_image_file(f, path)
                img = Image.open(f)
                if req.reduce > 1 and img.format == "JPEG":
                    img.draft("RGB", (-(-img.width // req.reduce), -(-img.height // req.reduce)))
                img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
        except (NotRegularFileError, MediaTypeError) as e:
            yield req, FrameProblem(path, "file_name", _refusal_reason(e), str(e))
            continue
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
    video_path: str,
    requests: Sequence[FrameRequest],
    chunk: int = DECORD_CHUNK,
    follow_symlinks: LinkPolicy = False,
) -> Iterator[tuple[FrameRequest, Image.Image | FrameProblem]]:
    """Requests must be sorted by frame_id (decoding forward is what a video reader does fast).
    The video's folder (--videos-dir) bounds where a symbolic link may lead (`link_problem`)."""
    folder, name = os.path.split(video_path)
    problem = link_problem(folder, name, follow_symlinks)
    if problem is not None:
        for req in requests:
            yield req, FrameProblem(video_path, "sequence_id", "symlink", f"video file {problem}")
        return
    if not os.path.lexists(video_path):
        for req in requests:
            yield req, FrameProblem(video_path, "sequence_id", "missing_video", "video file not found")
        return
    try:
        reader = open_video_reader(video_path, num_threads=1)
        n_frames = len(reader)
    except (NotRegularFileError, MediaTypeError) as e:
        for req in requests:
            yield req, FrameProblem(video_path, "sequence_id", _refusal_reason(e), str(e))
        return
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
