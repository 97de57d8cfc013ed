"""Ingest throughput on synthetic frames of REAL-Colon size, beside the machine's limit.

Generates `--videos` x `--frames` JPEGs of 1240 x 1080 with `--boxes` polyp boxes each in a
temporary root, measures the limit (decode one such JPEG, crop, resize and encode every box's
stored crop, nothing else, in a loop, in this process), then runs `polyp-ssl ingest` with
--workers 1 and 2 and prints one JSON object. Not a test: numbers depend on the machine.
With `--executor dask` it also runs `ingest --executor dask --workers 2` (a LocalCluster of two
worker processes on 127.0.0.1) and reports its frames/s beside the local pool's with 2 workers.

    .venv/bin/python scripts/bench_ingest.py [--videos 8 --frames 20 --boxes 2 --workers 1,2]
                                             [--executor dask]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polyp_ssl.ingest.crop import stored_crop

W, H = 1240, 1080


def synth_frame(rng: np.random.Generator, t: int) -> np.ndarray:
    """Smooth shading plus mild noise: compresses to ~150-300 KB like an endoscopy frame."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    r = 150 + 60 * np.sin(xx / 97.0 + t / 7) * np.cos(yy / 131.0)
    g = 90 + 40 * np.cos(xx / 53.0 - yy / 71.0 + t / 5)
    b = 80 + 30 * np.sin((xx + yy) / 45.0)
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: str, n_videos: int, n_frames: int, n_boxes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "annotations"))
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "polyp"}]}
    base = synth_frame(rng, 0)
    image_id = ann_id = 0
    for v in range(n_videos):
        seq = f"{v + 1:03d}-001"
        starts = [
            (rng.uniform(100, W - 400), rng.uniform(100, H - 400), rng.uniform(60, 200))
            for _ in range(n_boxes)
        ]
        for t in range(n_frames):
            frame = np.roll(base, shift=(3 * t + 50 * v), axis=1)
            image_id += 1
            name = f"{seq}_{t}.jpg"
            coco["images"].append(
                {
                    "id": image_id,
                    "file_name": name,
                    "width": W,
                    "height": H,
                    "frame_id": t,
                    "sequence_id": seq,
                }
            )
            for k, (x, y, s) in enumerate(starts):
                box = [x + 2 * t, y + t, s, s * 0.8]
                xi, yi = int(box[0]), int(box[1])
                frame[yi : yi + int(box[3]), xi : xi + int(box[2])] = (200, 60 + 40 * k, 60)
                ann_id += 1
                coco["annotations"].append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "bbox": box,
                        "category_id": 1,
                        "identity_id": f"{seq}_{k}",
                    }
                )
            Image.fromarray(frame).save(os.path.join(root, "images", name), quality=90)
    with open(os.path.join(root, "annotations", "instances_train.json"), "w") as f:
        json.dump(coco, f)
    return coco


def measure_limit(root: str, coco: dict, seconds: float, draft: bool = False) -> dict:
    """Decode + crop + resize + encode in a loop, single process: the per-core ceiling."""
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    images = coco["images"]
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        img_rec = images[n % len(images)]
        im = Image.open(os.path.join(root, "images", img_rec["file_name"]))
        if draft:
            im.draft("RGB", (W // 2, H // 2))
        im.load()
        for box in by_image[img_rec["id"]]:
            if draft and im.width != W:
                f = im.width / W
                box = [v * f for v in box]
            stored_crop(im, box, 5.0, 256, 90)
        n += 1
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "frames_per_s": round(n / dt, 1),
        "frames_per_cpu_s": round(n / cpu, 1),
        "frames": n,
        "seconds": round(dt, 2),
        "cpu_seconds": round(cpu, 2),
    }


def run_ingest(root: str, out: str, workers: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "polyp_ssl", "ingest", root, "--out", out, "--workers", str(workers),
           "--no-progress", "--overwrite", "--shard-max-bytes", "1", *extra]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    cpu = 0.0  # CPU time of the shard tasks, whichever process ran them
    for path in glob.glob(os.path.join(out, "shards", "*", "*.stats.json")):
        with open(path) as f:
            cpu += json.load(f)["cpu_seconds"]
    return {"summary": json.loads(res.stdout), "wall_seconds": round(wall, 2), "task_cpu_seconds": cpu}


def crop_difference(full_out: str, other_out: str) -> dict:
    """Mean absolute pixel difference (0-255) between the stored crops of two ingests."""
    import io

    from polyp_ssl.shards.reader import iter_samples

    def crops(out: str) -> dict[str, bytes]:
        paths = sorted(glob.glob(os.path.join(out, "shards", "*", "*.tar")))
        return {
            f"{s['__key__']}.{k}": v for s in iter_samples(paths) for k, v in s.items() if k.endswith(".jpg")
        }

    a, b = crops(full_out), crops(other_out)
    diffs = [
        float(
            np.abs(
                np.asarray(Image.open(io.BytesIO(a[k])), int) - np.asarray(Image.open(io.BytesIO(b[k])), int)
            ).mean()
        )
        for k in a
    ]
    return {
        "mean": round(float(np.mean(diffs)), 2),
        "max": round(float(np.max(diffs)), 2),
        "crops": len(diffs),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8, help="videos (one shard each)")
    p.add_argument("--frames", type=int, default=20, help="frames per video")
    p.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated (1 and 2 needed)")
    p.add_argument("--boxes", type=int, default=2, help="polyp boxes per frame")
    p.add_argument("--limit-seconds", type=float, default=8.0)
    p.add_argument(
        "--executor",
        choices=("local", "dask"),
        default="local",
        help="dask: also run ingest on a Dask LocalCluster of 2 workers, beside the local pool",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        root = os.path.join(tmp, "root")
        t0 = time.perf_counter()
        coco = make_dataset(root, args.videos, args.frames, args.boxes)
        gen_s = time.perf_counter() - t0
        n_src = len(coco["images"])
        jpeg_kb = (
            np.mean([os.path.getsize(os.path.join(root, "images", i["file_name"])) for i in coco["images"]])
            / 1e3
        )
        limit = measure_limit(root, coco, args.limit_seconds)
        limit_draft = measure_limit(root, coco, args.limit_seconds, draft=True)
        runs: dict = {}
        counts = sorted({1, 2, *map(int, args.workers.split(","))})
        variants = [(w, ()) for w in counts] + [(1, ("--jpeg-draft",))]
        if args.executor == "dask":
            variants.append((2, ("--executor", "dask")))
        for workers, extra in variants:
            name = f"{workers}" + {(): "", ("--jpeg-draft",): "_jpeg_draft"}.get(extra, "_dask")
            r = run_ingest(root, os.path.join(tmp, f"out{name}"), workers, *extra)
            s = r["summary"]["seconds"]
            runs[name] = {
                "source_frames_per_s": round(n_src / s, 1),
                "source_frames_per_s_per_worker": round(n_src / s / workers, 1),
                "crops_per_s": round(r["summary"]["frames"] / s, 1),
                "source_frames_per_task_cpu_s": round(n_src / r["task_cpu_seconds"], 1),
                "ingest_seconds": s,
                "wall_seconds_with_startup": r["wall_seconds"],
            }
            if "executor" in r["summary"]:  # the cluster's start is in `seconds`: also shown apart
                ex = r["summary"]["executor"]
                start = ex["cluster_start_seconds"]
                runs[name]["cluster_start_seconds"] = start
                runs[name]["source_frames_per_s_after_cluster_start"] = round(n_src / (s - start), 1)
                runs[name]["retried"] = ex["retried"]
                runs[name]["tasks_per_worker"] = sorted(ex["ran_on"].values())
        draft_diff = crop_difference(os.path.join(tmp, "out1"), os.path.join(tmp, "out1_jpeg_draft"))
        runs = {str(k): v for k, v in runs.items()}
        per_worker_ratio = runs["1"]["source_frames_per_s_per_worker"] / limit["frames_per_s"]
        report = {
            "frame_size": [W, H],
            "source_frames": n_src,
            "boxes_per_frame": args.boxes,
            "mean_source_jpeg_kb": round(float(jpeg_kb), 1),
            "generate_seconds": round(gen_s, 1),
            "cpu_count": os.cpu_count(),
            "limit_full_decode": limit,
            "limit_draft_half_decode": limit_draft,
            "ingest": runs,
            "load_average_1_5_15min": [round(x, 1) for x in os.getloadavg()],
            "workers1_fraction_of_limit": round(per_worker_ratio, 3),
            "cpu_efficiency_vs_limit": {
                w: round(
                    r["source_frames_per_task_cpu_s"]
                    / (limit_draft if w.endswith("draft") else limit)["frames_per_cpu_s"],
                    3,
                )
                for w, r in runs.items()
            },
            "workers2_fraction_of_limit_per_worker": round(
                runs["2"]["source_frames_per_s_per_worker"] / limit["frames_per_s"], 3
            ),
        }
    if "2_dask" in runs:
        report["dask_vs_local_2_workers"] = round(
            runs["2_dask"]["source_frames_per_s"] / runs["2"]["source_frames_per_s"], 3
        )
        report["dask_vs_local_2_workers_after_cluster_start"] = round(
            runs["2_dask"]["source_frames_per_s_after_cluster_start"] / runs["2"]["source_frames_per_s"], 3
        )
    for name in runs:
        report[f"speedup_{name}"] = round(
            runs[name]["source_frames_per_s"] / runs["1"]["source_frames_per_s"], 2
        )
    report["jpeg_draft_crop_abs_diff_vs_full_decode"] = draft_diff
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
