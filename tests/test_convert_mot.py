"""`polyp-ssl convert mot`: a tracker's output (MOTChallenge) in; track identities that stay
unknown; what needs polyps refused on such a root, and running on the gt.txt twin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

CLI = [sys.executable, "-m", "polyp_ssl"]
MIN_CONF, MIN_FRAMES = 0.4, 8


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def ok(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    res = cli(*args, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mot") / "raw"
    ok("synth", out, "--layout", "mot", "--videos", "4", "--frames-per-video", "120", "--width", "160",
       "--height", "128", "--seed", "2", "--workers", "1", "--mp4", "--quiet")  # fmt: skip
    return out


def _convert_ingest(raw: Path, out: Path, *flags: str) -> Path:
    ok("convert", "mot", raw, out, *flags, "--no-progress")
    ok("ingest", out, "--store-size", "64", "--workers", "1", "--no-progress")
    return out


@pytest.fixture(scope="module")
def track_root(raw: Path) -> Path:
    flags = ("--tracks", raw / "tracks", "--min-conf", MIN_CONF, "--min-track-frames", MIN_FRAMES)
    return _convert_ingest(raw, raw.parent / "tracks-root", *flags)


@pytest.fixture(scope="module")
def gt_root(raw: Path) -> Path:
    return _convert_ingest(raw, raw.parent / "gt-root")


def _tracks(raw: Path) -> dict[tuple[str, int], list[float]]:
    """(sequence, id) -> the confidences of its boxes, read from the tracker's files."""
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for path in (raw / "tracks").glob("*.txt"):
        for line in path.read_text().splitlines():
            v = line.split(",")
            out[(path.stem, int(v[1]))].append(float(v[6]))
    return out


def _annotations(root: Path) -> dict[tuple[str, int, str], list[float]]:
    """(sequence, frame_id, identity) -> bbox over every split of a converted root."""
    out = {}
    for path in (root / "annotations").glob("instances_*.json"):
        coco = json.loads(path.read_text())
        images = {i["id"]: i for i in coco["images"]}
        for a in coco["annotations"]:
            img = images[a["image_id"]]
            out[(img["sequence_id"], img["frame_id"], a["identity_id"])] = a["bbox"]
    return out


def test_tracks_become_identities_and_dropped_tracks_are_counted(raw: Path, track_root: Path) -> None:
    tracks = _tracks(raw)
    short = {k for k, c in tracks.items() if len(c) < MIN_FRAMES}
    low = {k for k, c in tracks.items() if k not in short and np.mean(c) < MIN_CONF}
    kept = set(tracks) - short - low
    assert short and low and kept  # the synthetic tracker's false positives are short and unsure
    report = json.loads((track_root / "convert_report.json").read_text())
    assert report["identities"] == "tracks"
    assert report["tracks"] == {
        "seen": len(tracks),
        "kept": len(kept),
        "dropped": {"low_confidence": len(low), "too_short": len(short)},
    }
    anns = _annotations(track_root)
    assert {i for _, _, i in anns} == {f"{s}_t{t}" for s, t in kept}
    kept_boxes = sum(len(tracks[k]) for k in kept)
    outside = sum(n for r, n in report["boxes"]["dropped"].items() if not r.startswith("track_"))
    assert len(anns) == kept_boxes - outside
    assert report["boxes"]["dropped"]["track_too_short"] == sum(len(tracks[k]) for k in short)
    info = json.loads((track_root / "annotations" / "instances_train.json").read_text())["info"]
    assert info["identities"] == "tracks"
    # the catalog says so, and its errors table counts the dropped tracks
    manifest = json.loads((track_root / "catalog" / "manifest.json").read_text())
    assert manifest["identities"] == "tracks"
    errors = pq.read_table(track_root / "catalog" / "errors.parquet").to_pylist()
    by_reason = {r["reason"]: r["detail"] for r in errors}
    assert by_reason["tracks_low_confidence"].startswith(f"{len(low)} tracks dropped")
    assert by_reason["tracks_too_short"].startswith(f"{len(short)} tracks dropped")
    assert by_reason["track_low_confidence"].startswith(f"{sum(len(tracks[k]) for k in low)} boxes dropped")


def test_gt_gives_polyp_identities(raw: Path, gt_root: Path) -> None:
    from polyp_ssl.shards.identities import root_identity_kind

    gt = {}
    for path in raw.glob("*/*/gt/gt.txt"):
        for line in path.read_text().splitlines():
            v = line.split(",")
            gt[(path.parent.parent.name, int(v[0]), f"{path.parent.parent.name}_{v[1]}")] = [
                float(c) for c in v[2:6]
            ]
    anns = _annotations(gt_root)
    assert anns.keys() == gt.keys()
    assert all(np.allclose(anns[k], gt[k]) for k in gt)
    manifest = json.loads((gt_root / "catalog" / "manifest.json").read_text())
    assert "identities" not in manifest  # the field is absent on polyp roots: manifests as before
    assert root_identity_kind(gt_root) == "polyps"


def test_videos_give_the_folders_dataset(raw: Path, tmp_path: Path) -> None:
    from PIL import Image

    flags = ("--tracks", raw / "tracks", "--min-conf", MIN_CONF, "--min-track-frames", MIN_FRAMES)
    folders = tmp_path / "folders"
    ok("convert", "mot", raw, folders, *flags, "--no-progress")
    videos = _convert_ingest(raw, tmp_path / "videos", *flags, "--videos-dir", raw / "videos")
    assert _annotations(videos) == _annotations(folders)
    assert json.loads((videos / "convert_report.json").read_text())["frames_from"] == "videos"
    decoded = sorted((videos / "images").rglob("*.jpg"))
    assert len(decoded) == len(list((folders / "images").rglob("*.jpg")))
    for path in decoded[::40]:  # frame f of the video is img1/f.jpg of the folder (H.264 vs JPEG)
        a = np.asarray(Image.open(path), dtype=np.float32)
        b = np.asarray(Image.open(folders / "images" / path.relative_to(videos / "images")), dtype=np.float32)
        assert np.abs(a - b).mean() < 12
    assert (videos / "catalog" / "manifest.json").is_file()


def test_temporal_samplers_see_unknown_identities_on_tracks(track_root: Path, gt_root: Path) -> None:
    from polyp_ssl.config import TrainConfig
    from polyp_ssl.stream import DataConfigError, build_index

    params = replace(TrainConfig().stream, fragment_length=2, min_tracklet_length=8)
    index = build_index(track_root, "train", params)
    assert index.samples and all(i == -1 for _, _, i in index.samples.values())
    assert any(i >= 0 for _, _, i in build_index(gt_root, "train", params).samples.values())
    params = replace(params, sampler="multipos")
    with pytest.raises(DataConfigError, match="tracker tracks"):
        build_index(track_root, "train", params)
    assert build_index(gt_root, "train", params).samples  # gt identities: multipos may run


@pytest.mark.slow
def test_train_on_tracks(track_root: Path, tmp_path: Path) -> None:
    ok("train", "--dataset_root", track_root, "--runs_dir", tmp_path, "--exp_name", "trk", "--max_steps", 2,
       "--batch_size", 10, "--n_views", 5, "--im_size", 32, "--fragment_length", 2,
       "--min_tracklet_length", 8, "--sfe_backbone_arch", "resnet18", "--accelerator", "cpu",
       "--num_workers", 0, "--aug_anchorcrop", "--eval_aug_anchorcrop", "--limit_val_batches", 0,
       "--logger", "csv", timeout=600)  # fmt: skip
    assert (tmp_path / "trk" / "checkpoints" / "last.ckpt").is_file()


def _refused(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "tracker tracks" in lines[0] and "gt/gt.txt" in lines[0]
    return lines[0]


def test_what_needs_polyps_is_refused_on_tracks_and_runs_on_gt(
    track_root: Path, gt_root: Path, tmp_path
) -> None:
    enc = ("--encoder", "descriptor")
    for task in ("retrieval", "reid"):
        line = _refused(cli("eval", "--task", task, "--dataset_root", track_root, *enc))
        assert f"{task} scoring" in line
    assert "size probe" in _refused(cli("probe", "--task", "size", "--dataset_root", track_root, *enc))
    assert "counting" in _refused(cli("count", "--dataset_root", track_root, *enc))
    assert "the report" in _refused(cli("report", "--dataset-root", track_root, "--baselines", "descriptor"))
    multipos = cli("train", "--dataset_root", track_root, "--runs_dir", tmp_path, "--sampler", "multipos",
                   "--sfe_backbone_arch", "resnet18", "--im_size", 32, "--batch_size", 10,
                   "--accelerator", "cpu", "--aug_anchorcrop", "--eval_aug_anchorcrop")  # fmt: skip
    assert multipos.returncode == 2 and "--sampler multipos needs polyp identities" in multipos.stderr
    assert not any(tmp_path.iterdir())  # refused before a run folder was made
    res = ok("eval", "--task", "retrieval", "--dataset_root", gt_root, *enc, "--out", tmp_path / "ev")
    assert "mAP" in res.stdout
    probe = cli("probe", "--task", "size", "--dataset_root", gt_root, *enc)  # MOT gt has no sizes
    assert "tracker tracks" not in probe.stderr


def test_embed_on_tracks_then_search_by_similarity(track_root: Path) -> None:
    ok("embed", "--dataset_root", track_root, "--encoder", "descriptor", "--split", "train",
       "--min_tracklet_frames", 8, "--name", "desc")  # fmt: skip
    rows = pq.read_table(track_root / "embeddings" / "desc.parquet").to_pylist()
    rows = [r for r in rows if r["fragment_index"] == -1]
    vec = np.array([r["vector"] for r in rows], dtype=np.float64)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    sim = vec @ vec[0]
    sim[0] = -np.inf
    query = rows[0]["tracklet_id"]
    sql = (
        "SELECT b.tracklet_id FROM embeddings_desc a, embeddings_desc b WHERE a.tracklet_id = "
        f"'{query}' AND b.tracklet_id <> a.tracklet_id AND a.fragment_index = -1 AND b.fragment_index = -1 "
        "ORDER BY array_cosine_similarity(a.vector, b.vector) DESC LIMIT 1"
    )
    res = ok("catalog", track_root, sql, "--format", "csv")
    assert res.stdout.strip().splitlines()[-1] == rows[int(np.argmax(sim))]["tracklet_id"]


# ---------------------------------------------------------------- bad input


@pytest.fixture
def one_seq(raw: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """RAW with one sequence folder (copied) and its tracks folder."""
    seq = sorted(raw.glob("train/*"))[0]
    small = tmp_path / "raw"
    shutil.copytree(seq, small / seq.name)
    (tmp_path / "tracks").mkdir()
    return small, tmp_path / "tracks", seq.name


GOOD = "1,1,10,10,20,20,0.9,-1,-1,-1"


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("2,1,abc,10,20,20,0.9,-1,-1,-1", "line 3: field 'bb_left': 'abc' is not a number"),
        ("2,1,10,10", "line 3: 4 fields, expected 6 to 10"),
        ("0,1,10,10,20,20,0.9,-1,-1,-1", "line 3: field 'frame': frame 0 (frames count from 1)"),
        ("2,1.5,10,10,20,20,0.9,-1,-1,-1", "line 3: field 'id': '1.5' is not a whole number"),
        (GOOD, "line 3: field 'id': id 1 has a second box on frame 1 (first on line 1)"),
        ("2,1,10,10,20,inf,0.9,-1,-1,-1", "line 3: field 'bb_height': 'inf' is not a finite number"),
    ],
)
def test_malformed_lines_are_named(one_seq, tmp_path: Path, bad: str, named: str) -> None:
    raw, tracks, seq = one_seq
    lines = [GOOD, "2,2,30,30,20,20,0.8,-1,-1,-1", bad] + [
        f"{f},1,10,10,20,20,0.9,-1,-1,-1" for f in range(3, 12)
    ]
    (tracks / f"{seq}.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    res = cli("convert", "mot", raw, out, "--tracks", tracks, "--no-progress")
    assert res.returncode == 1
    first = res.stderr.splitlines()[0]
    assert first.startswith("polyp-ssl convert: error: ") and f"{seq}.txt: {named}" in first, first
    assert not (out / "annotations").exists() or not any((out / "annotations").glob("instances_*.json"))
    skip = cli("convert", "mot", raw, out, "--tracks", tracks, "--on-error", "skip", "--min-track-frames", 1,
               "--no-progress")  # fmt: skip
    assert skip.returncode == 0, skip.stderr
    report = json.loads((out / "convert_report.json").read_text())
    assert report["n_skipped"] == 1 and report["problems"][0]["id"] == "line 3"


def test_bounds_and_paths_from_data(one_seq, tmp_path: Path, monkeypatch) -> None:
    from polyp_ssl.ingest.convert import mot
    from polyp_ssl.ingest.convert.common import ConvertError

    raw, tracks, seq = one_seq
    (tracks / f"{seq}.txt").write_text(GOOD + "\n" + "2," * 5000 + "\n")
    res = cli("convert", "mot", raw, tmp_path / "o1", "--tracks", tracks, "--no-progress")
    assert res.returncode == 1 and f"{seq}.txt: line 2: longer than 4,096 bytes" in res.stderr
    (tracks / f"{seq}.txt").write_text("\n".join(f"{f},1,10,10,20,20,0.9" for f in range(1, 40)) + "\n")
    monkeypatch.setattr(mot, "MAX_BOXES_PER_FILE", 30)
    cfg = mot.MotConfig(raw, tmp_path / "o2", tracks)
    with pytest.raises(ConvertError, match="line 31: more than 30 boxes in one file"):
        mot.convert_mot(cfg)
    monkeypatch.undo()
    outside = tmp_path / "secret.jpg"
    shutil.copy(raw / seq / "img1" / "000002.jpg", outside)
    (raw / seq / "img1" / "000002.jpg").unlink()
    (raw / seq / "img1" / "000002.jpg").symlink_to(outside)
    res = cli("convert", "mot", raw, tmp_path / "o4", "--tracks", tracks, "--no-progress")
    assert res.returncode == 1 and "000002.jpg" in res.stderr and "link" in res.stderr, res.stderr
    ini = raw / seq / "seqinfo.ini"
    ini.write_text(ini.read_text().replace("imDir=img1", "imDir=../../../etc"))
    res = cli("convert", "mot", raw, tmp_path / "o3", "--tracks", tracks, "--no-progress")
    assert res.returncode == 1 and "field 'imDir'" in res.stderr and "path separator" in res.stderr
    assert not (tmp_path / "o3" / "annotations").exists()


def test_identity_kind_is_validated_and_old_roots_read_as_polyps(track_root: Path, tmp_path: Path) -> None:
    from polyp_ssl.ingest.convert.mot import root_identities
    from polyp_ssl.shards.identities import root_identity_kind
    from polyp_ssl.shards.tables import CatalogError

    assert root_identity_kind(track_root) == "tracks"
    fake = tmp_path / "root"
    shutil.copytree(track_root / "catalog", fake / "catalog")
    manifest = json.loads((fake / "catalog" / "manifest.json").read_text())
    for value, kind in ((None, "polyps"), ("bogus", None)):
        manifest.pop("identities", None)
        if value is not None:
            manifest["identities"] = value
        (fake / "catalog" / "manifest.json").write_text(json.dumps(manifest))
        if kind is None:
            with pytest.raises(CatalogError, match="field 'identities' is 'bogus'"):
                root_identity_kind(fake)
        else:
            assert root_identity_kind(fake) == kind
    # a merge of a track root is a track root; a root without a report holds polyps
    report = json.loads((track_root / "convert_report.json").read_text())
    merged = {"converter": "merge", "sources": [{"root": "a", "report": {"converter": "sun"}},
                                                {"root": "b", "report": report}]}  # fmt: skip
    (fake / "convert_report.json").write_text(json.dumps(merged))
    assert root_identities(fake) == "tracks"
    assert root_identities(tmp_path) == "polyps"
