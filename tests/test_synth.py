"""`polyp-ssl synth`: format, determinism, MP4 output, bad arguments, and the measured properties."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from polyp_ssl.ingest.synth import generate as gen
from polyp_ssl.ingest.synth.cli import main
from polyp_ssl.ingest.synth.descriptor import DIM, crop_histogram, describe_tracklet
from polyp_ssl.ingest.synth.stats import (
    TARGETS,
    dataset_stats,
    out_of_range,
    retrieval_map,
    temporal_association_precision,
)

SMALL = ["--videos", "3", "--frames-per-video", "120", "--width", "128", "--height", "112", "--quiet"]
SPLITS = ("train", "val", "test")


def _tree_digest(root: Path, sub: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / sub).iterdir())}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "ds"
    assert main([str(root), *SMALL, "--seed", "7", "--workers", "1", "--mp4"]) == 0
    return root


def _load(root: Path) -> dict[str, dict]:
    return {s: json.loads((root / "annotations" / f"instances_{s}.json").read_text()) for s in SPLITS}


def test_loads_with_pycocotools(small_root):
    from pycocotools.coco import COCO

    n_images = 0
    for split in SPLITS:
        coco = COCO(str(small_root / "annotations" / f"instances_{split}.json"))
        n_images += len(coco.getImgIds())
        assert coco.getCatIds() == [1]
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert ann["category_id"] == 1 and ann["iscrowd"] == 0
    assert n_images == 3 * 120


def test_layout_ids_and_boxes(small_root):
    cocos = _load(small_root)
    image_ids, ann_ids = set(), set()
    videos_by_split = defaultdict(set)
    frames = defaultdict(list)
    for split, coco in cocos.items():
        images = {im["id"]: im for im in coco["images"]}
        assert len(images) == len(coco["images"])
        assert not image_ids & images.keys(), "image ids repeat across splits"
        image_ids |= images.keys()
        for im in coco["images"]:
            assert im["file_name"] == f"{im['sequence_id']}_{im['frame_id']}.jpg"
            assert im["dataset_id"] == "synth"
            videos_by_split[split].add(im["sequence_id"])
            frames[im["sequence_id"]].append(im["frame_id"])
        for a in coco["annotations"]:
            assert a["id"] not in ann_ids
            ann_ids.add(a["id"])
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
            assert math.isclose(a["area"], w * h, rel_tol=1e-3, abs_tol=0.02)
            assert a["identity_id"].startswith(im["sequence_id"] + "_")
            assert a["histology"] in {"AD", "HP", "SSL", "TSA"} and a["size"] > 0
    # split by video: each video in exactly one split; frames 0..n-1 contiguous
    all_videos = [v for vs in videos_by_split.values() for v in vs]
    assert len(all_videos) == len(set(all_videos)) == 3
    for fids in frames.values():
        assert sorted(fids) == list(range(120))
    # every referenced image exists with the declared size; some frames have no polyp
    annotated = set()
    for coco in cocos.values():
        images = {im["id"]: im for im in coco["images"]}
        for a in coco["annotations"]:
            annotated.add(a["image_id"])
        for iid in {a["image_id"] for a in coco["annotations"]}:
            im = images[iid]
            pixels = cv2.imread(str(small_root / "images" / im["file_name"]))
            assert pixels is not None and pixels.shape == (im["height"], im["width"], 3)
    assert 0 < len(annotated) < len(image_ids)
    assert len(list((small_root / "images").iterdir())) == 3 * 120


def test_labels_constant_per_identity(small_root):
    labels: dict[str, set] = defaultdict(set)
    for coco in _load(small_root).values():
        for a in coco["annotations"]:
            labels[a["identity_id"]].add((a["size"], a["histology"]))
    assert labels and all(len(v) == 1 for v in labels.values())


def test_same_seed_same_bytes_whatever_workers(small_root, tmp_path):
    other = tmp_path / "again"
    assert main([str(other), *SMALL, "--seed", "7", "--workers", "2"]) == 0
    assert _tree_digest(other, "annotations") == _tree_digest(small_root, "annotations")
    assert _tree_digest(other, "images") == _tree_digest(small_root, "images")
    different = tmp_path / "seed8"
    assert main([str(different), *SMALL, "--seed", "8", "--workers", "1"]) == 0
    assert _tree_digest(different, "annotations") != _tree_digest(small_root, "annotations")


def test_mp4_matches_jpegs(small_root):
    import decord

    videos = sorted((small_root / "videos").iterdir())
    assert [p.name for p in videos] == ["001-001.mp4", "001-002.mp4", "001-003.mp4"]
    for path in videos:
        vr = decord.VideoReader(str(path))
        assert len(vr) == 120
        for t in (0, 57, 119):
            frame = vr[t].asnumpy()
            jpeg = cv2.cvtColor(
                cv2.imread(str(small_root / "images" / f"{path.stem}_{t}.jpg")), cv2.COLOR_BGR2RGB
            )
            assert frame.shape == jpeg.shape
            diff = np.abs(frame.astype(np.float32) - jpeg).mean()
            assert diff < 6.0, f"{path.name} frame {t}: mean abs difference {diff:.1f}"
        # a wrong frame index would be much further off than the right one
        wrong = np.abs(vr[100].asnumpy().astype(np.float32) - vr[20].asnumpy()).mean()
        right = np.abs(
            vr[20].asnumpy().astype(np.float32)
            - cv2.cvtColor(cv2.imread(str(small_root / "images" / f"{path.stem}_20.jpg")), cv2.COLOR_BGR2RGB)
        ).mean()
        assert right < wrong


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--videos", "0"], "--videos"),
        (["--videos", "-2"], "--videos"),
        (["--frames-per-video", "0"], "--frames-per-video"),
        (["--frames-per-video", "-5"], "--frames-per-video"),
        (["--width", "16"], "--width"),
        (["--height", "8"], "--height"),
        (["--workers", "0"], "--workers"),
        (["--seed", "-1"], "--seed"),
        (["--dataset-id", "a/b"], "--dataset-id"),
        (["--mp4", "--width", "129"], "even"),
    ],
)
def test_bad_arguments_fail_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = [
        str(out),
        "--videos",
        "1",
        "--frames-per-video",
        "20",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
    ]
    assert main(args + extra) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_output_folder_problems(tmp_path, capsys):
    args = ["--videos", "1", "--frames-per-video", "20", "--width", "64", "--height", "64", "--quiet"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main([str(a_file), *args]) != 0
    assert "not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "x"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("k")
    assert main([str(full), *args]) != 0
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    # --overwrite replaces the dataset's own folders and keeps other files
    assert main([str(full), *args, "--overwrite"]) == 0
    assert sorted(p.name for p in full.iterdir()) == ["annotations", "images", "keep.txt"]
    # missing parents are created (mkdir -p); a parent that is a file is refused
    assert main([str(tmp_path / "no" / "such" / "parent"), *args]) == 0
    assert (tmp_path / "no" / "such" / "parent" / "annotations").is_dir()
    assert main([str(a_file / "sub"), *args]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--quiet"]) != 0  # neither OUT_DIR nor --stats


def test_interrupted_run_has_no_annotation_files(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = gen.render_video

    def failing(cfg, plan, out_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(cfg, plan, out_dir)

    monkeypatch.setattr(gen, "render_video", failing)
    cfg = gen.SynthConfig(videos=3, frames_per_video=20, width=64, height=64)
    with pytest.raises(RuntimeError):
        gen.generate(cfg, tmp_path / "ds", workers=1)
    assert any((tmp_path / "ds" / "images").iterdir())
    ann = tmp_path / "ds" / "annotations"
    assert not ann.exists() or not any(ann.iterdir())


def test_plan_balances_labels_and_splits():
    plans = gen.plan_dataset(gen.SynthConfig(videos=12, seed=3))
    assert [p.split for p in plans].count("test") == 3 and [p.split for p in plans].count("val") == 3
    labels = [lab for p in plans for lab in p.labels]
    assert all(1 <= len(p.labels) <= 5 for p in plans)
    assert all(len(p.labels) >= 3 for p in plans if p.split == "test")
    n = len(labels)
    assert sum(lab.size_mm <= 5 for lab in labels) == round(n / 2)
    assert sum(lab.histology == "AD" for lab in labels) == round(n / 2)
    assert gen.split_counts(1) == (1, 0, 0) and gen.split_counts(3) == (1, 1, 1)


# ---- the measured properties, on hand-built examples with known answers ----


def test_temporal_association_precision_known_answer():
    spans = [
        # video v: A [0,9], B [12,20], A [40,50], B [52,60]
        ("v", "A", 0, 9),
        ("v", "B", 12, 20),
        ("v", "A", 40, 50),
        ("v", "B", 52, 60),
        # video w: C [0,5], C [8,9], D [30,40]  -> C->C, C->C, D->C(gap 21)
        ("w", "C", 0, 5),
        ("w", "C", 8, 9),
        ("w", "D", 30, 40),
        ("u", "E", 0, 100),  # alone in its video: excluded
    ]
    # v: A0 -> B (gap 3) no; B -> A0 (gap 3) vs A40 (gap 20) -> A0 no; A40 -> B52 (gap 2) no;
    # B52 -> A40 (gap 2) no.  w: yes, yes, no.  => 2 of 7
    precision, queries, excluded = temporal_association_precision(spans)
    assert (queries, excluded) == (7, 1)
    assert precision == pytest.approx(2 / 7)
    # overlapping spans are at distance 0: the overlapping polyp is the nearest
    p, q, _ = temporal_association_precision([("v", "A", 0, 30), ("v", "B", 10, 20), ("v", "A", 32, 40)])
    assert q == 3 and p == pytest.approx(1 / 3)


def test_retrieval_map_against_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    ids = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "d", "e", "e"]
    got, queries, excluded = retrieval_map(x, ids)
    assert (queries, excluded) == (11, 1)  # "d" has no positive
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    aps = []
    for i in range(12):
        others = [j for j in range(12) if j != i]
        pos = [j for j in others if ids[j] == ids[i]]
        if not pos:
            continue
        order = sorted(others, key=lambda j: -xn[i] @ xn[j])
        hits, precisions = 0, []
        for rank, j in enumerate(order, start=1):
            if ids[j] == ids[i]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(np.mean(precisions))
    assert got == pytest.approx(np.mean(aps))
    perfect, _, _ = retrieval_map(np.eye(3)[[0, 0, 1, 1, 2, 2]], list("aabbcc"))
    assert perfect == pytest.approx(1.0)


def test_descriptor_is_a_normalised_colour_histogram():
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 250
    h = crop_histogram(red)
    assert h.shape == (DIM,) and h.sum() == pytest.approx(1.0) and h.max() == 1.0
    half = red.copy()
    half[:, 20:] = (0, 0, 250)
    d = describe_tracklet([red, half], [[0, 0, 40, 40], [0, 0, 40, 40]])
    assert d.dtype == np.float32 and np.linalg.norm(d) == pytest.approx(1.0, abs=1e-6)
    # mean histogram (0.75 red bin, 0.25 blue bin) normalised
    assert sorted(d[d > 0].tolist()) == pytest.approx(sorted(np.array([0.75, 0.25]) / np.hypot(0.75, 0.25)))
    # the crop is the box: a blue box inside a red image sees only blue
    d2 = describe_tracklet([half], [[25.2, 3, 10, 10]])
    assert d2.max() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        describe_tracklet([red], [])


def _write_hand_root(root: Path) -> None:
    """Two videos; colours make appearance retrieval perfect; known tracklets and labels."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    colours = {"A": (255, 0, 0), "B": (0, 0, 255), "C": (0, 255, 0)}
    # video v1: A frames 0-3, B frames 5-7, A frames 9-10 ; video v2: C frames 0-1, C 4-5
    plan = {
        "v1": {0: "A", 1: "A", 2: "A", 3: "A", 5: "B", 6: "B", 7: "B", 9: "A", 10: "A", 4: None},
        "v2": {0: "C", 1: "C", 4: "C", 5: "C", 2: None},
    }
    labels = {"A": (3.0, "AD"), "B": (8.0, "HP"), "C": (4.0, "OTHER")}
    images, anns = [], []
    for video, frames in plan.items():
        for f, ident in sorted(frames.items()):
            img = np.full((32, 32, 3), 128, np.uint8)
            iid = len(images) + 1
            name = f"{video}_{f}.jpg"
            images.append(
                {
                    "id": iid,
                    "file_name": name,
                    "width": 32,
                    "height": 32,
                    "frame_id": f,
                    "sequence_id": video,
                    "dataset_id": "hand",
                }
            )
            if ident:
                img[8:24, 8:24] = colours[ident][::-1]
                size, hist = labels[ident]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": iid,
                        "bbox": [8, 8, 16, 16],
                        "category_id": 1,
                        "identity_id": f"{video}_{ident}",
                        "size": size,
                        "histology": hist,
                        "area": 256,
                        "iscrowd": 0,
                    }
                )
            cv2.imwrite(str(root / "images" / name), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    for split in SPLITS:
        coco = {
            "images": images if split == "test" else [],
            "annotations": anns if split == "test" else [],
            "categories": [{"id": 1, "name": "polyp"}],
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def test_dataset_stats_on_hand_built_root(tmp_path, capsys):
    _write_hand_root(tmp_path)
    s = dataset_stats(tmp_path)
    t = s["splits"]["test"]
    # tracklets: A#0 (0-3), B (5-7), A#1 (9-10), C#0 (0-1), C#1 (4-5)
    assert (t["videos"], t["frames"], t["annotations"], t["polyps"], t["tracklets"]) == (2, 15, 13, 3, 5)
    assert t["frames_with_polyp_fraction"] == pytest.approx(13 / 15, abs=1e-4)
    assert t["mean_tracklet_length"] == pytest.approx(13 / 5)
    # nearest in time: A#0->B no, B->A#0 (gap 2, tie with A#1 gap 2, nearer midpoint A#1? B mid 6, A#0
    # mid 1.5, A#1 mid 9.5 -> A#1) no, A#1->B no, C#0->C#1 yes, C#1->C#0 yes
    assert s["temporal_association_precision"] == pytest.approx(2 / 5, abs=1e-4)
    assert s["mean_tracklets_per_polyp"] == pytest.approx(5 / 3, abs=1e-3)
    assert s["diminutive_fraction"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["adenoma_fraction"] == pytest.approx(1 / 2)  # OTHER is left out and counted
    assert s["histology_unknown"] == 1
    # A and C have two tracklets each with identical colours: perfect retrieval; B has no positive
    assert s["appearance_map"] == pytest.approx(1.0)
    assert (s["appearance_queries"], s["appearance_excluded"]) == (4, 1)
    assert out_of_range(s)  # this toy root is not in the synthetic ranges
    assert main(["--stats", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"]["tracklets"] == 5
    assert main(["--stats", str(tmp_path / "missing")]) != 0


@pytest.mark.slow
def test_default_dataset_properties(tmp_path):
    root = tmp_path / "default"
    t0 = time.perf_counter()
    assert main([str(root), "--quiet", "--workers", "2"]) == 0
    seconds = time.perf_counter() - t0
    s = dataset_stats(root)
    assert out_of_range(s) == [], json.dumps(s, indent=1)
    for key in TARGETS:
        assert s[key] is not None
    assert s["totals"]["videos"] == 12 and 7000 <= s["totals"]["frames"] <= 9000
    assert s["totals"]["tracklets_ge_30"] >= 0.5 * s["totals"]["tracklets"]
    assert s["splits"]["test"]["polyps"] >= 2 * s["splits"]["test"]["videos"]
    assert 0.3 < s["totals"]["frames_with_polyp_fraction"] < 0.95
    print(f"default dataset generated in {seconds:.1f} s")


def test_appearance_transfer_is_one_when_tracklets_of_a_polyp_look_alike_and_zero_when_not():
    from polyp_ssl.ingest.synth.stats import appearance_transfer

    rng = np.random.default_rng(0)
    polyp = {"a": rng.normal(size=8), "b": rng.normal(size=8)}
    ids = ["a", "a", "b", "b"]
    videos = ["v"] * 4
    # each tracklet = its polyp's look plus a little noise per half: tracklets of a polyp look alike
    first = np.stack([polyp[i] + 0.01 * rng.normal(size=8) for i in ids])
    second = np.stack([polyp[i] + 0.01 * rng.normal(size=8) for i in ids])
    alike = appearance_transfer(first, second, ids, videos)
    assert alike["transfer"] > 0.95 and alike["cross_pairs"] == 2
    # each tracklet a look of its own (a polyp's tracklets as unlike as two polyps)
    looks = rng.normal(size=(4, 8))
    first = looks + 0.01 * rng.normal(size=(4, 8))
    second = looks + 0.01 * rng.normal(size=(4, 8))
    unlike = appearance_transfer(first, second, ids, videos)
    assert abs(unlike["transfer"]) < 0.5 and unlike["within"] > 0.99
    assert appearance_transfer(np.zeros((0, 8)), np.zeros((0, 8)), [], [])["transfer"] is None
