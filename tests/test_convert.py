"""`polyp-ssl convert realcolon` on a tiny REAL-Colon raw layout built here."""

from __future__ import annotations

import json
import os

import pytest
from pycocotools.coco import COCO

from polyp_ssl.entry import main as entry_main
from polyp_ssl.ingest.convert.realcolon import (
    ConvertError,
    Problems,
    default_split,
    parse_voc,
    read_split_file,
)
from tests.convert_factory import LESIONS, N_FRAMES, VIDEOS, H, W, build_raw, voc_xml


def convert(capsys, *args) -> tuple[int, str, str]:
    code = entry_main(["convert", "realcolon", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def expected_boxes(video: str) -> dict[int, dict[str, list[float]]]:
    return {
        t: {o[0]: [o[2], o[4], o[3] - o[2], o[5] - o[4]] for o in objs} for t, objs in VIDEOS[video].items()
    }


def test_convert_default_split_loads_with_pycocotools(tmp_path, capsys):
    raw = build_raw(tmp_path / "raw")
    out = tmp_path / "rc"
    code, stdout, err = convert(capsys, raw, out)
    assert code == 0, err
    # default split: per site sorted, 3 train : 1 val : 1 test -> every video here is the 1st/2nd of its site
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["instances_train.json"]
    coco = COCO(str(out / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == sum(N_FRAMES.values())  # frames without objects are images too
    assert len(coco.getAnnIds()) == sum(len(o) for v in VIDEOS.values() for o in v.values())
    lesions = {row[0]: row for row in LESIONS}
    for video in VIDEOS:
        got: dict[int, dict[str, list[float]]] = {}
        for img in coco.loadImgs(coco.getImgIds()):
            if img["sequence_id"] != video:
                continue
            assert img["file_name"] == f"{video}_{img['frame_id']}.jpg"
            assert (img["width"], img["height"], img["dataset_id"]) == (W, H, "realcolon")
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            if anns:
                got[img["frame_id"]] = {a["identity_id"]: a["bbox"] for a in anns}
            for a in anns:
                lesion = lesions[a["identity_id"]]
                assert a["size"] == (float(lesion[2]) if lesion[2] else None)
                assert a["histology"] == lesion[5] and a["site"] == lesion[3]
                assert a["histology_extended"] == (lesion[4] or None)
                assert a["category_id"] == 1 and isinstance(a["box_id"], int)
        assert got == expected_boxes(video)
    # two polyps in one frame
    two = [i for i in coco.getImgIds() if len(coco.getAnnIds(imgIds=[i])) == 2]
    assert len(two) == 1
    # frames are hard links of the raw frames
    src = raw / "001-001_frames" / "001-001_2.jpg"
    assert os.stat(out / "images" / "001-001_2.jpg").st_ino == os.stat(src).st_ino
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    videos = {v["sequence_id"]: v for v in data["videos"]}
    assert videos["001-001"]["fps"] == 29.97 and videos["001-001"]["num_frames"] == 6
    assert videos["001-002"]["bbps"] is None and videos["002-001"]["endoscope_brand"] == "Pentax"
    report = json.loads((out / "convert_report.json").read_text())
    n_empty = sum(N_FRAMES.values()) - sum(len(v) for v in VIDEOS.values())
    assert report["frames_without_objects"] == n_empty and report["n_skipped"] == 0
    assert report["links"] == {"hardlink": sum(N_FRAMES.values())}
    # a second run finds the links in place and writes the same annotations
    before = (out / "annotations" / "instances_train.json").read_bytes()
    assert convert(capsys, raw, out)[0] == 0
    assert (out / "annotations" / "instances_train.json").read_bytes() == before
    assert json.loads((out / "convert_report.json").read_text())["links"] == {
        "present": sum(N_FRAMES.values())
    }


def test_default_split_is_per_site_and_deterministic():
    videos = [f"{s:03d}-{v:03d}" for s in (1, 2, 3, 4) for v in range(1, 16)]
    split = default_split(list(reversed(videos)))
    assert split == default_split(videos)
    for site in ("001", "002", "003", "004"):
        per = [split[v] for v in videos if v.startswith(site)]
        assert (per.count("train"), per.count("val"), per.count("test")) == (9, 3, 3)
    assert split["001-004"] == "val" and split["001-005"] == "test" and split["001-006"] == "train"


@pytest.mark.parametrize("fmt", ["csv", "json", "json_lists", "csv_noheader"])
def test_split_file(tmp_path, capsys, fmt):
    raw = build_raw(tmp_path / "raw")
    mapping = {"001-001": "train", "002-001": "test"}  # 001-002 left out on purpose
    if fmt == "csv":
        path = tmp_path / "s.csv"
        path.write_text("unique_video_name,split\n" + "".join(f"{v},{s}\n" for v, s in mapping.items()))
    elif fmt == "csv_noheader":
        path = tmp_path / "s.csv"
        path.write_text("".join(f"{v},{s}\n" for v, s in mapping.items()))
    elif fmt == "json":
        path = tmp_path / "s.json"
        path.write_text(json.dumps(mapping))
    else:
        path = tmp_path / "s.json"
        path.write_text(json.dumps({"train": ["001-001"], "test": ["002-001"]}))
    assert read_split_file(path) == mapping
    out = tmp_path / "rc"
    code, _, err = convert(capsys, raw, out, "--split-file", path)
    assert code == 0, err
    for split, video in (("train", "001-001"), ("test", "002-001")):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert {img["sequence_id"] for img in coco.loadImgs(coco.getImgIds())} == {video}
        assert len(coco.getImgIds()) == N_FRAMES[video]
    report = json.loads((out / "convert_report.json").read_text())
    assert report["videos_not_in_split_file"] == ["001-002"]


def test_bad_split_file(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("video,split\n001-001,train/../x\n")
    with pytest.raises(ConvertError, match=r"s\.csv: line 2: field 'split'"):
        read_split_file(path)


BAD_CASES = [
    (("001-001", 2, "size"), None, "001-001_2.xml", "size/width", "missing_field"),
    (("001-001", 3, "unique_id"), None, "001-001_3.xml", "unique_id", "missing_unique_id"),
    (("001-002", 1, "number"), None, "001-002_1.xml", "bndbox/xmin", "bad_number"),
    (None, [r for r in LESIONS if r[0] != "002-001_1"], "002-001_2.xml", "unique_id", "unknown_unique_id"),
]


@pytest.mark.parametrize(("bad", "lesions", "file", "field", "reason"), BAD_CASES)
def test_bad_input_fails_naming_file_and_field_and_writes_nothing(
    tmp_path, capsys, bad, lesions, file, field, reason
):
    raw = build_raw(tmp_path / "raw", lesions=lesions or LESIONS, bad=bad)
    out = tmp_path / "rc"
    code, _, err = convert(capsys, raw, out)
    assert code == 1
    assert file in err and f"field {field!r}" in err
    assert not out.exists()
    # with --on-error skip the item is left out and counted
    code, _, err = convert(capsys, raw, out, "--on-error", "skip")
    assert code == 0, err
    report = json.loads((out / "convert_report.json").read_text())
    assert report["skipped"] == {reason: 1}
    assert report["problems"][0]["field"] == field and report["problems"][0]["source"].endswith(file)
    coco = COCO(str(out / "annotations" / "instances_train.json"))
    n_ann = sum(len(o) for v in VIDEOS.values() for o in v.values())
    n_img = sum(N_FRAMES.values())
    if reason == "missing_field":  # the whole frame is left out
        assert len(coco.getImgIds()) == n_img - 1 and len(coco.getAnnIds()) == n_ann - 2
    else:  # one object left out
        assert len(coco.getImgIds()) == n_img and len(coco.getAnnIds()) == n_ann - 1


def test_bad_lesion_size_is_an_error(tmp_path, capsys):
    lesions = [("001-001_1", "001-001", "about 4", "rectum", "", "AD"), *LESIONS[1:]]
    raw = build_raw(tmp_path / "raw", lesions=lesions)
    code, _, err = convert(capsys, raw, tmp_path / "rc")
    assert code == 1 and "lesion_info.csv" in err and "'size [mm]'" in err and "001-001_1" in err


def test_missing_lesion_info(tmp_path, capsys):
    raw = build_raw(tmp_path / "raw")
    (raw / "lesion_info.csv").unlink()
    code, _, err = convert(capsys, raw, tmp_path / "rc")
    assert code == 1 and "lesion_info.csv" in err


@pytest.mark.parametrize("mode", ["copy", "symlink"])
def test_link_modes(tmp_path, capsys, mode):
    raw = build_raw(tmp_path / "raw")
    out = tmp_path / "rc"
    assert convert(capsys, raw, out, "--link", mode, "--empty-frames", "drop")[0] == 0
    dst = out / "images" / "001-001_1.jpg"
    src = raw / "001-001_frames" / "001-001_1.jpg"
    assert dst.read_bytes() == src.read_bytes()
    assert dst.is_symlink() == (mode == "symlink")
    if mode == "copy":
        assert os.stat(dst).st_ino != os.stat(src).st_ino
    n_img = sum(len(v) for v in VIDEOS.values())  # empty frames dropped
    assert len(list((out / "images").iterdir())) == n_img
    assert len(COCO(str(out / "annotations" / "instances_train.json")).getImgIds()) == n_img


def test_parse_voc_fractional_and_skip():
    xml = voc_xml("001-001", 2, VIDEOS["001-001"][2]).encode()
    frame = parse_voc(xml, "x.xml")
    assert (frame.width, frame.height, frame.filename) == (W, H, "001-001_2.jpg")
    assert [o.bbox for o in frame.objects] == [(11.0, 6.5, 20.0, 15.0), (40.0, 30.0, 20.5, 15.0)]
    bad = voc_xml("001-001", 2, [("001-001_1", 1, 30.0, 10.0, 5.0, 20.0)]).encode()  # xmax < xmin
    with pytest.raises(ConvertError, match="no area"):
        parse_voc(bad, "x.xml")
    problems = Problems("skip")
    assert parse_voc(bad, "x.xml", problems).objects == []
    assert problems.counts == {"zero_area_box": 1}
    with pytest.raises(ConvertError, match="not well-formed"):
        parse_voc(b"<annotation>", "x.xml")
