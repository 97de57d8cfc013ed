"""What every converter shares: errors naming file / id / field, the skip-mode problem log, the
discrepancy report, box clamping, natural frame order, image placement (link modes) and the
atomic writing of the report and the COCO annotation files.

A converter parses and checks its whole raw layout first (pure functions, nothing written), into
`Frame`s grouped by split; `write_dataset` then places the images, and last puts in the
annotation files and `OUT/convert_report.json` together (ingest.staged: written complete in a
staging folder, then renamed; a run killed while renaming is finished by the next writer of the
root, and ingest refuses the root until then), so an interrupted run never leaves a set of
annotation files that looks complete. Placing an image is idempotent (`link_file` keeps a
destination that already is the source, replaces anything else), so rerunning after a crash
gives the uninterrupted result.

Crash points for the tests (`ingest.faults.crash_point`, inert unless POLYP_SSL_TEST_CRASH_AT
is set): `convert_image_placed` (after each frame placed) and `convert_annotation_written`
(after each annotation file, and the report, is renamed into place).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.faults import crash_point
from polyp_ssl.ingest.media import check_image_file
from polyp_ssl.ingest.staged import StagedFiles
from polyp_ssl.shards.files import open_regular
from polyp_ssl.shards.textio import MAX_ANNOTATION_BYTES, TextInputError, load_json, one_line, read_csv_table

log = logging.getLogger(__name__)

CATEGORY = {"id": 1, "name": "polyp", "supercategory": "lesion"}
LINK_MODES = ("hardlink", "symlink", "copy")
MAX_REPORTED_PROBLEMS = 1000
LINK_CHUNK = 4096
REPORT_NAME = "convert_report.json"
SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ConvertError(ValueError):
    """Bad input: names the file, the id and the field."""

    def __init__(
        self, source: str | Path, reason: str, detail: str, id: str | None = None, field: str | None = None
    ):
        self.source, self.reason, self.detail, self.id, self.field = str(source), reason, detail, id, field
        where = str(source)
        if id is not None:
            where += f": {id}"
        if field is not None:
            where += f": field {field!r}"
        # file names that are not UTF-8 (surrogate escapes) are shown as \udcXX, control characters
        # (a terminal escape in a folder name) as \x1b: one printable line
        super().__init__(one_line(f"{where}: {detail}"))
        self.skippable = False  # set by Problems.handle: an item that --on-error skip leaves out

    def as_dict(self, action: str) -> dict[str, Any]:
        def text(v: str | None) -> str | None:
            return None if v is None else v.encode("utf-8", "backslashreplace").decode("utf-8")

        return {
            "source": text(self.source),
            "id": text(self.id),
            "field": self.field,
            "reason": self.reason,
            "detail": text(self.detail),
            "action": action,
        }


@dataclass
class Problems:
    """Bad input met with --on-error skip: counted by reason, the first ones kept in full."""

    on_error: str
    counts: Counter = field(default_factory=Counter)
    items: list[dict[str, Any]] = field(default_factory=list)

    def handle(self, exc: ConvertError, action: str = "skipped") -> None:
        if self.on_error == "fail":
            exc.skippable = True  # an item --on-error skip would leave out (the CLI says so)
            raise exc
        self.counts[exc.reason] += 1
        if len(self.items) < MAX_REPORTED_PROBLEMS:
            self.items.append(exc.as_dict(action))
        log.warning("%s (%s)", exc, action)


# ---------------------------------------------------------------- records


@dataclass(slots=True)
class Box:
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels, inside the frame
    identity_id: str
    size: float | None = None
    histology: str | None = None
    extra: dict[str, Any] | None = None  # more annotation fields (kept as metadata)


@dataclass(slots=True)
class Frame:
    source: Path | None  # the raw image placed at OUT/images/file_name (None: written by the converter)
    file_name: str  # relative to OUT/images
    frame_id: int
    sequence_id: str
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Tally:
    """The discrepancy counts of one conversion: files seen / paired / unpaired by kind, and every
    raw box's fate (converted as is, clamped to the frame, or dropped with a reason)."""

    files: Counter = field(default_factory=Counter)
    boxes: Counter = field(default_factory=Counter)  # seen, converted, clamped
    dropped: Counter = field(default_factory=Counter)  # reason -> boxes
    other: Counter = field(default_factory=Counter)  # anything else worth a line

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": dict(sorted(self.files.items())),
            "boxes": {
                "seen": self.boxes["seen"],
                "converted": self.boxes["converted"],
                "clamped": self.boxes["clamped"],
                "dropped": dict(sorted(self.dropped.items())),
            },
            "other": dict(sorted(self.other.items())),
        }


# ---------------------------------------------------------------- parsing helpers (pure)


def load_coco(path: Path) -> dict[str, Any]:
    """A seed-layout annotation file as a dict with lists `images` and `annotations`;
    ConvertError `bad_json` naming the file otherwise."""
    try:
        obj = load_json(path, "annotation file", max_bytes=MAX_ANNOTATION_BYTES)
    except TextInputError as exc:
        raise text_error(exc) from None
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("images"), list)
        or not isinstance(obj.get("annotations", []), list)
    ):
        raise ConvertError(path, "bad_json", "expected an object with lists 'images' and 'annotations'")
    return obj


def parse_number(text: str | None, source: str | Path, field: str, id: str | None = None) -> float:
    if text is None or not text.strip():
        raise ConvertError(source, "missing_field", "missing value", id, field)
    try:
        value = float(text.strip())
    except ValueError:
        raise ConvertError(source, "bad_number", f"{text.strip()!r} is not a number", id, field) from None
    if not math.isfinite(value):
        raise ConvertError(source, "bad_number", f"{text.strip()!r} is not a finite number", id, field)
    return value


_NUM_RE = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders `img2` before `img10` (numbers compared as numbers)."""
    return tuple(int(p) if p.isdigit() else p.casefold() for p in _NUM_RE.split(name))


def frame_number(name: str) -> int | None:
    """The frame number of a file name: the last run of digits of its stem (`image0012.jpg` -> 12)."""
    found = _NUM_RE.findall(Path(name).stem)
    return int(found[-1]) if found else None


def clamp_corners(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int
) -> tuple[tuple[float, float, float, float] | None, str]:
    """(x, y, w, h) of the corner box clamped to the frame, and what happened: "" (inside),
    "clamped", or a drop reason ("zero_area_box": no area as given; "box_outside_frame": no area
    left inside the frame) with None."""
    if not x2 > x1 or not y2 > y1:
        return None, "zero_area_box"
    cx1, cx2 = min(max(x1, 0.0), float(width)), min(max(x2, 0.0), float(width))
    cy1, cy2 = min(max(y1, 0.0), float(height)), min(max(y2, 0.0), float(height))
    if not cx2 > cx1 or not cy2 > cy1:
        return None, "box_outside_frame"
    how = "" if (cx1, cy1, cx2, cy2) == (x1, y1, x2, y2) else "clamped"
    return (cx1, cy1, cx2 - cx1, cy2 - cy1), how


def text_error(exc: TextInputError) -> ConvertError:
    """A reader's TextInputError as the converters' ConvertError (file, line, field, reason)."""
    where = None if exc.line is None else f"line {exc.line}"
    return ConvertError(exc.path, exc.reason, exc.detail, where, exc.field)


def read_csv_numbered(
    path: Path, required: tuple[str, ...] = (), max_rows: int | None = None
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs (values stripped) of a UTF-8 CSV read strictly and
    bounded (shards.textio.read_csv_table: lines, rows, quoting, ragged rows, control characters);
    ConvertError naming the file, the line and the field otherwise."""
    try:
        return read_csv_table(path, "CSV file", required, max_rows=max_rows)
    except TextInputError as exc:
        raise text_error(exc) from None


def read_csv(path: Path, required: tuple[str, ...] = ()) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a UTF-8 CSV (see `read_csv_numbered`)."""
    header, rows = read_csv_numbered(path, required)
    return header, [row for _, row in rows]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header (the pixels are not decoded)."""
    from PIL import Image

    with open_regular(path, "image") as f:
        check_image_file(f, path)  # JPEG, PNG or BMP by its bytes, whatever the name
        with Image.open(f) as im:
            return int(im.width), int(im.height)


def read_bytes(path: Path, limit: int | None = None) -> bytes | OSError:
    """The bytes of a raw file, or the OSError (a FIFO or device is refused, never read; a file
    of more than `limit` bytes is refused before it is read)."""
    try:
        with open_regular(path) as f:
            if limit is not None and os.fstat(f.fileno()).st_size > limit:
                return OSError(errno.EFBIG, f"larger than {limit:,} bytes, too large for its kind", str(path))
            return f.read()
    except OSError as exc:
        return exc


def keep_largest(boxes: list[Box]) -> tuple[Box, int]:
    """One polyp seen as several boxes on one frame: the largest box (the first of equal ones) and
    how many were left out. Datasets with one polyp per video or case use this rule."""
    best = max(boxes, key=lambda b: b.bbox[2] * b.bbox[3])  # max keeps the first of ties
    return best, len(boxes) - 1


# ---------------------------------------------------------------- writing


def link_file(src: Path, dst: Path, mode: str) -> str:
    """Place src at dst (hard link, symlink or copy; a hard link falls back to a copy across file
    systems). Returns what was done. An existing dst that is already src is left alone."""
    if dst.exists() or dst.is_symlink():
        try:
            if dst.resolve() == src.resolve() or os.path.samefile(src, dst):
                return "present"
        except OSError:
            pass
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    done = mode
    if mode == "symlink":
        os.symlink(src.resolve(), tmp)
    elif mode == "hardlink":
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(src, tmp)
            done = "copy"
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return done


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_coco_atomic(
    path: Path,
    info: dict[str, Any],
    images: Iterable[Any],
    annotations: Iterable[dict[str, Any]],
    videos: Iterable[dict[str, Any]],
    image_record: Callable[[Any], dict[str, Any]] | None = None,
    rename: bool = True,
) -> Path:
    """Write a COCO file one record per line (streamed), to a temporary name first, then renamed
    to `path`; with `rename=False` the complete temporary is left for the caller to rename (so
    several files can be renamed together) and its path returned; removed on any error.
    `image_record` turns compact image items (tuples) into records as they are written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    ok = False
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"info": ' + json.dumps(info, sort_keys=True))
            f.write(',\n"categories": ' + json.dumps([CATEGORY]))
            for key, items in (("videos", videos), ("images", images), ("annotations", annotations)):
                f.write(f',\n"{key}": [')
                for i, item in enumerate(items):
                    record = image_record(item) if key == "images" and image_record else item
                    f.write(("\n" if i == 0 else ",\n") + json.dumps(record, sort_keys=True))
                f.write("\n]")
            f.write("\n}\n")
            f.flush()
            os.fsync(f.fileno())
        if rename:
            os.replace(tmp, path)
        ok = True
    finally:
        if rename or not ok:
            tmp.unlink(missing_ok=True)
    return path if rename else tmp


def remove_stale_temporaries(annotations: Path, image_dirs: set[Path]) -> int:
    """Temporaries a killed run left (`.NAME.tmp-PID`: annotation files, frames being linked,
    the report in the root: pass the root among `image_dirs`); the output lock guarantees no
    live writer owns them. Every writer of a root calls it before placing frames (convert and
    merge). Returns how many were removed."""
    n = 0
    for folder in sorted({annotations, *image_dirs}):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if (
                entry.name.startswith(".")
                and ".tmp-" in entry.name
                and not entry.is_dir(follow_symlinks=False)
            ):
                os.unlink(entry.path)
                n += 1
    if n:
        log.info("removed %d temporary files left by an interrupted run", n)
    return n


def place_images(
    items: list[tuple[Path, Path]], mode: str, pool: ThreadPoolExecutor | None, progress: bool = False
) -> Counter:
    """Link (or copy) each (src, dst); destination folders are created. Counts by what was done."""
    if mode not in LINK_MODES:
        raise ValueError(f"--link must be one of {LINK_MODES}, got {mode!r}")
    for parent in sorted({dst.parent for _, dst in items}):
        parent.mkdir(parents=True, exist_ok=True)
    links: Counter = Counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="images", unit="frame")

    def place(item: tuple[Path, Path]) -> str:
        done = link_file(item[0], item[1], mode)
        crash_point("convert_image_placed")
        return done

    for start in range(0, len(items), LINK_CHUNK):  # a future per frame of a chunk, not of all
        chunk = items[start : start + LINK_CHUNK]
        links.update(pool.map(place, chunk) if pool is not None else map(place, chunk))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return links


def write_dataset(
    out: Path,
    converter: str,
    dataset_id: str,
    splits: dict[str, list[Frame]],
    tally: Tally,
    problems: Problems,
    link: str,
    pool: ThreadPoolExecutor | None,
    info: dict[str, Any] | None = None,
    videos: dict[str, dict[str, Any]] | None = None,
    report_extra: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Number images and annotations from 1 over splits (sorted), videos (natural order) and
    frames (by frame_id); place the images, then write the report, then the annotation files.

    Returns the report. `videos` holds per-sequence metadata for the COCO "videos" list."""
    per_split: dict[str, dict[str, list]] = {}
    image_id = annotation_id = 0
    to_place: list[tuple[Path, Path]] = []
    images_dir = out / "images"
    for split in sorted(splits):
        frames = sorted(splits[split], key=lambda f: (natural_key(f.sequence_id), f.frame_id))
        bucket = per_split.setdefault(split, {"images": [], "annotations": [], "videos": []})
        seen_videos: list[str] = []
        for fr in frames:
            if not seen_videos or seen_videos[-1] != fr.sequence_id:
                seen_videos.append(fr.sequence_id)
                record = {"sequence_id": fr.sequence_id, "dataset_id": dataset_id, "split": split}
                record.update((videos or {}).get(fr.sequence_id, {}))
                bucket["videos"].append(record)
            image_id += 1
            bucket["images"].append(
                {
                    "id": image_id,
                    "file_name": fr.file_name,
                    "width": fr.width,
                    "height": fr.height,
                    "frame_id": fr.frame_id,
                    "sequence_id": fr.sequence_id,
                    "dataset_id": dataset_id,
                }
            )
            if fr.source is not None:
                to_place.append((fr.source, images_dir / fr.file_name))
            for box in fr.boxes:
                annotation_id += 1
                x, y, w, h = box.bbox
                ann = {
                    "id": annotation_id,
                    "image_id": image_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "category_id": CATEGORY["id"],
                    "identity_id": box.identity_id,
                    "size": box.size,
                    "histology": box.histology,
                }
                if box.extra:
                    for k, v in box.extra.items():
                        ann.setdefault(k, v)
                bucket["annotations"].append(ann)
    out.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    remove_stale_temporaries(out / "annotations", {out, *(d.parent for _, d in to_place)})
    links = place_images(to_place, link, pool, progress)
    report: dict[str, Any] = {
        "converter": converter,
        "dataset_id": dataset_id,
        "out_root": str(out),
        "link": link,
        "on_error": problems.on_error,
        "splits": {
            s: {
                "videos": len(b["videos"]),
                "images": len(b["images"]),
                "annotations": len(b["annotations"]),
                "polyps": len({a["identity_id"] for a in b["annotations"]}),
            }
            for s, b in sorted(per_split.items())
        },
        **tally.as_dict(),
        "skipped": dict(sorted(problems.counts.items())),
        "n_skipped": sum(problems.counts.values()),
        "problems": problems.items,
        "links": dict(sorted(links.items())),
    }
    report.update(report_extra or {})
    base_info = {"description": f"converted by polyp-ssl convert {converter}", "dataset_id": dataset_id}
    base_info.update(info or {})
    # every split's file and the report complete in the staging folder first, then put in
    # together (ingest.staged): a root has all of them or none; a run killed while renaming is
    # finished by the next writer of the root
    with StagedFiles(out, point="convert_annotation_written") as staged:
        for split, bucket in sorted(per_split.items()):
            with staged.writing(f"annotations/instances_{split}.json") as path:
                split_info = dict(base_info, split=split)
                b = bucket
                write_coco_atomic(path, split_info, b["images"], b["annotations"], b["videos"])
        with staged.writing(REPORT_NAME) as path:
            write_json_atomic(path, report)
        staged.commit()
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The discrepancy report as the lines a converter prints."""
    lines = []
    for split, c in report.get("splits", {}).items():
        polyps = f", {c['polyps']} polyps" if "polyps" in c else ""
        lines.append(
            f"{split}: {c['videos']} videos, {c['images']} images, {c['annotations']} annotations{polyps}"
        )
    files = report.get("files")
    if files:
        lines.append("files: " + ", ".join(f"{k} {v}" for k, v in files.items()))
    boxes = report.get("boxes")
    if boxes:
        dropped = boxes.get("dropped") or {}
        lines.append(
            f"boxes: {boxes['seen']} seen, {boxes['converted']} converted ({boxes['clamped']} clamped), "
            f"{sum(dropped.values())} dropped" + (f" {dropped}" if dropped else "")
        )
    other = report.get("other")
    if other:
        lines.append("also: " + ", ".join(f"{k} {v}" for k, v in other.items()))
    if report.get("n_skipped"):
        lines.append(f"skipped {report['n_skipped']} items: {report['skipped']}")
    return lines


def report_error_rows(report: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """The report as rows of the catalog's `errors` table (ingest adds them): one row per count,
    action "converted" / "clamped" / "dropped", and one per recorded problem ("dropped"). Each row
    also has `items`, the number of items it stands for (47 for "47 boxes dropped"), which ingest's
    summary counts (the table keeps its pinned columns)."""
    conv = report.get("converter", "realcolon")
    rows: list[dict[str, Any]] = []
    if conv == "merge":  # the sources' own reports, each named by its root
        for src in report.get("sources") or []:
            if isinstance(src, dict) and isinstance(src.get("report"), dict):
                rows += report_error_rows(src["report"], str(Path(src.get("root", "")) / REPORT_NAME))
        return rows

    def row(
        reason: str, detail: str, action: str, id: str | None = None, field: str | None = None, items: int = 1
    ):
        rows.append(
            {"source": source, "id": id, "field": field, "reason": reason, "detail": detail, "action": action,
             "items": items}
        )  # fmt: skip

    boxes = report.get("boxes")
    if boxes:
        row(
            "boxes_converted",
            f"{boxes['converted']} of {boxes['seen']} raw boxes converted ({conv})",
            "converted",
            items=int(boxes["converted"]),
        )
        if boxes.get("clamped"):
            row(
                "box_clamped",
                f"{boxes['clamped']} boxes clamped to the frame ({conv})",
                "clamped",
                items=int(boxes["clamped"]),
            )
        for reason, n in (boxes.get("dropped") or {}).items():
            row(reason, f"{n} boxes dropped: {reason} ({conv})", "dropped", items=int(n))
    else:
        n = sum(c.get("annotations", 0) for c in report.get("splits", {}).values())
        row("boxes_converted", f"{n} boxes converted ({conv})", "converted", items=int(n))
    for kind, n in (report.get("files") or {}).items():
        if kind.startswith("unpaired") or kind.endswith("skipped"):
            row(kind, f"{n} files: {kind} ({conv})", "dropped", items=int(n))
    for reason, n in ((report.get("tracks") or {}).get("dropped") or {}).items():  # convert mot
        row(f"tracks_{reason}", f"{n} tracks dropped: {reason} ({conv})", "dropped", items=int(n))
    for p in report.get("problems") or []:
        row(p.get("reason") or "bad_input", p.get("detail") or "", "dropped", p.get("id"), p.get("field"))
    return rows


def read_report_rows(root: str | Path) -> list[dict[str, Any]]:
    """Errors rows from ROOT/convert_report.json when a converter wrote the root; [] otherwise
    (also for a report that cannot be read: it is informative, not input)."""
    path = Path(root) / REPORT_NAME
    if not path.is_file():
        return []
    try:
        report = load_json(path, "convert report")
    except (OSError, ValueError) as exc:  # TextInputError included: too large, too deep, not JSON
        log.warning("%s: not read (%s); no conversion rows in the errors table", path, exc)
        return []
    if not isinstance(report, dict):
        return []
    try:
        return report_error_rows(report, str(path))
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        log.warning("%s: unexpected content (%s); no conversion rows in the errors table", path, exc)
        return []


def check_options(link: str, on_error: str) -> None:
    if link not in LINK_MODES:
        raise ValueError(f"--link must be one of {LINK_MODES}, got {link!r}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error must be fail or skip, got {on_error!r}")


# quality of the frames decoded from a video and written as the converted root's JPEGs
DECODED_JPEG_QUALITY = 95


def write_decoded_frames(
    images_dir: Path, items: Iterable[tuple[Path, int, str]], what: str, first_index: int = 0
) -> None:
    """Decode video frames and write each as `images_dir/NAME` (a JPEG, written atomically):
    `items` are (video, frame number, NAME); frame number n is the video's index n - first_index
    (0 for 0-based numbers, 1 for MOTChallenge's frames from 1). Per video, in frame order, 64
    frames per decoder call; `what` names the video in errors (e.g. "video_path file")."""
    import io

    from PIL import Image

    from polyp_ssl.ingest.media import open_video_reader

    by_video: dict[Path, list[tuple[int, str]]] = {}
    for path, number, name in items:
        by_video.setdefault(path, []).append((number, name))
    for path, wanted in by_video.items():
        wanted.sort()
        vr = open_video_reader(path, what, num_threads=1)
        for start in range(0, len(wanted), 64):
            chunk = wanted[start : start + 64]
            batch = vr.get_batch([n - first_index for n, _ in chunk]).asnumpy()
            for (_, name), pixels in zip(chunk, batch, strict=True):
                dst = images_dir / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=DECODED_JPEG_QUALITY)
                tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
                try:
                    tmp.write_bytes(buf.getvalue())
                    os.replace(tmp, dst)
                finally:
                    tmp.unlink(missing_ok=True)
        del vr
