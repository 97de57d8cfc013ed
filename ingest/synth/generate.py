"""The dataset: a plan drawn from the seed in one process (splits, polyp labels, per-video seeds),
videos rendered in a process pool (one video per task, JPEGs and optional MP4 written by the
worker), and the COCO annotation files assembled in video order and written last, through a
temporary name, so that a root without them is an unfinished run.

Everything a video contains depends only on (seed, video index), so the output is the same
whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from polyp_ssl.ingest.synth.camera import CameraParams
from polyp_ssl.ingest.synth.polyps import PolypLabel, draw_labels
from polyp_ssl.ingest.synth.render import FrameRenderer, build_world

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CATEGORIES = [{"id": 1, "name": "polyp", "supercategory": "lesion"}]
MIN_SIDE = 64
OUTPUT_ENTRIES = ("annotations", "images", "videos")


@dataclass(frozen=True)
class SynthConfig:
    videos: int = 12
    frames_per_video: int = 660
    width: int = 384
    height: int = 320
    seed: int = 0
    dataset_id: str = "synth"
    mp4: bool = False
    fps: int = 25
    jpeg_quality: int = 90
    camera: CameraParams = field(default_factory=CameraParams)
    # (train, val, test) video counts; None: a quarter each to val and test (split_counts)
    splits: tuple[int, int, int] | None = None


def validate(cfg: SynthConfig) -> list[str]:
    """Problems with a config, as messages naming the option (empty when fine)."""
    errors = []
    if cfg.videos < 1:
        errors.append(f"--videos must be >= 1, got {cfg.videos}")
    if cfg.frames_per_video < 16:
        errors.append(f"--frames-per-video must be >= 16, got {cfg.frames_per_video}")
    if cfg.width < MIN_SIDE or cfg.height < MIN_SIDE:
        errors.append(f"--width and --height must be >= {MIN_SIDE}, got {cfg.width} x {cfg.height}")
    if cfg.mp4 and (cfg.width % 2 or cfg.height % 2):
        errors.append(f"--mp4 needs an even width and height (H.264 4:2:0), got {cfg.width} x {cfg.height}")
    if cfg.seed < 0:
        errors.append(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.splits is not None and (min(cfg.splits) < 0 or sum(cfg.splits) != cfg.videos):
        errors.append(f"splits {cfg.splits} must be non-negative and add up to --videos {cfg.videos}")
    if not cfg.dataset_id or "/" in cfg.dataset_id or cfg.dataset_id.strip() != cfg.dataset_id:
        errors.append(
            f"--dataset-id must be a non-empty name without '/' or surrounding spaces, got {cfg.dataset_id!r}"
        )
    if not 1 <= cfg.jpeg_quality <= 100:
        errors.append(f"jpeg quality must be in [1, 100], got {cfg.jpeg_quality}")
    return errors


@dataclass(frozen=True)
class VideoPlan:
    index: int
    sequence_id: str
    split: str
    labels: tuple[PolypLabel, ...]


def split_counts(n: int) -> tuple[int, int, int]:
    """(train, val, test) video counts: a quarter each to val and test (6/3/3 for 12)."""
    if n == 1:
        return 1, 0, 0
    if n == 2:
        return 1, 0, 1
    n_val = n_test = max(1, round(n / 4))
    return n - n_val - n_test, n_val, n_test


def plan_dataset(cfg: SynthConfig) -> list[VideoPlan]:
    """Splits (first train, then val, then test videos), polyp counts (1-5 in train, 2-5 in val,
    3-5 in test, so that retrieval on val and test has several polyps per video) and labels
    balanced over the whole dataset."""
    rng = np.random.default_rng([cfg.seed, 0])
    n_train, n_val, _ = cfg.splits or split_counts(cfg.videos)
    splits = ["train" if i < n_train else "val" if i < n_train + n_val else "test" for i in range(cfg.videos)]
    least = {"train": 1, "val": 2, "test": 3}
    counts = [int(rng.integers(least[s], 6)) for s in splits]
    labels = draw_labels(rng, sum(counts))
    plans, start = [], 0
    for i, (split, c) in enumerate(zip(splits, counts, strict=True)):
        plans.append(VideoPlan(i, f"001-{i + 1:03d}", split, tuple(labels[start : start + c])))
        start += c
    return plans


@dataclass
class VideoResult:
    index: int
    boxes: list[tuple[int, int, list[float]]]  # (frame_id, polyp k, bbox)


def render_video(cfg: SynthConfig, plan: VideoPlan, out_dir: str) -> VideoResult:
    """Render one video: write its JPEGs (and MP4) and return its boxes. Runs in a worker."""
    cv2.setNumThreads(1)
    rng = np.random.default_rng([cfg.seed, 1, plan.index])
    world = build_world(rng, list(plan.labels), cfg.frames_per_video, (cfg.width, cfg.height), cfg.camera)
    renderer = FrameRenderer(world, rng)
    images = Path(out_dir) / "images"
    writer, tmp_mp4 = None, None
    if cfg.mp4:
        import imageio_ffmpeg

        tmp_mp4 = Path(out_dir) / "videos" / f"{plan.sequence_id}.part.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(tmp_mp4),
            (cfg.width, cfg.height),
            pix_fmt_in="bgr24",
            fps=cfg.fps,
            codec="libx264",
            macro_block_size=1,
            quality=None,
            output_params=["-crf", "18", "-preset", "veryfast"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
    boxes = []
    params = [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
    try:
        for t in range(cfg.frames_per_video):
            img = renderer.render(t)
            for k, box in renderer.boxes(t):
                boxes.append((t, k, box))
            ok, buf = cv2.imencode(".jpg", img, params)
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {plan.sequence_id} frame {t}")
            (images / f"{plan.sequence_id}_{t}.jpg").write_bytes(buf.tobytes())
            if writer is not None:
                writer.send(np.ascontiguousarray(img))
    finally:
        if writer is not None:
            writer.close()
    if tmp_mp4 is not None:
        os.replace(tmp_mp4, tmp_mp4.with_name(f"{plan.sequence_id}.mp4"))
    return VideoResult(plan.index, boxes)


def build_coco(cfg: SynthConfig, plans: list[VideoPlan], results: list[VideoResult]) -> dict[str, dict]:
    """One COCO dict per split; image and annotation ids run over the whole dataset in video
    order, so they are unique across splits."""
    by_index = {r.index: r for r in results}
    info = {
        "description": "polyp-ssl synthetic colonoscopy dataset",
        "generator": "polyp-ssl synth",
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("mp4",)},
    }
    out = {
        s: {"info": dict(info, split=s), "images": [], "annotations": [], "categories": CATEGORIES}
        for s in SPLITS
    }
    image_id, ann_id = 0, 0
    for plan in plans:
        coco = out[plan.split]
        first_image = image_id + 1
        for t in range(cfg.frames_per_video):
            image_id += 1
            coco["images"].append(
                {
                    "id": image_id,
                    "file_name": f"{plan.sequence_id}_{t}.jpg",
                    "width": cfg.width,
                    "height": cfg.height,
                    "frame_id": t,
                    "sequence_id": plan.sequence_id,
                    "dataset_id": cfg.dataset_id,
                }
            )
        for t, k, box in by_index[plan.index].boxes:
            ann_id += 1
            label = plan.labels[k]
            coco["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": first_image + t,
                    "bbox": box,
                    "category_id": 1,
                    "identity_id": f"{plan.sequence_id}_{k}",
                    "area": round(box[2] * box[3], 2),
                    "iscrowd": 0,
                    "size": label.size_mm,
                    "histology": label.histology,
                }
            )
    return out


def check_output_dir(out: Path, overwrite: bool) -> str | None:
    """An error message when `out` cannot receive a dataset, else None."""
    if out.exists() and not out.is_dir():
        return f"output folder {out} exists and is not a folder"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return f"output folder {out} is not empty (pass --overwrite to replace a dataset there)"
    for ancestor in out.absolute().parents:  # missing parents are created (as mkdir -p does)
        if ancestor.exists():
            if not ancestor.is_dir():
                return f"{ancestor} (a parent of the output folder {out}) is not a folder"
            break
    return None


def prepare_output_dir(out: Path, mp4: bool) -> None:
    """Create the layout; with a previous dataset there, its annotation files go first (so an
    interrupted run never looks complete), then its images and videos. Other files are kept."""
    for name in OUTPUT_ENTRIES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (out / "images").mkdir(parents=True)
    if mp4:
        (out / "videos").mkdir()


def write_annotations(ann_dir: Path, cocos: dict[str, dict]) -> None:
    """All split files written under temporary names first, then renamed: a root has either all
    of them or none."""
    ann_dir.mkdir(exist_ok=True)
    parts = []
    for split in SPLITS:
        tmp = ann_dir / f"instances_{split}.json.part"
        tmp.write_text(json.dumps(cocos[split], separators=(",", ":")))
        parts.append(tmp)
    for tmp in parts:
        os.replace(tmp, tmp.with_suffix(""))


def generate(
    cfg: SynthConfig,
    out: Path,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the dataset to `out`; returns counts. progress(n_frames) is called as videos finish."""
    errors = validate(cfg)
    problem = check_output_dir(out, overwrite)
    if problem:
        errors.append(problem)
    if errors:
        raise ValueError("; ".join(errors))
    plans = plan_dataset(cfg)
    prepare_output_dir(out, cfg.mp4)
    results: list[VideoResult] = []
    if workers <= 1:
        for plan in plans:
            results.append(render_video(cfg, plan, str(out)))
            if progress:
                progress(cfg.frames_per_video)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(render_video, cfg, plan, str(out)) for plan in plans]
            for fut in futures:
                results.append(fut.result())
                if progress:
                    progress(cfg.frames_per_video)
    cocos = build_coco(cfg, plans, results)
    write_annotations(out / "annotations", cocos)
    n_ann = sum(len(c["annotations"]) for c in cocos.values())
    return {
        "videos": cfg.videos,
        "frames": cfg.videos * cfg.frames_per_video,
        "annotations": n_ann,
        "polyps": len({(r.index, k) for r in results for _, k, _ in r.boxes}),  # the ones in view
        "polyps_planned": sum(len(p.labels) for p in plans),
        "splits": {s: sum(p.split == s for p in plans) for s in SPLITS},
    }
