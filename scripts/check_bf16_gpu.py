"""Loss curves of fp32 and bf16-mixed training on one fixed batch, to locate a bf16 slowdown.

The paper's model (resnet50 + HMVE, random init), lr 1e-5, AdamW, `--steps` steps on the same
batch, for two batches: uniform noise frames (what bench_model_gpu.py trains on) and a batch of
stored crops from shards (colonoscopy-like frames). Variants, each from the same initial weights:

    fp32             TF32 convolutions (the PyTorch default on Hopper)
    bf16             autocast around the whole loss computation (as Lightning's bf16-mixed)
    bf16_backbone    autocast around the ResNet only; HMVE head, projector and loss in fp32
    bf16_math_attn   bf16, with attention forced to the plain math kernel (no fused kernels)

Also prints the spread of the fragment cosine similarities at initialisation (fp32 and bf16) and
the bf16 rounding error of them. Prints one JSON object.

    python scripts/check_bf16_gpu.py --root INGESTED_ROOT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from polyp_ssl.module import NTSSLModule
from polyp_ssl.stream import BagStream, build_index
from scripts.bench_train_gpu import model_config, stream_params

VARIANTS = ("fp32", "bf16", "bf16_backbone", "bf16_math_attn")


def shard_batch(root: str, a: argparse.Namespace) -> dict[str, torch.Tensor]:
    params = stream_params(a, min_tracklet_length=0, aug_anchorcrop=False)
    ds = BagStream(build_index(root, "train", params), params, batches_per_worker=1)
    return next(iter(ds))


def noise_batch(a: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    b = (a.batch_size // a.n_views) * a.n_views
    return {
        "frames": torch.randint(
            0, 256, (b, a.fragment_length, 3, a.im_size, a.im_size), dtype=torch.uint8, generator=gen
        ),
        "bag": torch.arange(b // a.n_views).repeat_interleave(a.n_views),
        "video": torch.zeros(b, dtype=torch.int64),
        "position": torch.rand(b, generator=gen),
    }


@contextlib.contextmanager
def step_context(variant: str, device: torch.device):
    """The context around one loss computation of a variant (bf16_backbone: none, see below)."""
    with contextlib.ExitStack() as stack:
        if variant in ("bf16", "bf16_math_attn"):
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if variant == "bf16_math_attn":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def autocast_backbone_only(model: NTSSLModule, device: torch.device) -> None:
    """bf16_backbone: the ResNet runs under autocast and hands fp32 features to the head."""
    plain = model.encoder.backbone.forward

    def forward(x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return plain(x).float()

    model.encoder.backbone.forward = forward


def cosine_spread(model: NTSSLModule, batch: dict, device: torch.device) -> dict[str, float]:
    """Std of off-diagonal fragment cosine similarities (fp32) and the rms bf16 error of them."""
    model.eval()
    with torch.no_grad():
        z32 = F.normalize(model.projector(model.fragment_vectors(batch["frames"])[0]).float(), dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z16 = model.projector(model.fragment_vectors(batch["frames"])[0])
        z16 = F.normalize(z16.float(), dim=1)
    model.train()
    off = ~torch.eye(z32.shape[0], dtype=torch.bool, device=device)
    s32, s16 = (z32 @ z32.T)[off], (z16 @ z16.T)[off]
    return {
        "cos_mean": round(s32.mean().item(), 5),
        "cos_std": round(s32.std().item(), 6),
        "bf16_cos_rms_error": round((s16 - s32).pow(2).mean().sqrt().item(), 6),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="an ingested root (e.g. the one bench_train_gpu builds)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch_size", type=int, default=60)
    ap.add_argument("--n_views", type=int, default=5)
    ap.add_argument("--fragment_length", type=int, default=8)
    ap.add_argument("--im_size", type=int, default=232)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    batches = {"noise": noise_batch(a), "shards": shard_batch(a.root, a)}
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "lr": a.lr}
    for bname, cpu_batch in batches.items():
        batch = {k: v.to(device) for k, v in cpu_batch.items() if torch.is_tensor(v)}
        row: dict = {}
        for variant in a.variants:
            torch.manual_seed(0)
            model = NTSSLModule(model_config(a, channels_last=variant != "fp32")).to(device)
            model.train()
            if variant == "fp32":
                row["init"] = cosine_spread(model, batch, device)
            opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
            if variant == "bf16_backbone":
                autocast_backbone_only(model, device)
            curve = []
            for _ in range(a.steps):
                with step_context(variant, device):
                    loss = model.compute_loss(batch)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                curve.append(round(loss.item(), 4))
            row[variant] = curve
            del model, opt
        result[bname] = row
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
