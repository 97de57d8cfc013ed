"""PolypsSet (KUMC) raw layout -> the seed's layout.

Input (RAW_DIR):
    train2019/Image/<n>.jpg              flat numbered frames, no sequences
    train2019/Annotation/<n>.xml         Pascal VOC
    val2019/Image/<seq>/<n>.jpg          one subfolder per sequence (video)
    val2019/Annotation/<seq>/<n>.xml
    test2019/...                         as val2019

Rules:
- a sequence subfolder of val2019 / test2019 is one video and one polyp (the dataset's
  convention; the paper uses these 39 sequences): sequence_id and identity_id `{split}_{seq}`
  (`val_10`), file names `{split}_{seq}_{n}.jpg` as in the paper (`val_10_102.jpg`), split
  `val` / `test`;
- train2019 has no sequences, so it cannot give tracklets: by default it is left out and
  counted; `--train2019 frames` converts it with one sequence per frame (`train_{n}`, split
  `train`), for detection-style use only;
- images and XML files are paired by name within a folder; each unpaired file is counted by kind
  (`unpaired_images`: no XML, so no way to know whether a polyp is there: left out;
  `unpaired_xml`: no image: left out);
- frames are ordered by the number in their name, never by listing;
- each VOC object is a box of the sequence's polyp; its `name` is the histology as written
  (`adenomatous` / `hyperplastic`); boxes are clamped to the frame; several boxes on one frame
  keep the largest (`extra_box_same_polyp`); a sequence whose objects name two histologies is
  counted (`histology_conflict`) and each box keeps its own.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.convert.common import (
    Box,
    ConvertError,
    Frame,
    Problems,
    Tally,
    check_options,
    clamp_corners,
    frame_number,
    image_size,
    keep_largest,
    natural_key,
    parse_number,
    read_bytes,
)
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.shards.files import check_regular
from polyp_ssl.shards.ids import id_problem

log = logging.getLogger(__name__)

DATASET_ID = "polypsset"
PARTS = {"train2019": "train", "val2019": "val", "test2019": "test"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
MAX_XML_BYTES = 16 << 20  # one frame's VOC annotation is a few KB


@dataclass
class PolypsSetConfig:
    raw_dir: Path
    out_root: Path
    train2019: str = "skip"  # skip | frames
    link: str = "hardlink"
    on_error: str = "fail"
    workers: int = 8
    follow_symlinks: bool = False


def parse_voc_boxes(
    data: bytes, source: Path
) -> tuple[int | None, int | None, list[tuple[str | None, tuple[float, float, float, float]]]]:
    """(width, height, [(name, (xmin, ymin, xmax, ymax))]) of a VOC XML; sizes None when absent."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ConvertError(source, "bad_xml", f"not well-formed XML: {exc}") from None
    dims: list[int | None] = []
    for key in ("width", "height"):
        node = root.find(f"size/{key}")
        if node is None or not (node.text or "").strip():
            dims.append(None)
            continue
        value = parse_number(node.text, source, f"size/{key}")
        dims.append(int(value) if value > 0 and value == int(value) else None)
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name_node = obj.find("name")
        name = (name_node.text or "").strip() or None if name_node is not None else None
        oid = f"object {i}" + (f" ({name})" if name else "")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ConvertError(source, "missing_field", "object has no bndbox", oid, "bndbox")
        coords = []
        for k in ("xmin", "ymin", "xmax", "ymax"):
            node = bnd.find(k)
            coords.append(parse_number(node.text if node is not None else None, source, f"bndbox/{k}", oid))
        objects.append((name, (coords[0], coords[1], coords[2], coords[3])))
    return dims[0], dims[1], objects


def _pairs(img_dir: Path, ann_dir: Path, tally: Tally) -> list[tuple[int, str, Path, Path]]:
    """(frame number, stem, image, xml) of the files paired by stem, natural order."""
    images = {}
    if img_dir.is_dir():
        images = {Path(n).stem: n for n in os.listdir(img_dir) if n.lower().endswith(IMAGE_EXTS)}
    xmls = {}
    if ann_dir.is_dir():
        xmls = {Path(n).stem: n for n in os.listdir(ann_dir) if n.lower().endswith(".xml")}
    tally.files["images_seen"] += len(images)
    tally.files["xml_seen"] += len(xmls)
    tally.files["unpaired_images"] += len(set(images) - set(xmls))
    tally.files["unpaired_xml"] += len(set(xmls) - set(images))
    out = []
    for stem in sorted(set(images) & set(xmls), key=natural_key):
        out.append((frame_number(stem), stem, img_dir / images[stem], ann_dir / xmls[stem]))
    tally.files["pairs"] += len(out)
    return out


def convert_polypsset(cfg: PolypsSetConfig, progress: bool = False) -> dict[str, Any]:
    from polyp_ssl.ingest.convert.common import write_dataset

    check_options(cfg.link, cfg.on_error)
    if cfg.train2019 not in ("skip", "frames"):
        raise ValueError(f"--train2019 must be skip or frames, got {cfg.train2019!r}")
    raw = Path(cfg.raw_dir)
    if not raw.is_dir():
        raise ConvertError(raw, "missing_file", "raw directory not found")
    present = [p for p in PARTS if (raw / p).is_dir()]
    if not present:
        raise ConvertError(raw, "no_videos", "no train2019/val2019/test2019 folders (is this PolypsSet?)")
    problems = Problems(cfg.on_error)
    tally = Tally()
    splits: dict[str, list[Frame]] = {}
    hist_by_seq: dict[str, Counter] = {}
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="convert") as pool:
        for part in present:
            split = PARTS[part]
            for sub in ("Image", "Annotation"):
                problem = link_problem(str(raw), f"{part}/{sub}", cfg.follow_symlinks)
                if problem is not None:
                    raise ConvertError(raw / part / sub, "symlink", problem)
            img_root, ann_root = raw / part / "Image", raw / part / "Annotation"
            if part == "train2019":
                pairs = _pairs(img_root, ann_root, tally)
                if cfg.train2019 == "skip":
                    tally.files["train2019_pairs_skipped"] += len(pairs)
                    continue
                groups = [(None, pairs)]
            else:
                seqs = sorted(
                    {
                        n
                        for d in (img_root, ann_root)
                        if d.is_dir()
                        for n in os.listdir(d)
                        if (d / n).is_dir()
                    },
                    key=natural_key,
                )
                loose = [
                    n for d in (img_root, ann_root) if d.is_dir() for n in os.listdir(d) if (d / n).is_file()
                ]
                if loose:
                    tally.files["unpaired_loose_files"] += len(loose)  # files next to the sequence folders
                groups = [(s, _pairs(img_root / s, ann_root / s, tally)) for s in seqs]
            prefix = split
            for seq, pairs in groups:
                frames = _convert_group(
                    raw, part, prefix, seq, pairs, cfg, problems, tally, pool, hist_by_seq
                )
                splits.setdefault(split, []).extend(frames)
        for seq, names in hist_by_seq.items():
            if len(names) > 1:
                tally.other["histology_conflict"] += 1
                log.warning("sequence %s: objects name several histologies %s", seq, dict(names))
        return write_dataset(
            Path(cfg.out_root),
            "polypsset",
            DATASET_ID,
            splits,
            tally,
            problems,
            cfg.link,
            pool,
            info={
                "identity_rule": "one polyp per val2019/test2019 sequence (identity_id = {split}_{seq}); "
                "train2019 " + ("left out" if cfg.train2019 == "skip" else "one sequence per frame")
            },
            report_extra={"raw_dir": str(raw), "train2019": cfg.train2019},
            progress=progress,
        )


def _convert_group(
    raw: Path,
    part: str,
    prefix: str,
    seq: str | None,
    pairs: list[tuple[int | None, str, Path, Path]],
    cfg: PolypsSetConfig,
    problems: Problems,
    tally: Tally,
    pool: ThreadPoolExecutor,
    hist_by_seq: dict[str, Counter],
) -> list[Frame]:
    checked = []
    for number, stem, img, xml in pairs:
        rel = f"{part}/Image/{seq}/{img.name}" if seq else f"{part}/Image/{img.name}"
        rel_xml = f"{part}/Annotation/{seq}/{xml.name}" if seq else f"{part}/Annotation/{xml.name}"
        try:
            for r, path in ((rel, img), (rel_xml, xml)):
                problem = link_problem(str(raw), r, cfg.follow_symlinks)
                if problem is not None:
                    raise ConvertError(path, "symlink", problem)
            if number is None:
                raise ConvertError(img, "bad_filename", "no frame number in the file name")
        except ConvertError as exc:
            problems.handle(exc)
            continue
        checked.append((number, stem, img, xml))
    contents = list(pool.map(lambda p: read_bytes(p[3], MAX_XML_BYTES), checked))
    out: list[Frame] = []
    used: dict[int, str] = {}
    for (number, stem, img, xml), data in zip(checked, contents, strict=True):
        sequence = f"{prefix}_{seq}" if seq else f"{prefix}_{stem}"
        try:
            problem = id_problem(sequence)  # from folder or file names: no control character, no "/"
            if problem is not None:
                raise ConvertError(img, "bad_id", f"sequence id {sequence!r} {problem}", field="sequence_id")
            if isinstance(data, OSError):
                raise ConvertError(xml, "unreadable_file", f"cannot read: {data}")
            width, height, objects = parse_voc_boxes(data, xml)
            if seq is not None and number in used:
                raise ConvertError(img, "duplicate_frame", f"frame number {number} also in {used[number]}")
            if width is None or height is None:
                width, height = image_size(img)
            else:
                check_regular(img, "image")  # size from the XML; a FIFO or device is still refused
        except ConvertError as exc:
            problems.handle(exc)
            continue
        except (OSError, ValueError) as exc:
            problems.handle(ConvertError(img, "unreadable_file", f"not a readable image: {exc}"))
            continue
        used[number] = img.name
        boxes, clamped = [], []
        for name, (x1, y1, x2, y2) in objects:
            tally.boxes["seen"] += 1
            bbox, how = clamp_corners(x1, y1, x2, y2, width, height)
            if bbox is None:
                tally.dropped[how] += 1
                continue
            clamped.append(how == "clamped")
            boxes.append(Box(bbox, sequence, None, name))
            hist_by_seq.setdefault(sequence, Counter())[name] += 1
        if len(boxes) > 1:
            best, extra = keep_largest(boxes)
            tally.dropped["extra_box_same_polyp"] += extra
            clamped = [clamped[boxes.index(best)]]
            boxes = [best]
        tally.boxes["clamped"] += sum(clamped)
        tally.boxes["converted"] += len(boxes)
        if not boxes:
            tally.other["frames_without_boxes"] += 1
        file_name = f"{sequence}_{number}{img.suffix.lower()}" if seq else f"{sequence}{img.suffix.lower()}"
        out.append(Frame(img, file_name, number if seq else 0, sequence, width, height, boxes))
    return out
