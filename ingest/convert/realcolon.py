"""REAL-Colon raw layout -> the seed's COCO layout (docs/method.md "REAL-Colon's raw layout").

Input (RAW_DIR):
    SSS-VVV_frames/SSS-VVV_{t}.jpg          t = frame index from 0
    SSS-VVV_annotations/SSS-VVV_{t}.xml     Pascal VOC, one per frame (also frames without boxes)
    lesion_info.csv                         unique_object_id, unique_video_name, size [mm], site,
                                            histology_extended, histology_class
    video_info.csv                          optional: unique_video_name, age, sex, endoscope_brand, fps,
                                            num_frames, num_lesions, bbps

Output (OUT_ROOT):
    images/SSS-VVV_{t}.jpg                  hard links to the raw frames (else copies, or symlinks)
    annotations/instances_{split}.json      COCO + frame_id, sequence_id, dataset_id on images;
                                            identity_id, size, histology, ... on annotations; "videos"
    convert_report.json                     counts, skipped items by reason, link counts

Everything is parsed and checked before anything is written; annotation files come last, each
written to a temporary name and renamed, so an interrupted run leaves no annotation file that
looks complete.

Default split (no --split-file), deterministic and by video: videos are grouped by site (SSS)
and sorted; within a site the k-th video goes to train if k % 5 in {0, 1, 2}, val if k % 5 == 3,
test if k % 5 == 4 (60/20/20 per site). It is not the paper's split: pass the paper's with
--split-file.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.convert.common import (  # noqa: F401 (ConvertError, Problems, link_file: used by tests)
    CATEGORY,
    LINK_CHUNK,
    LINK_MODES,
    MAX_REPORTED_PROBLEMS,
    ConvertError,
    Problems,
    link_file,
    parse_number,
    read_bytes,
    read_csv_numbered,
    remove_stale_temporaries,
    text_error,
    write_coco_atomic,
    write_json_atomic,
)
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.ingest.staged import StagedFiles
from polyp_ssl.shards.files import NotRegularFileError, check_regular
from polyp_ssl.shards.textio import TextInputError, csv_rows, load_json

log = logging.getLogger(__name__)

DATASET_ID = "realcolon"
MAX_XML_BYTES = 16 << 20
LESION_SIZE_FIELD = "size [mm]"
LESION_FIELDS = ("unique_object_id", "unique_video_name", LESION_SIZE_FIELD, "histology_class")
VIDEO_NUMERIC_FIELDS = ("age", "fps", "num_frames", "num_lesions")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_VIDEO_SPLIT_COLUMNS = ("video", "unique_video_name", "sequence_id", "video_id")


@dataclass
class ConvertConfig:
    raw_dir: Path
    out_root: Path
    split_file: Path | None = None
    link: str = "hardlink"
    on_error: str = "fail"  # fail | skip
    empty_frames: str = "keep"  # keep | drop: images without objects in the output
    workers: int = 8  # threads reading XML files and placing frames (I/O bound)
    follow_symlinks: bool = False  # raw files through links that stay inside raw_dir (never outside)


@dataclass(slots=True)
class VocObject:
    name: str | None
    unique_id: str
    box_id: int | str | None
    bbox: tuple[float, float, float, float]  # x, y, w, h


@dataclass
class VocFrame:
    filename: str
    width: int
    height: int
    objects: list[VocObject]


@dataclass
class Lesion:
    unique_id: str
    video: str | None
    size_mm: float | None
    histology: str | None
    histology_extended: str | None
    site: str | None


# ---------------------------------------------------------------- parsing (pure)


def _text(elem: ET.Element, path: str) -> str | None:
    found = elem.find(path)
    if found is None or found.text is None:
        return None
    return found.text.strip() or None


def _box_id(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def parse_voc_object(obj: ET.Element, source: str | Path, index: int) -> VocObject:
    uid = _text(obj, "unique_id")
    oid = f"object {index}"
    if uid is None:
        raise ConvertError(source, "missing_unique_id", "object has no unique_id", oid, "unique_id")
    oid = f"object {index} ({uid})"
    bnd = obj.find("bndbox")
    if bnd is None:
        raise ConvertError(source, "missing_field", "object has no bndbox", oid, "bndbox")
    xmin, xmax, ymin, ymax = (
        parse_number(_text(bnd, k), source, f"bndbox/{k}", oid) for k in ("xmin", "xmax", "ymin", "ymax")
    )
    if xmax <= xmin or ymax <= ymin:
        raise ConvertError(
            source,
            "zero_area_box",
            f"box xmin {xmin} xmax {xmax} ymin {ymin} ymax {ymax} has no area",
            oid,
            "bndbox",
        )
    return VocObject(
        _text(obj, "name"), uid, _box_id(_text(obj, "box_id")), (xmin, ymin, xmax - xmin, ymax - ymin)
    )


def parse_voc(data: bytes, source: str | Path, problems: Problems | None = None) -> VocFrame:
    """One frame's VOC XML. A bad object is raised, or with `problems` in skip mode left out."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ConvertError(source, "bad_xml", f"not well-formed XML: {exc}") from None
    filename = _text(root, "filename")
    if filename is None:
        raise ConvertError(source, "missing_field", "no filename", field="filename")
    dims = []
    for key in ("width", "height"):
        value = parse_number(_text(root, f"size/{key}"), source, f"size/{key}")
        if value <= 0 or value != int(value):
            raise ConvertError(
                source, "bad_number", f"{value} is not a positive whole number", field=f"size/{key}"
            )
        dims.append(int(value))
    objects = []
    for i, obj in enumerate(root.findall("object")):
        try:
            objects.append(parse_voc_object(obj, source, i))
        except ConvertError as exc:
            if problems is None:
                raise
            problems.handle(exc)
    return VocFrame(filename, dims[0], dims[1], objects)


def read_lesion_info(path: Path, problems: Problems) -> dict[str, Lesion]:
    if not path.exists():  # a FIFO or folder here is refused by name when read
        raise ConvertError(path, "missing_file", "lesion_info.csv is missing (needed for size and histology)")
    _, rows = read_csv_numbered(path, LESION_FIELDS)
    lesions: dict[str, Lesion] = {}
    for line, row in rows:
        uid = row["unique_object_id"]
        rid = f"line {line} ({uid or 'no id'})"
        if not uid:
            problems.handle(
                ConvertError(path, "missing_field", "empty unique_object_id", rid, "unique_object_id")
            )
            continue
        if uid in lesions:
            problems.handle(
                ConvertError(path, "duplicate_id", "unique_object_id listed twice", rid, "unique_object_id")
            )
            continue
        size: float | None = None
        text = row[LESION_SIZE_FIELD]
        if text and text.lower() not in ("nan", "na", "n/a"):
            try:
                size = parse_number(text, path, LESION_SIZE_FIELD, rid)
                if size < 0:
                    raise ConvertError(path, "bad_number", f"negative size {size}", rid, LESION_SIZE_FIELD)
            except ConvertError as exc:
                problems.handle(exc, action="size set to null")
                size = None
        lesions[uid] = Lesion(
            uid,
            row["unique_video_name"] or None,
            size,
            row["histology_class"] or None,
            row.get("histology_extended") or None,
            row.get("site") or None,
        )
    return lesions


def read_video_info(path: Path, problems: Problems) -> dict[str, dict[str, Any]]:
    if not path.exists():
        log.info("%s not found: no per-video records", path)
        return {}
    header, rows = read_csv_numbered(path)
    if "unique_video_name" not in header:
        raise ConvertError(path, "missing_field", "no column 'unique_video_name'", field="unique_video_name")
    videos: dict[str, dict[str, Any]] = {}
    for line, row in rows:
        name = row["unique_video_name"]
        if not name:
            problems.handle(
                ConvertError(
                    path, "missing_field", "empty unique_video_name", f"line {line}", "unique_video_name"
                )
            )
            continue
        record: dict[str, Any] = {}
        for key, value in row.items():
            if key == "unique_video_name":
                continue
            if key in VIDEO_NUMERIC_FIELDS and value:
                try:
                    number = parse_number(value, path, key, name)
                    value = int(number) if number == int(number) else number
                except ConvertError as exc:
                    problems.handle(exc, action="kept as text")
            record[key] = value if value != "" else None
        videos[name] = record
    return videos


def default_split(videos: list[str]) -> dict[str, str]:
    """Per site (the SSS of SSS-VVV), sorted videos dealt 3 train : 1 val : 1 test."""
    by_site: dict[str, list[str]] = {}
    for v in sorted(videos):
        by_site.setdefault(v.split("-", 1)[0], []).append(v)
    pattern = ("train", "train", "train", "val", "test")
    return {v: pattern[k % 5] for vs in by_site.values() for k, v in enumerate(vs)}


PAPER_SPLIT = "paper"


def paper_split(videos: list[str], lesions: dict[str, Lesion]) -> dict[str, str]:
    """The paper's split (from the earlier polyp-counting work): per site, videos 001-008 train,
    009-010 val, 011-015 test, keeping only videos with at least one lesion in lesion_info.csv.
    On the full dataset: 27 train videos (rc27) and 10 + 9 = 19 val + test videos (rc19)."""
    with_lesion = {lesion.video if lesion.video else uid.rsplit("_", 1)[0] for uid, lesion in lesions.items()}
    out: dict[str, str] = {}
    for v in videos:
        m = re.fullmatch(r"(\d{3})-(\d{3})", v)
        if not m or v not in with_lesion:
            continue
        n = int(m.group(2))
        if 1 <= n <= 8:
            out[v] = "train"
        elif n <= 10:
            out[v] = "val"
        elif n <= 15:
            out[v] = "test"
    return out


def read_split_file(path: Path) -> dict[str, str]:
    """video -> split from a CSV (columns video|unique_video_name|sequence_id, split; or two columns
    without header) or a JSON ({video: split}, {split: [videos]} or [{video, split}])."""
    if not path.exists():
        raise ConvertError(path, "missing_file", "split file not found")
    mapping: dict[str, str] = {}

    def put(video: Any, split: Any, where: str) -> None:
        if not isinstance(video, str) or not video.strip():
            raise ConvertError(path, "bad_split_file", f"video {video!r} is not a name", where, "video")
        if not isinstance(split, str) or not _SPLIT_RE.match(split.strip()):
            raise ConvertError(
                path, "bad_split_file", f"split {split!r} must match [A-Za-z0-9_-]+", where, "split"
            )
        video, split = video.strip(), split.strip()
        if mapping.get(video, split) != split:
            raise ConvertError(
                path, "bad_split_file", f"video in two splits ({mapping[video]}, {split})", video
            )
        mapping[video] = split

    if path.suffix.lower() == ".json":
        try:
            obj = load_json(path, "split file")
        except TextInputError as exc:
            raise text_error(exc) from None
        if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()):
            for split, videos in obj.items():
                for v in videos:
                    put(v, split, f"split {split!r}")
        elif isinstance(obj, dict):
            for v, split in obj.items():
                put(v, split, v)
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                if not isinstance(item, dict):
                    raise ConvertError(path, "bad_split_file", "list items must be objects", f"item {i}")
                video = next((item[c] for c in _VIDEO_SPLIT_COLUMNS if c in item), None)
                put(video, item.get("split"), f"item {i}")
        else:
            raise ConvertError(path, "bad_split_file", "expected an object or a list")
    else:
        try:
            rows = [(n, r) for n, r in csv_rows(path, "split file") if any(c.strip() for c in r)]
        except TextInputError as exc:
            raise text_error(exc) from None
        if not rows:
            raise ConvertError(path, "empty_file", "empty split file")
        header = [c.strip().lower() for c in rows[0][1]]
        vcol = next((header.index(c) for c in _VIDEO_SPLIT_COLUMNS if c in header), None)
        if vcol is not None and "split" in header:
            scol, body = header.index("split"), rows[1:]
        else:
            vcol, scol, body = 0, 1, rows
        for line, row in body:
            if len(row) <= max(vcol, scol):
                raise ConvertError(path, "bad_split_file", "too few columns", f"line {line}")
            put(row[vcol], row[scol], f"line {line}")
    if not mapping:
        raise ConvertError(path, "empty_file", "split file lists no video")
    return mapping


# ---------------------------------------------------------------- conversion


def find_videos(raw_dir: Path) -> list[str]:
    if not raw_dir.is_dir():
        raise ConvertError(raw_dir, "missing_file", "raw directory not found")
    videos = sorted(
        p.name[: -len("_annotations")]
        for p in raw_dir.iterdir()
        if p.is_dir() and p.name.endswith("_annotations")
    )
    if not videos:
        raise ConvertError(
            raw_dir, "no_videos", "no SSS-VVV_annotations folders (is this the REAL-Colon root?)"
        )
    return videos


def _xml_sort_key(path: Path) -> tuple[int, str]:
    m = re.search(r"_(\d+)$", path.stem)
    return (int(m.group(1)) if m else -1, path.name)


@dataclass(slots=True)
class _Frame:
    frame_id: int
    filename: str
    width: int
    height: int
    objects: list[tuple[VocObject, Lesion]]


def _check_frame_file(path: Path, xml: Path) -> None:
    """A frame that is a FIFO, device or socket is refused here, by name (stat only: the size is
    the XML's, the pixels are decoded, with their JPEG/PNG check, by ingest)."""
    try:
        check_regular(path, "frame")
    except NotRegularFileError as exc:
        raise ConvertError(xml, "not_regular_file", str(exc), field="filename") from None


def parse_video(
    raw_dir: Path,
    video: str,
    lesions: dict[str, Lesion],
    problems: Problems,
    counts: Counter,
    pool: ThreadPoolExecutor | None = None,
    follow_symlinks: bool = False,
) -> list[_Frame]:
    """The frames of one video, in time order. XML files are read by `pool` (I/O bound on large
    datasets), parsed and checked here, in order, so errors come out deterministically.

    A symbolic link on the way to an XML or a frame (the file, or the video's folder) is refused
    (`ingest.sources.link_problem`): with `follow_symlinks` only links that stay inside raw_dir."""
    ann_dir = raw_dir / f"{video}_annotations"
    frames_dir = raw_dir / f"{video}_frames"
    present = set(os.listdir(frames_dir)) if frames_dir.is_dir() else set()
    if not frames_dir.is_dir():
        log.warning("%s: frames folder missing", frames_dir)
    frame_re = re.compile(rf"^{re.escape(video)}_(\d+)$")
    out: list[_Frame] = []
    xml_names: set[str] = set()
    xmls = sorted(ann_dir.glob("*.xml"), key=_xml_sort_key)
    linked = {
        xml: problem
        for xml in xmls
        if (problem := link_problem(str(raw_dir), f"{ann_dir.name}/{xml.name}", follow_symlinks))
    }
    readable = [x for x in xmls if x not in linked]
    read_xml = functools.partial(read_bytes, limit=MAX_XML_BYTES)  # a frame's VOC file is a few KB
    contents = iter(pool.map(read_xml, readable) if pool is not None else map(read_xml, readable))
    for xml in xmls:
        data = None if xml in linked else next(contents)
        try:
            if xml in linked:
                raise ConvertError(xml, "symlink", linked[xml])
            if isinstance(data, OSError):
                raise ConvertError(xml, "unreadable_file", f"cannot read: {data}")
            frame = parse_voc(data, xml, problems)
            name = frame.filename if Path(frame.filename).suffix else f"{frame.filename}.jpg"
            if Path(name).name != name:
                raise ConvertError(
                    xml, "bad_filename", f"{name!r} is not a plain file name", field="filename"
                )
            m = frame_re.match(Path(name).stem)
            if not m:
                raise ConvertError(
                    xml, "bad_filename", f"{name!r} is not {video}_{{t}}.jpg", field="filename"
                )
            if name not in present:
                raise ConvertError(
                    xml, "missing_frame", f"frame {frames_dir / name} does not exist", field="filename"
                )
            problem = link_problem(str(raw_dir), f"{frames_dir.name}/{name}", follow_symlinks)
            if problem is not None:
                raise ConvertError(xml, "symlink", f"frame {frames_dir / name} {problem}", field="filename")
            _check_frame_file(frames_dir / name, xml)
        except ConvertError as exc:
            problems.handle(exc)
            continue
        xml_names.add(name)
        objects = []
        for i, obj in enumerate(frame.objects):
            lesion = lesions.get(obj.unique_id)
            oid = f"object {i} ({obj.unique_id})"
            try:
                if lesion is None:
                    raise ConvertError(
                        xml,
                        "unknown_unique_id",
                        f"unique_id {obj.unique_id!r} is not in lesion_info.csv (unique_object_id)",
                        oid,
                        "unique_id",
                    )
                if lesion.video is not None and lesion.video != video:
                    raise ConvertError(
                        xml,
                        "video_mismatch",
                        f"lesion_info.csv puts {obj.unique_id!r} in video {lesion.video!r}",
                        oid,
                        "unique_id",
                    )
            except ConvertError as exc:
                problems.handle(exc)
                continue
            objects.append((obj, lesion))
        out.append(_Frame(int(m.group(1)), name, frame.width, frame.height, objects))
    counts["frames_without_xml"] += len({n for n in present if n.lower().endswith(".jpg")} - xml_names)
    kept: dict[int, _Frame] = {}
    for f in out:
        if f.frame_id in kept:
            problems.handle(
                ConvertError(
                    ann_dir,
                    "duplicate_frame",
                    f"frame {f.frame_id} is annotated by two "
                    f"XMLs ({kept[f.frame_id].filename}, {f.filename})",
                    f.filename,
                    "filename",
                )
            )
            continue
        kept[f.frame_id] = f
    return list(kept.values())


def _image_record(image: tuple) -> dict[str, Any]:
    image_id, file_name, width, height, frame_id, video = image
    return {
        "id": image_id,
        "file_name": file_name,
        "width": width,
        "height": height,
        "frame_id": frame_id,
        "sequence_id": video,
        "dataset_id": DATASET_ID,
    }


def _write_coco_atomic(path: Path, images: list[tuple], annotations: list[dict], videos: list[dict]) -> None:
    info = {"description": "REAL-Colon, converted by polyp-ssl convert realcolon", "dataset_id": DATASET_ID}
    write_coco_atomic(path, info, images, annotations, videos, image_record=_image_record)


def convert(cfg: ConvertConfig, progress: bool = False) -> dict[str, Any]:
    """Run the conversion; returns the report (also written to OUT_ROOT/convert_report.json)."""
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="convert") as pool:
        return _convert(cfg, progress, pool)


def _convert(cfg: ConvertConfig, progress: bool, pool: ThreadPoolExecutor) -> dict[str, Any]:
    if cfg.link not in LINK_MODES:
        raise ValueError(f"--link must be one of {LINK_MODES}, got {cfg.link!r}")
    if cfg.on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error must be fail or skip, got {cfg.on_error!r}")
    raw = Path(cfg.raw_dir)
    problems = Problems(cfg.on_error)
    counts: Counter = Counter()
    videos = find_videos(raw)
    for name in ("lesion_info.csv", "video_info.csv"):
        problem = link_problem(str(raw), name, cfg.follow_symlinks)
        if problem is not None:
            raise ConvertError(raw / name, "symlink", problem)
    lesions = read_lesion_info(raw / "lesion_info.csv", problems)
    video_info = read_video_info(raw / "video_info.csv", problems)
    splits, not_in_split, missing_videos = _choose_splits(cfg, raw, videos, lesions)

    iterator: Any = [v for v in videos if v in splits]
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="parse", unit="video")
    parsed: dict[str, list[_Frame]] = {}
    for video in iterator:
        parsed[video] = parse_video(raw, video, lesions, problems, counts, pool, cfg.follow_symlinks)
    per_split, to_link = _build_records(parsed, splits, video_info, cfg.empty_frames, counts)

    out = Path(cfg.out_root)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out / "annotations", {out, images_dir})  # left by a killed run
    links = _place_frames(raw, images_dir, to_link, cfg.link, pool, progress)

    report = {
        "raw_dir": str(raw),
        "out_root": str(out),
        "on_error": cfg.on_error,
        "link": cfg.link,
        "empty_frames": cfg.empty_frames,
        "split_source": str(cfg.split_file)
        if cfg.split_file
        else "default (per site 3 train : 1 val : 1 test)",
        "videos": sum(len(b["videos"]) for b in per_split.values()),
        "splits": {
            s: {"videos": len(b["videos"]), "images": len(b["images"]), "annotations": len(b["annotations"])}
            for s, b in sorted(per_split.items())
        },
        "frames_without_objects": counts["frames_without_objects"],
        "frames_without_xml": counts["frames_without_xml"],
        "videos_not_in_split_file": not_in_split,
        "split_file_videos_not_found": missing_videos,
        "skipped": dict(sorted(problems.counts.items())),
        "n_skipped": sum(problems.counts.values()),
        "problems": problems.items,
        "links": dict(sorted(links.items())),
    }
    # the annotation files and the report put in together, all or none (ingest.staged)
    with StagedFiles(out, point="convert_annotation_written") as staged:
        for split, bucket in sorted(per_split.items()):
            with staged.writing(f"annotations/instances_{split}.json") as path:
                _write_coco_atomic(path, bucket["images"], bucket["annotations"], bucket["videos"])
        with staged.writing("convert_report.json") as path:
            write_json_atomic(path, report)
        staged.commit()
    return report


def _choose_splits(
    cfg: ConvertConfig, raw: Path, videos: list[str], lesions: dict[str, Lesion]
) -> tuple[dict[str, str], list[str], list[str]]:
    """(split of each video, videos left out as not in the split file, videos of the split file
    not found): the paper's split, a split file, or the default per-site split."""
    if cfg.split_file is not None and str(cfg.split_file) == PAPER_SPLIT:
        splits = paper_split(videos, lesions)
    else:
        splits = read_split_file(Path(cfg.split_file)) if cfg.split_file else default_split(videos)
    not_in_split = [v for v in videos if v not in splits]
    if not_in_split:
        log.warning(
            "%d videos are not in the split file and are left out: %s", len(not_in_split), not_in_split
        )
    missing_videos = sorted(set(splits) - set(videos))
    if missing_videos:
        log.warning("%d videos of the split file are not in %s: %s", len(missing_videos), raw, missing_videos)
    return splits, not_in_split, missing_videos


def _build_records(
    parsed: dict[str, list[_Frame]],
    splits: dict[str, str],
    video_info: dict[str, dict[str, Any]],
    empty_frames: str,
    counts: Counter,
) -> tuple[dict[str, dict[str, list]], list[tuple[str, str]]]:
    """(COCO records per split, the frames to place as (video, file name)). Ids: images and
    annotations numbered from 1 over videos (sorted) and frames (by t). `parsed` is emptied as it
    goes: one copy of the frames in memory, not two."""
    per_split: dict[str, dict[str, list]] = {}
    image_id = annotation_id = 0
    to_link: list[tuple[str, str]] = []  # (video, file name)
    for video, frames in list(parsed.items()):
        del parsed[video]  # keep one copy of the frames in memory, not two
        split = splits[video]
        bucket = per_split.setdefault(split, {"images": [], "annotations": [], "videos": []})
        record = {"sequence_id": video, "dataset_id": DATASET_ID, "split": split}
        record.update(video_info.get(video, {}))
        bucket["videos"].append(record)
        for frame in sorted(frames, key=lambda f: f.frame_id):
            if not frame.objects:
                counts["frames_without_objects"] += 1
                if empty_frames == "drop":
                    continue
            image_id += 1
            # a tuple, not a dict: millions of frames on the full dataset (see _image_record)
            bucket["images"].append(
                (image_id, frame.filename, frame.width, frame.height, frame.frame_id, video)
            )
            to_link.append((video, frame.filename))
            for obj, lesion in frame.objects:
                annotation_id += 1
                bucket["annotations"].append(_annotation_record(annotation_id, image_id, obj, lesion))
    return per_split, to_link


def _annotation_record(annotation_id: int, image_id: int, obj: VocObject, lesion: Lesion) -> dict[str, Any]:
    x, y, w, h = obj.bbox
    return {
        "id": annotation_id,
        "image_id": image_id,
        "bbox": [x, y, w, h],
        "area": w * h,
        "iscrowd": 0,
        "category_id": CATEGORY["id"],
        "identity_id": obj.unique_id,
        "box_id": obj.box_id,
        "lesion": obj.name,
        "size": lesion.size_mm,
        "histology": lesion.histology,
        "histology_extended": lesion.histology_extended,
        "site": lesion.site,
    }


def _place_frames(
    raw: Path,
    images_dir: Path,
    to_link: list[tuple[str, str]],
    link: str,
    pool: ThreadPoolExecutor,
    progress: bool,
) -> Counter:
    """Place each frame in OUT/images (link or copy); returns the count per way placed."""
    links: Counter = Counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(to_link), desc="images", unit="frame")

    def place(item: tuple[str, str]) -> str:
        video, name = item
        return link_file(raw / f"{video}_frames" / name, images_dir / name, link)

    for start in range(0, len(to_link), LINK_CHUNK):  # chunks: a future per frame of a chunk, not of all
        chunk = to_link[start : start + LINK_CHUNK]
        links.update(pool.map(place, chunk))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return links
