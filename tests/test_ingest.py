"""Ingest core: shards, samples, crops, tracklets and catalog on a tiny synthetic root."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import default_videos, make_root
from PIL import Image
from shard_factory import SPAN_COLUMNS

from polyp_ssl.ingest.cli import main as ingest_main
from polyp_ssl.shards.reader import iter_samples
from polyp_ssl.shards.sample import TrackletSample, encode_sample, sample_meta
from polyp_ssl.shards.schema import TABLES
from polyp_ssl.shards.writer import ShardWriter, file_sha256


def run_ingest(root, *args) -> int:
    return ingest_main([str(root), "--no-progress", *map(str, args)])


def read_catalog(out) -> dict:
    return {name: pq.read_table(os.path.join(out, "catalog", f"{name}.parquet")) for name in TABLES}


def shard_paths(out, split="train") -> list[str]:
    return sorted(glob.glob(os.path.join(out, "shards", split, f"{split}-*.tar")))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    coco = make_root(str(root), mp4=True)
    assert run_ingest(root, "--shard-max-bytes", "60k", "--store-size", "64") == 0
    return root, coco


# --- tar writing / reading -------------------------------------------------------------------


def _meta(key: str, n: int) -> TrackletSample:
    return TrackletSample(
        key=key,
        tracklet_id=key,
        split="s",
        dataset_id=None,
        video_id="v",
        sequence_id="v",
        identity_id="i",
        size_mm=None,
        histology=None,
        position_in_video=0.0,
        video_first_frame=0,
        video_last_frame=1,
        frame_ids=list(range(n)),
        image_ids=list(range(n)),
        annotation_ids=list(range(n)),
        file_names=["f"] * n,
        boxes=[[0, 0, 1, 1]] * n,
        crops=[[0, 0, 1, 1]] * n,
        crop_sizes=[[1, 1]] * n,
        boxes_in_crop=[[0, 0, 1, 1]] * n,
    )


def test_writer_is_deterministic_and_reads_back(tmp_path):
    samples = [encode_sample(_meta(f"k{i}", i + 1), [bytes([i]) * (100 + i)] * (i + 1)) for i in range(3)]
    paths = []
    for name in ("a.tar", "b.tar"):
        with ShardWriter(tmp_path / name) as w:
            w.write_all(samples)
        assert w.sha256 == file_sha256(tmp_path / name)
        assert w.n_bytes == os.path.getsize(tmp_path / name)
        paths.append(tmp_path / name)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    back = list(iter_samples([paths[0]]))
    assert back == samples
    listing = subprocess.run(
        ["tar", "-tvf", str(paths[0])], capture_output=True, text=True, check=True
    ).stdout
    lines = listing.strip().splitlines()
    assert [ln.split()[-1] for ln in lines[:3]] == ["k0.json", "k0.0000.jpg", "k1.json"]
    assert all("0/0" in ln and "1970-01-01" in ln for ln in lines)


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "x.tar") as w:
        w.write(encode_sample(_meta("k", 1), [b"1"]))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- tracklets -------------------------------------------------------------------------------


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def expected_tracklets(videos) -> set[tuple]:
    """(identity, start, end, n) by a direct loop over each track's frames."""
    out = set()
    for (_seq, _ds), (_n, tracks) in videos.items():
        for tr in tracks:
            runs: list[list[int]] = []
            for i, f in enumerate(tr.frames):
                if i and f - tr.frames[i - 1] <= 1 and _iou(tr.boxes[i - 1], tr.boxes[i]) >= 0.1:
                    runs[-1].append(f)
                else:
                    runs.append([f])
            out |= {(tr.identity, r[0], r[-1], len(r)) for r in runs}
    return out


def test_tracklet_boundaries_match_direct_computation(ingested):
    root, _ = ingested
    t = read_catalog(root)["tracklets"].to_pylist()
    got = {(r["identity_id"], r["start_frame"], r["end_frame"], r["n_frames"]) for r in t}
    assert got == expected_tracklets(default_videos())
    # k counts tracklets of an identity in time order
    by_identity: dict[str, list] = {}
    for r in sorted(t, key=lambda r: r["start_frame"]):
        by_identity.setdefault(r["identity_id"], []).append(r["tracklet_id"])
    for identity, ids in by_identity.items():
        assert ids == [f"{identity}#{k}" for k in range(len(ids))]
    assert len(t) >= 6  # the gap, the IoU jump and the short tracklet all split


# --- samples and crops -----------------------------------------------------------------------


def direct_crop(
    src: np.ndarray, box, scale: float, store: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    H, W = src.shape[:2]
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    x0 = min(max(0, math.floor(cx - w * scale / 2)), W - 1)
    y0 = min(max(0, math.floor(cy - h * scale / 2)), H - 1)
    x1 = max(min(W, math.ceil(cx + w * scale / 2)), x0 + 1)
    y1 = max(min(H, math.ceil(cy + h * scale / 2)), y0 + 1)
    region = src[y0:y1, x0:x1]
    f = min(1.0, store / max(x1 - x0, y1 - y0))
    size = (max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f)))
    return cv2.resize(region, size, interpolation=cv2.INTER_AREA), (x0, y0, x1, y1)


def test_samples_hold_the_crops_of_the_source_frames(ingested):
    root, coco = ingested
    paths = shard_paths(root)
    assert len(paths) >= 2
    anns = {a["id"]: a for a in coco["annotations"]}
    keys, videos_order = set(), []
    n_frames = 0
    for sample in iter_samples(paths):
        meta = sample_meta(sample)
        assert meta.key == sample["__key__"] and meta.key not in keys
        assert all(c.isalnum() or c in "_-" for c in meta.key)
        keys.add(meta.key)
        videos_order.append((meta.video_id, meta.frame_ids[0]))
        assert meta.params["crop_scale"] == 5.0 and meta.params["store_size"] == 64
        assert meta.frame_ids == sorted(meta.frame_ids)
        for i, fid in enumerate(meta.frame_ids):
            ann = anns[meta.annotation_ids[i]]
            assert ann["image_id"] == meta.image_ids[i] and meta.identity_id == str(ann["identity_id"])
            assert meta.boxes[i] == pytest.approx(ann["bbox"])
            src = cv2.cvtColor(cv2.imread(str(root / "images" / meta.file_names[i])), cv2.COLOR_BGR2RGB)
            want, rect = direct_crop(src, ann["bbox"], 5.0, 64)
            got = np.asarray(Image.open(io.BytesIO(sample[f"{i:04d}.jpg"])).convert("RGB"))
            assert tuple(meta.crops[i]) == rect and got.shape == want.shape
            assert list(meta.crop_sizes[i]) == [got.shape[1], got.shape[0]] and max(got.shape[:2]) <= 64
            assert np.abs(got.astype(int) - want.astype(int)).mean() < 8, (meta.key, fid)
            # the box in the crop maps back onto the source box
            bx, by, bw, bh = meta.boxes_in_crop[i]
            sx = (rect[2] - rect[0]) / got.shape[1]
            assert rect[0] + bx * sx == pytest.approx(ann["bbox"][0]) and bw * sx == pytest.approx(
                ann["bbox"][2]
            )
            n_frames += 1
    assert n_frames == len(coco["annotations"])
    # a video's tracklets are contiguous and in time order, videos in sorted order
    vids = [v for v, _ in videos_order]
    assert vids == sorted(vids)
    for v in set(vids):
        starts = [s for vv, s in videos_order if vv == v]
        assert starts == sorted(starts)
    # case_M_7/polyp 1 needed a safe key, its original id is kept
    assert any(k.startswith("case_M_7_polyp_1_0-") for k in keys)


def test_webdataset_reads_the_shards(ingested):
    import webdataset as wds

    root, _ = ingested
    for path in shard_paths(root):
        ours = list(iter_samples([path]))
        theirs = list(wds.WebDataset(f"file:{path}", shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in theirs] == [s["__key__"] for s in ours]
        for a, b in zip(ours, theirs, strict=True):
            assert {k: v for k, v in b.items() if not k.startswith("__")} == {
                k: v for k, v in a.items() if not k.startswith("__")
            }


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_reconciles(ingested):
    root, coco = ingested
    cat = read_catalog(root)
    for name, schema in TABLES.items():
        assert cat[name].schema.equals(schema, check_metadata=False), name
    frames, tracklets, shards = (cat[n].to_pylist() for n in ("frames", "tracklets", "shards"))
    errors = cat["errors"].to_pylist()
    skipped = [e for e in errors if e["action"] == "skipped"]
    assert len(coco["annotations"]) == len(frames) + len(skipped)
    assert sorted(f["annotation_id"] for f in frames) == sorted(a["id"] for a in coco["annotations"])
    # tracklets rows = samples in shards, in the shard the row names
    in_shards = {}
    for path in shard_paths(root):
        rel = os.path.relpath(path, root)
        for s in iter_samples([path]):
            in_shards[s["__key__"]] = (rel, sample_meta(s).n_frames)
    assert {t["sample_key"]: (t["shard"], t["n_frames"]) for t in tracklets} == in_shards
    assert sum(t["n_frames"] for t in tracklets) == len(frames)
    for s in shards:
        assert file_sha256(root / s["path"]) == s["sha256"]
        assert os.path.getsize(root / s["path"]) == s["n_bytes"]
    assert sum(s["n_samples"] for s in shards) == len(tracklets)
    # videos and polyps
    videos = {v["video_id"]: v for v in cat["videos"].to_pylist()}
    assert set(videos) == {"seqA", "ds1/seqB", "seqC"}
    assert videos["seqA"]["first_frame"] == 0 and videos["seqA"]["last_frame"] == 39
    assert videos["ds1/seqB"]["dataset_id"] == "ds1"
    polyps = {p["identity_id"]: p for p in cat["polyps"].to_pylist()}
    assert polyps["seqA_1"]["size_mm"] == 4.0 and polyps["seqA_1"]["histology"] == "AD"
    assert polyps["case_M_7/polyp 1"]["size_mm"] is None
    assert sum(v["n_tracklets"] for v in videos.values()) == len(tracklets)
    assert sum(p["n_frames"] for p in polyps.values()) == len(frames)
    # positions are over the video's annotated frames (the reference code's meaning), not its images
    frame_of = {im["id"]: (im.get("dataset_id"), im["sequence_id"], im["frame_id"]) for im in coco["images"]}
    span_of: dict[str, tuple[int, int]] = {}
    for a in coco["annotations"]:
        ds, seq, f = frame_of[a["image_id"]]
        vid = f"{ds}/{seq}" if ds else seq
        lo, hi = span_of.get(vid, (f, f))
        span_of[vid] = (min(lo, f), max(hi, f))
    assert span_of["seqA"] == (0, 35) and span_of["ds1/seqB"] == (3, 24)  # unannotated frames at the ends
    for t in tracklets:
        lo, hi = span_of[t["video_id"]]
        assert t["position_in_video"] == pytest.approx((t["start_frame"] - lo) / (hi - lo))
        assert 0.0 <= t["position_in_video"] <= 1.0
    manifest = json.loads((root / "catalog" / "manifest.json").read_text())
    assert manifest["counts"]["frames"] == len(frames) and manifest["annotations_in"] == len(
        coco["annotations"]
    )
    assert manifest["inputs"]["annotations/instances_train.json"] == file_sha256(
        root / "annotations" / "instances_train.json"
    )
    assert manifest["parameters"]["crop_scale"] == 5.0


def _without_spans(table):
    return table.select([c for c in table.column_names if c not in SPAN_COLUMNS])


def test_mp4_source_gives_the_same_tracklets_and_close_crops(ingested, tmp_path):
    root, _ = ingested
    out = tmp_path / "out"
    rc = run_ingest(
        root, "--out", out, "--videos-dir", root / "videos", "--shard-max-bytes", "60k", "--store-size", "64"
    )
    assert rc == 0
    a, b = read_catalog(root), read_catalog(out)
    cols = ["tracklet_id", "video_id", "start_frame", "end_frame", "n_frames", "sample_key", "shard"]
    assert a["tracklets"].select(cols).equals(b["tracklets"].select(cols))
    assert _without_spans(a["frames"]).equals(_without_spans(b["frames"]))  # other JPEG bytes
    diffs = []
    for pa_, pb in zip(shard_paths(root), shard_paths(out), strict=True):
        for sa, sb in zip(iter_samples([pa_]), iter_samples([pb]), strict=True):
            assert sa.keys() == sb.keys()
            for k in sa:
                if k.endswith(".jpg"):
                    ia = np.asarray(Image.open(io.BytesIO(sa[k])), dtype=int)
                    ib = np.asarray(Image.open(io.BytesIO(sb[k])), dtype=int)
                    diffs.append(np.abs(ia - ib).mean())
    assert diffs and max(diffs) < 10, max(diffs)


def test_draft_reduce_never_upsamples():
    from polyp_ssl.ingest.crop import crop_geometry, draft_reduce

    for box, want in [((500, 400, 200, 160), 2), ((500, 400, 60, 50), 1), ((100, 100, 600, 500), 4)]:
        r = draft_reduce([box], 1240, 1080, 5.0, 256)
        crop, size = crop_geometry(box, 1240, 1080, 5.0, 256)
        assert r == want and max(crop[2] - crop[0], crop[3] - crop[1]) / r >= max(size)
    assert (
        draft_reduce([(500, 400, 200, 160), (500, 400, 60, 50)], 1240, 1080, 5.0, 256) == 1
    )  # the smaller wins


def test_jpeg_draft_gives_the_same_geometry_and_close_crops(ingested, tmp_path):
    root, _ = ingested
    outs = [tmp_path / "full", tmp_path / "draft"]
    assert run_ingest(root, "--out", outs[0], "--store-size", "16") == 0
    assert run_ingest(root, "--out", outs[1], "--store-size", "16", "--jpeg-draft") == 0
    a, b = read_catalog(outs[0]), read_catalog(outs[1])
    for name in ("frames", "tracklets"):  # the same but for the spans of the (other) JPEG bytes
        assert _without_spans(a[name]).equals(_without_spans(b[name])), name
    diffs = []
    for sa, sb in zip(iter_samples(shard_paths(outs[0])), iter_samples(shard_paths(outs[1])), strict=True):
        assert sample_meta(sb).params["jpeg_draft"] is True
        for k in sa:
            if k.endswith(".jpg"):
                ia = np.asarray(Image.open(io.BytesIO(sa[k])), dtype=int)
                ib = np.asarray(Image.open(io.BytesIO(sb[k])), dtype=int)
                diffs.append(np.abs(ia - ib).mean())
    assert max(diffs) < 8 and 0 < np.mean(diffs) < 5, (max(diffs), np.mean(diffs))


def test_each_source_frame_is_decoded_once(ingested):
    root, coco = ingested
    stats = [json.loads(Path(p[: -len(".tar")] + ".stats.json").read_text()) for p in shard_paths(root)]
    annotated_images = {a["image_id"] for a in coco["annotations"]}
    assert len(annotated_images) < len(coco["annotations"])  # some frames show two polyps
    assert sum(s["n_source_frames_decoded"] for s in stats) == len(annotated_images)
    assert sum(s["n_frames"] for s in stats) == len(coco["annotations"])
