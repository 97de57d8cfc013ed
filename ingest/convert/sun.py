"""SUN Colonoscopy Video Database raw layout -> the seed's layout.

Input (RAW_DIR):
    caseN/*.jpg                 the frames of case N (positive and negative cases)
    annotation_txt/caseN.txt    positive cases: one line per frame, `<file>.jpg` then zero or more
                                `x1,y1,x2,y2,cls` groups (corner coordinates, may lie outside the frame)
    case_info.csv               one row per positive case: case_id,shape,size,location,pathology
                                (`--case-info` points elsewhere)

Rules:
- a case is positive when case_info.csv lists it; it is one polyp: identity_id = the case id
  (`case1`), size from the `size` string in mm (`6mm` -> 6.0, `15mm-` -> 15.0: a trailing `-` or
  `+` is an open range, its bound is kept; the text is kept as `size_text`; a string that is not a
  size gives size null and is counted), histology = `pathology` as written (SUN vocabulary);
- frames are ordered by the number in their name (`image9` before `image10`), never by listing;
  frame_id = that number;
- boxes are clamped to the frame (counted); a box with no area inside the frame is dropped
  (counted by reason); a frame line with several boxes of the case's one polyp keeps the largest
  (the first of equal ones) and counts the others as dropped (`extra_box_same_polyp`);
- a frame of a positive case without a line in the case's txt is kept without boxes
  (`--empty-frames drop` leaves such frames out); a line naming a file that is not in the case
  folder is an error (or skipped and counted);
- negative cases (case folders not in case_info.csv) are left out and counted, or with
  `--negatives` converted as frames without boxes.
Everything goes into one split, `--split` (default `all`).
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.convert.common import (
    SPLIT_RE,
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
    read_csv_numbered,
    text_error,
    write_dataset,
)
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.shards.textio import TextInputError, read_lines

log = logging.getLogger(__name__)

DATASET_ID = "sun"
CASE_FIELDS = ("case_id", "shape", "size", "location", "pathology")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MAX_BOX_LINE = 1 << 16  # a frame name and its boxes; a longer line is not a box line
_CASE_RE = re.compile(r"^case\d+$")
_SIZE_RE = re.compile(r"^\s*[<>~≤≥]?\s*(\d+(?:\.\d+)?)\s*(mm)?\s*[-+]?\s*$", re.IGNORECASE)


@dataclass
class SunConfig:
    raw_dir: Path
    out_root: Path
    case_info: Path | None = None  # default RAW_DIR/case_info.csv
    negatives: bool = False
    split: str = "all"
    link: str = "hardlink"
    on_error: str = "fail"
    empty_frames: str = "keep"
    workers: int = 8
    follow_symlinks: bool = False


@dataclass
class Case:
    case_id: str
    size_mm: float | None
    size_text: str | None
    shape: str | None
    location: str | None
    pathology: str | None


def parse_size(text: str | None) -> float | None:
    """Millimetres of a SUN size string (`6mm`, `15mm-`, `<5mm`, `3`); None when it is not one."""
    if text is None:
        return None
    m = _SIZE_RE.match(text)
    return float(m.group(1)) if m else None


def read_case_info(path: Path, problems: Problems, tally: Tally) -> dict[str, Case]:
    if not path.exists():  # a FIFO or folder here is refused by name when read
        raise ConvertError(path, "missing_file", "case_info.csv is missing (needed for size and pathology)")
    _, rows = read_csv_numbered(path, CASE_FIELDS)
    cases: dict[str, Case] = {}
    for line, row in rows:
        cid = row["case_id"]
        rid = f"line {line} ({cid or 'no id'})"
        if not _CASE_RE.match(cid):
            problems.handle(ConvertError(path, "bad_id", f"case_id {cid!r} is not caseN", rid, "case_id"))
            continue
        if cid in cases:
            problems.handle(ConvertError(path, "duplicate_id", "case_id listed twice", rid, "case_id"))
            continue
        text = row["size"] or None
        size = parse_size(text)
        if text is not None and size is None:
            tally.other["size_unparsed (kept as text)"] += 1
            log.warning("%s: %s: size %r is not a size in mm: kept as size_text, size null", path, rid, text)
        cases[cid] = Case(
            cid, size, text, row["shape"] or None, row["location"] or None, row["pathology"] or None
        )
    return cases


def parse_box_line(
    line: str, source: Path, lineno: int
) -> tuple[str, list[tuple[float, float, float, float]]]:
    """`name x1,y1,x2,y2,cls ...` -> (name, corner boxes). ConvertError naming file and line."""
    parts = line.split()
    where = f"line {lineno}"
    if not parts:
        raise ConvertError(source, "bad_line", "empty line", where)
    name, groups = parts[0], parts[1:]
    boxes = []
    for g, group in enumerate(groups):
        values = group.split(",")
        if len(values) != 5:
            raise ConvertError(source, "bad_box", f"box {group!r} is not x1,y1,x2,y2,cls", where, f"box {g}")
        try:
            x1, y1, x2, y2 = (float(v) for v in values[:4])
        except ValueError:
            raise ConvertError(
                source,
                "bad_number",
                f"box {group!r} has a coordinate that is not a number",
                where,
                f"box {g}",
            ) from None
        if not all(abs(v) < 1e9 for v in (x1, y1, x2, y2)):
            raise ConvertError(source, "bad_number", f"box {group!r} is not finite", where, f"box {g}")
        boxes.append((x1, y1, x2, y2))
    return name, boxes


def _box_lines(
    txt: Path, folder: Path, names: dict[str, int], problems: Problems, tally: Tally
) -> dict[str, tuple[int, list]]:
    """Frame name -> (line, corner boxes) of a case's box file, read line by line (each line at
    most MAX_BOX_LINE characters, plain UTF-8 text: shards.textio.read_lines); a bad line is a
    problem of that line, a file that cannot be read as text a ConvertError of the file."""
    lines: dict[str, tuple[int, list]] = {}
    try:
        for lineno, line in read_lines(txt, "box file", max_line=MAX_BOX_LINE):
            if not line.strip():
                continue
            try:
                name, boxes = parse_box_line(line, txt, lineno)
                if name not in names:
                    raise ConvertError(
                        txt, "missing_frame", f"frame {folder / name} does not exist", f"line {lineno}"
                    )
                if name in lines:
                    raise ConvertError(
                        txt, "duplicate_frame", f"{name} already on line {lines[name][0]}", f"line {lineno}"
                    )
            except ConvertError as exc:
                problems.handle(exc)
                if exc.reason == "missing_frame":
                    tally.files["unpaired_box_lines"] += 1
                continue
            lines[name] = (lineno, boxes)
    except TextInputError as exc:
        raise text_error(exc) from None
    except OSError as exc:
        raise ConvertError(txt, "missing_file", f"box file of a positive case not readable: {exc}") from None
    return lines


def _frames_of(folder: Path) -> dict[str, int]:
    """Image file name -> frame number, for a case folder."""
    out = {}
    for name in os.listdir(folder):
        if name.lower().endswith(IMAGE_EXTS):
            out[name] = frame_number(name)
    return out


def convert_sun(cfg: SunConfig, progress: bool = False) -> dict[str, Any]:
    check_options(cfg.link, cfg.on_error)
    if not SPLIT_RE.match(cfg.split):
        raise ValueError(f"--split must match [A-Za-z0-9_-]+, got {cfg.split!r}")
    raw = Path(cfg.raw_dir)
    if not raw.is_dir():
        raise ConvertError(raw, "missing_file", "raw directory not found")
    problems = Problems(cfg.on_error)
    tally = Tally()
    info_path = Path(cfg.case_info) if cfg.case_info else raw / "case_info.csv"
    if cfg.case_info is None:
        problem = link_problem(str(raw), "case_info.csv", cfg.follow_symlinks)
        if problem is not None:
            raise ConvertError(info_path, "symlink", problem)
    cases = read_case_info(info_path, problems, tally)
    folders = sorted(
        (p.name for p in raw.iterdir() if p.is_dir() and _CASE_RE.match(p.name)), key=natural_key
    )
    if not folders:
        raise ConvertError(raw, "no_videos", "no caseN folders (is this the SUN root?)")
    for cid in sorted(set(cases) - set(folders), key=natural_key):
        problems.handle(
            ConvertError(info_path, "missing_frame", f"case folder {raw / cid} does not exist", cid)
        )
    txt_dir = raw / "annotation_txt"
    frames_out: list[Frame] = []
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="convert") as pool:
        for cid in folders:
            problem = link_problem(str(raw), cid, cfg.follow_symlinks)
            if problem is not None:
                problems.handle(ConvertError(raw / cid, "symlink", problem))
                continue
            names = _frames_of(raw / cid)
            tally.files["images_seen"] += len(names)
            case = cases.get(cid)
            if case is None:
                tally.other["negative_cases"] += 1
                if not cfg.negatives:
                    tally.files["images_of_negative_cases_skipped"] += len(names)
                    continue
                frames_out += _frames(raw, cid, names, {}, None, cfg, problems, tally, pool)
                continue
            txt = txt_dir / f"{cid}.txt"
            problem = link_problem(str(raw), f"annotation_txt/{cid}.txt", cfg.follow_symlinks)
            try:
                if problem is not None:
                    raise ConvertError(txt, "symlink", problem)
                lines = _box_lines(txt, raw / cid, names, problems, tally)
            except ConvertError as exc:
                problems.handle(exc)
                continue
            tally.files["box_files_seen"] += 1
            frames_out += _frames(raw, cid, names, lines, case, cfg, problems, tally, pool)
        return write_dataset(
            Path(cfg.out_root),
            "sun",
            DATASET_ID,
            {cfg.split: frames_out},
            tally,
            problems,
            cfg.link,
            pool,
            info={"identity_rule": "one polyp per positive case (identity_id = case id)"},
            report_extra={"raw_dir": str(raw), "case_info": str(info_path), "negatives": cfg.negatives},
            progress=progress,
        )


def _frames(
    raw: Path,
    cid: str,
    names: dict[str, int | None],
    lines: dict[str, tuple[int, list]],
    case: Case | None,
    cfg: SunConfig,
    problems: Problems,
    tally: Tally,
    pool: ThreadPoolExecutor,
) -> list[Frame]:
    folder = raw / cid
    by_number: dict[int, str] = {}
    for name in sorted(names, key=natural_key):
        number = names[name]
        try:
            if number is None:
                raise ConvertError(folder / name, "bad_filename", "no frame number in the file name", cid)
            if number in by_number:
                raise ConvertError(
                    folder / name,
                    "duplicate_frame",
                    f"frame number {number} also in {by_number[number]}",
                    cid,
                )
            problem = link_problem(str(raw), f"{cid}/{name}", cfg.follow_symlinks)
            if problem is not None:
                raise ConvertError(folder / name, "symlink", problem, cid)
        except ConvertError as exc:
            problems.handle(exc)
            if name in lines:
                tally.boxes["seen"] += len(lines[name][1])
                tally.dropped["frame_skipped"] += len(lines[name][1])
            continue
        by_number[number] = name
    numbers = sorted(by_number)
    sizes = list(pool.map(lambda n: _size(folder / by_number[n]), numbers))
    out: list[Frame] = []
    for number, size in zip(numbers, sizes, strict=True):
        name = by_number[number]
        if isinstance(size, ConvertError):
            problems.handle(size)
            continue
        w, h = size
        entry = lines.get(name)
        if case is not None and entry is None:
            tally.files["images_without_box_line"] += 1
        boxes: list[Box] = []
        if entry is not None:
            lineno, corners = entry
            tally.files["images_paired"] += 1
            clamped: list[bool] = []
            for x1, y1, x2, y2 in corners:
                tally.boxes["seen"] += 1
                bbox, how = clamp_corners(x1, y1, x2, y2, w, h)
                if bbox is None:
                    tally.dropped[how] += 1
                    continue
                clamped.append(how == "clamped")
                boxes.append(
                    Box(
                        bbox,
                        cid,
                        case.size_mm if case else None,
                        case.pathology if case else None,
                        {"size_text": case.size_text, "shape": case.shape, "location": case.location}
                        if case
                        else None,
                    )
                )
            if len(boxes) > 1:
                best, extra = keep_largest(boxes)
                tally.dropped["extra_box_same_polyp"] += extra
                clamped = [clamped[boxes.index(best)]]
                boxes = [best]
            tally.boxes["clamped"] += sum(clamped)
        tally.boxes["converted"] += len(boxes)
        if not boxes:
            tally.other["frames_without_boxes"] += 1
            if case is not None and cfg.empty_frames == "drop":
                continue
        out.append(Frame(folder / name, f"{cid}/{name}", number, cid, w, h, boxes))
    return out


def _size(path: Path) -> tuple[int, int] | ConvertError:
    try:
        return image_size(path)
    except (OSError, ValueError) as exc:
        return ConvertError(path, "unreadable_file", f"not a readable image: {exc}")
