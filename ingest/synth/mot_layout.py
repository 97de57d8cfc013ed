"""`polyp-ssl synth OUT --layout mot`: a synthetic dataset as a detector and tracker would leave it.

Layout (MOTChallenge): `OUT/{split}/{SEQ}/img1/000001.jpg` (frame_id t is `{t+1:06d}.jpg`),
`OUT/{split}/{SEQ}/seqinfo.ini`, `OUT/{split}/{SEQ}/gt/gt.txt` (the polyps: `frame,id,bb_left,
bb_top,bb_width,bb_height,1,-1,-1,-1`, frames from 1, id = polyp k + 1) and the tracker's output
`OUT/tracks/{SEQ}.txt` (`frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1`); with `--mp4`
also `OUT/videos/{SEQ}.mp4` (every frame; frame f of the files is video index f - 1).

The tracker's faults, each at the rate `OUT/synth_layout.json` states (`faults`):
- a new track id after every gap: a polyp that leaves the view (or is missed) and returns gets a
  new id (the tracker does not re-identify);
- id switches: an *encounter* is the first frame of a run of frames in which two polyps are both
  in view with box centres closer than `encounter_distance` x the larger box side, one of them
  at least in view on the frame before (a tracked polyp that another one meets or joins); at every
  `1 / id_switch_rate`-th encounter of a video (the 1st, 3rd, ... for 0.5) the two tracks swap
  polyps from that frame on (a track that was following one polyp follows the other);
- false positives: one short track (`fp_frames` frames) of low confidence (`fp_conf`) per
  `fp_every_frames` frames of a video, on a box that overlaps no polyp;
- box jitter: every box of a track moved and resized by Gaussian noise of `jitter` x its side;
  true tracks' confidences are drawn from `true_conf`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.ingest.synth.generate import SynthConfig

FAULTS = {
    "new_id_after_gap": 1.0,
    "id_switch_rate": 0.5,
    "encounter_distance": 3.0,
    "fp_every_frames": 40,
    "fp_frames": [4, 12],
    "fp_conf": [0.05, 0.3],
    "true_conf": [0.55, 0.95],
    "jitter": 0.04,
}
TRACKS_DIR = "tracks"


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def near(a: tuple[float, ...], b: tuple[float, ...], distance: float) -> bool:
    """Two boxes whose centres are closer than `distance` x the larger side of either."""
    dx = (a[0] + a[2] / 2) - (b[0] + b[2] / 2)
    dy = (a[1] + a[3] / 2) - (b[1] + b[3] / 2)
    return (dx * dx + dy * dy) ** 0.5 < distance * max(a[2], a[3], b[2], b[3])


def simulate_tracker(
    boxes: dict[int, dict[int, tuple[float, float, float, float]]],
    n_frames: int,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[list[tuple[int, int, tuple[float, ...], float]], dict[str, int]]:
    """One video's tracker output from its polyps' boxes (`boxes[t][k]`): rows (frame_id, track
    id, box, conf) and the counts of each fault."""
    f = FAULTS
    follow: dict[int, int] = {}  # polyp -> the track following it now
    next_id = 1
    rows: list[tuple[int, int, tuple[float, ...], float]] = []
    counts = {"encounters": 0, "id_switches": 0, "new_ids_after_gap": 0, "false_positives": 0}
    close_before: set[tuple[int, int]] = set()
    every = round(1 / f["id_switch_rate"])
    ever: set[int] = set()
    for t in range(n_frames):
        seen = boxes.get(t, {})
        for k in list(follow):
            if k not in seen:
                del follow[k]  # out of view: its track ends
        for k in sorted(seen):
            if k not in follow:
                if k in ever:
                    counts["new_ids_after_gap"] += 1
                ever.add(k)
                follow[k] = next_id
                next_id += 1
        ks = sorted(seen)
        close_now = {
            (a, b)
            for i, a in enumerate(ks)
            for b in ks[i + 1 :]
            if near(seen[a], seen[b], f["encounter_distance"])
        }
        before = boxes.get(t - 1, {})
        for a, b in sorted(close_now - close_before):
            if a not in before and b not in before:
                continue  # both just came into view: a swap of two new tracks would change nothing
            if counts["encounters"] % every == 0:
                follow[a], follow[b] = follow[b], follow[a]
                counts["id_switches"] += 1
            counts["encounters"] += 1
        close_before = close_now
        for k in ks:
            x, y, w, h = seen[k]
            s = f["jitter"]
            jw, jh = w * (1 + rng.normal(0, s)), h * (1 + rng.normal(0, s))
            jx, jy = x + rng.normal(0, s) * w, y + rng.normal(0, s) * h
            conf = float(rng.uniform(*f["true_conf"]))
            rows.append((t, follow[k], (jx, jy, max(1.0, jw), max(1.0, jh)), conf))
    width, height = size
    for start in range(0, n_frames - f["fp_frames"][1], f["fp_every_frames"]):
        length = int(rng.integers(f["fp_frames"][0], f["fp_frames"][1] + 1))
        side = float(rng.uniform(0.08, 0.15) * min(width, height))
        for _ in range(100):  # a place that overlaps no polyp over its frames
            x, y = float(rng.uniform(0, width - side)), float(rng.uniform(0, height - side))
            box = (x, y, side, side)
            if all(
                _iou(box, b) == 0 for t in range(start, start + length) for b in boxes.get(t, {}).values()
            ):
                break
        else:
            continue
        tid, next_id = next_id, next_id + 1
        counts["false_positives"] += 1
        for t in range(start, start + length):
            rows.append((t, tid, box, float(rng.uniform(*f["fp_conf"]))))
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows, counts


def seqinfo(name: str, cfg: SynthConfig) -> str:
    return (
        f"[Sequence]\nname={name}\nimDir=img1\nframeRate={cfg.fps}\nseqLength={cfg.frames_per_video}\n"
        f"imWidth={cfg.width}\nimHeight={cfg.height}\nimExt=.jpg\n"
    )


def write_mot(videos, by_seq, seed_root: Path, out: Path, cfg: SynthConfig) -> dict[str, Any]:
    """The MOT layout of a rendered seed dataset (see the module doc); returns the expected
    outcome: counts of the faults written, per sequence and in total."""
    totals: dict[str, int] = defaultdict(int)
    sequences: dict[str, dict[str, Any]] = {}
    (out / TRACKS_DIR).mkdir(exist_ok=True)
    images = {img["id"]: img for v in videos for img in v["frames"]}
    for n, v in enumerate(videos):
        seq = v["seq"]
        folder = out / v["split"] / seq
        (folder / "img1").mkdir(parents=True, exist_ok=True)
        (folder / "gt").mkdir(exist_ok=True)
        for img in v["frames"]:
            os.replace(
                seed_root / "images" / img["file_name"], folder / "img1" / f"{img['frame_id'] + 1:06d}.jpg"
            )
        (folder / "seqinfo.ini").write_text(seqinfo(seq, cfg))
        boxes: dict[int, dict[int, tuple[float, float, float, float]]] = defaultdict(dict)
        gt_lines = []
        for a in by_seq[v["seq"]]:
            t = images[a["image_id"]]["frame_id"]
            k = int(str(a["identity_id"]).rsplit("_", 1)[1])
            boxes[t][k] = tuple(float(c) for c in a["bbox"])
        for t in sorted(boxes):
            for k in sorted(boxes[t]):
                x, y, w, h = boxes[t][k]
                gt_lines.append(f"{t + 1},{k + 1},{_fmt(x)},{_fmt(y)},{_fmt(w)},{_fmt(h)},1,-1,-1,-1")
        (folder / "gt" / "gt.txt").write_text("\n".join(gt_lines) + "\n")
        rng = np.random.default_rng([cfg.seed, 7, n])
        rows, counts = simulate_tracker(boxes, cfg.frames_per_video, (cfg.width, cfg.height), rng)
        lines = [
            f"{t + 1},{tid},{_fmt(b[0])},{_fmt(b[1])},{_fmt(b[2])},{_fmt(b[3])},{conf:.3f},-1,-1,-1"
            for t, tid, b, conf in rows
        ]
        (out / TRACKS_DIR / f"{seq}.txt").write_text("\n".join(lines) + "\n")
        counts.update(
            polyps=len({k for t in boxes for k in boxes[t]}),
            tracks=len({r[1] for r in rows}),
            gt_boxes=len(gt_lines),
            track_boxes=len(rows),
        )
        sequences[seq] = {"split": v["split"], **counts}
        for key, value in counts.items():
            totals[key] += value
    if (seed_root / "videos").is_dir():
        (out / "videos").mkdir(exist_ok=True)
        for v in videos:
            os.replace(seed_root / "videos" / f"{v['seq']}.mp4", out / "videos" / f"{v['seq']}.mp4")
    return {"counts": dict(totals), "faults": FAULTS, "sequences": sequences, "tracks_dir": TRACKS_DIR}
