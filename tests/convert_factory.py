"""A tiny REAL-Colon raw layout (frames, VOC XML boxes, lesion and video tables)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

W, H = 64, 48

# video -> {t: [(unique_id, box_id, xmin, xmax, ymin, ymax)]}; frames not listed have no object
VIDEOS = {
    "001-001": {
        1: [("001-001_1", 1, 10.5, 30.25, 5.0, 20.75)],
        2: [("001-001_1", 1, 11.0, 31.0, 6.5, 21.5), ("001-001_2", 2, 40.0, 60.5, 30.0, 45.0)],
        3: [("001-001_1", 1, 12.0, 32.0, 7.0, 22.0)],
        5: [("001-001_2", 2, 41.25, 61.0, 29.5, 44.0)],
    },
    "001-002": {0: [("001-002_1", 1, 0.0, 16.0, 0.0, 12.0)], 1: [("001-002_1", 1, 1.0, 17.0, 1.0, 13.0)]},
    "002-001": {2: [("002-001_1", 1, 20.0, 40.0, 20.0, 40.0)]},
}
N_FRAMES = {"001-001": 6, "001-002": 3, "002-001": 4}
LESIONS = [
    ("001-001_1", "001-001", "4", "rectum", "tubular adenoma", "AD"),
    ("001-001_2", "001-001", "12.5", "sigmoid", "hyperplastic polyp", "HP"),
    ("001-002_1", "001-002", "", "cecum", "", "OTHER"),
    ("002-001_1", "002-001", "3", "ascending", "sessile serrated lesion", "SSL"),
]


def voc_xml(video: str, t: int, objects, drop: str | None = None) -> str:
    parts = [f"<annotation><folder>{video}_frames</folder><filename>{video}_{t}.jpg</filename>"]
    if drop != "size":
        parts.append(f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>")
    for uid, box_id, x0, x1, y0, y1 in objects:
        uid_xml = "" if drop == "unique_id" else f"<unique_id>{uid}</unique_id>"
        xmin = "ten" if drop == "number" else repr(x0)
        parts.append(
            f"<object><name>lesion</name>{uid_xml}<box_id>{box_id}</box_id><bndbox><xmin>{xmin}</xmin>"
            f"<xmax>{x1!r}</xmax><ymin>{y0!r}</ymin><ymax>{y1!r}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "".join(parts)


def build_raw(raw: Path, lesions=LESIONS, bad: tuple[str, int, str] | None = None) -> Path:
    """`bad` = (video, t, what) breaks one XML: size | unique_id | number."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for video, n in N_FRAMES.items():
        (raw / f"{video}_frames").mkdir()
        (raw / f"{video}_annotations").mkdir()
        for t in range(n):
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
                raw / f"{video}_frames" / f"{video}_{t}.jpg"
            )
            drop = bad[2] if bad and bad[:2] == (video, t) else None
            (raw / f"{video}_annotations" / f"{video}_{t}.xml").write_text(
                voc_xml(video, t, VIDEOS[video].get(t, []), drop)
            )
    lines = ["unique_object_id,unique_video_name,size [mm],site,histology_extended,histology_class"]
    lines += [",".join(row) for row in lesions]
    (raw / "lesion_info.csv").write_text("\n".join(lines) + "\n")
    (raw / "video_info.csv").write_text(
        "unique_video_name,age,sex,endoscope_brand,fps,num_frames,num_lesions,bbps\n"
        "001-001,65,M,Olympus,29.97,6,2,8\n001-002,70,F,Olympus,30,3,1,\n002-001,55,F,Pentax,25,4,1,7\n"
    )
    return raw
