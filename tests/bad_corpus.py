"""The bad-input corpus: malformed COCO annotation files, REAL-Colon raw layouts and CLI flags.

    python tests/bad_corpus.py [DIR]     # writes the corpus to DIR (default tests/data/bad/)

Generated, never committed. Each case is a `BadCase`: the `polyp-ssl` command line that must
fail, the words its error message must contain (file, id, field, reason) and the folder it must
leave without output. `build_corpus(base)` writes every case's input under `base`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest_fixtures import Track, make_root, moving

ANN = "instances_train.json"


@dataclass(frozen=True)
class BadCase:
    name: str
    group: str  # coco | realcolon | cli
    argv: list[str]  # after `polyp-ssl`
    words: tuple[str, ...]  # all must appear in stderr
    out: str  # must hold no file afterwards (except `keep`)
    keep: tuple[str, ...] = ()  # files under `out` that were there before and must stay unchanged


# ---------------------------------------------------------------- COCO


def coco_videos():
    f1, f2 = list(range(0, 8)), list(range(1, 7))
    return {
        ("v1", None): (9, [Track("v1_a", f1, moving(10, 10, 20, 16, f1), 5.0, "AD")]),
        ("v2", None): (8, [Track("v2_a", f2, moving(60, 40, 24, 20, f2), 3.0, "HP")]),
    }


def _ann(coco: dict, k: int = 0) -> dict:
    return coco["annotations"][k]


def _img(coco: dict, k: int = 0) -> dict:
    return coco["images"][k]


def _set_ann(field: str, value, k: int = 2):
    def mutate(coco: dict):
        a = _ann(coco, k)
        a[field] = value
        return coco, (f"annotation {a['id']}", repr(field))

    return mutate


def _set_img(field: str, value, k: int = 1):
    def mutate(coco: dict):
        img = _img(coco, k)
        img[field] = value
        return coco, (f"image {img['id']}", repr(field))

    return mutate


def _drop_ann_key(coco: dict):
    a = _ann(coco, 1)
    del a["bbox"]
    return coco, (f"annotation {a['id']}", "'bbox'", "missing_key")


def _dup_image(coco: dict):
    dup = dict(_img(coco, 3), file_name="copy.jpg")
    coco["images"].append(dup)
    return coco, (f"image {dup['id']}", "duplicate_image_id")


def _dup_annotation(coco: dict):
    a = _ann(coco, 4)
    b = _ann(coco, 5)
    b["id"] = a["id"]
    return coco, (f"annotation {a['id']}", "'id'", "duplicate_annotation_id")


def _huge_id(coco: dict):
    a = _ann(coco, 3)
    a["id"] = 10**30
    return coco, ("annotations[3]", "'id'", "64-bit")


def _surrogate_name(coco: dict):
    _img(coco, 0)["file_name"] = "v1_\udcff.jpg"  # written as the escape \udcff: not text
    return coco, (".images[0].file_name", "bad_text")


def _raw(text: bytes, *words: str):
    return lambda coco: (text, words)


# name -> mutation of the good COCO dict (or raw file bytes) and the words of the message
COCO_CASES: dict[str, Callable] = {
    "empty_file": _raw(b"", "not valid JSON"),
    "json_array": _raw(b'[{"images": []}]', "top level is a list"),
    "non_utf8_bytes": _raw(b'{"images": [], "annotations": [], "x": "\xff\xfe"}', "not valid JSON", "utf-8"),
    "images_not_a_list": lambda c: ({**c, "images": {"1": c["images"][0]}}, ("'images'", "not a list")),
    "missing_annotations_key": lambda c: ({"images": c["images"]}, ("'annotations'", "missing_key")),
    "missing_bbox": _drop_ann_key,
    "bbox_wrong_type": lambda c: _with(_set_ann("bbox", "10,10,5,5")(c), "bad_bbox"),
    "bbox_nan": lambda c: _with(_set_ann("bbox", [10.0, float("nan"), 5.0, 5.0])(c), "nan_box"),
    "bbox_negative_size": lambda c: _with(_set_ann("bbox", [10.0, 10.0, -5.0, 5.0])(c), "zero_area_box"),
    "bbox_huge_numbers": lambda c: _with(
        _set_ann("bbox", [1e308, 1e308, 1e308, 1e308])(c), "box_outside_frame"
    ),
    "width_wrong_type": lambda c: _with(_set_img("width", "160")(c), "bad_type"),
    "height_negative": lambda c: _with(_set_img("height", -128)(c), "bad_type"),
    "size_negative": lambda c: _with(_set_ann("size", -4.0)(c), "bad_value", "negative"),
    "identity_wrong_type": lambda c: _with(_set_ann("identity_id", ["v1_a"])(c), "bad_type"),
    "annotation_id_huge": _huge_id,
    "number_with_5000_digits": _raw(
        b'{"images": [{"id": ' + b"9" * 5000 + b'}], "annotations": []}', "not valid JSON", "digits"
    ),
    "duplicate_image_id": _dup_image,
    "duplicate_annotation_id": _dup_annotation,
    "file_name_escapes_root": lambda c: _with(_set_img("file_name", "../../etc/passwd")(c), "unsafe_path"),
    "file_name_absolute": lambda c: _with(_set_img("file_name", "/etc/passwd")(c), "unsafe_path"),
    "file_name_lone_surrogate": lambda c: _surrogate_name(c),
}


def _with(result, *more: str):
    coco, words = result
    return coco, (*words, *more)


def write_coco_case(base: Path, name: str, good: dict, good_images: Path) -> BadCase:
    root = base / f"coco_{name}"
    (root / "annotations").mkdir(parents=True)
    # hard links, not a linked folder: ingest refuses raw input reached through symbolic links
    (root / "images").mkdir()
    for frame in good_images.iterdir():
        os.link(frame, root / "images" / frame.name)
    content, words = COCO_CASES[name](copy.deepcopy(good))
    path = root / "annotations" / ANN
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))  # ensure_ascii: a lone surrogate stays an escape
    out = root / "out"
    argv = ["ingest", str(root), "--out", str(out), "--no-progress"]
    return BadCase(f"coco/{name}", "coco", argv, (ANN, *words), str(out))


# ---------------------------------------------------------------- REAL-Colon raw layout

RC_W, RC_H = 64, 48
# video -> {t: [(unique_id, xmin, xmax, ymin, ymax)]}
RC_VIDEOS = {
    "001-001": {0: [("001-001_1", 10, 30, 5, 20)], 1: [("001-001_1", 11, 31, 6, 21)], 2: []},
    "001-002": {0: [("001-002_1", 0, 16, 0, 12)], 1: [("001-002_1", 1, 17, 1, 13)]},
}
RC_LESIONS = "unique_object_id,unique_video_name,size [mm],site,histology_extended,histology_class\n" + (
    "001-001_1,001-001,4,rectum,tubular adenoma,AD\n001-002_1,001-002,7,cecum,hyperplastic polyp,HP\n"
)


def rc_xml(video: str, t: int, objects, size: bool = True, uid: bool = True, xmin: str | None = None) -> str:
    parts = [f"<annotation><filename>{video}_{t}.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{RC_W}</width><height>{RC_H}</height><depth>3</depth></size>")
    for u, x0, x1, y0, y1 in objects:
        parts.append(
            f"<object><name>lesion</name>{f'<unique_id>{u}</unique_id>' if uid else ''}<box_id>1</box_id>"
            f"<bndbox><xmin>{xmin or x0}</xmin><xmax>{x1}</xmax><ymin>{y0}</ymin><ymax>{y1}</ymax></bndbox>"
            "</object>"
        )
    return "".join(parts) + "</annotation>"


def build_realcolon(raw: Path) -> Path:
    rng = np.random.default_rng(0)
    for video, frames in RC_VIDEOS.items():
        (raw / f"{video}_frames").mkdir(parents=True)
        (raw / f"{video}_annotations").mkdir()
        for t, objects in frames.items():
            Image.fromarray(rng.integers(0, 255, (RC_H, RC_W, 3), dtype=np.uint8)).save(
                raw / f"{video}_frames" / f"{video}_{t}.jpg"
            )
            (raw / f"{video}_annotations" / f"{video}_{t}.xml").write_text(rc_xml(video, t, objects))
    (raw / "lesion_info.csv").write_text(RC_LESIONS)
    return raw


def _xml(raw: Path, video: str, t: int) -> Path:
    return raw / f"{video}_annotations" / f"{video}_{t}.xml"


def _rc_broken_xml(raw: Path):
    _xml(raw, "001-001", 1).write_text("<annotation><filename>001-001_1.jpg</filename><size>")
    return ("001-001_1.xml", "not well-formed")


def _rc_no_size(raw: Path):
    _xml(raw, "001-002", 0).write_text(rc_xml("001-002", 0, RC_VIDEOS["001-002"][0], size=False))
    return ("001-002_0.xml", "'size/width'")


def _rc_no_unique_id(raw: Path):
    _xml(raw, "001-001", 0).write_text(rc_xml("001-001", 0, RC_VIDEOS["001-001"][0], uid=False))
    return ("001-001_0.xml", "'unique_id'", "no unique_id")


def _rc_bad_number(raw: Path):
    _xml(raw, "001-002", 1).write_text(rc_xml("001-002", 1, RC_VIDEOS["001-002"][1], xmin="1O.5"))
    return ("001-002_1.xml", "'bndbox/xmin'", "'1O.5' is not a number")


def _rc_missing_column(raw: Path):
    lines = RC_LESIONS.splitlines()
    (raw / "lesion_info.csv").write_text("\n".join(",".join(x.split(",")[:-1]) for x in lines) + "\n")
    return ("lesion_info.csv", "'histology_class'", "no column")


def _rc_unknown_unique_id(raw: Path):
    (raw / "lesion_info.csv").write_text(
        RC_LESIONS.splitlines()[0] + "\n" + RC_LESIONS.splitlines()[1] + "\n"
    )
    return ("001-002_0.xml", "'unique_id'", "'001-002_1' is not in lesion_info.csv")


def _rc_csv_not_utf8(raw: Path):
    (raw / "lesion_info.csv").write_bytes(RC_LESIONS.encode() + b"001-003_1,001-003,3,rectum,\xe9chec,AD\n")
    return ("lesion_info.csv", "not UTF-8")


def _rc_non_utf8_names(raw: Path):
    for suffix in (b"_annotations", b"_frames"):
        os.rename(os.fsencode(raw / f"001-002{suffix.decode()}"), os.fsencode(raw) + b"/001-\xff02" + suffix)
    return ("001-\\udcff02_annotations", "'filename'", "is not 001-")


def _rc_empty_lesion_info(raw: Path):
    (raw / "lesion_info.csv").write_text("")
    return ("lesion_info.csv", "empty CSV")


RC_CASES: dict[str, Callable[[Path], tuple[str, ...]]] = {
    "xml_not_well_formed": _rc_broken_xml,
    "xml_missing_size": _rc_no_size,
    "object_without_unique_id": _rc_no_unique_id,
    "unparsable_coordinate": _rc_bad_number,
    "lesion_info_missing_column": _rc_missing_column,
    "unknown_unique_id": _rc_unknown_unique_id,
    "lesion_info_not_utf8": _rc_csv_not_utf8,
    "non_utf8_file_names": _rc_non_utf8_names,
    "lesion_info_empty": _rc_empty_lesion_info,
}


def write_rc_case(base: Path, name: str, good_raw: Path) -> BadCase:
    raw = base / f"rc_{name}"
    shutil.copytree(good_raw, raw)
    words = RC_CASES[name](raw)
    out = base / f"rc_{name}_out"
    argv = ["convert", "realcolon", str(raw), str(out), "--no-progress"]
    return BadCase(f"realcolon/{name}", "realcolon", argv, words, str(out))


# ---------------------------------------------------------------- CLI flags


def cli_cases(base: Path, good_root: Path) -> list[BadCase]:
    def ingest_case(name: str, flags: list[str], words: tuple[str, ...], out: Path | None = None) -> BadCase:
        out = out or base / f"cli_{name}_out"
        argv = ["ingest", str(good_root), "--no-progress", "--out", str(out), *flags]
        return BadCase(f"cli/{name}", "cli", argv, words, str(out))

    file_dir = base / "cli_out_is_a_file"
    file_dir.mkdir()
    (file_dir / "out").write_text("not a folder\n")
    return [
        ingest_case("negative_workers", ["--workers", "-1"], ("--workers", "must be positive")),
        ingest_case("part_index_past_count", ["--part", "3/2"], ("--part", "'3/2'")),
        ingest_case("part_not_a_fraction", ["--part", "half"], ("--part", "'half'")),
        ingest_case(
            "shard_max_bytes_zero", ["--shard-max-bytes", "0"], ("--shard-max-bytes", "at least 1 byte")
        ),
        ingest_case(
            "shard_max_bytes_not_a_size", ["--shard-max-bytes", "lots"], ("--shard-max-bytes", "'lots'")
        ),
        ingest_case("unknown_on_error", ["--on-error", "ignore"], ("--on-error", "'ignore'")),
        ingest_case("jpeg_quality_out_of_range", ["--jpeg-quality", "101"], ("--jpeg-quality", "1..100")),
        ingest_case("resume_and_overwrite", ["--resume", "--overwrite"], ("--resume", "--overwrite")),
        BadCase(
            "cli/out_is_a_file",
            "cli",
            ["ingest", str(good_root), "--no-progress", "--out", str(file_dir / "out")],
            ("is a file, not a folder", str(file_dir / "out")),
            str(file_dir),
            keep=("out",),
        ),
        BadCase(
            "cli/convert_unknown_link",
            "cli",
            ["convert", "realcolon", str(base / "_rc_good"), str(base / "cli_link_out"), "--link", "move"],
            ("--link", "'move'"),
            str(base / "cli_link_out"),
        ),
    ]


# ---------------------------------------------------------------- the corpus


def build_corpus(base: str | os.PathLike[str]) -> list[BadCase]:
    """Write every case's input under `base` (an empty or missing folder); return the cases."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    good_root = base / "_coco_good"
    good = make_root(str(good_root), coco_videos())
    good_raw = build_realcolon(base / "_rc_good")
    cases = [write_coco_case(base, name, good, good_root / "images") for name in COCO_CASES]
    cases += [write_rc_case(base, name, good_raw) for name in RC_CASES]
    cases += cli_cases(base, good_root)
    return cases


def files_under(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bad")
    base = Path(argv[0] if argv else default)
    if base.exists() and any(base.iterdir()):
        print(f"{base} is not empty: remove it first", file=sys.stderr)
        return 1
    cases = build_corpus(base)
    for case in cases:
        print(f"{case.name}: polyp-ssl {' '.join(case.argv)}")
    print(f"{len(cases)} bad inputs in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
