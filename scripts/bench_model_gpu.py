"""Training-step throughput of the NT-SSL model on synthetic GPU tensors (no data loading).

Prints frames/s of full training steps (forward, loss, backward, AdamW) for fp32, bf16 autocast +
channels-last, and the same with the backbone compiled, at the paper's setting by default
(resnet50 + HMVE, im_size 232, batch 60 fragments x 8 frames, hierarchical MIL-NCE 1 1).

    python scripts/bench_model_gpu.py [--steps 20] [--warmup 5] [--no-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from polyp_ssl.module import NTSSLModule

PAPER = {
    "encoder_type": "hmve",
    "sfe_backbone_arch": "resnet50",
    "sfe_d_model": 2048,
    "d_proj": 128,
    "lr": 1e-5,
    "loss_type": "mil-nce",
    "loss_milnce_weights": [1.0, 1.0],
}


def synthetic_batch(batch: int, frames: int, im: int, n_views: int, device: str) -> dict[str, torch.Tensor]:
    bag = torch.arange(batch // n_views).repeat_interleave(n_views)
    return {
        "frames": torch.randint(0, 256, (batch, frames, 3, im, im), dtype=torch.uint8, device=device),
        "bag": bag.to(device),
        "video": bag.to(device),
        "position": torch.rand(batch, device=device),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(mode: str, args: argparse.Namespace) -> dict[str, float | str]:
    torch.manual_seed(0)
    parts = set(mode.split("+"))
    config = {**PAPER, "channels_last": "cl" in parts, "sfe_backbone_arch": args.arch, "sfe_d_model": None}
    module = NTSSLModule(config).to(args.device).train()
    if "compile" in parts:
        module.encoder.backbone.compile()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5, weight_decay=1e-4)
    batch = synthetic_batch(args.batch_size, args.fragment_length, args.im_size, args.n_views, args.device)
    bf16 = "bf16" in parts

    def step() -> torch.Tensor:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
            loss = module.compute_loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    warmup_losses = [round(float(step().detach()), 4) for _ in range(args.warmup)]
    sync(args.device)
    warm_s = time.perf_counter() - t0
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(args.device)
    dt = time.perf_counter() - t0
    frames = args.steps * args.batch_size * args.fragment_length
    out = {
        "mode": mode,
        "frames_per_s": frames / dt,
        "fragments_per_s": args.steps * args.batch_size / dt,
        "step_ms": 1000 * dt / args.steps,
        "warmup_s": warm_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0,
        "warmup_losses": warmup_losses,
        "loss": float(loss.detach()),
    }
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch_size", type=int, default=60)
    p.add_argument("--fragment_length", type=int, default=8)
    p.add_argument("--n_views", type=int, default=5)
    p.add_argument("--im_size", type=int, default=232)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--modes", nargs="+", default=None, help="e.g. fp32 fp32+cl bf16 bf16+cl bf16+cl+compile")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    args = p.parse_args(argv)
    if args.device == "cpu":
        print(json.dumps([measure("fp32", args), measure("bf16+cl", args)]))
        return 0
    if not torch.cuda.is_available():
        print("bench_model_gpu: needs a CUDA GPU")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    modes = args.modes or ["fp32", "bf16+cl"] + ([] if args.no_compile else ["bf16+cl+compile"])
    results = []
    for mode in modes:
        results.append(measure(mode, args))
        torch.cuda.empty_cache()
    if args.json:
        report = {"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
