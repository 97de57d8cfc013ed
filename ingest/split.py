"""`polyp-ssl split ROOT --by polyp --fractions 0.7,0.3 --seed 42 [--stratify size|histology]`.

Splits a dataset root by polyp: every polyp (identity_id) goes to exactly one split, so no polyp
is in two splits. Polyps are grouped by stratum (with --stratify: the binary size or histology
class of `shards.labels`, "unknown" for polyps without one; else one group), each group sorted,
shuffled with the seed and cut at the cumulative fractions (rounded), so each split gets its
fraction of every stratum and the result depends only on the input and the seed.

An image goes to the split of each polyp it shows, with that split's boxes only; an image
without a box goes with its video's first polyp (identity ids sorted), and a video without any
polyp goes to the first split. Image and annotation ids are numbered again from 1.

Files: the annotation files the split reads are first kept in `ROOT/annotations/source/`
(moved there once, atomically: a folder renamed into place); the splits'
`annotations/instances_{name}.json` are then written complete into the root's staging folder
and put in together (ingest.staged: all of them or none, also on a full disk; the error names
the file), and the `instances_*.json` files that are not among the new splits are removed
(their content is in `source/`). A rerun reads `source/` again, so rerunning after a crash, or
with other fractions, gives what an uninterrupted run gives.

Stale sources are never split silently: each split also records, in `annotations/.polyp-ssl-split`
(put in with the split files), the sha256 of the sources it read and of the files it wrote. A
rerun re-splits `source/` only when the root's current `instances_*.json` are exactly the files
the last split wrote; a file it did not write (a later merge or convert put it there, or it was
edited) is refused, naming it, unless `--overwrite`: then the files the last split did not write
become the new sources and replace `source/` (in the same staged set). Each run prints which
source files it splits and their counts.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.ingest.convert.common import (
    SPLIT_RE,
    ConvertError,
    load_coco,
    write_coco_atomic,
    write_json_atomic,
)
from polyp_ssl.ingest.staged import StagedFiles, finish_interrupted
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser
from polyp_ssl.shards.ids import text_problem
from polyp_ssl.shards.labels import DIMINUTIVE_MAX_MM, histology_binary, size_binary
from polyp_ssl.shards.textio import load_json, shown
from polyp_ssl.shards.writer import file_sha256

log = logging.getLogger(__name__)

_ANN_RE = re.compile(r"^instances_(.+)\.json$")
SOURCE_DIR = "source"
STAMP = ".polyp-ssl-split"  # in annotations/: what the last split read and wrote (sha256 per file)
SPLIT_DESCRIPTION = "split by polyp with polyp-ssl split"
STRATA = ("size", "histology")


# (field, required) of the records split reads ids from; each id is an int or plain text
IMAGE_ID_FIELDS = (("id", True), ("dataset_id", False), ("sequence_id", False))
VIDEO_ID_FIELDS = (("dataset_id", False), ("sequence_id", False))
ANNOTATION_ID_FIELDS = (("image_id", True), ("identity_id", True))


def _check_record(path: Path, record: Any, where: str, id_fields: tuple[tuple[str, bool], ...]) -> None:
    """ConvertError naming the file, the record (`images[3]`) and the field when `record` is not an
    object, lacks a required id, or has an id that is not a whole number or plain text (a list,
    an object, a boolean, a string with a control character)."""
    if not isinstance(record, dict):
        raise ConvertError(path, "bad_type", f"the record is a {type(record).__name__}, not an object", where)
    for key, required in id_fields:
        if key not in record or record[key] is None:
            if required:
                raise ConvertError(path, "missing_field", f"no {key!r}", where, key)
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConvertError(
                path, "bad_type", f"{shown(value)} is a {type(value).__name__}, not an id", where, key
            )
        problem = text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            raise ConvertError(path, "bad_id", f"{shown(value)} {problem}", where, key)


def assign(polyps: dict[str, str], fractions: list[float], names: list[str], seed: int) -> dict[str, str]:
    """identity -> split name. `polyps` maps identity -> stratum. Pure and deterministic."""
    rng = np.random.default_rng(seed)
    cum = np.cumsum(np.asarray(fractions, dtype=float) / sum(fractions))
    out: dict[str, str] = {}
    for stratum in sorted(set(polyps.values())):
        ids = sorted(i for i, s in polyps.items() if s == stratum)
        order = [ids[k] for k in rng.permutation(len(ids))]
        bounds = [int(round(c * len(ids))) for c in cum]
        bounds[-1] = len(ids)
        j = 0
        for k, ident in enumerate(order):
            while k >= bounds[j]:
                j += 1
            out[ident] = names[j]
    return out


# the binary labels of shards.labels (size_binary, histology_binary) by name
STRATUM_NAMES = {
    "size": {"0": f"diminutive (<= {DIMINUTIVE_MAX_MM:g} mm)", "1": f"larger (> {DIMINUTIVE_MAX_MM:g} mm)"},
    "histology": {"0": "non-adenoma", "1": "adenoma"},
}


def _stratum(stratify: str | None, size: Any, histology: Any, dataset: Any) -> str:
    if stratify is None:
        return "all"
    if stratify == "size":
        try:
            y = size_binary(size if isinstance(size, int | float) and not isinstance(size, bool) else None)
        except ValueError:
            y = None
    else:
        y = histology_binary(
            histology if isinstance(histology, str) else None, dataset if isinstance(dataset, str) else None
        )
    return "unknown" if y is None else str(y)


def source_files(root: Path) -> dict[str, Path]:
    """The annotation files the split reads: annotations/source/ when an earlier split kept them
    there, else the root's instances_*.json."""
    ann = root / "annotations"
    kept = ann / SOURCE_DIR
    base = kept if kept.is_dir() else ann
    if not ann.is_dir():
        raise ConvertError(root, "missing_file", "no annotations/ folder (is this a dataset root?)")
    found = {m.group(1): base / n for n in sorted(os.listdir(base)) if (m := _ANN_RE.match(n))}
    if not found:
        raise ConvertError(base, "missing_file", "no instances_{split}.json file")
    return found


def _current_files(ann: Path) -> dict[str, Path]:
    return {m.group(1): ann / n for n in sorted(os.listdir(ann)) if (m := _ANN_RE.match(n))}


def _read_stamp(ann: Path) -> dict[str, Any] | None:
    """The last split's record (sources and outputs, name -> sha256), or None (none, or unreadable)."""
    path = ann / STAMP
    if not path.is_file():
        return None
    try:
        stamp = load_json(path, "split record")
    except (OSError, ValueError):
        return None
    ok = isinstance(stamp, dict) and all(isinstance(stamp.get(k), dict) for k in ("sources", "outputs"))
    return stamp if ok else None


def _info_of(path: Path) -> dict[str, Any]:
    info = load_coco(path).get("info")
    return info if isinstance(info, dict) else {}


def _written_by_last_split(ann: Path, current: dict[str, Path]) -> dict[str, bool]:
    """split name -> whether the current `instances_{name}.json` is a file the last split wrote
    from the sources now in annotations/source/. Roots split before the record existed: a file
    counts as the split's when its `info` says a split wrote it."""
    stamp = _read_stamp(ann)
    if stamp is None:
        return {s: _info_of(p).get("description") == SPLIT_DESCRIPTION for s, p in current.items()}
    kept = ann / SOURCE_DIR
    sources = {p.name: file_sha256(p) for p in _current_files(kept).values()}
    same_sources = sources == stamp["sources"]
    return {s: same_sources and stamp["outputs"].get(p.name) == file_sha256(p) for s, p in current.items()}


def plan_sources(root: Path, overwrite: bool) -> tuple[dict[str, Path], bool]:
    """(the annotation files to split, whether they become the new annotations/source/).

    No source/ yet: the root's instances_*.json (kept in source/ by this split). With source/:
    source/ again when the root's instances_*.json are the files the last split wrote; else a
    ValueError naming the first file it did not write, unless `overwrite`: then those files are
    the sources and replace source/."""
    ann = root / "annotations"
    if not (ann / SOURCE_DIR).is_dir():
        return source_files(root), True
    current = _current_files(ann)
    written = _written_by_last_split(ann, current)
    foreign = {s: p for s, p in current.items() if not written[s]}
    if not foreign:
        return source_files(root), False
    if not overwrite:
        first = next(iter(foreign.values()))
        raise ValueError(
            f"{first} is not a file the last split of {root} wrote from {ann / SOURCE_DIR}/ (a later merge "
            "or convert put it there, or it was edited): re-splitting would split the old sources; pass "
            f"--overwrite to split {', '.join(p.name for p in foreign.values())} instead (they replace "
            "annotations/source/)"
        )
    return foreign, True


def _stage_sources(staged: StagedFiles, root: Path, files: dict[str, Path]) -> dict[str, str]:
    """Put the source files into annotations/source/ with the split files (hard links, else
    copies); the old source files not among them are removed. Returns name -> sha256."""
    kept = root / "annotations" / SOURCE_DIR
    digests = {}
    for path in files.values():
        with staged.writing(f"annotations/{SOURCE_DIR}/{path.name}") as dst:
            try:
                os.link(path, dst)
            except OSError:
                shutil.copyfile(path, dst)
        digests[path.name] = file_sha256(path)
    if kept.is_dir():
        for old in _current_files(kept).values():
            if old.name not in digests:
                staged.remove_on_commit(f"annotations/{SOURCE_DIR}/{old.name}")
    return digests


def split_root(
    root: Path,
    fractions: list[float],
    names: list[str],
    seed: int = 42,
    stratify: str | None = None,
    overwrite: bool = False,
    say: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Split ROOT in place (see the module doc); returns per-split counts. `say` gets one line
    naming the source files split and their counts."""
    _check_options(fractions, names, stratify)
    root = Path(root)
    finish_interrupted(root)  # a split or merge killed while putting its files in: finish that first
    files, new_sources = plan_sources(root, overwrite)
    records = _read_records({s: load_coco(p) for s, p in files.items()}, files, stratify)
    kept = " (kept in annotations/source/)" if new_sources else ""
    say(
        f"splitting {', '.join(map(str, files.values()))}{kept}: {len(records.images)} images, "
        f"{len(records.anns)} annotations, {len(records.polyp_stratum)} polyps"
    )
    where = assign(records.polyp_stratum, fractions, names, seed)
    out, videos_in = _build_splits(records, where, names)
    info = {
        "description": SPLIT_DESCRIPTION,
        "fractions": fractions,
        "seed": seed,
        "stratify": stratify,
        "sources": sorted(files),
    }
    _write_splits(root, files, new_sources, names, out, info)
    summary: dict[str, Any] = {}
    for n in names:
        polyps = {str(a["identity_id"]) for a in out[n]["annotations"]}
        summary[n] = {
            "polyps": len(polyps),
            "videos": len(videos_in[n]),
            "images": len(out[n]["images"]),
            "annotations": len(out[n]["annotations"]),
            "strata": {
                stratum_name(stratify, k): v
                for k, v in sorted(Counter(records.polyp_stratum[p] for p in polyps).items())
            },
        }
    return summary


def _check_options(fractions: list[float], names: list[str], stratify: str | None) -> None:
    if len(fractions) != len(names) or len(fractions) < 2:
        raise ValueError(f"need as many split names as fractions (>= 2), got {names} for {fractions}")
    if any(not f > 0 for f in fractions):
        raise ValueError(f"--fractions must be positive, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"--fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    if len(set(names)) != len(names) or any(not SPLIT_RE.match(n) or n == SOURCE_DIR for n in names):
        raise ValueError(f"--names must be distinct names matching [A-Za-z0-9_-]+, got {names}")
    if stratify not in (None, *STRATA):
        raise ValueError(f"--stratify must be one of {STRATA}, got {stratify!r}")


@dataclass
class _Records:
    """The checked records of the source files: images keyed by (source split, id), the
    annotations in order, each polyp's stratum, the polyps of each video, the video records."""

    images: dict[tuple[str, Any], dict] = field(default_factory=dict)
    anns: list[tuple[str, dict]] = field(default_factory=list)
    polyp_stratum: dict[str, str] = field(default_factory=dict)
    video_polyps: dict[tuple[Any, Any], set[str]] = field(default_factory=dict)
    videos_meta: dict[tuple[Any, Any], dict] = field(default_factory=dict)


def _read_records(loaded: dict[str, dict], files: dict[str, Path], stratify: str | None) -> _Records:
    """The records of every source file, checked (ConvertError naming the file and record)."""
    r = _Records()
    for s, obj in loaded.items():
        for i, img in enumerate(obj["images"]):
            _check_record(files[s], img, f"images[{i}]", IMAGE_ID_FIELDS)
            if (s, img["id"]) in r.images:
                raise ConvertError(files[s], "bad_image", "image id repeated", f"images[{i}]", "id")
            r.images[(s, img["id"])] = img
        for i, v in enumerate(obj.get("videos") or []):
            if isinstance(v, dict):
                _check_record(files[s], v, f"videos[{i}]", VIDEO_ID_FIELDS)
                r.videos_meta.setdefault((v.get("dataset_id"), v.get("sequence_id")), v)
        for i, ann in enumerate(obj["annotations"]):
            _check_record(files[s], ann, f"annotations[{i}]", ANNOTATION_ID_FIELDS)
            if (s, ann["image_id"]) not in r.images:
                raise ConvertError(
                    files[s],
                    "missing_image",
                    "image_id names no image of the file",
                    f"annotations[{i}]",
                    "image_id",
                )
            ident = ann["identity_id"]
            if ident == "":
                raise ConvertError(
                    files[s], "bad_type", "identity_id is empty", f"annotations[{i}]", "identity_id"
                )
            ident = str(ident)
            img = r.images[(s, ann["image_id"])]
            if ident not in r.polyp_stratum:
                r.polyp_stratum[ident] = _stratum(
                    stratify, ann.get("size"), ann.get("histology"), img.get("dataset_id")
                )
            r.video_polyps.setdefault((img.get("dataset_id"), img.get("sequence_id")), set()).add(ident)
            r.anns.append((s, ann))
    return r


def _build_splits(
    records: _Records, where: dict[str, str], names: list[str]
) -> tuple[dict[str, dict[str, list]], dict[str, list[tuple[Any, Any]]]]:
    """(records per split, renumbered; the videos of each split in order). An image goes to the
    split of each polyp it shows; one without a box to the split of its video's first polyp."""
    out: dict[str, dict[str, list]] = {n: {"images": [], "annotations": [], "videos": []} for n in names}
    by_image: dict[tuple[str, Any], list[dict]] = {}
    for s, ann in records.anns:
        by_image.setdefault((s, ann["image_id"]), []).append(ann)
    next_image = next_ann = 0
    videos_in: dict[str, list[tuple[Any, Any]]] = {n: [] for n in names}
    for key, img in records.images.items():  # source order: files (sorted), then images as listed
        vkey = (img.get("dataset_id"), img.get("sequence_id"))
        boxes = by_image.get(key, [])
        targets = sorted({where[str(a["identity_id"])] for a in boxes}, key=names.index)
        if not targets:
            vp = sorted(records.video_polyps.get(vkey, ()))
            targets = [where[vp[0]] if vp else names[0]]
        for t in targets:
            next_image += 1
            out[t]["images"].append(dict(img, id=next_image))
            if vkey not in videos_in[t]:
                videos_in[t].append(vkey)
            for a in boxes:
                if where[str(a["identity_id"])] == t:
                    next_ann += 1
                    out[t]["annotations"].append(dict(a, id=next_ann, image_id=next_image))
    for n in names:
        meta = records.videos_meta
        out[n]["videos"] = [dict(meta[v], split=n) for v in videos_in[n] if v in meta]
    return out, videos_in


def _write_splits(
    root: Path,
    files: dict[str, Path],
    new_sources: bool,
    names: list[str],
    out: dict[str, dict[str, list]],
    info: dict[str, Any],
) -> None:
    """All split files or none: written complete into the staging folder, then put in together
    (with the stamp, the sources kept aside, and other split files removed)."""
    ann_dir = root / "annotations"
    with StagedFiles(root) as staged:
        if new_sources:
            source_digests = _stage_sources(staged, root, files)
        else:
            source_digests = {p.name: file_sha256(p) for p in files.values()}
        outputs = {}
        for n in names:
            with staged.writing(f"annotations/instances_{n}.json") as path:
                write_coco_atomic(
                    path, dict(info, split=n), out[n]["images"], out[n]["annotations"], out[n]["videos"]
                )
            outputs[path.name] = file_sha256(path)
        with staged.writing(f"annotations/{STAMP}") as path:
            write_json_atomic(path, {"sources": source_digests, "outputs": outputs})
        for p in sorted(ann_dir.iterdir()):
            m = _ANN_RE.match(p.name)
            if m and p.is_file() and m.group(1) not in names:
                staged.remove_on_commit(f"annotations/{p.name}")
        staged.commit()


def stratum_name(stratify: str | None, stratum: str) -> str:
    """How a stratum is shown: the class name of its binary label (`_stratum` keys the strata by
    the label, "0" / "1", which the assignment's order depends on)."""
    return STRATUM_NAMES.get(stratify or "", {}).get(stratum, stratum)


def _parser() -> argparse.ArgumentParser:
    p = FlagParser(
        formatter_class=DefaultsHelpFormatter,
        prog="polyp-ssl split",
        description="Split a dataset root by polyp into annotations/instances_{name}.json (no polyp in "
        "two splits); the files it reads are kept in annotations/source/.",
        epilog="example: polyp-ssl split /data/rsp --by polyp --fractions 0.7,0.3 --seed 42 --stratify size",
    )
    p.add_argument("root", type=Path, help="dataset root (images/ + annotations/instances_*.json)")
    p.add_argument("--by", choices=("polyp",), default="polyp", help="the unit kept in one split")
    p.add_argument("--fractions", default="0.7,0.3", help="fractions of polyps per split, summing to 1")
    p.add_argument("--names", default=None, help="split names (default train,val or train,val,test)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the assignment of polyps to splits")
    p.add_argument("--stratify", choices=STRATA, default=None, help="keep each class's fractions")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the root's instances_*.json are not the files its last split wrote (a new merge): split "
        "them instead of annotations/source/, which they replace; without it such a root is refused",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        print(f"polyp-ssl split: --fractions {args.fractions!r} is not a list of numbers", file=sys.stderr)
        return 2
    names = (
        args.names.split(",")
        if args.names
        else (["train", "val", "test"][: len(fractions)] if len(fractions) <= 3 else [])
    )
    from polyp_ssl.shards.lock import LockHeld, output_lock

    try:
        if not args.root.is_dir():
            raise ConvertError(args.root, "missing_file", "dataset root not found")
        with output_lock(args.root, "polyp-ssl split"):
            summary = split_root(
                args.root, fractions, names, args.seed, args.stratify, args.overwrite, say=print
            )
    except LockHeld as exc:
        print(f"polyp-ssl split: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # ConvertError included: names file, id and field
        print(f"polyp-ssl split: error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, ConvertError) else 1
    except OSError as exc:
        print(f"polyp-ssl split: error: {exc}", file=sys.stderr)
        return 2 if getattr(exc, "bad_input", False) else 1  # a FIFO or device given as input
    for n, c in summary.items():
        print(
            f"{n}: {c['polyps']} polyps, {c['videos']} videos, {c['images']} images, "
            f"{c['annotations']} annotations, strata: "
            + ", ".join(f"{k} {v}" for k, v in c["strata"].items())
        )
    print(f"wrote {args.root}/annotations/instances_{{{','.join(summary)}}}.json")
    return 0
