"""LDPolypVideo raw layout -> the seed's layout.

Input (RAW_DIR):
    TrainValid/Images/<video>/<frame>.jpg
    TrainValid/Annotations/<video>/<frame>.txt   first line: the box count N; then N lines
                                                 `xmin ymin xmax ymax`
    Test/...                                     as TrainValid

Rules:
- LDPolypVideo has no polyp ids: one video is one polyp (the dataset's convention, followed by
  the authors' counting work): identity_id = sequence_id = `{part}_{video}` (`TrainValid_12`);
  the rule is written in the annotation files' `info.identity_rule`. A frame with several boxes
  keeps the largest (the first of equal ones); the others are counted (`extra_box_same_polyp`);
- split `train` for TrainValid, `test` for Test; frames ordered by the number in their name;
- a frame with a txt of count 0 is a frame without a polyp; an image without a txt is counted
  (`unpaired_images`) and left out, a txt without an image likewise (`unpaired_txt`);
- a count that disagrees with the number of box lines, or a line that is not four numbers, is
  an error naming the file and the line (or, with --on-error skip, the frame is left out and
  counted); boxes are clamped to the frame (counted).
"""

from __future__ import annotations

import logging
import os
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
    read_bytes,
    write_dataset,
)
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.shards.ids import id_problem

log = logging.getLogger(__name__)

DATASET_ID = "ldpolyp"
PARTS = {"TrainValid": "train", "Test": "test"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
MAX_BOX_FILE_BYTES = 1 << 20  # a box count and a few box lines
IDENTITY_RULE = "one polyp per video (LDPolypVideo has no polyp ids): identity_id = sequence_id"


@dataclass
class LDPolypConfig:
    raw_dir: Path
    out_root: Path
    link: str = "hardlink"
    on_error: str = "fail"
    workers: int = 8
    follow_symlinks: bool = False


def parse_box_file(text: str, source: Path) -> list[tuple[float, float, float, float]]:
    """The corner boxes of one LDPolyp txt; ConvertError naming the file and line otherwise."""
    lines = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not lines:
        raise ConvertError(source, "bad_line", "empty file (expected the box count on line 1)", "line 1")
    first_no, first = lines[0]
    try:
        count = int(first.split()[0])
    except ValueError:
        raise ConvertError(
            source, "bad_number", f"box count {first!r} is not a whole number", f"line {first_no}"
        ) from None
    if count < 0:
        raise ConvertError(source, "bad_number", f"negative box count {count}", f"line {first_no}")
    body = lines[1:]
    if len(body) != count:
        raise ConvertError(
            source,
            "box_count_mismatch",
            f"count says {count} boxes, {len(body)} box lines follow",
            f"line {first_no}",
        )
    boxes = []
    for lineno, line in body:
        parts = line.replace(",", " ").split()
        try:
            if len(parts) != 4:
                raise ValueError
            x1, y1, x2, y2 = (float(p) for p in parts)
        except ValueError:
            raise ConvertError(
                source, "bad_box", f"{line!r} is not `xmin ymin xmax ymax`", f"line {lineno}"
            ) from None
        if not all(abs(v) < 1e9 for v in (x1, y1, x2, y2)):
            raise ConvertError(source, "bad_number", f"{line!r} is not finite", f"line {lineno}")
        boxes.append((x1, y1, x2, y2))
    return boxes


def convert_ldpolyp(cfg: LDPolypConfig, progress: bool = False) -> dict[str, Any]:
    check_options(cfg.link, cfg.on_error)
    raw = Path(cfg.raw_dir)
    if not raw.is_dir():
        raise ConvertError(raw, "missing_file", "raw directory not found")
    present = [p for p in PARTS if (raw / p).is_dir()]
    if not present:
        raise ConvertError(raw, "no_videos", "no TrainValid/ or Test/ folder (is this LDPolypVideo?)")
    problems = Problems(cfg.on_error)
    tally = Tally()
    splits: dict[str, list[Frame]] = {}
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="convert") as pool:
        for part in present:
            img_root, ann_root = raw / part / "Images", raw / part / "Annotations"
            for sub in ("Images", "Annotations"):
                problem = link_problem(str(raw), f"{part}/{sub}", cfg.follow_symlinks)
                if problem is not None:
                    raise ConvertError(raw / part / sub, "symlink", problem)
            videos = sorted(
                {n for d in (img_root, ann_root) if d.is_dir() for n in os.listdir(d) if (d / n).is_dir()},
                key=natural_key,
            )
            for video in videos:
                frames = _video(raw, part, video, cfg, problems, tally, pool)
                splits.setdefault(PARTS[part], []).extend(frames)
        return write_dataset(
            Path(cfg.out_root),
            "ldpolyp",
            DATASET_ID,
            splits,
            tally,
            problems,
            cfg.link,
            pool,
            info={"identity_rule": IDENTITY_RULE},
            report_extra={"raw_dir": str(raw), "identity_rule": IDENTITY_RULE},
            progress=progress,
        )


def _video(
    raw: Path,
    part: str,
    video: str,
    cfg: LDPolypConfig,
    problems: Problems,
    tally: Tally,
    pool: ThreadPoolExecutor,
) -> list[Frame]:
    img_dir, ann_dir = raw / part / "Images" / video, raw / part / "Annotations" / video
    images = (
        {Path(n).stem: n for n in os.listdir(img_dir) if n.lower().endswith(IMAGE_EXTS)}
        if img_dir.is_dir()
        else {}
    )
    txts = (
        {Path(n).stem: n for n in os.listdir(ann_dir) if n.lower().endswith(".txt")}
        if ann_dir.is_dir()
        else {}
    )
    tally.files["images_seen"] += len(images)
    tally.files["txt_seen"] += len(txts)
    tally.files["unpaired_images"] += len(set(images) - set(txts))
    tally.files["unpaired_txt"] += len(set(txts) - set(images))
    sequence = f"{part}_{video}"
    problem = id_problem(sequence)  # from a folder name: no control character, no "/"
    if problem is not None:
        problems.handle(
            ConvertError(img_dir, "bad_id", f"sequence id {sequence!r} {problem}", field="sequence_id")
        )
        return []
    checked = []
    used: dict[int, str] = {}
    for stem in sorted(set(images) & set(txts), key=natural_key):
        img, txt = img_dir / images[stem], ann_dir / txts[stem]
        number = frame_number(stem)
        try:
            for path in (img, txt):
                problem = link_problem(str(raw), os.path.relpath(path, raw), cfg.follow_symlinks)
                if problem is not None:
                    raise ConvertError(path, "symlink", problem)
            if number is None:
                raise ConvertError(img, "bad_filename", "no frame number in the file name")
            if number in used:
                raise ConvertError(img, "duplicate_frame", f"frame number {number} also in {used[number]}")
        except ConvertError as exc:
            problems.handle(exc)
            continue
        used[number] = img.name
        checked.append((number, img, txt))
    tally.files["pairs"] += len(checked)

    def load(item: tuple[int, Path, Path]) -> tuple[bytes | OSError, tuple[int, int] | Exception]:
        data = read_bytes(item[2], MAX_BOX_FILE_BYTES)
        try:
            size: tuple[int, int] | Exception = image_size(item[1])
        except (OSError, ValueError) as exc:
            size = exc
        return data, size

    out: list[Frame] = []
    for (number, img, txt), (data, size) in zip(checked, pool.map(load, checked), strict=True):
        try:
            if isinstance(data, OSError):
                raise ConvertError(txt, "unreadable_file", f"cannot read: {data}")
            if isinstance(size, Exception):
                raise ConvertError(img, "unreadable_file", f"not a readable image: {size}")
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ConvertError(txt, "bad_encoding", f"not UTF-8 text: {exc}") from None
            corners = parse_box_file(text, txt)
        except ConvertError as exc:
            problems.handle(exc)
            continue
        w, h = size
        boxes, clamped = [], []
        for x1, y1, x2, y2 in corners:
            tally.boxes["seen"] += 1
            bbox, how = clamp_corners(x1, y1, x2, y2, w, h)
            if bbox is None:
                tally.dropped[how] += 1
                continue
            clamped.append(how == "clamped")
            boxes.append(Box(bbox, sequence))
        if len(boxes) > 1:
            best, extra = keep_largest(boxes)
            tally.dropped["extra_box_same_polyp"] += extra
            clamped = [clamped[boxes.index(best)]]
            boxes = [best]
        tally.boxes["clamped"] += sum(clamped)
        tally.boxes["converted"] += len(boxes)
        if not boxes:
            tally.other["frames_without_boxes"] += 1
        out.append(Frame(img, f"{sequence}/{img.name}", number, sequence, w, h, boxes))
    return out
