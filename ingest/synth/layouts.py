"""Synthetic data in the raw layouts of the public datasets (`polyp-ssl synth --layout ...`), so
the converters are tested end to end on data that looks like the real downloads, traps included.

A seed-layout dataset is rendered first (`generate`, in a temporary folder inside OUT), then its
frames are moved into the raw layout and its boxes written in the layout's own format:

- `sun`: `caseN/` folders (file names `case_M_N_image{t}.jpg`, unpadded: listing order differs
  from frame order), `annotation_txt/caseN.txt`, `case_info.csv` (sizes `6mm`, `15mm-`, one
  `unknown`; SUN pathology strings); traps: boxes with negative or overflowing corners (clamped),
  a box wholly outside the frame (dropped), a line with a second, smaller box of the case's polyp
  (dropped: the larger is kept), one negative case (a case folder without a table row);
- `polypsset`: `{train2019,val2019,test2019}/{Image,Annotation}`, val/test with one numeric
  subfolder per sequence, VOC XML with `adenomatous` / `hyperplastic`; traps: images without an
  XML and XML files without an image, unpadded frame numbers, a flat train2019;
- `ldpolyp`: `{TrainValid,Test}/{Images,Annotations}/<video>/<t>.{jpg,txt}`; traps: a frame
  whose txt lists a second box, negative corners, an image without its txt;
- `table`: `boxes.csv` (`video,frame,image_path,x,y,w,h,identity,size_mm,histology,split,site`) with
  frames under `frames/`, a row per box and one per frame without a polyp, histology in
  PolypSize's words (the table is how PolypSize comes in); traps: boxes reaching over the frame's
  edge (clamped), rows not in frame order.

One polyp per video in sun, polypsset and ldpolyp (the datasets' convention): the video's polyp
with the most boxes; the others' boxes are not written. `OUT/synth_layout.json` records the
expected outcome (boxes written, to be clamped, to be dropped by reason, unpaired files, polyps).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.synth.generate import SynthConfig, generate
from polyp_ssl.ingest.synth.mot_layout import write_mot
from polyp_ssl.ingest.synth.realcolon_layout import write_realcolon
from polyp_ssl.shards.files import open_regular_text

LAYOUTS = ("sun", "polypsset", "ldpolyp", "table", "realcolon", "mot")
SUN_PATHOLOGY = {
    "AD": "Low-grade adenoma",
    "HP": "Hyperplastic polyp",
    "SSL": "Sessile serrated lesion",
    "TSA": "Traditional serrated adenoma",
}
POLYPSIZE_HISTOLOGY = {
    "AD": "Tubular Adenoma",
    "HP": "Hyperplastic Polyp",
    "SSL": "Sessile Serrated Lesion (SSL)",
    "TSA": "Tubulovillous Adenoma",
}
POLYPSSET_CLASS = {"AD": "adenomatous", "HP": "hyperplastic", "SSL": "hyperplastic", "TSA": "adenomatous"}
LAYOUT_FILE = "synth_layout.json"


def sun_size(size_mm: float | None, index: int) -> str:
    """SUN-style size string: `6mm`, `15mm-` from 15 mm on, and `unknown` for the second case."""
    if index == 1 or size_mm is None:
        return "unknown"
    return "15mm-" if size_mm >= 15 else f"{round(size_mm)}mm"


def _load_seed(root: Path) -> tuple[list[dict], dict[int, dict], dict[str, list[dict]]]:
    """(videos as {seq, split, frames: [(t, image)]}, images by id, annotations by sequence)."""
    images: dict[int, dict] = {}
    by_seq: dict[str, list[dict]] = defaultdict(list)
    videos: dict[str, dict] = {}
    for path in sorted((root / "annotations").glob("instances_*.json")):
        split = path.stem[len("instances_") :]
        with open_regular_text(path, "annotation file") as f:  # a FIFO: refused by name
            coco = json.loads(f.read())
        for img in coco["images"]:
            images[img["id"]] = img
            v = videos.setdefault(
                img["sequence_id"], {"seq": img["sequence_id"], "split": split, "frames": []}
            )
            v["frames"].append(img)
        for ann in coco["annotations"]:
            by_seq[images[ann["image_id"]]["sequence_id"]].append(ann)
    for v in videos.values():
        v["frames"].sort(key=lambda i: i["frame_id"])
    return sorted(videos.values(), key=lambda v: v["seq"]), images, by_seq


def _main_polyp(anns: list[dict]) -> str | None:
    counts = Counter(a["identity_id"] for a in anns)
    return min(counts, key=lambda k: (-counts[k], k)) if counts else None


def write_layout(layout: str, cfg: SynthConfig, out: Path, workers: int = 1) -> dict[str, Any]:
    """Render a dataset and write it into OUT in `layout`; returns the expected outcome."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_root = out / ".seed-render"
    shutil.rmtree(seed_root, ignore_errors=True)
    generate(cfg, seed_root, workers=workers)
    try:
        videos, images, by_seq = _load_seed(seed_root)
        writer = {
            "sun": _sun,
            "polypsset": _polypsset,
            "ldpolyp": _ldpolyp,
            "table": _table,
            "realcolon": write_realcolon,
            "mot": write_mot,
        }[layout]
        expected = writer(videos, by_seq, seed_root, out, cfg)
    finally:
        shutil.rmtree(seed_root, ignore_errors=True)
    expected["layout"] = layout
    (out / LAYOUT_FILE).write_text(json.dumps(expected, indent=1, sort_keys=True))
    return expected


def _move(seed_root: Path, img: dict, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(seed_root / "images" / img["file_name"], dst)


def _corners(bbox: list[float]) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return x, y, x + w, y + h


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _sun(videos, by_seq, seed_root: Path, out: Path, cfg: SynthConfig) -> dict[str, Any]:
    exp: Counter = Counter()
    (out / "annotation_txt").mkdir(exist_ok=True)
    rows = []
    polyps: dict[str, dict] = {}
    negative = len(videos) - 1 if len(videos) > 1 else None
    for n, v in enumerate(videos, start=1):
        case = f"case{n}"
        for img in v["frames"]:
            _move(seed_root, img, out / case / f"case_M_{n}_image{img['frame_id']}.jpg")
        exp["frames"] += len(v["frames"])
        if n - 1 == negative:
            exp["negative_cases"] += 1
            exp["negative_frames"] += len(v["frames"])
            continue
        anns = by_seq[v["seq"]]
        main = _main_polyp(anns)
        boxes = {a["image_id"]: a for a in anns if a["identity_id"] == main}
        label = next((a for a in anns if a["identity_id"] == main), None)
        size_text = sun_size(label["size"] if label else None, n - 1)
        rows.append(
            [
                case,
                "Is",
                size_text,
                "Ascending colon",
                SUN_PATHOLOGY.get(label["histology"], "") if label else "",
            ]
        )
        polyps[case] = {"size_text": size_text, "histology": label["histology"] if label else None}
        lines = []
        for k, img in enumerate(v["frames"]):
            name = f"case_M_{n}_image{img['frame_id']}.jpg"
            a = boxes.get(img["id"])
            if a is None:
                if k % 7 == 3:  # a frame line without boxes
                    lines.append(name)
                else:
                    exp["frames_without_line"] += 1
                continue
            x1, y1, x2, y2 = _corners(a["bbox"])
            ox1, oy1, ox2, oy2 = x1, y1, x2, y2
            groups = []
            exp["boxes"] += 1
            if k % 5 == 0:  # negative and overflowing corners: clamped
                x1, y2 = -7.0, cfg.height + 9.0
                exp["clamped"] += 1
            groups.append((x1, y1, x2, y2))
            if k % 11 == 4:  # a second, smaller box of the same polyp: dropped
                groups.append((ox1 + 1, oy1 + 1, ox1 + 2 + (ox2 - ox1) / 3, oy1 + 2 + (oy2 - oy1) / 3))
                exp["boxes"] += 1
                exp["dropped_extra_box_same_polyp"] += 1
            if k % 13 == 6:  # a box wholly left of the frame: dropped
                groups.append((-40.0, 5.0, -10.0, 25.0))
                exp["boxes"] += 1
                exp["dropped_box_outside_frame"] += 1
            lines.append(name + " " + " ".join(",".join(_fmt(c) for c in g) + ",0" for g in groups))
        # lines written out of frame order: the converter must not rely on it
        lines.reverse()
        (out / "annotation_txt" / f"{case}.txt").write_text("\n".join(lines) + "\n")
    with open(out / "case_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "shape", "size", "location", "pathology"])
        w.writerows(rows)
    return {"counts": dict(exp), "polyps": polyps}


def _voc(name: str, w: int, h: int, objects: list[tuple[str, tuple[float, ...]]]) -> str:
    parts = [
        f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height>"
        "<depth>3</depth></size>"
    ]
    for cls, (x1, y1, x2, y2) in objects:
        parts.append(
            f"<object><name>{cls}</name><bndbox><xmin>{_fmt(x1)}</xmin><ymin>{_fmt(y1)}</ymin>"
            f"<xmax>{_fmt(x2)}</xmax><ymax>{_fmt(y2)}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _polypsset(videos, by_seq, seed_root: Path, out: Path, cfg: SynthConfig) -> dict[str, Any]:
    exp: Counter = Counter()
    part_of = {"train": "train2019", "val": "val2019", "test": "test2019"}
    polyps: dict[str, dict] = {}
    train_n = 0
    seq_no: Counter = Counter()
    for v in videos:
        part = part_of[v["split"]]
        anns = by_seq[v["seq"]]
        main = _main_polyp(anns)
        boxes = {a["image_id"]: a for a in anns if a["identity_id"] == main}
        label = next((a for a in anns if a["identity_id"] == main), None)
        cls = POLYPSSET_CLASS[label["histology"]] if label else "hyperplastic"
        if part != "train2019":
            seq_no[part] += 1
            seq = str(seq_no[part] * 5)  # 5, 10, ...: natural, not listing, order
            polyps[f"{v['split']}_{seq}"] = {"histology": cls}
        for k, img in enumerate(v["frames"]):
            a = boxes.get(img["id"])
            if part == "train2019":
                train_n += 1
                img_path = out / part / "Image" / f"{train_n}.jpg"
                xml_path = out / part / "Annotation" / f"{train_n}.xml"
                exp["train2019_pairs"] += 1
            else:
                t = img["frame_id"]
                img_path = out / part / "Image" / seq / f"{t}.jpg"
                xml_path = out / part / "Annotation" / seq / f"{t}.xml"
            objects = []
            if a is not None:
                objects.append((cls, _corners(a["bbox"])))
            if part != "train2019" and k % 9 == 2:  # XML without image (as in test2019)
                xml_path.parent.mkdir(parents=True, exist_ok=True)
                xml_path.write_text(_voc(img_path.name, img["width"], img["height"], objects))
                (seed_root / "images" / img["file_name"]).unlink()
                exp["unpaired_xml"] += 1
                continue
            _move(seed_root, img, img_path)
            if part != "train2019" and k % 9 == 5:  # image without XML
                exp["unpaired_images"] += 1
                continue
            xml_path.parent.mkdir(parents=True, exist_ok=True)
            xml_path.write_text(_voc(img_path.name, img["width"], img["height"], objects))
            if part != "train2019":
                exp["frames"] += 1
                exp["boxes"] += len(objects)
    return {"counts": dict(exp), "polyps": polyps}


def _ldpolyp(videos, by_seq, seed_root: Path, out: Path, cfg: SynthConfig) -> dict[str, Any]:
    exp: Counter = Counter()
    polyps = {}
    for n, v in enumerate(videos, start=1):
        part = "Test" if v["split"] == "test" else "TrainValid"
        video = str(n)
        anns = by_seq[v["seq"]]
        main = _main_polyp(anns)
        by_image: dict[int, list[dict]] = defaultdict(list)
        for a in anns:
            by_image[a["image_id"]].append(a)
        polyps[f"{part}_{video}"] = {"frames": 0}
        for k, img in enumerate(v["frames"]):
            t = img["frame_id"]
            _move(seed_root, img, out / part / "Images" / video / f"{t}.jpg")
            if k == 1:  # an image without its txt
                exp["unpaired_images"] += 1
                continue
            exp["frames"] += 1
            boxes = [_corners(a["bbox"]) for a in by_image.get(img["id"], []) if a["identity_id"] == main]
            others = [_corners(a["bbox"]) for a in by_image.get(img["id"], []) if a["identity_id"] != main]
            area = [
                (b[2] - b[0]) * (b[3] - b[1]) for b in boxes
            ]  # before the trap: the clamped box is larger
            if boxes and k % 6 == 0:
                x1, y1, x2, y2 = boxes[0]
                boxes[0] = (-3.0, -2.0, x2, y2)
                exp["clamped"] += 1
            smaller = [o for o in others if boxes and (o[2] - o[0]) * (o[3] - o[1]) < area[0]]
            if boxes and k % 4 == 0:  # a second, smaller box on the frame: one polyp per video
                x1, y1, x2, y2 = boxes[0]
                inner = (
                    max(x1, 0) + 1,
                    max(y1, 0) + 1,
                    max(x1, 0) + 1 + (x2 - max(x1, 0)) / 3,
                    max(y1, 0) + 1 + (y2 - max(y1, 0)) / 3,
                )
                boxes.append(smaller[0] if smaller else inner)
            exp["boxes"] += len(boxes)
            if len(boxes) > 1:
                exp["dropped_extra_box_same_polyp"] += len(boxes) - 1
            txt = out / part / "Annotations" / video / f"{t}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text(
                "\n".join([str(len(boxes))] + [" ".join(_fmt(c) for c in b) for b in boxes]) + "\n"
            )
    return {"counts": dict(exp), "polyps": polyps}


def _table(videos, by_seq, seed_root: Path, out: Path, cfg: SynthConfig) -> dict[str, Any]:
    exp: Counter = Counter()
    rows = []
    polyps: dict[str, dict] = {}
    for n, v in enumerate(videos):
        site = f"site{n % 2}"  # an extra column: kept as metadata
        anns = by_seq[v["seq"]]
        by_image: dict[int, list[dict]] = defaultdict(list)
        for a in anns:
            by_image[a["image_id"]].append(a)
        for k, img in enumerate(v["frames"]):
            rel = f"frames/{v['seq']}/{img['frame_id']:04d}.jpg"
            _move(seed_root, img, out / rel)
            exp["frames"] += 1
            boxes = by_image.get(img["id"], [])
            if not boxes:
                rows.append([v["seq"], img["frame_id"], rel, "", "", "", "", "", "", "", v["split"], site])
            for a in boxes:
                x, y, w, h = a["bbox"]
                if k % 8 == 0:  # reaching over the right edge: clamped
                    w = cfg.width - x + 6
                    exp["clamped"] += 1
                exp["boxes"] += 1
                hist = POLYPSIZE_HISTOLOGY[a["histology"]]
                polyps[a["identity_id"]] = {"size_mm": a["size"], "histology": hist}
                rows.append(
                    [
                        v["seq"],
                        img["frame_id"],
                        rel,
                        _fmt(x),
                        _fmt(y),
                        _fmt(w),
                        _fmt(h),
                        a["identity_id"],
                        a["size"],
                        hist,
                        v["split"],
                        site,
                    ]
                )
    rows.reverse()  # row order is not frame order
    with open(out / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "video",
                "frame",
                "image_path",
                "x",
                "y",
                "w",
                "h",
                "identity",
                "size_mm",
                "histology",
                "split",
                "site",
            ]
        )
        w.writerows(rows)
    return {"counts": dict(exp), "polyps": polyps}
