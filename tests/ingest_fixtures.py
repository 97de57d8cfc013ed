"""A tiny dataset root in the seed layout, built from known boxes, for the ingest tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

W, H = 160, 128


@dataclass
class Track:
    identity: str
    frames: list[int]
    boxes: list[list[float]]
    size: float | None = None
    histology: str | None = None


def background(seed: int, t: int) -> np.ndarray:
    """A smooth, textured frame (compresses like a real one, unlike noise)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rng = np.random.default_rng(seed)
    fx, fy, ph = rng.uniform(0.02, 0.08, 3)
    r = 128 + 60 * np.sin(fx * xx + 0.1 * t) * np.cos(fy * yy)
    g = 100 + 50 * np.cos(fy * xx * 0.7 - ph * t)
    b = 90 + 40 * np.sin(fx * yy + fy * xx)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def draw(frame: np.ndarray, box: list[float], colour: tuple[int, int, int]) -> None:
    x, y, w, h = (int(round(v)) for v in box)
    frame[max(0, y) : y + h, max(0, x) : x + w] = colour
    frame[max(0, y + h // 4) : y + h // 2, max(0, x + w // 4) : x + w // 2] = (255, 255, 255)


def moving(x0: float, y0: float, w: float, h: float, frames: list[int], dx: float = 1.0) -> list[list[float]]:
    return [[x0 + dx * (f - frames[0]), y0 + 0.5 * (f - frames[0]) % 7, w, h] for f in frames]


def default_videos() -> dict[tuple[str, str | None], tuple[int, list[Track]]]:
    """(sequence_id, dataset_id) -> (n_frames, tracks)."""
    a1 = list(range(0, 12)) + list(range(14, 20))  # gap of 2 -> two tracklets
    a2 = list(range(30, 36))
    jump_frames = list(range(5, 15))
    jump_boxes = moving(10, 70, 20, 18, jump_frames[:5]) + moving(
        110, 20, 20, 18, jump_frames[5:]
    )  # IoU 0 -> split
    return {
        ("seqA", None): (
            40,
            [
                Track("seqA_1", a1 + a2, moving(20, 20, 24, 20, a1 + a2, 0.5), 4.0, "AD"),
                Track("seqA_2", jump_frames, jump_boxes, 8.0, "HP"),
            ],
        ),
        ("seqB", "ds1"): (
            30,
            [
                Track(
                    "case_M_7/polyp 1",
                    list(range(3, 25)),
                    moving(60, 40, 30, 26, list(range(3, 25))),
                    None,
                    None,
                )
            ],
        ),
        ("seqC", None): (
            25,
            [
                Track("seqC_1", list(range(0, 25)), moving(5, 5, 16, 14, list(range(0, 25))), 12.0, "SSL"),
                Track("seqC_2", list(range(2, 4)), moving(100, 80, 18, 16, [2, 3]), 3.0, "AD"),
            ],
        ),
    }


def make_root(root: str, videos=None, split: str = "train", mp4: bool = False, seed: int = 0) -> dict:
    """Write images/, annotations/instances_{split}.json (and videos/*.mp4); returns the COCO dict."""
    videos = default_videos() if videos is None else videos
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "polyp"}]}
    image_id = 1000 * seed
    ann_id = 5000 + 1000 * seed
    colours = [(200, 40, 40), (40, 200, 60), (40, 60, 220), (220, 200, 40)]
    for vi, ((seq, ds), (n_frames, tracks)) in enumerate(sorted(videos.items(), key=lambda kv: kv[0][0])):
        frames = []
        for t in range(n_frames):
            frame = background(seed * 100 + vi, t)
            image_id += 1
            name = f"{seq}_{t:04d}.jpg"
            img = {
                "id": image_id,
                "file_name": name,
                "width": W,
                "height": H,
                "frame_id": t,
                "sequence_id": seq,
            }
            if ds is not None:
                img["dataset_id"] = ds
            coco["images"].append(img)
            for ti, tr in enumerate(tracks):
                if t in tr.frames:
                    box = tr.boxes[tr.frames.index(t)]
                    draw(frame, box, colours[ti % len(colours)])
                    ann_id += 1
                    ann = {
                        "id": ann_id,
                        "image_id": image_id,
                        "bbox": box,
                        "category_id": 1,
                        "identity_id": tr.identity,
                    }
                    if tr.size is not None:
                        ann["size"] = tr.size
                    if tr.histology is not None:
                        ann["histology"] = tr.histology
                    coco["annotations"].append(ann)
            Image.fromarray(frame).save(os.path.join(root, "images", name), quality=95)
            frames.append(frame)
        if mp4:
            write_mp4(os.path.join(root, "videos", f"{seq}.mp4"), frames)
    write_coco(root, split, coco)
    return coco


def write_coco(root: str, split: str, coco: dict) -> str:
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def write_mp4(path: str, frames: list[np.ndarray]) -> None:
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with imageio.get_writer(
        path, fps=25, codec="libx264", quality=10, macro_block_size=16, ffmpeg_log_level="error"
    ) as w:
        for f in frames:
            w.append_data(f)
