"""Any dataset as one table of boxes (CSV or Parquet) -> the seed's layout.

This is how a hospital, or a dataset without a converter of its own (PolypSize), brings its data.
Header (one row per box; a frame without a polyp is a row with x, y, w, h and identity empty):

    video,frame,image_path,x,y,w,h,identity,size_mm,histology
    site1-007,0,frames/site1-007/0000.jpg,,,,,,,
    site1-007,1,frames/site1-007/0001.jpg,120,88,64,52,site1-007_p1,4.5,Tubular Adenoma
    site1-007,1,frames/site1-007/0001.jpg,300,40,30,30,site1-007_p2,,

- `video` (sequence id), `frame` (whole number >= 0: the frame's index in the video; frames are
  ordered by it), `x, y, w, h` (pixels, top-left corner and size), `identity` (the polyp; one
  polyp belongs to one video), `size_mm` and `histology` (may be empty; histology as the
  dataset writes it, mapped at probe time);
- `image_path`: the frame's image, relative to the table's folder (absolute paths and `..` are
  refused); or instead a `video_path` column: the frame is decoded from that video file (decord,
  frame index = `frame`) and written as a JPEG;
- an optional `split` column (default: every row in `--split`, `all`);
- any other column is kept on each annotation as metadata (text).
Boxes are clamped to the frame (counted); a box without area inside it is dropped (counted).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    image_size,
    read_csv_numbered,
    write_dataset,
    write_decoded_frames,
)
from polyp_ssl.ingest.media import MediaTypeError, open_video_reader
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.shards.files import check_regular, open_regular
from polyp_ssl.shards.ids import id_problem, text_problem

log = logging.getLogger(__name__)

REQUIRED = ("video", "frame", "x", "y", "w", "h", "identity", "size_mm", "histology")
KNOWN = (*REQUIRED, "image_path", "video_path", "split")
# One table's bounds (rows of CSV or Parquet, Parquet columns and uncompressed bytes): a million
# boxes make about a gigabyte of Python rows; a larger dataset is several tables, merged.
MAX_TABLE_ROWS = 1_000_000
MAX_TABLE_COLUMNS = 256
MAX_TABLE_BYTES = 512 << 20


@dataclass
class TableConfig:
    table: Path
    out_root: Path
    dataset_id: str | None = None  # default: the table's file name without suffix
    split: str = "all"
    link: str = "hardlink"
    on_error: str = "fail"
    workers: int = 8
    follow_symlinks: bool = False


@dataclass
class _Row:
    where: str  # "line 7" (CSV) or "row 5" (Parquet)
    values: dict[str, str]


def _check_parquet_size(path: Path, meta: Any) -> None:
    """Refuse a Parquet table whose metadata declares more rows, columns or (uncompressed) bytes
    than a table may hold, before any of it is read: a few hundred KiB of well-compressed Parquet
    can declare millions of rows, gigabytes once they are Python rows."""
    nbytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    sizes = (
        (meta.num_rows, MAX_TABLE_ROWS, "rows"),
        (meta.num_columns, MAX_TABLE_COLUMNS, "columns"),
        (nbytes, MAX_TABLE_BYTES, "bytes"),
    )
    for n, limit, what in sizes:
        if n > limit:
            raise ConvertError(
                path,
                "table_too_large",
                f"the Parquet metadata declares {n:,} {what}, more than the {limit:,} one table may hold "
                "(split it into several tables, convert each and `polyp-ssl convert merge` them)",
            )


def _parquet_text(value: Any, path: Path, where: str, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    problem = text_problem(text)
    if problem is not None:
        raise ConvertError(path, "control_character", f"{text[:80]!r} {problem}", where, column)
    return text


def _read_parquet(path: Path) -> tuple[list[str], list[_Row]]:
    """Header and rows of a Parquet table, its declared size checked against the bounds first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_regular(path, "table") as f:
            pf = pq.ParquetFile(f)
            _check_parquet_size(path, pf.metadata)
            table = pf.read()
    except (OSError, pa.ArrowException) as exc:
        raise ConvertError(path, "bad_parquet", f"unreadable Parquet: {exc}") from None
    header = list(table.column_names)
    rows = []
    for i, r in enumerate(table.to_pylist()):
        where = f"row {i}"
        rows.append(_Row(where, {k: _parquet_text(v, path, where, k) for k, v in r.items()}))
    return header, rows


def read_table(path: Path) -> tuple[list[str], list[_Row]]:
    if not path.exists():
        raise ConvertError(path, "missing_file", "table not found")
    check_regular(path, "table")  # a FIFO or device is refused by name, never read
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path)
    header, dict_rows = read_csv_numbered(path, max_rows=MAX_TABLE_ROWS)
    return header, [_Row(f"line {i}", r) for i, r in dict_rows]


def _number(row: _Row, key: str, source: Path, whole: bool = False) -> float | None:
    text = row.values.get(key, "")
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConvertError(source, "bad_number", f"{text!r} is not a number", row.where, key) from None
    if not math.isfinite(value) or abs(value) >= 2**53:
        raise ConvertError(source, "bad_number", f"{text!r} is not a finite number", row.where, key)
    if whole and (value != int(value) or value < 0):
        raise ConvertError(source, "bad_number", f"{text!r} is not a whole number >= 0", row.where, key)
    return value


def _rel_path(row: _Row, key: str, source: Path, base: Path, follow: bool) -> Path:
    rel = row.values.get(key, "")
    if not rel:
        raise ConvertError(source, "missing_field", "empty path", row.where, key)
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":") or ".." in parts or "\0" in rel:
        raise ConvertError(source, "unsafe_path", f"{rel!r} leaves the table's folder", row.where, key)
    problem = link_problem(str(base), rel, follow)
    if problem is not None:
        raise ConvertError(source, "symlink", f"{rel!r} {problem}", row.where, key)
    path = base / rel
    if not path.exists():  # a FIFO or device is refused by name when opened
        raise ConvertError(source, "missing_frame", f"{path} does not exist", row.where, key)
    return path


def convert_table(cfg: TableConfig, progress: bool = False) -> dict[str, Any]:
    check_options(cfg.link, cfg.on_error)
    source = Path(cfg.table)
    dataset_id = cfg.dataset_id or source.stem
    problem = id_problem(dataset_id)
    if problem is not None:
        raise ValueError(f"--dataset-id {dataset_id!r} {problem}")
    if not SPLIT_RE.match(cfg.split):
        raise ValueError(f"--split must match [A-Za-z0-9_-]+, got {cfg.split!r}")
    header, rows = read_table(source)
    run = _TableRun(cfg, source, _frames_column(header, source), [c for c in header if c not in KNOWN])
    run.tally.files["rows"] = len(rows)
    frames = run.group_rows(rows)  # nothing is read or written yet
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="convert") as pool:
        keys = sorted(frames)
        if run.mode == "image_path":
            sizes = list(pool.map(lambda k: _size_or_error(frames[k]["path"]), keys))
        else:
            sizes = _video_sizes(frames, keys, source)
        out, decoded = run.build_frames(frames, keys, sizes)
        if decoded:
            write_decoded_frames(Path(cfg.out_root) / "images", decoded, "video_path file")
            run.tally.files["frames_decoded"] = len(decoded)
        run.tally.files["images"] = len(keys)
        return write_dataset(
            Path(cfg.out_root),
            "table",
            dataset_id,
            out,
            run.tally,
            run.problems,
            cfg.link,
            pool,
            info={"table": source.name, "metadata_columns": run.extra_cols},
            report_extra={"table": str(source), "metadata_columns": run.extra_cols, "frames_from": run.mode},
            progress=progress,
        )


def _frames_column(header: list[str], source: Path) -> str:
    """ "image_path" or "video_path": where the table's frames come from; ConvertError for a
    missing required column."""
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ConvertError(
            source, "missing_field", f"no column {missing[0]!r} (header: {header})", field=missing[0]
        )
    mode = "image_path" if "image_path" in header else "video_path" if "video_path" in header else None
    if mode is None:
        raise ConvertError(
            source, "missing_field", "no column 'image_path' (or 'video_path')", field="image_path"
        )
    if "image_path" in header and "video_path" in header:
        raise ConvertError(source, "bad_table", "give image_path or video_path, not both", field="video_path")
    return mode


@dataclass
class _TableRun:
    """One table's conversion: its options, where frames come from, and what was counted."""

    cfg: TableConfig
    source: Path
    mode: str  # "image_path" or "video_path"
    extra_cols: list[str]
    problems: Problems = field(init=False)
    base: Path = field(init=False)  # relative paths in the table are relative to its folder
    tally: Tally = field(default_factory=Tally)
    owner: dict[str, str] = field(default_factory=dict)  # identity -> video

    def __post_init__(self) -> None:
        self.problems = Problems(self.cfg.on_error)
        self.base = self.source.resolve().parent

    def group_rows(self, rows: list[_Row]) -> dict[tuple[str, int], dict[str, Any]]:
        """The rows grouped by (video, frame), each checked; a bad row is handled by the error
        policy and its box counted as dropped."""
        frames: dict[tuple[str, int], dict[str, Any]] = {}
        for row in rows:
            try:
                self._add_row(row, frames)
            except ConvertError as exc:
                self.problems.handle(exc)
                if row.values.get("x"):
                    self.tally.boxes["seen"] += 1
                    self.tally.dropped["bad_row"] += 1
        splits_of_video: dict[str, set[str]] = {}
        for (video, _), e in frames.items():
            splits_of_video.setdefault(video, set()).add(e["split"])
        for video, ss in splits_of_video.items():
            if len(ss) > 1:
                raise ConvertError(
                    self.source,
                    "bad_split",
                    f"video {video!r} has frames in several splits {sorted(ss)}",
                    field="split",
                )
        return frames

    def _add_row(self, row: _Row, frames: dict[tuple[str, int], dict[str, Any]]) -> None:
        source, mode, v = self.source, self.mode, row.values
        video = v.get("video", "")
        problem = id_problem(video)
        if problem is not None:
            raise ConvertError(source, "bad_id", f"video {video!r} {problem}", row.where, "video")
        if v.get("frame", "") == "":
            raise ConvertError(source, "missing_field", "empty frame", row.where, "frame")
        frame = int(_number(row, "frame", source, whole=True))  # type: ignore[arg-type]
        split = v.get("split") or self.cfg.split
        if not SPLIT_RE.match(split):
            raise ConvertError(
                source, "bad_split", f"split {split!r} must match [A-Za-z0-9_-]+", row.where, "split"
            )
        path = _rel_path(row, mode, source, self.base, self.cfg.follow_symlinks)
        coords = [_number(row, k, source) for k in ("x", "y", "w", "h")]
        identity = v.get("identity", "")
        has_box = any(c is not None for c in coords) or identity != ""
        if has_box:
            self._check_box(row, video, coords, identity)
        size = _number(row, "size_mm", source)
        if size is not None and size < 0:
            raise ConvertError(source, "bad_number", f"negative size {size}", row.where, "size_mm")
        entry = frames.setdefault(
            (video, frame), {"path": path, "split": split, "boxes": [], "where": row.where}
        )
        if entry["path"] != path and mode == "image_path":
            raise ConvertError(
                source,
                "bad_table",
                f"frame {frame} of {video} has two images ({entry['path']}, {path})",
                row.where,
                mode,
            )
        if entry["split"] != split:
            raise ConvertError(
                source, "bad_split", f"frame {frame} of {video} in two splits", row.where, "split"
            )
        if has_box:
            extra = {c: v.get(c) or None for c in self.extra_cols}
            entry["boxes"].append((coords, identity, size, v.get("histology") or None, extra, row.where))

    def _check_box(self, row: _Row, video: str, coords: list[float | None], identity: str) -> None:
        if any(c is None for c in coords):
            k = ("x", "y", "w", "h")[[c is None for c in coords].index(True)]
            raise ConvertError(self.source, "missing_field", "a box needs x, y, w and h", row.where, k)
        if not identity:
            raise ConvertError(self.source, "missing_field", "a box needs an identity", row.where, "identity")
        if self.owner.setdefault(identity, video) != video:
            raise ConvertError(
                self.source,
                "identity_in_several_videos",
                f"identity {identity!r} already belongs to video {self.owner[identity]!r}",
                row.where,
                "identity",
            )

    def build_frames(
        self, frames: dict[tuple[str, int], dict[str, Any]], keys: list, sizes: list
    ) -> tuple[dict[str, list[Frame]], list[tuple[Path, int, str]]]:
        """(frames per split, frames to decode from videos) once the frame sizes are known;
        boxes clamped to their frame, unreadable frames handled by the error policy."""
        tally, mode = self.tally, self.mode
        out: dict[str, list[Frame]] = {}
        decoded: list[tuple[Path, int, str]] = []
        for key, size in zip(keys, sizes, strict=True):
            video, number = key
            entry = frames[key]
            if isinstance(size, Exception):
                self.problems.handle(
                    ConvertError(
                        self.source, "unreadable_file", f"{entry['path']}: {size}", entry["where"], mode
                    )
                )
                tally.boxes["seen"] += len(entry["boxes"])
                tally.dropped["frame_unreadable"] += len(entry["boxes"])
                continue
            w, h = size
            boxes = []
            for coords, identity, size_mm, histology, extra, _where in entry["boxes"]:
                tally.boxes["seen"] += 1
                x, y, bw, bh = coords
                bbox, how = clamp_corners(x, y, x + bw, y + bh, w, h)
                if bbox is None:
                    tally.dropped[how] += 1
                    continue
                tally.boxes["clamped"] += how == "clamped"
                boxes.append(Box(bbox, identity, size_mm, histology, extra or None))
            tally.boxes["converted"] += len(boxes)
            if mode == "image_path":
                path: Path = entry["path"]
                name = f"{video}/{number}{path.suffix.lower() or '.jpg'}"
                out.setdefault(entry["split"], []).append(Frame(path, name, number, video, w, h, boxes))
            else:
                name = f"{video}/{number}.jpg"
                decoded.append((entry["path"], number, name))
                out.setdefault(entry["split"], []).append(Frame(None, name, number, video, w, h, boxes))
        return out, decoded


def _size_or_error(path: Path) -> tuple[int, int] | Exception:
    try:
        return image_size(path)
    except (OSError, ValueError) as exc:
        return exc


def _video_sizes(frames: dict, keys: list, source: Path) -> list[tuple[int, int] | Exception]:
    """(width, height) per frame key from each video file's first frame; an error for a frame
    index beyond the video's end."""
    info: dict[Path, tuple[int, int, int] | Exception] = {}
    out: list[tuple[int, int] | Exception] = []
    for key in keys:
        path = frames[key]["path"]
        if path not in info:
            try:
                vr = open_video_reader(path, "video_path file", num_threads=1)
                h, w = vr[0].shape[:2]
                info[path] = (int(w), int(h), len(vr))
                del vr
            except (OSError, MediaTypeError) as exc:  # not a regular file / not a video container
                info[path] = exc
            except Exception as exc:  # decord raises its own DECORDError for unreadable files
                info[path] = OSError(f"not a readable video: {exc}")
        got = info[path]
        if isinstance(got, Exception):
            out.append(got)
        elif key[1] >= got[2]:
            out.append(ValueError(f"frame {key[1]} is beyond the video's {got[2]} frames"))
        else:
            out.append((got[0], got[1]))
    return out
