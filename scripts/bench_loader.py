"""Fragments/s of the streaming loader (stored crops in shards) vs a map-style loader that reads the
original frames from images/ and crops them (the reference code's way), same data and transforms.

The streaming loader runs in each --decode_on mode: `workers` (the workers decode and crop on the
CPU) and `device` (the workers ship JPEG bytes; the main process decodes and crops on --device,
nvJPEG on a GPU; that time is counted, up to a final synchronisation).

Builds a small REAL-Colon-sized synthetic dataset (1240x1080 JPEG frames) in a temp dir (or in
--root, reused when it exists), ingests it with `polyp-ssl ingest`, then times both loaders for each
worker count. Also prints the machine's per-frame ceilings, measured in the same run in the main
process on one thread: decode + anchor crop + resize of one stored crop (the least work a streaming
frame needs) and of one full frame (a map-style frame). Prints one JSON object.

The streaming loader with decoding in the workers runs with each --shard_access in the same run:
`random` (the default: batches from the epoch's global shuffle, each frame read at its catalog
byte span) and `sequential` (each stream reads whole shards and mixes its few open videos), with
the batches' same-video bag-pair rate beside the global-shuffle expectation and the workers'
peak memory. `--memory_frames N` adds a memory section on videos of REAL-Colon's size (N box
frames each: about 46,000 frames with 13% boxed is 6,000), where an open video's JPEGs dominate a
sequential worker's memory and a random-access worker holds one batch.

    python scripts/bench_loader.py --workers 1 2
    python scripts/bench_loader.py --workers 2 --memory_frames 6000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from polyp_ssl.device_decode import decode_batch_on, pack_jpegs
from polyp_ssl.diversity import bag_videos, global_shuffle_pair_rate, same_video_pair_rate
from polyp_ssl.fragments import fragment_index_lists
from polyp_ssl.planned_source import PlannedSource
from polyp_ssl.shards.crops import enlarge_box
from polyp_ssl.shards.sample import frame_jpeg, sample_meta
from polyp_ssl.stream import BagStream, StreamLoader, StreamParams, build_index, iter_tar_samples
from polyp_ssl.transforms import CropParams, crop_resize, crop_window, decode_jpeg_bytes, resize_uint8
from tests.shard_factory import make_raw_root, make_root


class FullFrameFragments(Dataset):
    """The reference code's way: per fragment, open each full JPEG, crop the enlarged box, resize."""

    def __init__(self, root: Path, fragment_length: int, stride: int, scale: float, im_size: int) -> None:
        coco = json.loads((root / "annotations" / "instances_train.json").read_text())
        images = {im["id"]: im for im in coco["images"]}
        by_identity: dict[str, list] = {}
        for a in coco["annotations"]:
            im = images[a["image_id"]]
            by_identity.setdefault(a["identity_id"], []).append((im["frame_id"], im["file_name"], a["bbox"]))
        self.items = []
        for frames in by_identity.values():
            frames.sort()
            for idx in fragment_index_lists(len(frames), fragment_length, stride, True):
                self.items.append([frames[i] for i in idx])
        self.root, self.scale, self.im_size = root, scale, im_size
        self.length = 0  # > len(items): cycle over the fragments (same data, longer timing)

    def __len__(self) -> int:
        return max(len(self.items), self.length)

    def load_frame(self, name: str, box: list[float]) -> torch.Tensor:
        img = Image.open(self.root / "images" / name).convert("RGB")
        x0, y0, x1, y1 = enlarge_box(box, self.scale, img.width, img.height)
        t = torch.from_numpy(np.array(img.crop((x0, y0, x1, y1)))).permute(2, 0, 1)
        return resize_uint8(t.contiguous(), self.im_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([self.load_frame(name, box) for _, name, box in self.items[i % len(self.items)]])


def worker_peak_mb() -> list[float]:
    """Peak resident memory (VmHWM, MB) of each live child process (the DataLoader's workers)."""
    peaks = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip() or 0) == os.getpid() and "VmHWM" in fields:
            peaks.append(round(int(fields["VmHWM"].split()[0]) / 1024, 1))
    return peaks


def time_loader(loader, n_batches: int, finish=None, sync=None, seen: dict | None = None) -> float:
    """Fragments/s over n_batches, counted from the loader's start (worker start-up included, the
    same for both loaders), so prefetching cannot hide work. `finish` turns a loader batch into
    frames (device decoding), `sync` waits for the device before the clock stops. With `seen`, the
    batches' same-video bag-pair rates and the workers' peak memory are recorded there."""
    t = time.perf_counter()
    n = 0
    for i, batch in enumerate(loader):
        if seen is not None:
            seen.setdefault("pair_rates", []).append(
                same_video_pair_rate(bag_videos(batch["bag"].numpy(), batch["video"].numpy()))
            )
        if finish is not None:
            batch = finish(batch)
        frames = batch["frames"] if isinstance(batch, dict) else batch
        n += frames.shape[0]
        if i + 1 == n_batches:
            if seen is not None:
                seen["worker_peak_mb"] = worker_peak_mb()
            break
    if sync is not None:
        sync()
    return n / (time.perf_counter() - t)


def per_frame_ms(fn, items: list, repeats: int = 3) -> float:
    """Best-of-`repeats` milliseconds per item of fn over items (best: the least disturbed by other
    jobs on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, (time.perf_counter() - t) / len(items))
    return best * 1000


def ceilings(out: Path, full: FullFrameFragments, scale: float, im_size: int, device: str | None) -> dict:
    """Per-frame cost of decode + crop + resize alone: a stored crop vs a full frame on one CPU
    thread (as in a loader worker), and (device) a batch of stored crops decoded on the device."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        shard = sorted((out / "shards" / "train").glob("*.tar"))[0]
        sample = next(iter_tar_samples(str(shard)))
        meta = sample_meta(sample)
        stored = [(frame_jpeg(sample, i), meta.boxes_in_crop[i]) for i in range(min(32, meta.n_frames))]
        params = CropParams(scale)
        stored_ms = per_frame_ms(
            lambda jb: crop_resize(decode_jpeg_bytes(jb[0]), jb[1], params, im_size), stored
        )
        frames = [f for frag in full.items[:4] for f in frag][:16]
        full_ms = per_frame_ms(lambda f: full.load_frame(f[1], f[2]), frames, repeats=2)
    finally:
        torch.set_num_threads(threads)
    result = {
        "stored_crop_decode_crop_resize_ms": round(stored_ms, 3),
        "full_frame_decode_crop_resize_ms": round(full_ms, 3),
        "ceiling_ratio": round(full_ms / stored_ms, 1),
    }
    if device is not None:
        n = meta.n_frames
        data, offsets = pack_jpegs([frame_jpeg(sample, i) for i in range(n)])
        windows = [list(crop_window(meta.boxes_in_crop[i], params, *meta.crop_sizes[i])) for i in range(n)]
        batch = {
            "jpeg_data": data,
            "jpeg_offsets": offsets,
            "jpeg_names": [str(i) for i in range(n)],
            "frame_jpeg": torch.arange(n)[None],
            "frame_window": torch.tensor(windows)[None],
            "flips": torch.zeros((1, 2), dtype=torch.bool),
        }
        # start-up (nvJPEG handles, kernels) not timed; the frames against the workers' own
        on_device = decode_batch_on(batch, device, im_size)["frames"][0].cpu().int()
        on_cpu = torch.stack(
            [
                crop_resize(decode_jpeg_bytes(frame_jpeg(sample, i)), meta.boxes_in_crop[i], params, im_size)
                for i in range(n)
            ]
        ).int()
        diff = (on_device - on_cpu).abs().float()
        result["device_vs_workers_grey_levels"] = {
            "mean": round(diff.mean().item(), 3),
            "share_over_2": round((diff > 2).float().mean().item(), 5),
            "max": int(diff.max().item()),
        }
        sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
        sync()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            decode_batch_on(batch, device, im_size)
            sync()
            best = min(best, (time.perf_counter() - t) / n)
        result["device_stored_crop_decode_crop_resize_ms"] = round(best * 1000, 4)
        result["device_frames"] = n
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--polyps", type=int, default=2)
    ap.add_argument("--frames", type=int, default=160, help="frames per video (every polyp in every frame)")
    ap.add_argument("--batches", type=int, default=3, help="timed batches per worker")
    ap.add_argument("--batch_size", type=int, default=10)
    ap.add_argument("--n_views", type=int, default=5)
    ap.add_argument("--fragment_length", type=int, default=8)
    ap.add_argument("--im_size", type=int, default=232)
    ap.add_argument("--root", type=Path, default=None, help="build the data here (reused if present)")
    ap.add_argument("--decode_on", nargs="+", default=["workers", "device"], choices=["workers", "device"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shard_access", nargs="+", default=["random", "sequential"])
    ap.add_argument("--memory_frames", type=int, default=0, help="box frames per video of the memory section")
    ap.add_argument("--memory_videos", type=int, default=5)
    a = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    base = a.root or Path(tmp.name)
    raw, out = base / "raw", base / "ingested"
    t = time.perf_counter()
    if not (out / "catalog" / "manifest.json").exists():
        make_raw_root(raw, a.videos, a.polyps, a.frames)
        subprocess.run(
            [sys.executable, "-m", "polyp_ssl", "ingest", str(raw), "--out", str(out), "--no-progress"],
            check=True,
            capture_output=True,
        )
    ingest_s = time.perf_counter() - t
    modes = {
        mode: StreamParams(
            batch_size=a.batch_size,
            n_views=a.n_views,
            fragment_length=a.fragment_length,
            fragment_stride=4,
            fragment_drop_last=True,
            min_tracklet_length=30,
            im_size=a.im_size,
            bbox_scale_factor=5.0,
            open_videos=4,
            decode_on=mode,
        )
        for mode in a.decode_on
    }
    index = build_index(out, "train", next(iter(modes.values())))
    full = FullFrameFragments(raw, a.fragment_length, 4, 5.0, a.im_size)
    b = (a.batch_size // a.n_views) * a.n_views
    device = a.device if "device" in modes else None
    result = {
        "frame_size": [1240, 1080],
        "im_size": a.im_size,
        "fragment_length": a.fragment_length,
        "batch_fragments": b,
        "train_fragments": index.total_fragments,
        "cpu_count": os.cpu_count(),
        "device": (torch.cuda.get_device_name() if str(device).startswith("cuda") else device),
        "ingest_s": round(ingest_s, 1),
        "ceiling_per_frame": ceilings(out, full, 5.0, a.im_size, device),
        "per_workers": {},
    }
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    for w in a.workers:
        n_batches = a.batches * max(w, 1)
        full.length = n_batches * b
        generator = torch.Generator().manual_seed(0)
        map_loader = DataLoader(full, batch_size=b, shuffle=True, num_workers=w, generator=generator)
        map_fps = time_loader(map_loader, n_batches)
        row: dict = {"map_style_fragments_per_s": round(map_fps, 2)}
        for mode, params in modes.items():
            ds = BagStream(index, params, 0, 1, w, batches_per_worker=a.batches)
            if mode == "device":
                fps = time_loader(
                    StreamLoader(ds), n_batches, lambda x: decode_batch_on(x, device, a.im_size), sync
                )
                # the workers' side alone (shard reading, bags, JPEG bytes): what they could feed
                ds = BagStream(index, params, 0, 1, w, batches_per_worker=a.batches)
                raw = time_loader(StreamLoader(ds), n_batches, lambda x: {"frames": x["frame_jpeg"]})
                row["stream_device_workers_only_fragments_per_s"] = round(raw, 2)
            else:
                for access in a.shard_access:
                    ds = BagStream(
                        index, replace(params, shard_access=access), 0, 1, w, batches_per_worker=a.batches
                    )
                    seen: dict = {}
                    fps_a = time_loader(StreamLoader(ds), n_batches, seen=seen)
                    tag = "" if access == "random" else "_sequential"
                    row[f"stream{tag}_same_video_pair_rate"] = round(float(np.mean(seen["pair_rates"])), 4)
                    row[f"stream{tag}_worker_peak_mb"] = seen.get("worker_peak_mb", [])
                    row[f"stream_{mode}{tag}_fragments_per_s"] = round(fps_a, 2)
                    if access == "random":
                        fps = fps_a
                row["global_shuffle_pair_rate"] = round(global_shuffle_pair_rate(index.video_eligible), 4)
                if len(a.shard_access) == 2:
                    row["random_vs_sequential_throughput"] = round(
                        row["stream_workers_fragments_per_s"]
                        / row["stream_workers_sequential_fragments_per_s"],
                        3,
                    )
            if mode != "workers" or "random" in a.shard_access:
                row[f"stream_{mode}_fragments_per_s"] = round(fps, 2)
                row[f"stream_{mode}_speedup"] = round(fps / map_fps, 2)
        result["per_workers"][str(w)] = row
    if a.memory_frames:
        result["memory"] = memory_section(base / "memory", a)
    print(json.dumps(result, indent=2))
    return 0


def memory_section(folder: Path, a) -> dict:
    """Peak resident memory of one loader worker on long videos (a.memory_frames box frames each),
    per --shard_access, at the paper's batch (60 fragments x 8 frames)."""
    per_tracklet = 500
    tracklets = max(1, a.memory_frames // per_tracklet)
    polyps = 3
    root = folder / "root"
    if not (root / "catalog").exists():
        make_root(
            root,
            videos={"train": a.memory_videos, "val": 1},
            polyps_per_video=polyps,
            tracklets_per_polyp=-(-tracklets // polyps),
            frames_per_tracklet=per_tracklet,
            videos_per_shard=1,
            store_size=256,
            jpeg_pool=16,
            source_wh=(1240, 1080),
            box_wh=(120.0, 100.0),
        )
    params = StreamParams(
        batch_size=60,
        n_views=5,
        fragment_length=8,
        fragment_stride=4,
        fragment_drop_last=True,
        min_tracklet_length=30,
        im_size=a.im_size,
        open_videos=4,
    )
    index = build_index(root, "train", params)
    jpeg_bytes = [p.stat().st_size for p in (root / "shards" / "train").glob("*.tar")]
    out: dict = {
        "videos": len(index.video_ids),
        "box_frames_per_video": int(
            index.sample_frames and sum(index.sample_frames.values()) // len(index.video_ids)
        ),
        "mean_jpeg_kb": round(sum(jpeg_bytes) / max(1, sum(index.sample_frames.values())) / 1024, 1),
        "batch": "60 fragments x 8 frames",
        "open_videos": params.open_videos,
    }
    for access in a.shard_access:
        ds = BagStream(index, replace(params, shard_access=access), 0, 1, 1, batches_per_worker=a.batches)
        seen: dict = {}
        time_loader(StreamLoader(ds), a.batches, seen=seen)
        out[f"{access}_worker_peak_mb"] = seen.get("worker_peak_mb", [])
        if isinstance(ds.source, PlannedSource):
            out["span_index_mb"] = round(ds.source.spans.nbytes / 2**20, 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
