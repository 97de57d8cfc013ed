"""Peak memory (RSS, CPU) of a few training steps, per backbone, image size, batch and fragment length.

Each measurement runs in a fresh process (peak RSS is per process): the paper's encoder (HMVE on a
torchvision ResNet, random init, n_views 5), a synthetic uint8 batch of `batch x frames` crops of
`im_size` px, two AdamW steps (forward, backward, step; the second step holds the optimizer state).
Prints one JSON object: the measurements and, per backbone, the least-squares fit

    peak_bytes = a + b * batch * fragment_length * im_size**2

that `polyp_ssl.memory` keeps (copy the fitted constants there when they change).

    python scripts/bench_train_memory.py > docs/bench/train_memory_cpu.json
    python scripts/bench_train_memory.py --quick   # two small points per backbone, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (arch, im_size, batch, fragment_length): pixels per batch spread over 8x, both backbones (kept small:
# a CPU step at the paper's size takes minutes; the fit is linear in pixels)
POINTS: list[tuple[str, int, int, int]] = [
    (arch, im, batch, frames)
    for arch in ("resnet18", "resnet50")
    for im, batch, frames in ((64, 10, 4), (64, 10, 8), (96, 10, 4), (96, 20, 4), (128, 10, 4), (128, 10, 8))
]
QUICK = [p for p in POINTS if p[1] == 64]


def measure_one(arch: str, im_size: int, batch: int, frames: int, steps: int) -> dict:
    """Run `steps` training steps in this process; peak RSS in bytes (Linux: ru_maxrss is KiB)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from polyp_ssl.module import NTSSLModule

    torch.manual_seed(0)
    n_views = 5 if batch % 5 == 0 else 2
    model = NTSSLModule(
        {
            "encoder_type": "hmve",
            "sfe_backbone_arch": arch,
            "sfe_backbone_weights": None,
            "d_proj": 128,
            "hmve_d_model": 256,
            "hmve_d_feedforward": 1024,
            "hmve_n_heads": 8,
            "hmve_n_layers": 3,
            "hmve_dropout": 0.1,
            "loss_type": "mil-nce",
            "loss_milnce_weights": [1.0, 1.0],
        }
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch_data = {
        "frames": torch.randint(
            0, 256, (batch, frames, 3, im_size, im_size), dtype=torch.uint8, generator=gen
        ),
        "bag": torch.arange(batch // n_views).repeat_interleave(n_views),
        "video": torch.zeros(batch, dtype=torch.int64),
        "tracklet": torch.arange(batch),
        "identity": torch.arange(batch),
        "position": torch.rand(batch, generator=gen),
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model.compute_loss(batch_data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "arch": arch,
        "im_size": im_size,
        "batch_size": batch,
        "fragment_length": frames,
        "pixels": batch * frames * im_size * im_size,
        "rss_before_steps_bytes": before,
        "peak_rss_bytes": peak,
        "seconds_per_step": round((time.perf_counter() - t0) / steps, 2),
    }


def fit(rows: list[dict]) -> dict[str, float]:
    """Least squares of peak_rss_bytes on pixels: intercept a, slope b (bytes per pixel)."""
    xs = [float(r["pixels"]) for r in rows]
    ys = [float(r["peak_rss_bytes"]) for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys, strict=True))
    return {"a_bytes": round(a), "b_bytes_per_pixel": round(b, 2), "max_relative_error": round(worst, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="only the small points (checks the script)")
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement (default: 2)")
    p.add_argument("--one", nargs=4, metavar=("ARCH", "IM", "BATCH", "FRAMES"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        arch, im, batch, frames = a.one
        print(json.dumps(measure_one(arch, int(im), int(batch), int(frames), a.steps)))
        return 0
    rows = []
    for arch, im, batch, frames in QUICK if a.quick else POINTS:
        cmd = [
            sys.executable,
            __file__,
            "--steps",
            str(a.steps),
            "--one",
            arch,
            str(im),
            str(batch),
            str(frames),
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"}
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    fits = {arch: fit([r for r in rows if r["arch"] == arch]) for arch in sorted({r["arch"] for r in rows})}
    result = {
        "what": "peak RSS of the training process, CPU, fp32, HMVE encoder, n_views 5, AdamW",
        "host": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "steps": a.steps,
        "measurements": rows,
        "fit": fits,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
