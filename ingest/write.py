"""One worker task: read, crop and write one whole shard, then its stats file (the done marker).

Per video: decode each source frame once, in frame order, and crop every box of that frame;
then build the tracklets from the boxes that survived and write one sample per tracklet, in
time order. Building tracklets after cropping means a frame that cannot be read (skip mode)
splits a tracklet exactly as if its box had never been annotated.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from polyp_ssl.ingest.coco import Annotation, VideoPlan
from polyp_ssl.ingest.crop import StoredCrop, draft_reduce, stored_crop
from polyp_ssl.ingest.errors import ErrorSink
from polyp_ssl.ingest.faults import crash_point, shard_finished
from polyp_ssl.ingest.plan import ShardTask
from polyp_ssl.ingest.sources import FrameProblem, FrameRequest, iter_decord_video, iter_jpeg_folder
from polyp_ssl.ingest.tracklets import Box, build_tracklets
from polyp_ssl.shards.members import MemberSpan
from polyp_ssl.shards.sample import JSON_EXT, TrackletSample, encode_sample, frame_ext, safe_key
from polyp_ssl.shards.writer import ShardWriter, write_atomic

log = logging.getLogger(__name__)

# 2: the tracklets and frames rows carry their members' byte spans (catalog version 3); resume
# redoes a shard whose stats file is of another version
STATS_VERSION = 2


def stats_path(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + ".stats.json"


@dataclass
class VideoResult:
    samples: list[tuple[TrackletSample, list[bytes]]] = field(default_factory=list)
    tracklets: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    video: dict[str, Any] = field(default_factory=dict)
    n_frames_decoded: int = 0


def _frame_source(task: ShardTask, video: VideoPlan, requests: list[FrameRequest]):
    if task.videos_dir is not None:
        path = os.path.join(task.videos_dir, f"{video.sequence_id}.mp4")
        return iter_decord_video(path, requests, follow_symlinks=task.follow_symlinks)
    return iter_jpeg_folder(task.images_dir, requests, task.follow_symlinks)


def crop_video(task: ShardTask, video: VideoPlan, sink: ErrorSink) -> tuple[dict[int, StoredCrop], int]:
    """Stored crops of the video's boxes that could be read, by annotation id."""
    by_frame: dict[tuple[int, str], list[Annotation]] = defaultdict(list)
    for a in video.annotations:
        by_frame[(a.frame_id, a.file_name)].append(a)
    p = task.params
    requests = []
    for fid, name in sorted(by_frame):
        anns = by_frame[(fid, name)]
        reduce = 1
        if p.jpeg_draft and task.videos_dir is None:
            reduce = draft_reduce(
                [a.bbox for a in anns], anns[0].width, anns[0].height, p.crop_scale, p.store_size
            )
        requests.append(FrameRequest(fid, name, reduce))
    crops: dict[int, StoredCrop] = {}
    n_decoded = 0
    for req, frame in _frame_source(task, video, requests):
        anns = by_frame[(req.frame_id, req.file_name)]
        full = (anns[0].width, anns[0].height)
        if not isinstance(frame, FrameProblem) and frame.size not in (full, _expected_size(full, req.reduce)):
            at = f" at 1/{req.reduce} size" if req.reduce > 1 else ""
            frame = FrameProblem(
                os.path.join(task.images_dir, req.file_name) if task.videos_dir is None else req.file_name,
                "width",
                "frame_size_mismatch",
                f"frame_id {req.frame_id} decodes to {frame.width}x{frame.height}{at}, "
                f"the annotation file says {anns[0].width}x{anns[0].height}",
            )
        if isinstance(frame, FrameProblem):
            for a in anns:
                sink.skip(
                    frame.source,
                    f"annotation {a.annotation_id}",
                    frame.field,
                    frame.reason,
                    f"{frame.detail} (image {a.image_id}, video {video.video_id!r})",
                )
            continue
        n_decoded += 1
        for a in anns:
            crops[a.annotation_id] = stored_crop(
                frame, a.bbox, p.crop_scale, p.store_size, p.jpeg_quality, full
            )
    return crops, n_decoded


def _expected_size(full: tuple[int, int], reduce: int) -> tuple[int, int]:
    return (-(-full[0] // reduce), -(-full[1] // reduce))


def annotated_span(video: VideoPlan) -> tuple[int, int]:
    """(first, last) frame_id over the video's valid annotations (every identity, kept or not), the
    span positions are normalised over; the image span when the video has no annotation."""
    ids = [a.frame_id for a in video.annotations]
    return (min(ids), max(ids)) if ids else (video.first_frame, video.last_frame)


def build_video(task: ShardTask, video: VideoPlan, sink: ErrorSink) -> VideoResult:
    crops, n_decoded = crop_video(task, video, sink)
    kept = [a for a in video.annotations if a.annotation_id in crops]
    by_id = {a.annotation_id: a for a in kept}
    per_identity: dict[str, list[Box]] = defaultdict(list)
    for a in kept:
        per_identity[a.identity_id].append(Box(a.annotation_id, a.image_id, a.frame_id, a.bbox))
    tracklets = []  # (start_frame, identity, k, boxes)
    for identity, boxes in per_identity.items():
        for k, tr in enumerate(build_tracklets(boxes, task.params.separation, task.params.iou_min)):
            tracklets.append((tr[0].frame_id, identity, k, tr))
    tracklets.sort(key=lambda t: (t[0], t[1], t[2]))

    # a fragment's position in its video is normalised over the video's annotated frames (the
    # reference code's meaning), not over every image of the video
    first, last = annotated_span(video)
    span = last - first
    params = task.params.sample_params()
    out = VideoResult(n_frames_decoded=n_decoded)
    for start, identity, k, boxes in tracklets:
        anns = [by_id[b.annotation_id] for b in boxes]
        cs = [crops[b.annotation_id] for b in boxes]
        tid = f"{identity}#{k}"
        key = safe_key(tid)
        size_mm = next((a.size_mm for a in anns if a.size_mm is not None), None)
        histology = next((a.histology for a in anns if a.histology is not None), None)
        position = (start - first) / span if span > 0 else 0.0
        extra_keys = sorted({k2 for a in anns for k2 in a.extra})
        meta = TrackletSample(
            key=key,
            tracklet_id=tid,
            split=video.split,
            dataset_id=video.dataset_id,
            video_id=video.video_id,
            sequence_id=video.sequence_id,
            identity_id=identity,
            size_mm=size_mm,
            histology=histology,
            position_in_video=position,
            video_first_frame=first,
            video_last_frame=last,
            frame_ids=[a.frame_id for a in anns],
            image_ids=[a.image_id for a in anns],
            annotation_ids=[a.annotation_id for a in anns],
            file_names=[a.file_name for a in anns],
            boxes=[list(a.bbox) for a in anns],
            crops=[list(c.crop) for c in cs],
            crop_sizes=[list(c.size) for c in cs],
            boxes_in_crop=[c.box_in_crop for c in cs],
            params=params,
            extra={k2: [a.extra.get(k2) for a in anns] for k2 in extra_keys},
        )
        out.samples.append((meta, [c.jpeg for c in cs]))
        out.tracklets.append(
            {
                "tracklet_id": tid,
                "split": video.split,
                "dataset_id": video.dataset_id,
                "video_id": video.video_id,
                "identity_id": identity,
                "start_frame": anns[0].frame_id,
                "end_frame": anns[-1].frame_id,
                "n_frames": len(anns),
                "position_in_video": position,
                "size_mm": size_mm,
                "histology": histology,
                "shard": task.rel_path,
                "sample_key": key,
            }
        )
        for i, (a, c) in enumerate(zip(anns, cs, strict=True)):
            out.frames.append(
                {
                    "tracklet_id": tid,
                    "frame_index": i,
                    "frame_id": a.frame_id,
                    "image_id": a.image_id,
                    "annotation_id": a.annotation_id,
                    "file_name": a.file_name,
                    "bbox_x": a.bbox[0],
                    "bbox_y": a.bbox[1],
                    "bbox_w": a.bbox[2],
                    "bbox_h": a.bbox[3],
                    "crop_x0": c.crop[0],
                    "crop_y0": c.crop[1],
                    "crop_x1": c.crop[2],
                    "crop_y1": c.crop[3],
                    "stored_w": c.size[0],
                    "stored_h": c.size[1],
                }
            )
    out.video = video_row(video, n_polyps=len({t[1] for t in tracklets}), n_tracklets=len(tracklets))
    return out


def video_row(video: VideoPlan, n_polyps: int, n_tracklets: int) -> dict[str, Any]:
    return {
        "video_id": video.video_id,
        "dataset_id": video.dataset_id,
        "sequence_id": video.sequence_id,
        "split": video.split,
        "first_frame": video.first_frame,
        "last_frame": video.last_frame,
        "n_images": video.n_images,
        "n_polyps": n_polyps,
        "n_tracklets": n_tracklets,
    }


def add_spans(result: VideoResult, spans: dict[str, dict[str, MemberSpan]]) -> None:
    """Fill the catalog's member spans into the video's rows: `json_*` of each tracklet row (by
    sample_key), `jpeg_*` of each frame row (by tracklet and frame_index), from what
    ShardWriter.write returned per sample key."""
    key_of = {}
    for t in result.tracklets:
        key_of[t["tracklet_id"]] = t["sample_key"]
        span = spans[t["sample_key"]][JSON_EXT]
        t.update(json_offset=span.offset, json_size=span.size, json_crc32=span.crc32)
    for f in result.frames:
        span = spans[key_of[f["tracklet_id"]]][frame_ext(f["frame_index"])]
        f.update(jpeg_offset=span.offset, jpeg_size=span.size, jpeg_crc32=span.crc32)


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write the task's shard and stats file; returns a short summary. In `fail` mode an input
    problem raises IngestError and leaves neither file behind."""
    t0, c0 = time.perf_counter(), time.process_time()
    sink = ErrorSink(task.on_error)
    tar_path = os.path.join(task.out_root, task.rel_path)
    rows: dict[str, list] = {"tracklets": [], "frames": [], "videos": []}
    n_decoded = 0
    with ShardWriter(tar_path) as writer:
        for video in task.videos:
            result = build_video(task, video, sink)
            spans: dict[str, dict[str, MemberSpan]] = {}
            for meta, jpegs in result.samples:
                spans[meta.key] = writer.write(encode_sample(meta, jpegs))
                crash_point("sample_written")
            add_spans(result, spans)
            rows["tracklets"] += result.tracklets
            rows["frames"] += result.frames
            rows["videos"].append(result.video)
            n_decoded += result.n_frames_decoded
    stats = {
        "version": STATS_VERSION,
        "shard": task.rel_path,
        "split": task.split,
        "fingerprint": task.fingerprint,
        "n_samples": writer.n_samples,
        "n_bytes": writer.n_bytes,
        "sha256": writer.sha256,
        "n_frames": len(rows["frames"]),
        "n_source_frames_decoded": n_decoded,
        "videos": [v.video_id for v in task.videos],
        "seconds": round(time.perf_counter() - t0, 3),
        "cpu_seconds": round(time.process_time() - c0, 3),
        "rows": {**rows, "errors": [r.to_dict() for r in sink.rows]},
    }
    try:
        write_atomic(stats_path(tar_path), json.dumps(stats, sort_keys=True).encode("utf-8"))
    except BaseException:
        # the stats file marks the tar as done: never leave a tar without it (e.g. disk full)
        if os.path.exists(tar_path):
            os.remove(tar_path)
        raise
    crash_point("shard_done")
    shard_finished()
    return summary_of(stats)


def summary_of(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("shard", "n_samples", "n_bytes", "n_frames", "n_source_frames_decoded")}
