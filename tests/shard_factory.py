"""Tiny ingested roots built exactly per docs/architecture.md (shards + catalog), for tests and
benchmarks that must not depend on the ingest stage."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from polyp_ssl.shards.crops import box_in_crop, enlarge_box, stored_size
from polyp_ssl.shards.sample import TrackletSample, encode_sample, safe_key
from polyp_ssl.shards.schema import CATALOG_VERSION, TABLES


def _jpeg(rng: np.random.Generator, w: int, h: int, colour: np.ndarray) -> bytes:
    img = np.clip(colour[None, None, :] + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> None:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)


# the catalog's member span columns (tracklets: the JSON member; frames: the JPEG member); they
# differ between two ingests whose shards differ, even when every other column agrees
SPAN_COLUMNS = ("json_offset", "json_size", "json_crc32", "jpeg_offset", "jpeg_size", "jpeg_crc32")


def tar_spans(path: Path) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(sample key, member suffix) -> (offset of the member's data, its size, CRC-32 of the data)
    of every regular member of a tar, as tarfile reads them (independently of ShardWriter)."""
    data = Path(path).read_bytes()
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.isfile():
                key, suffix = m.name.split(".", 1)
                crc = zlib.crc32(data[m.offset_data : m.offset_data + m.size]) & 0xFFFFFFFF
                out[(key, suffix)] = (m.offset_data, m.size, crc)
    return out


def fill_spans(root: Path, tracklets: list[dict], frames: list[dict]) -> None:
    """Set the member span columns of catalog rows (json_* of tracklets, jpeg_* of frames) from
    the tars under `root` they name; a member that is not there gets nulls."""
    spans: dict[str, dict] = {}
    key_of = {}
    for t in tracklets:
        if t["shard"] not in spans:
            spans[t["shard"]] = tar_spans(Path(root) / t["shard"])
        key_of[t["tracklet_id"]] = (t["shard"], t["sample_key"])
        span = spans[t["shard"]].get((t["sample_key"], "json"), (None, None, None))
        t["json_offset"], t["json_size"], t["json_crc32"] = span
    for f in frames:
        shard, key = key_of[f["tracklet_id"]]
        span = spans[shard].get((key, f"{f['frame_index']:04d}.jpg"), (None, None, None))
        f["jpeg_offset"], f["jpeg_size"], f["jpeg_crc32"] = span


def respan_catalog(root: Path, catalog_sub: str = "catalog") -> None:
    """Rewrite the member span columns of ROOT's tracklets and frames tables from its shards as
    they are now: for tests that rewrite a shard and want the catalog to describe it."""
    cat = Path(root) / catalog_sub
    tracklets = pq.read_table(cat / "tracklets.parquet").to_pylist()
    frames = pq.read_table(cat / "frames.parquet").to_pylist()
    fill_spans(root, tracklets, frames)
    pq.write_table(pa.Table.from_pylist(tracklets, schema=TABLES["tracklets"]), cat / "tracklets.parquet")
    pq.write_table(pa.Table.from_pylist(frames, schema=TABLES["frames"]), cat / "frames.parquet")


def make_root(
    out: Path,
    videos: dict[str, int] | None = None,
    polyps_per_video: int = 2,
    tracklets_per_polyp: int | list[int] = 2,
    frames_per_tracklet: int | list[int] = 12,
    videos_per_shard: int = 2,
    source_wh: tuple[int, int] = (160, 128),
    store_size: int = 48,
    crop_scale: float = 6.0,
    seed: int = 0,
    jpeg_pool: int = 0,
    box_wh: tuple[float, float] = (20.0, 16.0),
) -> Path:
    """Write OUT/shards/{split}/*.tar and OUT/catalog/*.parquet; returns `out`.

    jpeg_pool > 0 reuses that many distinct JPEGs per stored-crop size (fast to build big roots for
    benchmarks). Tracklets of one video are in time order: polyp p's tracklet t covers frames starting at
    (t * polyps_per_video + p) * 20; every video spans frames [0, last annotated frame].
    """
    videos = videos or {"train": 4, "val": 2}
    rng = np.random.default_rng(seed)
    out = Path(out)
    rows: dict[str, list[dict]] = {name: [] for name in TABLES}
    sw, sh = source_wh
    pool: dict[tuple[int, int, int], bytes] = {}
    v_global = 0
    for split, n_videos in videos.items():
        (out / "shards" / split).mkdir(parents=True, exist_ok=True)
        shard_samples: list[list[dict]] = []
        for v in range(n_videos):
            video_id = f"{split}{v:03d}"
            if v % videos_per_shard == 0:
                shard_samples.append([])
            shard_idx = len(shard_samples) - 1
            shard_rel = f"shards/{split}/{split}-{shard_idx:06d}.tar"
            tracks = []
            k = 0
            n_tpp = tracklets_per_polyp if isinstance(tracklets_per_polyp, int) else tracklets_per_polyp[v]
            for t in range(n_tpp):
                for p in range(polyps_per_video):
                    n = (
                        frames_per_tracklet
                        if isinstance(frames_per_tracklet, int)
                        else frames_per_tracklet[k % len(frames_per_tracklet)]
                    )
                    start = (t * polyps_per_video + p) * 20
                    tracks.append((p, t, start, n))
                    k += 1
            tracks.sort(key=lambda x: (x[2], x[0]))
            last_frame = max(s + n - 1 for _, _, s, n in tracks)
            n_tracklets = 0
            for p, t, start, n in tracks:
                identity = f"{video_id}_{p}"
                tid = f"{identity}#{t}"
                colour = rng.uniform(40, 215, size=3)
                frame_ids = list(range(start, start + n))
                boxes, crops, sizes, bics, jpegs = [], [], [], [], []
                for i in range(n):
                    bw, bh = box_wh[0] * (1 + p * 0.2), box_wh[1] * (1 + p * 0.1)
                    j = i % 40  # the box drifts for 40 frames, then starts over: it stays in the frame
                    x = (30.0 + 2 * j + 10 * p) * sw / 160
                    y = (40.0 + j) * sh / 128
                    box = [x, y, bw, bh]
                    crop = enlarge_box(box, crop_scale, sw, sh)
                    size = stored_size(crop[2] - crop[0], crop[3] - crop[1], store_size)
                    boxes.append(box)
                    crops.append(list(crop))
                    sizes.append(list(size))
                    bics.append(box_in_crop(box, crop, size))
                    if jpeg_pool:
                        pool_key = (size[0], size[1], int(rng.integers(jpeg_pool)))
                        if pool_key not in pool:
                            pool[pool_key] = _jpeg(rng, size[0], size[1], colour)
                        jpegs.append(pool[pool_key])
                    else:
                        jpegs.append(_jpeg(rng, size[0], size[1], colour))
                key = safe_key(tid)
                meta = TrackletSample(
                    key=key,
                    tracklet_id=tid,
                    split=split,
                    dataset_id=None,
                    video_id=video_id,
                    sequence_id=video_id,
                    identity_id=identity,
                    size_mm=4.0 + p,
                    histology="AD",
                    position_in_video=start / last_frame,
                    video_first_frame=0,
                    video_last_frame=last_frame,
                    frame_ids=frame_ids,
                    image_ids=[v_global * 10000 + f for f in frame_ids],
                    annotation_ids=[v_global * 10000 + f for f in frame_ids],
                    file_names=[f"{video_id}_{f}.jpg" for f in frame_ids],
                    boxes=boxes,
                    crops=crops,
                    crop_sizes=sizes,
                    boxes_in_crop=bics,
                    params={"crop_scale": crop_scale, "store_size": store_size, "jpeg_quality": 85},
                )
                shard_samples[shard_idx].append(encode_sample(meta, jpegs))
                n_tracklets += 1
                rows["tracklets"].append(
                    {
                        "tracklet_id": tid,
                        "split": split,
                        "dataset_id": None,
                        "video_id": video_id,
                        "identity_id": identity,
                        "start_frame": start,
                        "end_frame": start + n - 1,
                        "n_frames": n,
                        "position_in_video": start / last_frame,
                        "size_mm": 4.0 + p,
                        "histology": "AD",
                        "shard": shard_rel,
                        "sample_key": key,
                    }
                )
                for i, f in enumerate(frame_ids):
                    rows["frames"].append(
                        {
                            "tracklet_id": tid,
                            "frame_index": i,
                            "frame_id": f,
                            "image_id": v_global * 10000 + f,
                            "annotation_id": v_global * 10000 + f,
                            "file_name": f"{video_id}_{f}.jpg",
                            "bbox_x": boxes[i][0],
                            "bbox_y": boxes[i][1],
                            "bbox_w": boxes[i][2],
                            "bbox_h": boxes[i][3],
                            "crop_x0": crops[i][0],
                            "crop_y0": crops[i][1],
                            "crop_x1": crops[i][2],
                            "crop_y1": crops[i][3],
                            "stored_w": sizes[i][0],
                            "stored_h": sizes[i][1],
                        }
                    )
            for p in range(polyps_per_video):
                rows["polyps"].append(
                    {
                        "identity_id": f"{video_id}_{p}",
                        "video_id": video_id,
                        "dataset_id": None,
                        "split": split,
                        "size_mm": 4.0 + p,
                        "histology": "AD",
                        "n_tracklets": n_tpp,
                        "n_frames": sum(n for pp, _, _, n in tracks if pp == p),
                    }
                )
            rows["videos"].append(
                {
                    "video_id": video_id,
                    "dataset_id": None,
                    "sequence_id": video_id,
                    "split": split,
                    "first_frame": 0,
                    "last_frame": last_frame,
                    "n_images": last_frame + 1,
                    "n_polyps": polyps_per_video,
                    "n_tracklets": n_tracklets,
                }
            )
            v_global += 1
        for i, samples in enumerate(shard_samples):
            path = out / "shards" / split / f"{split}-{i:06d}.tar"
            _write_tar(path, samples)
            rows["shards"].append(
                {
                    "path": f"shards/{split}/{split}-{i:06d}.tar",
                    "split": split,
                    "n_samples": len(samples),
                    "n_bytes": path.stat().st_size,
                    "sha256": "",
                    "first_video": None,
                    "last_video": None,
                }
            )
    fill_spans(out, rows["tracklets"], rows["frames"])
    cat = out / "catalog"
    cat.mkdir(parents=True, exist_ok=True)
    for name, schema in TABLES.items():
        table = pa.Table.from_pylist(rows[name], schema=schema)
        pq.write_table(table, cat / f"{name}.parquet")
    manifest = {"version": CATALOG_VERSION, "catalog_version": CATALOG_VERSION}
    (cat / "manifest.json").write_text(json.dumps(manifest))
    return out


def make_raw_root(
    root: Path,
    n_videos: int,
    polyps: int,
    frames: int,
    wh: tuple[int, int] = (1240, 1080),
    seed: int = 0,
    split: str = "train",
) -> Path:
    """A raw dataset root for `polyp-ssl ingest`: images/ of full frames and
    annotations/instances_{split}.json; every polyp is in every frame (one long tracklet)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    w, h = wh
    # a few distinct smooth frames (colonoscopy-like: low-frequency content), reused as files
    pool = []
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(6):
        base = 120 + 60 * np.sin(xx / (40 + 9 * k)) * np.cos(yy / (55 + 7 * k))
        img = np.stack([base, base * 0.6 + 30, base * 0.5 + 20], -1) + rng.normal(0, 6, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    images, anns = [], []
    for v in range(n_videos):
        seq = f"{split}{v + 1:03d}-001"
        for f in range(frames):
            iid = len(images) + 1 + seed * 1_000_000
            name = f"{seq}_{f}.jpg"
            (root / "images" / name).write_bytes(pool[(v + f) % len(pool)])
            images.append(
                {"id": iid, "file_name": name, "width": w, "height": h, "frame_id": f, "sequence_id": seq}
            )
            for p in range(polyps):
                sx, sy = w / 1240, h / 1080
                bw, bh = (110 + 20 * p) * sx, (95 + 10 * p) * sy
                x = (300 + 250 * p + (f % 20)) * sx
                y = (350 + 100 * p + (f % 10)) * sy
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": iid,
                        "bbox": [x, y, bw, bh],
                        "category_id": 1,
                        "identity_id": f"{seq}_{p}",
                    }
                )
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "polyp"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root
