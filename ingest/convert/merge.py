"""`polyp-ssl convert merge ROOT... OUT`: several dataset roots (the seed's layout) into one.

- each source gets a dataset_id: `--dataset-ids a,b,...` (one per source, in order), else the one
  dataset_id all of its images carry, else its folder name; ids must differ and be plain names;
- ids cannot collide: images and annotations are numbered again from 1; images go to
  `OUT/images/{dataset_id}/{file_name}` (hard links where the file system allows, else copies,
  or `--link`); identity_id becomes `{dataset_id}:{identity_id}`; the video id is
  `{dataset_id}/{sequence_id}` at ingest;
- histology is left exactly as each source wrote it (each dataset's vocabulary is mapped at
  probe time by its dataset_id, `shards.labels`);
- `SOURCE::val,test` takes only those annotation files of a source (e.g. REAL-Colon's val+test
  for rc19); all of them otherwise. Everything goes into one split, `--split` (default `all`),
  or with `--keep-splits` into the source's split names.
The sources' convert reports are kept inside OUT/convert_report.json, so ingest of the merged
root still records every conversion count in its errors table.

Refused before anything is written: a source that is the output root, contains it or is inside
it (real paths, links resolved: the output would overwrite or grow its own input); a source that
is itself the output of a merge (its images already carry `{dataset_id}/` names: merging it again
would nest them as `sun/sun/...`; merge its sources instead); with --keep-splits, a source split
name that ingest would refuse as a split (shards.ids). The report and the annotation files are
put in all together or not at all (ingest.staged); frames a killed run was linking
(`.NAME.tmp-PID`) are removed by the next run.

An OUT that already holds a dataset (images, annotation files or a convert report) is refused
unless `--overwrite`, which replaces the whole output: the new images/, annotations/ and report
are built in the root's staging folder and swapped in for the old ones (ingest.staged: a kill
leaves the old root or is rolled forward to the new one), so no old `instances_*.json`,
`annotations/source/` or image of an earlier merge or split is left for the next step to use.
Other entries of OUT (not written by merge) are left as they are.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.ingest.convert.common import (
    REPORT_NAME,
    SPLIT_RE,
    ConvertError,
    load_coco,
    place_images,
    remove_stale_temporaries,
    write_coco_atomic,
    write_json_atomic,
)
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.ingest.staged import StagedFiles, pending_entries, pending_swap
from polyp_ssl.shards.ids import id_problem
from polyp_ssl.shards.textio import load_json

log = logging.getLogger(__name__)

_ANN_RE = re.compile(r"^instances_(.+)\.json$")
MERGED_DESCRIPTION = "merged by polyp-ssl convert merge"


@dataclass
class MergeConfig:
    sources: list[str]  # PATH or PATH::split,split
    out_root: Path
    dataset_ids: list[str] | None = None
    split: str = "all"
    keep_splits: bool = False
    link: str = "hardlink"
    workers: int = 8
    follow_symlinks: bool = False
    overwrite: bool = False


# what a merge writes into OUT: the entries `--overwrite` replaces whole
OUTPUT_ENTRIES = ("images", "annotations", REPORT_NAME)


class OutputExists(ValueError):
    """The output root already holds a dataset and --overwrite was not given."""


@dataclass
class Source:
    root: Path
    only: list[str] | None
    dataset_id: str = ""
    files: dict[str, Path] = field(default_factory=dict)


def parse_source(text: str) -> Source:
    if "::" in text:
        path, _, splits = text.rpartition("::")
        only = [s.strip() for s in splits.split(",") if s.strip()]
        if not only:
            raise ValueError(f"{text!r}: no split names after '::'")
        return Source(Path(path), only)
    return Source(Path(text), None)


def _annotation_files(src: Source) -> dict[str, Path]:
    ann = src.root / "annotations"
    if not ann.is_dir():
        raise ConvertError(src.root, "missing_file", "no annotations/ folder (is this a dataset root?)")
    found = {m.group(1): ann / n for n in sorted(p.name for p in ann.iterdir()) if (m := _ANN_RE.match(n))}
    if src.only is not None:
        missing = [s for s in src.only if s not in found]
        if missing:
            raise ConvertError(
                ann / f"instances_{missing[0]}.json",
                "missing_file",
                f"split {missing[0]!r} not found (this root has {sorted(found)})",
            )
        found = {s: found[s] for s in src.only}
    if not found:
        raise ConvertError(ann, "missing_file", "no instances_{split}.json file")
    return found


def check_roots(sources: list[str], out_root: str | Path) -> None:
    """ValueError, before anything is written, naming both paths, when a source root is the
    output root, contains it or is inside it (real paths: links resolved); also when a source
    holds an unfinished swap of an interrupted split or merge (half of its files are new)."""
    out_real = Path(os.path.realpath(out_root))
    for text in sources:
        src = parse_source(text).root
        src_real = Path(os.path.realpath(src))
        how = None
        if src_real == out_real:
            how = "is the output root"
        elif out_real.is_relative_to(src_real):
            how = "contains the output root"
        elif src_real.is_relative_to(out_real):
            how = "is inside the output root"
        if how is not None:
            raise ValueError(
                f"source {src} ({src_real}) {how} {out_root} ({out_real}): the merge would write into "
                "its own input; choose an output root outside every source"
            )
        if (marker := pending_swap(src)) is not None:
            raise ValueError(
                f"source {src}: {marker} is the unfinished swap of an interrupted split or merge; "
                "rerun that command first"
            )


def _holds_data(path: Path) -> bool:
    """A file, or a folder with anything in it but the temporaries of a killed run."""
    if path.is_symlink() or path.is_file():
        return True
    if not path.is_dir():
        return False
    return any(not (e.name.startswith(".") and ".tmp-" in e.name) for e in os.scandir(path))


def dataset_entries(out: str | Path) -> list[str]:
    """The entries of OUT that hold a dataset (images/, annotations/, the convert report); the
    new entries of an interrupted merge into an empty root (its unfinished swap) are not counted:
    the rerun finishes and then replaces them."""
    out = Path(out)
    pending, replaces = pending_entries(out)
    ignore = pending if not replaces else set()
    return [n for n in OUTPUT_ENTRIES if n not in ignore and _holds_data(out / n)]


def check_output(out: str | Path, overwrite: bool) -> None:
    """OutputExists naming OUT, what it holds and the flag, when OUT already holds a dataset
    and `overwrite` is false."""
    held = dataset_entries(out)
    if held and not overwrite:
        raise OutputExists(
            f"{out} already holds a dataset ({', '.join(held)}): pass --overwrite to replace the whole "
            "output (old images, annotation files and annotations/source/ included), or choose an empty "
            "output folder"
        )


def _check_not_merged(src: Source, path: Path, obj: dict[str, Any], report: Any) -> None:
    """ValueError when `src` is itself a merge's output: its file names and identities already
    carry their dataset ids, so a second merge would nest them (`sun/sun/...`)."""
    info = obj.get("info") if isinstance(obj.get("info"), dict) else {}
    merged = info.get("description") == MERGED_DESCRIPTION or (
        isinstance(report, dict) and report.get("converter") == "merge"
    )
    if not merged:
        return
    inner = [s.get("root") for s in info.get("sources") or [] if isinstance(s, dict)]
    hint = f" ({', '.join(map(str, inner))})" if inner else ""
    raise ValueError(
        f"{path}: source {src.root} is the output of `polyp-ssl convert merge` (its images are already "
        f"named {{dataset_id}}/...; merging it again would nest them as "
        f"{src.dataset_id}/{{dataset_id}}/...): "
        f"merge its sources{hint} instead"
    )


def _check_kept_split(split: str, path: Path) -> None:
    """--keep-splits: the source's split name becomes `instances_{name}.json` of the output, which
    ingest reads as a split: refused here with ingest's own rule (shards.ids)."""
    problem = id_problem(split)
    if problem is not None:
        raise ValueError(
            f"{path}: split name {split!r} {problem}; ingest would refuse it as a split, so --keep-splits "
            "cannot keep it (rename the file, or merge into one --split)"
        )


def _own_dataset_id(files: dict[str, Path]) -> str | None:
    ids: set[Any] = set()
    for path in files.values():
        ids |= {img.get("dataset_id") for img in load_coco(path)["images"] if isinstance(img, dict)}
    return ids.pop() if len(ids) == 1 and isinstance(next(iter(ids)), str) else None


def merge(cfg: MergeConfig, progress: bool = False) -> dict[str, Any]:
    sources = _check_sources(cfg)
    merged = _Merged()
    for src in sources:
        merged.add_source(src, cfg)
    out = Path(cfg.out_root)
    out.mkdir(parents=True, exist_ok=True)
    # temporaries a killed run of an older version left in place (`.NAME.tmp-PID`); the output
    # lock says no live writer owns them (a killed run's staging folder is removed by StagedFiles)
    remove_stale_temporaries(out / "annotations", {out})
    # the whole output (images, report, annotation files) put in together, replacing the old one
    with StagedFiles(out) as staged:
        report = _write_output(
            staged, cfg, merged.to_place, merged.per_split, merged.counts, merged.reports, progress
        )
        for name in OUTPUT_ENTRIES:
            if os.path.lexists(out / name):
                staged.replace_on_commit(name)
        staged.commit()
    return report


def _check_sources(cfg: MergeConfig) -> list[Source]:
    """The options, the output and the sources checked; each source with its annotation files and
    its (unique) dataset id."""
    if len(cfg.sources) < 1:
        raise ValueError("give at least one source root")
    if not SPLIT_RE.match(cfg.split):
        raise ValueError(f"--split must match [A-Za-z0-9_-]+, got {cfg.split!r}")
    check_roots(cfg.sources, cfg.out_root)
    check_output(cfg.out_root, cfg.overwrite)
    sources = [parse_source(s) for s in cfg.sources]
    if cfg.dataset_ids is not None and len(cfg.dataset_ids) != len(sources):
        raise ValueError(f"--dataset-ids names {len(cfg.dataset_ids)} ids for {len(sources)} sources")
    for i, src in enumerate(sources):
        if not src.root.is_dir():
            raise ConvertError(src.root, "missing_file", "source root not found")
        src.files = _annotation_files(src)
        ds = (
            cfg.dataset_ids[i] if cfg.dataset_ids else (_own_dataset_id(src.files) or src.root.resolve().name)
        )
        problem = id_problem(ds)
        if problem is None and ":" in ds:
            problem = "contains ':' (it prefixes identity ids as dataset:identity)"
        if problem is not None:
            raise ValueError(f"dataset id {ds!r} of {src.root} {problem}")
        src.dataset_id = ds
    seen: dict[str, Path] = {}
    for src in sources:
        if src.dataset_id in seen:
            raise ValueError(
                f"two sources have dataset id {src.dataset_id!r} ({seen[src.dataset_id]}, {src.root}); "
                "give --dataset-ids"
            )
        seen[src.dataset_id] = src.root
    return sources


def _sub_report(src: Source) -> Any:
    """A source's own convert report, or None (informative only)."""
    rpath = src.root / REPORT_NAME
    if not rpath.is_file():
        return None
    try:
        return load_json(rpath, "convert report")
    except (OSError, ValueError):  # too large, too deep or not JSON: informative only
        return None


@dataclass
class _Merged:
    """The merged dataset as it is built: records per split (renumbered), frames to place,
    counts and reports per source."""

    per_split: dict[str, dict[str, list]] = field(default_factory=dict)
    image_id: int = 0
    annotation_id: int = 0
    to_place: list[tuple[Path, Path]] = field(default_factory=list)
    counts: dict[str, Counter] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)

    def add_source(self, src: Source, cfg: MergeConfig) -> None:
        c = self.counts.setdefault(src.dataset_id, Counter())
        sub_report = _sub_report(src)
        self.reports.append(
            {
                "root": str(src.root),
                "dataset_id": src.dataset_id,
                "splits": sorted(src.files),
                "report": sub_report,
            }
        )
        for split, path in src.files.items():
            obj = load_coco(path)
            _check_not_merged(src, path, obj, sub_report)
            if cfg.keep_splits:
                _check_kept_split(split, path)
            target = split if cfg.keep_splits else cfg.split
            bucket = self.per_split.setdefault(target, {"images": [], "annotations": [], "videos": []})
            new_ids = self._add_images(src, path, obj, bucket, c, cfg.follow_symlinks)
            self._add_annotations(src, path, obj, bucket, c, new_ids)
            for v in obj.get("videos") or []:
                if isinstance(v, dict):
                    bucket["videos"].append(dict(v, dataset_id=src.dataset_id, split=target))
            c["polyps"] = c["polyps"]  # filled below
        idents = {
            a["identity_id"]
            for b in self.per_split.values()
            for a in b["annotations"]
            if a["identity_id"].startswith(f"{src.dataset_id}:")
        }
        c["polyps"] = len(idents)
        c["videos"] = len(
            {
                (img["sequence_id"])
                for b in self.per_split.values()
                for img in b["images"]
                if img.get("dataset_id") == src.dataset_id and "sequence_id" in img
            }
        )

    def _add_images(
        self, src: Source, path: Path, obj: dict[str, Any], bucket: dict[str, list], c: Counter, follow: Any
    ) -> dict[Any, int]:
        """The file's image records, checked and renumbered; returns {old id: new id}."""
        new_ids: dict[Any, int] = {}
        for i, img in enumerate(obj["images"]):
            where = f"image {img.get('id')!r}" if isinstance(img, dict) else f"images[{i}]"
            if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or not img["file_name"]:
                raise ConvertError(path, "bad_image", "image has no file_name", where, "file_name")
            name = img["file_name"].replace("\\", "/")
            if name.startswith("/") or ".." in name.split("/") or "\0" in name:
                raise ConvertError(
                    path, "unsafe_path", f"{name!r} leaves the images folder", where, "file_name"
                )
            if (
                img.get("id") in new_ids
                or isinstance(img.get("id"), bool)
                or not isinstance(img.get("id"), int)
            ):
                raise ConvertError(
                    path, "bad_image", "image id missing, not an integer or repeated", where, "id"
                )
            problem = link_problem(str(src.root), f"images/{name}", follow)
            if problem is not None:
                raise ConvertError(path, "symlink", f"images/{name} {problem}", where, "file_name")
            srcfile = src.root / "images" / name
            if not srcfile.is_file():
                raise ConvertError(path, "missing_frame", f"{srcfile} does not exist", where, "file_name")
            self.image_id += 1
            new_ids[img["id"]] = self.image_id
            rec = dict(img, id=self.image_id, file_name=f"{src.dataset_id}/{name}", dataset_id=src.dataset_id)
            bucket["images"].append(rec)
            self.to_place.append((srcfile, Path(src.dataset_id) / name))
            c["images"] += 1
        return new_ids

    def _add_annotations(
        self, src: Source, path: Path, obj: dict[str, Any], bucket: dict[str, list], c: Counter, new_ids: dict
    ) -> None:
        """The file's annotation records, checked, renumbered, identities prefixed by the dataset id."""
        for i, ann in enumerate(obj.get("annotations", [])):
            where = f"annotation {ann.get('id')!r}" if isinstance(ann, dict) else f"annotations[{i}]"
            if not isinstance(ann, dict) or ann.get("image_id") not in new_ids:
                raise ConvertError(
                    path, "missing_image", "image_id names no image of the file", where, "image_id"
                )
            ident = ann.get("identity_id")
            if not isinstance(ident, str | int) or isinstance(ident, bool) or ident == "":
                raise ConvertError(
                    path, "bad_type", f"identity_id {ident!r} is not a string", where, "identity_id"
                )
            self.annotation_id += 1
            rec = dict(
                ann,
                id=self.annotation_id,
                image_id=new_ids[ann["image_id"]],
                identity_id=f"{src.dataset_id}:{ident}",
                source_identity_id=ident,
            )
            bucket["annotations"].append(rec)
            c["annotations"] += 1


def _write_output(
    staged: StagedFiles,
    cfg: MergeConfig,
    to_place: list[tuple[Path, Path]],
    per_split: dict[str, dict[str, list]],
    counts: dict[str, Counter],
    reports: list[dict[str, Any]],
    progress: bool,
) -> dict[str, Any]:
    """The images, the report and every annotation file of the merge, under the staging folder."""
    out = Path(cfg.out_root)
    images = staged.folder("images")
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="merge") as pool:
        links = place_images([(src, images / rel) for src, rel in to_place], cfg.link, pool, progress)
    report = {
        "converter": "merge",
        "out_root": str(out),
        "link": cfg.link,
        "datasets": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "splits": {
            s: {
                "videos": len({(i.get("dataset_id"), i.get("sequence_id")) for i in b["images"]}),
                "images": len(b["images"]),
                "annotations": len(b["annotations"]),
                "polyps": len({a["identity_id"] for a in b["annotations"]}),
            }
            for s, b in sorted(per_split.items())
        },
        "links": dict(sorted(links.items())),
        "sources": reports,
    }
    info = {
        "description": MERGED_DESCRIPTION,
        "sources": [
            {"root": r["root"], "dataset_id": r["dataset_id"], "splits": r["splits"]} for r in reports
        ],
    }
    with staged.writing(REPORT_NAME) as path:
        write_json_atomic(path, report)
    for split, b in sorted(per_split.items()):
        with staged.writing(f"annotations/instances_{split}.json") as path:
            write_coco_atomic(path, dict(info, split=split), b["images"], b["annotations"], b["videos"])
    return report
