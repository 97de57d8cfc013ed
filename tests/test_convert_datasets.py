"""`polyp-ssl convert sun | polypsset | ldpolyp | table` end to end on synthetic raw layouts
(`polyp-ssl synth --layout ...`, traps included), and the converters' bad-input messages."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import polyp_ssl.ingest.convert.common as common
from polyp_ssl.entry import main as entry_main
from polyp_ssl.ingest.convert.common import clamp_corners, frame_number, natural_key, report_error_rows
from polyp_ssl.ingest.convert.sun import parse_size

SYNTH = ["--videos", "6", "--frames-per-video", "24", "--width", "96", "--height", "80", "--workers", "1"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """One synthetic raw download per layout (read-only for the tests)."""
    base = tmp_path_factory.mktemp("raw")
    out = {}
    for layout in ("sun", "polypsset", "ldpolyp", "table"):
        assert entry_main(["synth", str(base / layout), "--layout", layout, "--quiet", *SYNTH]) == 0
        out[layout] = base / layout
    return out


def expected(root: Path) -> dict:
    return json.loads((root / "synth_layout.json").read_text())


def convert(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = entry_main(["convert", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def check_root(root: Path) -> dict[str, dict]:
    """Invariants of every converted root: each image file exists, frames of a video are in
    frame order with distinct frame ids, every box lies inside its frame."""
    cocos = {
        p.stem[len("instances_") :]: json.loads(p.read_text()) for p in (root / "annotations").glob("*.json")
    }
    for coco in cocos.values():
        images = {i["id"]: i for i in coco["images"]}
        last: dict[str, int] = {}
        for img in coco["images"]:
            assert (root / "images" / img["file_name"]).is_file()
            assert img["frame_id"] > last.get(img["sequence_id"], -1)
            last[img["sequence_id"]] = img["frame_id"]
        for a in coco["annotations"]:
            img = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= img["width"] + 1e-9 and y + h <= img["height"] + 1e-9
    return cocos


def test_pure_helpers():
    assert sorted(["img10.jpg", "img9.jpg", "img100.jpg"], key=natural_key) == [
        "img9.jpg",
        "img10.jpg",
        "img100.jpg",
    ]
    assert frame_number("case_M_3_image0012.jpg") == 12 and frame_number("abc.jpg") is None
    assert clamp_corners(-5, 2, 20, 90, 64, 48) == ((0.0, 2.0, 20.0, 46.0), "clamped")
    assert clamp_corners(1, 2, 3, 4, 64, 48) == ((1, 2, 2, 2), "")
    assert clamp_corners(-30, 2, -5, 9, 64, 48) == (None, "box_outside_frame")
    assert clamp_corners(5, 2, 5, 9, 64, 48) == (None, "zero_area_box")
    assert parse_size("6mm") == 6.0 and parse_size("15mm-") == 15.0 and parse_size(" 3.5 mm") == 3.5
    assert parse_size("unknown") is None and parse_size("5-10mm") is None


def test_sun_every_box_accounted_for(raw, tmp_path, capsys):
    exp = expected(raw["sun"])
    c = exp["counts"]
    rc, out, err = convert(capsys, "sun", raw["sun"], tmp_path / "sun")
    assert rc == 0, err
    report = json.loads((tmp_path / "sun" / "convert_report.json").read_text())
    boxes = report["boxes"]
    assert boxes["seen"] == c["boxes"]
    assert boxes["clamped"] == c["clamped"]
    assert boxes["dropped"] == {
        "box_outside_frame": c["dropped_box_outside_frame"],
        "extra_box_same_polyp": c["dropped_extra_box_same_polyp"],
    }
    assert boxes["converted"] + sum(boxes["dropped"].values()) == boxes["seen"]
    assert report["files"]["images_of_negative_cases_skipped"] == c["negative_frames"]
    assert report["files"]["images_without_box_line"] == c["frames_without_line"]
    assert "boxes:" in out and "clamped" in out  # the discrepancy report is printed too
    coco = check_root(tmp_path / "sun")["all"]
    assert boxes["converted"] == len(coco["annotations"])
    # one identity per positive case; size in mm from the string, text kept; SUN pathology
    by_case = {}
    for a in coco["annotations"]:
        by_case.setdefault(a["identity_id"], set()).add((a["size"], a["size_text"], a["histology"]))
    assert set(by_case) == set(exp["polyps"])
    for case, truth in exp["polyps"].items():
        ((size, text, hist),) = by_case[case]
        assert text == truth["size_text"] and size == parse_size(truth["size_text"])
        assert hist.split()[0].lower() in {"low-grade", "hyperplastic", "sessile", "traditional"}
    assert report["other"]["size_unparsed (kept as text)"] == 1
    # frames by number although names are unpadded (image10 lists before image9)
    seq = [i for i in coco["images"] if i["sequence_id"] == "case1"]
    assert [i["frame_id"] for i in seq] == list(range(24))
    assert all(i["file_name"] == f"case1/case_M_1_image{i['frame_id']}.jpg" for i in seq)


def test_sun_negatives_opt_in(raw, tmp_path, capsys):
    c = expected(raw["sun"])["counts"]
    rc, _, err = convert(capsys, "sun", raw["sun"], tmp_path / "sun", "--negatives", "--split", "train")
    assert rc == 0, err
    coco = load(tmp_path / "sun", "train")
    negative = [i for i in coco["images"] if i["sequence_id"] == "case6"]
    assert len(negative) == c["negative_frames"]
    assert not {a["image_id"] for a in coco["annotations"]} & {i["id"] for i in negative}


def test_polypsset_pairs_by_name_and_counts_unpaired(raw, tmp_path, capsys):
    exp = expected(raw["polypsset"])
    c = exp["counts"]
    rc, out, err = convert(capsys, "polypsset", raw["polypsset"], tmp_path / "pp")
    assert rc == 0, err
    report = json.loads((tmp_path / "pp" / "convert_report.json").read_text())
    assert report["files"]["unpaired_images"] == c["unpaired_images"]
    assert report["files"]["unpaired_xml"] == c["unpaired_xml"]
    assert report["files"]["train2019_pairs_skipped"] == c["train2019_pairs"]
    assert report["boxes"]["seen"] == report["boxes"]["converted"] == c["boxes"]
    cocos = check_root(tmp_path / "pp")
    assert set(cocos) == {"val", "test"}
    assert sum(len(co["images"]) for co in cocos.values()) == c["frames"]
    hist = {a["identity_id"]: a["histology"] for co in cocos.values() for a in co["annotations"]}
    assert hist == {k: v["histology"] for k, v in exp["polyps"].items()}
    # sequences from the subfolders, paper-style names, frames in number order
    img = cocos["val"]["images"][0]
    assert img["sequence_id"] == "val_5" and img["file_name"] == f"val_5_{img['frame_id']}.jpg"
    # train2019 as one sequence per frame
    rc, _, err = convert(capsys, "polypsset", raw["polypsset"], tmp_path / "pp2", "--train2019", "frames")
    assert rc == 0, err
    train = load(tmp_path / "pp2", "train")
    assert len(train["images"]) == c["train2019_pairs"]
    assert len({i["sequence_id"] for i in train["images"]}) == c["train2019_pairs"]


def test_ldpolyp_one_identity_per_video(raw, tmp_path, capsys):
    exp = expected(raw["ldpolyp"])
    c = exp["counts"]
    rc, _, err = convert(capsys, "ldpolyp", raw["ldpolyp"], tmp_path / "ld")
    assert rc == 0, err
    report = json.loads((tmp_path / "ld" / "convert_report.json").read_text())
    assert report["boxes"]["seen"] == c["boxes"]
    assert report["boxes"]["clamped"] == c["clamped"]
    assert report["boxes"]["dropped"] == {"extra_box_same_polyp": c["dropped_extra_box_same_polyp"]}
    assert report["files"]["unpaired_images"] == c["unpaired_images"]
    assert "one polyp per video" in report["identity_rule"]
    cocos = check_root(tmp_path / "ld")
    assert "one polyp per video" in cocos["train"]["info"]["identity_rule"]
    images = {i["id"]: i for co in cocos.values() for i in co["images"]}
    assert sum(len(co["images"]) for co in cocos.values()) == c["frames"]
    for co in cocos.values():
        for a in co["annotations"]:
            assert a["identity_id"] == images[a["image_id"]]["sequence_id"]
    assert {i["sequence_id"] for i in images.values()} == set(exp["polyps"])


def test_table_csv_and_parquet_carry_everything(raw, tmp_path, capsys):
    exp = expected(raw["table"])
    c = exp["counts"]
    rc, _, err = convert(
        capsys, "table", raw["table"] / "boxes.csv", tmp_path / "tb", "--dataset-id", "polypsize"
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "tb" / "convert_report.json").read_text())
    assert report["boxes"] == {
        "seen": c["boxes"],
        "converted": c["boxes"],
        "clamped": c["clamped"],
        "dropped": {},
    }
    cocos = check_root(tmp_path / "tb")
    assert set(cocos) == {"train", "val", "test"}  # from the table's split column
    anns = [a for co in cocos.values() for a in co["annotations"]]
    assert len(anns) == c["boxes"]
    assert {a["identity_id"]: (a["size"], a["histology"]) for a in anns} == {
        k: (v["size_mm"], v["histology"]) for k, v in exp["polyps"].items()
    }
    assert {a["site"] for a in anns} == {"site0", "site1"}  # an extra column, kept as metadata
    assert {i["dataset_id"] for co in cocos.values() for i in co["images"]} == {"polypsize"}
    assert sum(len(co["images"]) for co in cocos.values()) == c["frames"]
    # the same rows as Parquet give the same annotation files
    with open(raw["table"] / "boxes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    work = tmp_path / "pq"
    shutil.copytree(raw["table"], work)
    pq.write_table(pa.Table.from_pylist(rows), work / "boxes.parquet")
    rc, _, err = convert(
        capsys, "table", work / "boxes.parquet", tmp_path / "tb2", "--dataset-id", "polypsize"
    )
    assert rc == 0, err
    for split in cocos:
        a, b = load(tmp_path / "tb", split), load(tmp_path / "tb2", split)
        assert a["annotations"] == b["annotations"] and a["images"] == b["images"]


def _copy(raw: Path, tmp: Path) -> Path:
    dst = tmp / raw.name
    shutil.copytree(raw, dst)
    return dst


@pytest.mark.parametrize(
    "layout, breaks, where",
    [
        ("sun", "sun_bad_box", "line"),
        ("sun", "sun_missing_frame", "line"),
        ("ldpolyp", "ld_count_mismatch", "line 1"),
        ("ldpolyp", "ld_bad_number", "line 2"),
        ("polypsset", "pp_bad_xml", "Annotation"),
        ("table", "table_bad_number", "line 2"),
        ("table", "table_unsafe_path", "line 2"),
    ],
)
def test_bad_input_is_named_and_nothing_written(raw, tmp_path, capsys, layout, breaks, where):
    src = _copy(raw[layout], tmp_path)
    target = None
    if breaks.startswith("sun"):
        target = src / "annotation_txt" / "case1.txt"
        lines = target.read_text().splitlines()
        lines[0] = (
            "case_M_1_image5.jpg 1,2,x,4,0" if breaks == "sun_bad_box" else "case_M_1_image999.jpg 1,2,3,4,0"
        )
        target.write_text("\n".join(lines) + "\n")
    elif breaks.startswith("ld"):
        target = sorted(
            (src / "TrainValid" / "Annotations" / "1").glob("*.txt"), key=lambda p: natural_key(p.name)
        )[0]
        target.write_text("3\n1 2 3 4\n" if breaks == "ld_count_mismatch" else "1\n1 2 three 4\n")
    elif breaks == "pp_bad_xml":
        target = sorted((src / "val2019" / "Annotation" / "5").glob("*.xml"))[0]
        target.write_text("<annotation><object>")
    else:
        target = src / "boxes.csv"
        lines = target.read_text().splitlines()
        parts = lines[1].split(",")
        if breaks == "table_bad_number":
            parts[3] = "12px"
        else:
            parts[2] = "../../etc/passwd"
        lines[1] = ",".join(parts)
        target.write_text("\n".join(lines) + "\n")
    name = {"table": "table"}.get(layout, layout)
    arg = src / "boxes.csv" if layout == "table" else src
    rc, _, err = convert(capsys, name, arg, tmp_path / "out")
    assert rc == 1
    assert str(target) in err and where in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "annotations").exists() or not list(
        (tmp_path / "out" / "annotations").iterdir()
    )
    # with --on-error skip the rest converts and the problem is in the report
    rc, _, err = convert(capsys, name, arg, tmp_path / "out2", "--on-error", "skip")
    assert rc == 0, err
    report = json.loads((tmp_path / "out2" / "convert_report.json").read_text())
    assert report["n_skipped"] >= 1 and any(str(target) == p["source"] for p in report["problems"])


@pytest.mark.parametrize("layout", ["sun", "polypsset", "ldpolyp", "table"])
def test_crash_then_rerun_equals_uninterrupted_run(raw, tmp_path, capsys, monkeypatch, layout):
    arg = raw[layout] / "boxes.csv" if layout == "table" else raw[layout]
    rc, _, err = convert(capsys, layout, arg, tmp_path / "clean")
    assert rc == 0, err
    real = common.link_file
    calls = {"n": 0}

    def dying(src, dst, mode):  # the disk fills up after 30 frames
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, mode)

    monkeypatch.setattr(common, "link_file", dying)
    rc, _, err = convert(capsys, layout, arg, tmp_path / "crashed", "--workers", "1")
    assert rc == 1 and "No space left on device" in err and "Traceback" not in err
    assert not list((tmp_path / "crashed" / "annotations").glob("*.json"))  # nothing looks complete
    monkeypatch.setattr(common, "link_file", real)
    rc, _, err = convert(capsys, layout, arg, tmp_path / "crashed")
    assert rc == 0, err
    for p in sorted((tmp_path / "clean" / "annotations").iterdir()):
        assert p.read_bytes() == (tmp_path / "crashed" / "annotations" / p.name).read_bytes()
    files = lambda r: sorted(str(p.relative_to(r)) for p in (r / "images").rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "clean") == files(tmp_path / "crashed")
    assert not list((tmp_path / "crashed").rglob(".*tmp*"))


def test_report_rows_for_the_errors_table(raw, tmp_path, capsys):
    rc, _, err = convert(capsys, "sun", raw["sun"], tmp_path / "sun")
    assert rc == 0, err
    report = json.loads((tmp_path / "sun" / "convert_report.json").read_text())
    rows = report_error_rows(report, "convert_report.json")
    by = {(r["reason"], r["action"]) for r in rows}
    assert ("boxes_converted", "converted") in by and ("box_clamped", "clamped") in by
    assert ("box_outside_frame", "dropped") in by and ("extra_box_same_polyp", "dropped") in by
    # the table's columns, and `items`: what the row stands for (ingest's summary counts it)
    assert all(set(r) == {"source", "id", "field", "reason", "detail", "action", "items"} for r in rows)
    counts = {r["reason"]: r["items"] for r in rows if r["action"] == "dropped" and r["id"] is None}
    assert counts["extra_box_same_polyp"] == report["boxes"]["dropped"]["extra_box_same_polyp"]


def test_symlinked_raw_input_is_refused(raw, tmp_path, capsys):
    src = _copy(raw["ldpolyp"], tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("1\n1 2 30 40\n")
    victim = sorted((src / "Test" / "Annotations").rglob("*.txt"))[0]
    victim.unlink()
    victim.symlink_to(outside)
    rc, _, err = convert(capsys, "ldpolyp", src, tmp_path / "out")
    assert rc == 1 and "symbolic link" in err and str(victim) in err


def test_table_with_video_path_decodes_frames(tmp_path, capsys):
    root = tmp_path / "seed"
    args = ["--videos", "1", "--frames-per-video", "20", "--width", "64", "--height", "64", "--workers", "1"]
    assert entry_main(["synth", str(root), "--mp4", "--quiet", *args]) == 0
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    images = {i["id"]: i for i in coco["images"]}
    rows = ["video,frame,video_path,x,y,w,h,identity,size_mm,histology"]
    boxed = set()
    for a in coco["annotations"]:
        img = images[a["image_id"]]
        boxed.add(img["frame_id"])
        x, y, w, h = a["bbox"]
        rows.append(
            f"v1,{img['frame_id']},videos/001-001.mp4,{x},{y},{w},{h},{a['identity_id']},{a['size']},AD"
        )
    rows += [f"v1,{t},videos/001-001.mp4,,,,,,," for t in range(20) if t not in boxed]
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    rc, _, err = convert(capsys, "table", root / "boxes.csv", tmp_path / "out", "--dataset-id", "clinic")
    assert rc == 0, err
    got = load(tmp_path / "out", "all")
    assert [i["frame_id"] for i in got["images"]] == list(range(20))
    assert len(got["annotations"]) == len(coco["annotations"])
    from PIL import Image

    with Image.open(tmp_path / "out" / "images" / got["images"][3]["file_name"]) as im:
        assert im.size == (64, 64) and im.format == "JPEG"
    # a frame index beyond the video's end is named
    (root / "boxes.csv").write_text("\n".join([*rows, "v1,99,videos/001-001.mp4,,,,,,,"]) + "\n")
    rc, _, err = convert(capsys, "table", root / "boxes.csv", tmp_path / "out2")
    assert rc == 1 and "beyond the video" in err and "boxes.csv" in err


@pytest.mark.parametrize("point", ["convert_image_placed:40", "convert_annotation_written:1"])
def test_sigkill_then_rerun_equals_uninterrupted_run(raw, tmp_path, point):
    """A real SIGKILL of `polyp-ssl convert ldpolyp` (two annotation files) mid-way; the same
    command again gives the uninterrupted run's annotation files and images."""
    import os
    import signal
    import subprocess
    import sys

    def cli(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "polyp_ssl",
            "convert",
            "ldpolyp",
            str(raw["ldpolyp"]),
            str(out),
            "--no-progress",
        ]
        return subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
        )

    assert cli(tmp_path / "clean").returncode == 0
    killed = cli(tmp_path / "out", {"POLYP_SSL_TEST_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL
    written = sorted(p.name for p in (tmp_path / "out" / "annotations").glob("*.json"))
    assert written == ([] if point.startswith("convert_image") else ["instances_test.json"])
    done = cli(tmp_path / "out")
    assert done.returncode == 0, done.stderr
    for p in sorted((tmp_path / "clean" / "annotations").iterdir()):
        assert p.read_bytes() == (tmp_path / "out" / "annotations" / p.name).read_bytes()
    files = lambda r: sorted(str(p.relative_to(r)) for p in (r / "images").rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "clean") == files(tmp_path / "out")
    assert not list((tmp_path / "out").rglob(".*tmp*"))
