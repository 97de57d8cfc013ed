"""A detector and tracker's output in the MOTChallenge format -> the seed's layout.

Input:
    RAW/SEQ/img1/000001.jpg ...     a sequence as a MOTChallenge folder (image folder and extension
    RAW/SEQ/seqinfo.ini              from seqinfo.ini's imDir / imExt when given); or RAW/SPLIT/SEQ/
    RAW/SEQ/gt/gt.txt (optional)     (MOTChallenge's train/ and test/): SPLIT is the split
    TRACKS/SEQ.txt                   the tracker's output for SEQ (--tracks)
    VIDEOS/SEQ.mp4 (--videos-dir)    or the sequences as videos: frame f is video index f - 1

Every box file is `frame,id,bb_left,bb_top,bb_width,bb_height,conf,x,y,z` (frames from 1; 6 to
10 fields, conf 1 when absent). A frame's file name carries its number: frame_id = the MOT frame.

Identities (written in the annotation files' `info.identities`, the report, and by ingest in
the catalog manifest, `shards.schema.identity_kind`):
- with --tracks: every track is its own identity `{SEQ}_t{id}`, of kind "tracks": a tracker's
  track, not a polyp (a polyp that leaves the view and returns has several). A track whose mean
  confidence is below --min-conf, or with fewer than --min-track-frames boxes, is dropped and
  counted (report `tracks.dropped`, the catalog's errors table). Training with the temporal
  samplers works on such a root; what needs polyp identities (multipos, retrieval, re-id,
  counting, probes) refuses it. A track with a gap keeps its identity and becomes one tracklet
  per unbroken run (ingest's tracklet rule). gt.txt files are not read (counted).
- without --tracks: the sequences' gt/gt.txt are the boxes, their ids polyp identities
  `{SEQ}_{id}` ("polyps"): the annotated twin of the same videos, on which evaluation works.
  Rows with conf 0 (MOTChallenge: not to be considered) are dropped and counted.
A malformed line is named by file and line (`tracks/SEQ.txt: line 7: field 'bb_width': ...`).
Only frames with a kept box are written (linked from img1, or decoded from the video).
Bounds: a line of at most MAX_LINE bytes, at most MAX_BOXES_PER_FILE boxes per file, a
seqinfo.ini of at most MAX_SEQINFO_BYTES; names from the data (folders, imDir) are one plain
path component, so nothing escapes RAW or OUT.
"""

from __future__ import annotations

import configparser
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.convert.common import (
    REPORT_NAME,
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
    natural_key,
    read_bytes,
    text_error,
    write_dataset,
    write_decoded_frames,
)
from polyp_ssl.ingest.media import MediaTypeError, open_video_reader
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.shards.ids import id_problem
from polyp_ssl.shards.schema import IDENTITY_KINDS, identity_kind
from polyp_ssl.shards.textio import TextInputError, load_json, read_lines

log = logging.getLogger(__name__)

MAX_LINE = 4096
MAX_BOXES_PER_FILE = 2_000_000  # ~ a day of 25 fps video with a dozen tracks on every frame
MAX_SEQINFO_BYTES = 64 << 10
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
FIELDS = ("frame", "id", "bb_left", "bb_top", "bb_width", "bb_height", "conf", "x", "y", "z")
TRACK_RULE = "one identity per tracker track ({SEQ}_t{id}): a track, not a polyp"
GT_RULE = "one identity per gt.txt id ({SEQ}_{id}): a polyp"


@dataclass
class MotConfig:
    raw_dir: Path
    out_root: Path
    tracks_dir: Path | None = None  # None: the sequences' gt/gt.txt
    videos_dir: Path | None = None
    min_conf: float = 0.0
    min_track_frames: int = 8
    split: str = "all"
    dataset_id: str = "mot"
    link: str = "hardlink"
    on_error: str = "fail"
    workers: int = 8
    follow_symlinks: bool = False


@dataclass
class Sequence:
    name: str
    split: str
    folder: Path | None  # RAW/[SPLIT/]SEQ, None for a video without one
    video: Path | None = None


@dataclass(slots=True)
class Row:
    frame: int
    track: int
    box: tuple[float, float, float, float]
    conf: float
    where: str


@dataclass
class _Run:
    cfg: MotConfig
    problems: Problems
    tally: Tally = field(default_factory=Tally)
    tracks: Counter = field(default_factory=Counter)  # seen, kept, dropped_<reason>

    @property
    def kind(self) -> str:
        return "tracks" if self.cfg.tracks_dir is not None else "polyps"


# ---------------------------------------------------------------- parsing (pure)


def _value(text: str, source: Path, where: str, name: str, whole: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConvertError(
            source, "bad_number", f"{text.strip()[:40]!r} is not a number", where, name
        ) from None
    if not math.isfinite(value) or abs(value) >= 2**53:
        raise ConvertError(source, "bad_number", f"{text.strip()[:40]!r} is not a finite number", where, name)
    if whole and value != int(value):
        raise ConvertError(source, "bad_number", f"{text.strip()!r} is not a whole number", where, name)
    return value


def parse_line(text: str, source: Path, lineno: int) -> Row:
    """One box line; ConvertError naming the file, the line and the field otherwise."""
    where = f"line {lineno}"
    parts = text.split(",")
    if not 6 <= len(parts) <= len(FIELDS):
        raise ConvertError(
            source, "bad_line", f"{len(parts)} fields, expected 6 to 10 ({','.join(FIELDS)})", where
        )
    frame = _value(parts[0], source, where, "frame", whole=True)
    if frame < 1:
        raise ConvertError(source, "bad_number", f"frame {int(frame)} (frames count from 1)", where, "frame")
    track = _value(parts[1], source, where, "id", whole=True)
    if track < 0:
        raise ConvertError(source, "bad_number", f"negative id {int(track)}", where, "id")
    x, y, w, h = (_value(parts[i], source, where, FIELDS[i]) for i in range(2, 6))
    conf = _value(parts[6], source, where, "conf") if len(parts) > 6 and parts[6].strip() else 1.0
    return Row(int(frame), int(track), (x, y, w, h), conf, where)


def parse_box_file(path: Path, problems: Problems) -> dict[int, list[Row]]:
    """The rows of one MOT box file by id, in frame order; read line by line (MAX_LINE bytes a
    line, MAX_BOXES_PER_FILE rows). A malformed line: ConvertError naming file and line, or with
    --on-error skip the line is left out and counted."""
    by_id: dict[int, list[Row]] = {}
    first: dict[tuple[int, int], int] = {}
    n = 0
    try:
        for lineno, text in read_lines(path, "box file", max_line=MAX_LINE):
            if not text.strip():
                continue
            n += 1
            if n > MAX_BOXES_PER_FILE:
                raise ConvertError(
                    path,
                    "too_many_boxes",
                    f"more than {MAX_BOXES_PER_FILE:,} boxes in one file",
                    f"line {lineno}",
                )
            try:
                row = parse_line(text, path, lineno)
                key = (row.frame, row.track)
                if key in first:
                    raise ConvertError(
                        path,
                        "duplicate_box",
                        f"id {row.track} has a second box on frame {row.frame} (first on line {first[key]})",
                        f"line {lineno}",
                        "id",
                    )
            except ConvertError as exc:
                problems.handle(exc)
                continue
            first[key] = lineno
            by_id.setdefault(row.track, []).append(row)
    except TextInputError as exc:
        raise text_error(exc) from None
    for rows in by_id.values():
        rows.sort(key=lambda r: r.frame)
    return by_id


def parse_seqinfo(path: Path) -> dict[str, str]:
    """The [Sequence] section of a seqinfo.ini (keys lower-cased); {} when there is none."""
    data = read_bytes(path, MAX_SEQINFO_BYTES)
    if isinstance(data, FileNotFoundError):
        return {}
    if isinstance(data, OSError):
        raise ConvertError(path, "unreadable_file", f"cannot read: {data}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(data.decode("utf-8-sig"), source=str(path))
    except (UnicodeDecodeError, configparser.Error) as exc:
        raise ConvertError(
            path, "bad_seqinfo", f"not a seqinfo.ini: {str(exc).splitlines()[0][:120]}"
        ) from None
    return {k.lower(): v.strip() for k, v in parser["Sequence"].items()} if "Sequence" in parser else {}


# ---------------------------------------------------------------- sequences


def _is_sequence(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("img1", "seqinfo.ini", "gt"))


def find_sequences(cfg: MotConfig) -> list[Sequence]:
    """RAW/SEQ (split --split) and RAW/SPLIT/SEQ folders; with --videos-dir, one sequence per
    video (its split from the folder of the same name, when there is one)."""
    raw = Path(cfg.raw_dir)
    if not raw.is_dir():
        raise ConvertError(raw, "missing_file", "raw directory not found")
    skip = {p.resolve() for p in (cfg.tracks_dir, cfg.videos_dir) if p is not None}
    found: dict[str, Sequence] = {}

    def add(name: str, split: str, folder: Path) -> None:
        problem = id_problem(name)
        if problem is not None:
            raise ConvertError(folder, "bad_id", f"sequence {name!r} {problem}", field="sequence_id")
        if name in found:
            raise ConvertError(
                folder, "duplicate_sequence", f"sequence {name!r} also in {found[name].folder}"
            )
        found[name] = Sequence(name, split, folder)

    for entry in sorted(os.scandir(raw), key=lambda e: natural_key(e.name)):
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False) or path.resolve() in skip:
            continue
        if _is_sequence(path):
            add(entry.name, cfg.split, path)
            continue
        subs = [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        seqs = sorted((s for s in subs if _is_sequence(s)), key=lambda s: natural_key(s.name))
        if seqs and not SPLIT_RE.match(entry.name):
            raise ConvertError(path, "bad_split", f"split folder {entry.name!r} must match [A-Za-z0-9_-]+")
        for s in seqs:
            add(s.name, entry.name, s)
    if cfg.videos_dir is None:
        if not found:
            raise ConvertError(raw, "no_videos", "no sequence folders (SEQ/img1, SEQ/seqinfo.ini) in it")
        return list(found.values())
    videos = Path(cfg.videos_dir)
    if not videos.is_dir():
        raise ConvertError(videos, "missing_file", "--videos-dir not found")
    out = []
    for name in sorted(os.listdir(videos), key=natural_key):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in VIDEO_EXTS:
            continue
        problem = link_problem(str(videos), name, cfg.follow_symlinks)
        if problem is not None:
            raise ConvertError(videos / name, "symlink", problem)
        seq = found.get(stem) or Sequence(stem, cfg.split, None)
        if id_problem(stem) is not None:
            raise ConvertError(
                videos / name, "bad_id", f"sequence {stem!r} {id_problem(stem)}", field="sequence_id"
            )
        seq.video = videos / name
        out.append(seq)
    if not out:
        raise ConvertError(videos, "no_videos", f"no videos ({', '.join(VIDEO_EXTS)}) in it")
    return out


def _box_file(run: _Run, seq: Sequence) -> Path | None:
    if run.cfg.tracks_dir is not None:
        return Path(run.cfg.tracks_dir) / f"{seq.name}.txt"
    return None if seq.folder is None else _raw_file(run, seq.folder / "gt" / "gt.txt")


def _raw_file(run: _Run, path: Path) -> Path:
    """`path` (inside RAW) when no symbolic link on the way to it is refused (ingest.sources)."""
    problem = link_problem(
        str(run.cfg.raw_dir), os.path.relpath(path, run.cfg.raw_dir), run.cfg.follow_symlinks
    )
    if problem is not None:
        raise ConvertError(path, "symlink", problem)
    return path


def _frames_of_folder(run: _Run, seq: Sequence) -> dict[int, Path]:
    """frame number -> image file of a sequence folder (image folder and extension from
    seqinfo.ini when it names them)."""
    assert seq.folder is not None
    info = parse_seqinfo(_raw_file(run, seq.folder / "seqinfo.ini"))
    im_dir = info.get("imdir", "img1")
    if id_problem(im_dir) is not None:
        detail = f"imDir {im_dir!r} {id_problem(im_dir)}"
        raise ConvertError(seq.folder / "seqinfo.ini", "unsafe_path", detail, field="imDir")
    folder = seq.folder / im_dir
    rel = os.path.relpath(folder, run.cfg.raw_dir)
    problem = link_problem(str(run.cfg.raw_dir), rel, run.cfg.follow_symlinks)
    if problem is not None:
        raise ConvertError(folder, "symlink", problem)
    if not folder.is_dir():
        raise ConvertError(
            folder, "missing_frames", "no image folder (give --videos-dir for sequences as videos)"
        )
    ext = info.get("imext", "").lower()
    frames: dict[int, Path] = {}
    for name in os.listdir(folder):
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in IMAGE_EXTS or (ext and suffix != ext):
            continue
        number = frame_number(name)
        if number is None:
            run.tally.files["images_without_number"] += 1
            continue
        if number in frames:
            raise ConvertError(
                folder / name, "duplicate_frame", f"frame {number} also in {frames[number].name}"
            )
        frames[number] = folder / name
    run.tally.files["images_seen"] += len(frames)
    return frames


# ---------------------------------------------------------------- conversion


def convert_mot(cfg: MotConfig, progress: bool = False) -> dict[str, Any]:
    check_options(cfg.link, cfg.on_error)
    if not SPLIT_RE.match(cfg.split):
        raise ValueError(f"--split must match [A-Za-z0-9_-]+, got {cfg.split!r}")
    if id_problem(cfg.dataset_id) is not None:
        raise ValueError(f"--dataset-id {cfg.dataset_id!r} {id_problem(cfg.dataset_id)}")
    if cfg.min_track_frames < 1 or not math.isfinite(cfg.min_conf):
        raise ValueError("--min-track-frames must be >= 1 and --min-conf a number")
    if cfg.tracks_dir is not None and not Path(cfg.tracks_dir).is_dir():
        raise ValueError(f"--tracks {cfg.tracks_dir}: not a folder")
    run = _Run(cfg, Problems(cfg.on_error))
    sequences = find_sequences(cfg)
    splits: dict[str, list[Frame]] = {}
    decoded: list[tuple[Path, int, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="convert") as pool:
        for seq in sequences:
            try:
                frames, todo = _sequence(run, seq, pool)
            except ConvertError as exc:
                run.problems.handle(exc)
                continue
            splits.setdefault(seq.split, []).extend(frames)
            decoded += todo
        if decoded:
            write_decoded_frames(Path(cfg.out_root) / "images", decoded, "video file", first_index=1)
            run.tally.files["frames_decoded"] = len(decoded)
        rule = TRACK_RULE if run.kind == "tracks" else GT_RULE
        tracks = {
            "seen": run.tracks["seen"],
            "kept": run.tracks["kept"],
            "dropped": {
                k[len("dropped_") :]: v for k, v in sorted(run.tracks.items()) if k.startswith("dropped_")
            },
        }
        return write_dataset(
            Path(cfg.out_root),
            "mot",
            cfg.dataset_id,
            splits,
            run.tally,
            run.problems,
            cfg.link,
            pool,
            info={"identities": run.kind, "identity_rule": rule},
            report_extra={
                "raw_dir": str(cfg.raw_dir),
                "identities": run.kind,
                "identity_rule": rule,
                "tracks": tracks,
                "min_conf": cfg.min_conf,
                "min_track_frames": cfg.min_track_frames,
                "frames_from": "videos" if cfg.videos_dir is not None else "folders",
            },
            progress=progress,
        )


def _sequence(run: _Run, seq: Sequence, pool: ThreadPoolExecutor) -> tuple[list[Frame], list]:
    """One sequence's frames (with their kept boxes) and the frames to decode from its video."""
    box_file = _box_file(run, seq)
    if run.kind == "tracks" and seq.folder is not None and (seq.folder / "gt" / "gt.txt").is_file():
        run.tally.other["gt_files_not_used"] += 1
    if box_file is None or not box_file.is_file():
        what = "tracks file" if run.kind == "tracks" else "gt/gt.txt (or give --tracks DIR)"
        raise ConvertError(
            box_file or seq.video or seq.name, "missing_file", f"no {what} for sequence {seq.name}"
        )
    run.tally.files["box_files"] += 1
    by_id = parse_box_file(box_file, run.problems)
    boxes = _kept_rows(run, by_id, box_file)
    if seq.video is not None:
        sizes, n_frames = _video_size(seq.video)
        image_of: dict[int, Path] = {}
    else:
        image_of = _frames_of_folder(run, seq)
        n_frames = None
    frames: list[Frame] = []
    todo: list[tuple[Path, int, str]] = []
    numbers = sorted(boxes)
    if seq.video is None:
        present = [f for f in numbers if f in image_of]
        got = dict(zip(present, pool.map(lambda f: _size_or_error(run, image_of[f]), present), strict=True))
    for number in numbers:
        rows = boxes[number]
        try:
            if seq.video is not None:
                if number > n_frames:  # type: ignore[operator]
                    detail = f"frame {number} is beyond the video's {n_frames} frames ({seq.video})"
                    raise ConvertError(box_file, "missing_frame", detail, rows[0][1].where, "frame")
                size: Any = sizes
            else:
                if number not in image_of:
                    detail = f"no image of frame {number} in {seq.folder}"
                    raise ConvertError(box_file, "missing_frame", detail, rows[0][1].where, "frame")
                size = got[number]
                if isinstance(size, ConvertError):
                    raise size
                if isinstance(size, Exception):
                    raise ConvertError(image_of[number], "unreadable_file", f"not a readable image: {size}")
        except ConvertError as exc:
            run.problems.handle(exc)
            run.tally.boxes["seen"] += len(rows)
            run.tally.dropped["frame_missing"] += len(rows)
            continue
        w, h = size
        kept = []
        for identity, row in rows:
            run.tally.boxes["seen"] += 1
            x, y, bw, bh = row.box
            bbox, how = clamp_corners(x, y, x + bw, y + bh, w, h)
            if bbox is None:
                run.tally.dropped[how] += 1
                continue
            run.tally.boxes["clamped"] += how == "clamped"
            kept.append(Box(bbox, identity, extra={"track_conf": round(row.conf, 4)}))
        run.tally.boxes["converted"] += len(kept)
        if not kept:
            continue
        if seq.video is not None:
            name = f"{seq.name}/{number:06d}.jpg"
            todo.append((seq.video, number, name))
            frames.append(Frame(None, name, number, seq.name, w, h, kept))
        else:
            src = image_of[number]
            name = f"{seq.name}/{number:06d}{src.suffix.lower()}"
            frames.append(Frame(src, name, number, seq.name, w, h, kept))
    return frames, todo


def _kept_rows(run: _Run, by_id: dict[int, list[Row]], source: Path) -> dict[int, list[tuple[str, Row]]]:
    """Rows by frame, each with its identity, after the track filters (tracks) or the ignore flag
    (gt: conf 0); what is dropped is counted (tracks and boxes)."""
    cfg, seq = run.cfg, source.stem if run.kind == "tracks" else source.parent.parent.name
    out: dict[int, list[tuple[str, Row]]] = {}
    for track, rows in sorted(by_id.items()):
        if run.kind == "polyps":
            ignored = [r for r in rows if r.conf == 0]
            if ignored:
                run.tally.boxes["seen"] += len(ignored)
                run.tally.dropped["gt_ignored"] += len(ignored)
            rows = [r for r in rows if r.conf != 0]
            identity = f"{seq}_{track}"
        else:
            run.tracks["seen"] += 1
            reason = None
            if len(rows) < cfg.min_track_frames:
                reason = "track_too_short"
            elif sum(r.conf for r in rows) / len(rows) < cfg.min_conf:
                reason = "track_low_confidence"
            if reason is not None:
                run.tracks[f"dropped_{reason[len('track_') :]}"] += 1
                run.tally.other[f"tracks_dropped_{reason[len('track_') :]}"] += 1
                run.tally.boxes["seen"] += len(rows)
                run.tally.dropped[reason] += len(rows)
                continue
            run.tracks["kept"] += 1
            identity = f"{seq}_t{track}"
        for r in rows:
            out.setdefault(r.frame, []).append((identity, r))
    return out


def _size_or_error(run: _Run, path: Path) -> tuple[int, int] | Exception:
    """(width, height) of a frame, or why not: a refused link (never opened) or an unreadable image."""
    try:
        _raw_file(run, path)
        return image_size(path)
    except (OSError, ValueError) as exc:
        return exc


def _video_size(path: Path) -> tuple[tuple[int, int], int]:
    """((width, height), frame count) of a video; ConvertError naming it when it is not one."""
    try:
        vr = open_video_reader(path, "video file", num_threads=1)
        h, w = vr[0].shape[:2]
        n = len(vr)
        del vr
    except (OSError, MediaTypeError) as exc:
        raise ConvertError(path, "unreadable_file", str(exc)) from None
    except Exception as exc:  # decord raises its own DECORDError for unreadable files
        raise ConvertError(path, "unreadable_file", f"not a readable video: {exc}") from None
    return (int(w), int(h)), int(n)


def root_identities(root: str | Path) -> str:
    """The identity kind of a dataset root, from its convert report: "tracks" when a `convert mot
    --tracks` made it (or made a source of a merge), "polyps" otherwise (every other root, and a
    root without a readable report). Ingest writes it in the catalog manifest."""
    path = Path(root) / REPORT_NAME
    if not path.is_file():
        return "polyps"
    try:
        report = load_json(path, "convert report")
    except (OSError, ValueError) as exc:
        log.warning("%s: not read (%s); identities taken as polyps", path, exc)
        return "polyps"
    return _report_identities(report, 0)


def _report_identities(report: Any, depth: int) -> str:
    if not isinstance(report, dict) or depth > 8:
        return "polyps"
    kinds = {identity_kind(report)} if report.get("identities") in IDENTITY_KINDS else set()
    for src in report.get("sources") or []:
        if isinstance(src, dict):
            kinds.add(_report_identities(src.get("report"), depth + 1))
    return "tracks" if "tracks" in kinds else "polyps"
