"""REAL-Colon's official raw layout (`polyp-ssl synth --layout realcolon`), for `polyp-ssl convert
realcolon` and the paper's split (`--split-file paper`) without the real download.

Videos are numbered 15 per site, as in REAL-Colon: `001-001` ... `001-015`, `002-001`, ... (the
last site holds what is left of `--videos`). Written:

    SSS-VVV_frames/SSS-VVV_{t}.jpg        t from 0, every frame of the video
    SSS-VVV_annotations/SSS-VVV_{t}.xml   Pascal VOC, one per frame (also frames without boxes),
                                          objects with name, unique_id (SSS-VVV_k), box_id, bndbox
    lesion_info.csv                       unique_object_id, unique_video_name, size [mm], site,
                                          histology_extended, histology_class
    video_info.csv                        unique_video_name, age, sex, endoscope_brand, fps,
                                          num_frames, num_lesions, bbps

The rendered videos with the most polyps (the generator's val and test videos) take the numbers
009-015 of each site, the paper's held-out videos, so retrieval on them has several polyps per
video. Video 004 of every site, and 013 of the first site, have no lesion: their frames are written
with annotation files without objects and lesion_info.csv does not list them, so the paper's split
leaves them out. Box corners are written with fractions (`12.5`), as in the real files.
`OUT/synth_layout.json` records the expected outcome: the paper's split per video, the videos
without lesion, and every polyp's size and histology.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Any

VIDEOS_PER_SITE = 15
NO_LESION_NUMBERS = (4,)  # in every site
NO_LESION_FIRST_SITE = (13,)  # in the first site only
HISTOLOGY_EXTENDED = {
    "AD": "Tubular adenoma",
    "HP": "Hyperplastic polyp",
    "SSL": "Sessile serrated lesion",
    "TSA": "Traditional serrated adenoma",
}
BRANDS = ("Olympus", "Pentax", "Fujifilm")


def video_names(n: int) -> list[str]:
    """The REAL-Colon names of n videos, 15 per site: 001-001 ... 001-015, 002-001, ..."""
    return [f"{i // VIDEOS_PER_SITE + 1:03d}-{i % VIDEOS_PER_SITE + 1:03d}" for i in range(n)]


def has_lesion(name: str) -> bool:
    site, number = (int(x) for x in name.split("-"))
    return number not in NO_LESION_NUMBERS and not (site == 1 and number in NO_LESION_FIRST_SITE)


def paper_split_of(name: str) -> str | None:
    """The paper's split of a video (train 001-008, val 009-010, test 011-015), None without lesion."""
    if not has_lesion(name):
        return None
    number = int(name.split("-")[1])
    return "train" if number <= 8 else "val" if number <= 10 else "test"


def assign_names(videos: list[dict]) -> dict[str, str]:
    """Rendered sequence id -> REAL-Colon name: the generator's val and test videos (more polyps)
    fill the held-out numbers 009-015 first, its train videos the numbers 001-008 first."""
    names = video_names(len(videos))
    held = [n for n in names if int(n.split("-")[1]) > 8]
    early = [n for n in names if int(n.split("-")[1]) <= 8]
    rich = [v["seq"] for v in videos if v["split"] != "train"]
    poor = [v["seq"] for v in videos if v["split"] == "train"]
    order = rich[: len(held)] + poor + rich[len(held) :]
    slots = held + early
    return dict(zip(order, slots, strict=True))


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _voc(name: str, w: int, h: int, objects: list[tuple[str, int, tuple[float, ...]]]) -> str:
    parts = [
        f"<annotation><folder>{name.rsplit('_', 1)[0]}_frames</folder><filename>{name}</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
    ]
    for uid, box_id, (x, y, bw, bh) in objects:
        parts.append(
            f"<object><name>lesion</name><unique_id>{uid}</unique_id><box_id>{box_id}</box_id>"
            f"<bndbox><xmin>{_fmt(x)}</xmin><xmax>{_fmt(x + bw)}</xmax>"
            f"<ymin>{_fmt(y)}</ymin><ymax>{_fmt(y + bh)}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>\n"


def _write_video(
    seq: dict, name: str, anns: list[dict], seed_root: Path, out: Path, lesions: bool
) -> tuple[Counter, dict[str, dict]]:
    """One video's frames and XML files; returns (counts, its polyps as lesion_info rows)."""
    counts: Counter = Counter()
    frames_dir = out / f"{name}_frames"
    ann_dir = out / f"{name}_annotations"
    frames_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    polyps: dict[str, dict] = {}
    for a in anns if lesions else []:
        by_image.setdefault(a["image_id"], []).append(a)
        k = a["identity_id"].rsplit("_", 1)[1]
        polyps.setdefault(f"{name}_{k}", {"size_mm": a["size"], "histology": a["histology"]})
    box_ids: Counter = Counter()
    for img in seq["frames"]:
        file_name = f"{name}_{img['frame_id']}.jpg"
        os.replace(seed_root / "images" / img["file_name"], frames_dir / file_name)
        objects = []
        for a in by_image.get(img["id"], []):
            uid = f"{name}_{a['identity_id'].rsplit('_', 1)[1]}"
            box_ids[uid] += 1
            objects.append((uid, box_ids[uid], tuple(a["bbox"])))
        (ann_dir / f"{name}_{img['frame_id']}.xml").write_text(
            _voc(file_name, img["width"], img["height"], objects)
        )
        counts["frames"] += 1
        counts["boxes"] += len(objects)
        counts["frames_without_objects"] += not objects
    return counts, polyps


def _write_tables(out: Path, info: list[dict], polyps: dict[str, dict]) -> None:
    with open(out / "lesion_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "unique_object_id",
                "unique_video_name",
                "size [mm]",
                "site",
                "histology_extended",
                "histology_class",
            ]
        )
        for uid, p in sorted(polyps.items()):
            site = "rectum" if int(uid.rsplit("_", 1)[1]) % 2 else "sigmoid colon"
            hist = p["histology"]
            w.writerow([uid, uid.rsplit("_", 1)[0], p["size_mm"], site, HISTOLOGY_EXTENDED[hist], hist])
    with open(out / "video_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["unique_video_name", "age", "sex", "endoscope_brand", "fps", "num_frames", "num_lesions", "bbps"]
        )
        for i, v in enumerate(info):
            w.writerow(
                [v["name"], 50 + i % 30, "MF"[i % 2], BRANDS[i % 3], 25, v["frames"], v["lesions"], 6 + i % 4]
            )


def write_realcolon(videos, by_seq, seed_root: Path, out: Path, cfg) -> dict[str, Any]:
    """The layout writer (`ingest.synth.layouts.write_layout`): rendered videos -> REAL-Colon's files."""
    names = assign_names(videos)
    counts: Counter = Counter()
    polyps: dict[str, dict] = {}
    info = []
    split: dict[str, str | None] = {}
    for seq in sorted(videos, key=lambda v: names[v["seq"]]):
        name = names[seq["seq"]]
        lesions = has_lesion(name)
        c, p = _write_video(seq, name, by_seq.get(seq["seq"], []), seed_root, out, lesions)
        counts.update(c)
        polyps.update(p)
        counts["videos"] += 1
        counts["videos_without_lesion"] += not lesions
        info.append({"name": name, "frames": c["frames"], "lesions": len(p)})
        split[name] = paper_split_of(name) if p else None  # a video whose polyps never show: no lesion
    _write_tables(out, info, polyps)
    counts["polyps"] = len(polyps)
    return {
        "counts": dict(counts),
        "polyps": polyps,
        "paper_split": split,
        "no_lesion": sorted(n for n, s in split.items() if s is None),
    }
