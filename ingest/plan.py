"""Planning, in the main process: which videos go into which shard, decided before any frame is
read, so the result does not depend on the number of workers or on the order they finish in."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from polyp_ssl.ingest.coco import VideoPlan
from polyp_ssl.ingest.crop import crop_geometry

# Estimated bytes of one stored crop: JPEG at quality ~90 of a textured frame is about
# 0.3 bytes per pixel, plus a tar header and padding per member.
BYTES_PER_PIXEL = 0.3
TAR_MEMBER_OVERHEAD = 768


@dataclass(frozen=True)
class IngestParams:
    crop_scale: float = 5.0
    store_size: int = 256
    jpeg_quality: int = 90
    separation: int = 1
    iou_min: float = 0.1
    shard_max_bytes: int = 256_000_000
    source: str = "images"  # "images" (JPEG folder) or "video" (decord, --videos-dir)
    jpeg_draft: bool = False  # decode source JPEGs at 1/2, 1/4, 1/8 size when every crop allows

    def sample_params(self) -> dict:
        """The parameters recorded in every sample's JSON."""
        d = asdict(self)
        d.pop("shard_max_bytes")
        return d


@dataclass
class ShardTask:
    split: str
    index: int
    rel_path: str  # relative to the output root
    out_root: str
    videos: list[VideoPlan]
    params: IngestParams
    images_dir: str
    videos_dir: str | None
    on_error: str
    fingerprint: str = ""
    n_boxes: int = field(default=0)
    follow_symlinks: bool | tuple[str, ...] = False  # links inside the root (True), or also these folders


def part_of(index: int, n_parts: int) -> int:
    return index % n_parts


def select_part(videos: list[VideoPlan], part: int | None, n_parts: int | None) -> list[VideoPlan]:
    """Every n_parts-th video of the sorted list, starting at `part` (all when part is None)."""
    if part is None or n_parts is None:
        return list(videos)
    return [v for i, v in enumerate(videos) if part_of(i, n_parts) == part]


def shard_rel_path(split: str, index: int, part: int | None) -> str:
    name = f"{split}-{index:06d}.tar" if part is None else f"{split}-p{part:03d}-{index:06d}.tar"
    return f"shards/{split}/{name}"


def estimate_video_bytes(video: VideoPlan, params: IngestParams) -> int:
    total = 0
    for a in video.annotations:
        _, (w, h) = crop_geometry(a.bbox, a.width, a.height, params.crop_scale, params.store_size)
        total += int(w * h * BYTES_PER_PIXEL) + TAR_MEMBER_OVERHEAD
    return total


def group_videos(videos: list[VideoPlan], params: IngestParams) -> list[list[VideoPlan]]:
    """Consecutive videos per shard; a shard closes after the video that reaches shard_max_bytes
    (estimated). Videos without annotations are left out (they have no samples)."""
    shards: list[list[VideoPlan]] = []
    current: list[VideoPlan] = []
    size = 0
    for v in videos:
        if not v.annotations:
            continue
        current.append(v)
        size += estimate_video_bytes(v, params)
        if size >= params.shard_max_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def shard_fingerprint(task: ShardTask, input_sha256: str) -> str:
    """Identifies what a shard was made from: resume keeps a finished shard only when it matches."""
    obj = {
        "params": asdict(task.params),
        "input_sha256": input_sha256,
        "shard": task.rel_path,
        "videos": [v.video_id for v in task.videos],
        "annotations": [len(v.annotations) for v in task.videos],
    }
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def plan_split(
    split: str,
    videos: list[VideoPlan],
    params: IngestParams,
    out_root: str,
    images_dir: str,
    videos_dir: str | None,
    on_error: str,
    input_sha256: str,
    part: int | None = None,
) -> list[ShardTask]:
    tasks = []
    for index, group in enumerate(group_videos(videos, params)):
        task = ShardTask(
            split,
            index,
            shard_rel_path(split, index, part),
            out_root,
            group,
            params,
            images_dir,
            videos_dir,
            on_error,
            n_boxes=sum(len(v.annotations) for v in group),
        )
        task.fingerprint = shard_fingerprint(task, input_sha256)
        tasks.append(task)
    return tasks
