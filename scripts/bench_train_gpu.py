"""Training-step throughput (frames/s) from shards (the streaming loader) vs synthetic GPU tensors.

Prints one JSON object. The paper's encoder (HMVE, resnet50, random init), batch 60 x 8 frames at
232 px, n_views 5; fp32 and bf16-mixed + channels-last (+ torch.compile with --compile). It builds
its own REAL-Colon-like ingested root (stored crops of 1240x1080 frames) unless --root is given.
`--smoke` runs tiny settings on CPU to check the script.

    python scripts/bench_train_gpu.py --workers 12
    python scripts/bench_train_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from polyp_ssl.device_decode import decode_batch_on, is_encoded
from polyp_ssl.module import NTSSLModule
from polyp_ssl.stream import BagStream, StreamLoader, StreamParams, build_index


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="an ingested root (default: generate one in a temp dir)")
    p.add_argument("--workers", type=int, default=12, help="loader workers")
    p.add_argument(
        "--decode_on",
        choices=["workers", "device"],
        default="workers",
        help="where the JPEGs are decoded (device: by a thread ahead of the steps, as in training)",
    )
    p.add_argument(
        "--sync_decode",
        action="store_true",
        help="with --decode_on device: decode each batch in the step instead of ahead (for comparison)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch_size", type=int, default=60)
    p.add_argument("--n_views", type=int, default=5)
    p.add_argument("--fragment_length", type=int, default=8)
    p.add_argument("--im_size", type=int, default=232)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--compile", action="store_true", help="also measure bf16 + channels-last + torch.compile")
    p.add_argument(
        "--time_budget", type=float, default=420.0, help="skip measurements after this many seconds"
    )
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings, to check the script")
    a = p.parse_args(argv)
    if a.smoke:
        a.workers, a.steps, a.warmup, a.batch_size, a.n_views = min(a.workers, 1), 2, 1, 8, 2
        a.fragment_length, a.im_size, a.arch = 2, 32, "resnet18"
    return a


def make_bench_root(out: Path, smoke: bool) -> Path:
    from tests.shard_factory import make_root

    if smoke:
        return make_root(out, videos={"train": 4}, frames_per_tracklet=12, jpeg_pool=4)
    # REAL-Colon-like: 1240x1080 frames, boxes ~ 120x100 px, stored crops <= 256 px (ingest default)
    return make_root(
        out,
        videos={"train": 16},
        polyps_per_video=4,
        tracklets_per_polyp=3,
        frames_per_tracklet=96,
        videos_per_shard=1,
        source_wh=(1240, 1080),
        store_size=256,
        crop_scale=5.0,
        jpeg_pool=16,
        box_wh=(120.0, 100.0),
    )


def model_config(a: argparse.Namespace, channels_last: bool) -> dict:
    return {
        "encoder_type": "hmve",
        "sfe_backbone_arch": a.arch,
        "sfe_backbone_weights": None,
        "d_proj": 128,
        "hmve_d_model": 256,
        "hmve_d_feedforward": 1024,
        "hmve_n_heads": 8,
        "hmve_n_layers": 3,
        "hmve_dropout": 0.1,
        "lr": 1e-5,
        "loss_type": "mil-nce",
        "loss_temperature": 0.07,
        "loss_milnce_weights": [1.0, 1.0],
        "channels_last": channels_last,
    }


def stream_params(a: argparse.Namespace, **overrides) -> StreamParams:
    """The benchmark's loader settings (batch, fragments, im_size from the flags; anchor-crop
    augmentation on, 4 open videos, fragments at stride 4)."""
    settings = {
        "batch_size": a.batch_size,
        "n_views": a.n_views,
        "fragment_length": a.fragment_length,
        "fragment_stride": 4,
        "fragment_drop_last": True,
        "min_tracklet_length": 30,
        "im_size": a.im_size,
        "aug_anchorcrop": True,
        "open_videos": 4,
        "max_epochs": 50,
    }
    return StreamParams(**{**settings, **overrides})


def batches_forever(loader: StreamLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def to_device(batch: dict, device: torch.device, im_size: int) -> dict:
    """As the data module does: decode an encoded batch on the device, then move the rest."""
    if is_encoded(batch):
        batch = decode_batch_on(batch, device, im_size)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_steps(model, opt, batches, n: int, device, bf16: bool, im_size: int) -> float:
    """Seconds for n training steps (batch to the device, forward, backward, AdamW step)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        batch = to_device(next(batches), device, im_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.compute_loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tmp = tempfile.TemporaryDirectory()
    t = time.perf_counter()
    root = Path(a.root) if a.root else make_bench_root(Path(tmp.name) / "root", a.smoke)
    result: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "workers": a.workers,
        "decode_on": a.decode_on + (" (in the step)" if a.decode_on == "device" and a.sync_decode else ""),
        "batch_size": a.batch_size,
        "fragment_length": a.fragment_length,
        "im_size": a.im_size,
        "arch": a.arch,
        "root_build_s": round(time.perf_counter() - t, 1),
        "modes": {},
    }
    params = stream_params(a, min_tracklet_length=0 if a.smoke else 30, decode_on=a.decode_on)
    index = build_index(root, "train", params)
    result["train_fragments"] = index.total_fragments
    # one long epoch: streams re-pass over their videos with new bags, no per-epoch restart bubbles
    long_epoch = 4 * (a.warmup + a.steps) + 4
    ds = BagStream(index, params, 0, 1, a.workers, batches_per_worker=long_epoch)
    loader = StreamLoader(ds, pin_memory=device.type == "cuda")
    if a.decode_on == "device" and not a.sync_decode:
        loader.decode_device = device  # as in training: a thread decodes ahead of the step
    shard_batches = batches_forever(loader)
    # loader alone (includes worker start-up in the first batches, so warm up first)
    for _ in range(a.warmup):
        next(shard_batches)
    t = time.perf_counter()
    n_loader = max(a.steps, 2 * max(a.workers, 1))
    for _ in range(n_loader):
        to_device(next(shard_batches), device, a.im_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    frames_per_batch = (a.batch_size // a.n_views) * a.n_views * a.fragment_length
    result["loader_only_frames_per_s"] = round(n_loader * frames_per_batch / (time.perf_counter() - t), 1)

    gen = torch.Generator().manual_seed(0)
    b = (a.batch_size // a.n_views) * a.n_views
    synth = {
        "frames": torch.randint(
            0, 256, (b, a.fragment_length, 3, a.im_size, a.im_size), dtype=torch.uint8, generator=gen
        ).to(device),
        "bag": torch.arange(b // a.n_views).repeat_interleave(a.n_views).to(device),
        "video": torch.zeros(b, dtype=torch.int64, device=device),
        "tracklet": torch.arange(b, device=device),
        "identity": torch.arange(b, device=device),
        "position": torch.rand(b, generator=gen).to(device),
    }

    def synth_forever():
        while True:
            yield synth

    modes = [("fp32", False, False, False), ("bf16-mixed+channels_last", True, True, False)]
    if a.compile:
        modes.append(("bf16-mixed+channels_last+compile", True, True, True))
    for name, bf16, cl, comp in modes:
        if time.perf_counter() - start > a.time_budget:
            result["modes"][name] = "skipped: time budget"
            continue
        torch.manual_seed(0)
        model = NTSSLModule(model_config(a, cl)).to(device)
        if comp:
            model.encoder.backbone.compile()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
        row = {}
        for source, batches in (("synthetic", synth_forever()), ("shards", shard_batches)):
            try:
                run_steps(model, opt, batches, a.warmup, device, bf16, a.im_size)
                secs = run_steps(model, opt, batches, a.steps, device, bf16, a.im_size)
            except torch.OutOfMemoryError as exc:
                row[source] = f"out of memory: {exc}"[:200]
                break
            row[f"{source}_frames_per_s"] = round(a.steps * frames_per_batch / secs, 1)
        if "synthetic_frames_per_s" in row and "shards_frames_per_s" in row:
            row["shards_vs_synthetic"] = round(row["shards_frames_per_s"] / row["synthetic_frames_per_s"], 3)
        if device.type == "cuda":
            row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.reset_peak_memory_stats()
        result["modes"][name] = row
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
