"""Bad input: a clear message naming file, id and field; `fail` leaves nothing visible, `skip`
records an errors row and keeps every other annotation."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Track, make_root, moving, write_coco, write_mp4

from polyp_ssl.ingest.cli import main as ingest_main


def small_videos():
    return {
        ("v1", None): (12, [Track("v1_a", list(range(0, 10)), moving(10, 10, 20, 16, list(range(0, 10))))]),
        ("v2", None): (10, [Track("v2_a", list(range(2, 9)), moving(60, 40, 24, 20, list(range(2, 9))))]),
    }


def visible_output(out) -> list[str]:
    found = glob.glob(os.path.join(out, "shards", "**", "*"), recursive=True)
    found += glob.glob(os.path.join(out, "catalog", "**", "*"), recursive=True)
    return [f for f in found if os.path.isfile(f)]


def first_ann(coco, image_frame=None, seq="v1"):
    """The annotation of the v1_a box in frame `image_frame` of `seq` (default: the first)."""
    imgs = {i["id"]: i for i in coco["images"]}
    for a in coco["annotations"]:
        img = imgs.get(a["image_id"])
        if img and img["sequence_id"] == seq and (image_frame is None or img["frame_id"] == image_frame):
            return a
    raise AssertionError("no such annotation")


def break_missing_key(root, coco):
    a = first_ann(coco)
    del a["identity_id"]
    return a["id"], "identity_id", "missing_key"


def break_missing_image(root, coco):
    a = first_ann(coco, 3)
    a["image_id"] = 999999
    return a["id"], "image_id", "missing_image"


def break_zero_area(root, coco):
    a = first_ann(coco, 4)
    a["bbox"] = [10, 10, 0, 16]
    return a["id"], "bbox", "zero_area_box"


def break_nan_box(root, coco):
    a = first_ann(coco, 5)
    a["bbox"] = [10, float("nan"), 20, 16]
    return a["id"], "bbox", "nan_box"


def break_duplicate_identity(root, coco):
    a = first_ann(coco, 6)
    dup = dict(a, id=777777, bbox=[50, 50, 10, 10])
    coco["annotations"].append(dup)
    return 777777, "identity_id", "duplicate_identity_in_frame"


def break_missing_frame(root, coco):
    a = first_ann(coco, 7)
    img = next(i for i in coco["images"] if i["id"] == a["image_id"])
    os.remove(os.path.join(root, "images", img["file_name"]))
    return a["id"], "file_name", "missing_frame"


def break_unreadable_frame(root, coco):
    a = first_ann(coco, 2)
    img = next(i for i in coco["images"] if i["id"] == a["image_id"])
    with open(os.path.join(root, "images", img["file_name"]), "wb") as f:
        f.write(b"\xff\xd8 this is not a jpeg")
    return a["id"], "file_name", "unreadable_frame"


CASES = {
    "missing_key": break_missing_key,
    "missing_image": break_missing_image,
    "zero_area_box": break_zero_area,
    "nan_box": break_nan_box,
    "duplicate_identity_in_frame": break_duplicate_identity,
    "missing_frame": break_missing_frame,
    "unreadable_frame": break_unreadable_frame,
}


@pytest.mark.parametrize("mode", ["fail", "skip"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(tmp_path, capsys, case, mode):
    root = tmp_path / "root"
    coco = make_root(str(root), small_videos())
    ann_id, field, reason = CASES[case](str(root), coco)
    path = write_coco(str(root), "train", coco)
    n_in = len(coco["annotations"])
    rc = ingest_main([str(root), "--no-progress", "--on-error", mode, "--shard-max-bytes", "1"])
    err = capsys.readouterr().err
    if mode == "fail":
        assert rc != 0
        assert f"annotation {ann_id}" in err and repr(field) in err and reason in err, err
        assert ("instances_train.json" in err) or ("images" in err)
        assert visible_output(root) == []
        return
    assert rc == 0, err
    errors = pq.read_table(root / "catalog" / "errors.parquet").to_pylist()
    assert [(e["id"], e["field"], e["reason"], e["action"]) for e in errors] == [
        (f"annotation {ann_id}", field, reason, "skipped")
    ]
    assert errors[0]["source"].endswith(("instances_train.json", ".jpg")) and errors[0]["detail"]
    frames = pq.read_table(root / "catalog" / "frames.parquet").to_pylist()
    assert len(frames) + 1 == n_in
    assert ann_id not in {f["annotation_id"] for f in frames}
    assert path  # the file was rewritten with the problem


def test_box_outside_frame_is_clamped_and_counted(tmp_path, capsys):
    root = tmp_path / "root"
    coco = make_root(str(root), small_videos())
    a = first_ann(coco, 1)
    a["bbox"] = [-5.0, 100.0, 30.0, 40.0]  # 128 px high frame: clamped to y in [100, 128)
    inside = first_ann(coco, 2)
    inside["bbox"] = [86.41, 37.35, 33.58, 36.41]  # inside: kept exactly, not "fixed" by float noise
    write_coco(str(root), "train", coco)
    assert ingest_main([str(root), "--no-progress"]) == 0  # fixed, not fatal, in fail mode too
    errors = pq.read_table(root / "catalog" / "errors.parquet").to_pylist()
    assert [(e["id"], e["field"], e["reason"], e["action"]) for e in errors] == [
        (f"annotation {a['id']}", "bbox", "box_outside_frame", "fixed")
    ]
    frames = {f["annotation_id"]: f for f in pq.read_table(root / "catalog" / "frames.parquet").to_pylist()}
    f = frames[a["id"]]
    assert (f["bbox_x"], f["bbox_y"], f["bbox_w"], f["bbox_h"]) == (0.0, 100.0, 25.0, 28.0)
    g = frames[inside["id"]]
    assert [g["bbox_x"], g["bbox_y"], g["bbox_w"], g["bbox_h"]] == inside["bbox"]
    assert len(frames) == len(coco["annotations"])


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_video_shorter_than_frame_id(tmp_path, capsys, mode):
    root = tmp_path / "root"
    make_root(str(root), small_videos(), mp4=True)
    from ingest_fixtures import background

    write_mp4(str(root / "videos" / "v1.mp4"), [background(0, t) for t in range(8)])  # frames 8, 9 annotated
    rc = ingest_main([str(root), "--no-progress", "--videos-dir", str(root / "videos"), "--on-error", mode])
    err = capsys.readouterr().err
    if mode == "fail":
        assert rc == 1 and "v1.mp4" in err and "frame_id 8" in err and "video_too_short" in err, err
        assert visible_output(root) == []
        return
    assert rc == 0
    errors = pq.read_table(root / "catalog" / "errors.parquet").to_pylist()
    assert {e["reason"] for e in errors} == {"video_too_short"} and len(errors) == 2
    assert all(e["source"].endswith("v1.mp4") and e["field"] == "frame_id" for e in errors)
    t = pq.read_table(root / "catalog" / "tracklets.parquet").to_pylist()
    assert {(r["identity_id"], r["start_frame"], r["end_frame"]) for r in t} == {
        ("v1_a", 0, 7),
        ("v2_a", 2, 8),
    }


@pytest.mark.parametrize(
    "content, words",
    [
        ("[1, 2]", "not an object"),
        ('{"images": []}', "'annotations'"),
        ('{"images": {}, "annotations": []}', "'images'"),
        ("{not json", "not valid JSON"),
    ],
)
@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_broken_annotation_file_is_fatal(tmp_path, capsys, content, words, mode):
    root = tmp_path / "root"
    make_root(str(root), small_videos())
    (root / "annotations" / "instances_train.json").write_text(content)
    assert ingest_main([str(root), "--no-progress", "--on-error", mode]) == 1
    err = capsys.readouterr().err
    assert "instances_train.json" in err and words in err, err
    assert visible_output(root) == []


def test_failure_in_a_worker_removes_the_shards_of_the_run(tmp_path, capsys):
    root = tmp_path / "root"
    coco = make_root(str(root), small_videos())
    a = first_ann(coco, 3, seq="v2")  # v2 is the second shard: the first is written before the error
    img = next(i for i in coco["images"] if i["id"] == a["image_id"])
    os.remove(root / "images" / img["file_name"])
    rc = ingest_main([str(root), "--no-progress", "--shard-max-bytes", "1", "--workers", "2"])
    assert rc == 1 and "missing_frame" in capsys.readouterr().err
    assert visible_output(root) == []


def test_skip_keeps_conservation_with_many_problems(tmp_path):
    root = tmp_path / "root"
    coco = make_root(str(root), small_videos())
    for fn in (break_missing_key, break_missing_image, break_zero_area, break_duplicate_identity):
        fn(str(root), coco)
    coco["annotations"].append("not a record")
    write_coco(str(root), "train", coco)
    assert ingest_main([str(root), "--no-progress", "--on-error", "skip"]) == 0
    errors = pq.read_table(root / "catalog" / "errors.parquet").to_pylist()
    frames = pq.read_table(root / "catalog" / "frames.parquet").num_rows
    assert frames + sum(e["action"] == "skipped" for e in errors) == len(coco["annotations"])
    manifest = json.loads((root / "catalog" / "manifest.json").read_text())
    assert manifest["annotations_in"] == len(coco["annotations"])


def test_splits_and_identity_shared_by_two_videos(tmp_path, capsys):
    root = tmp_path / "root"
    make_root(str(root), small_videos(), split="train")
    val = {("w1", None): (8, [Track("v1_a", list(range(0, 6)), moving(10, 10, 20, 16, list(range(0, 6))))])}
    coco_val = make_root(str(root), val, split="val", seed=1)
    # default --splits: every annotation file; the identity v1_a of train reappears in val
    assert ingest_main([str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "instances_val.json" in err and "identity_in_several_videos" in err and "'identity_id'" in err
    assert ingest_main([str(root), "--no-progress", "--on-error", "skip"]) == 0
    errors = pq.read_table(root / "catalog" / "errors.parquet").to_pylist()
    assert len(errors) == len(coco_val["annotations"])
    assert {e["reason"] for e in errors} == {"identity_in_several_videos"}
    assert sorted(os.listdir(root / "shards")) == ["train"]  # val had nothing left
    videos = pq.read_table(root / "catalog" / "videos.parquet").to_pylist()
    assert [(v["split"], v["video_id"], v["n_tracklets"]) for v in videos] == [
        ("train", "v1", 1),
        ("train", "v2", 1),
        ("val", "w1", 0),
    ]
    manifest = json.loads((root / "catalog" / "manifest.json").read_text())
    assert manifest["splits"] == ["train", "val"] and len(manifest["inputs"]) == 2
