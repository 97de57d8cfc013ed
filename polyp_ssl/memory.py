"""Checks before a training run starts: will it fit in memory, and does the machine have the device asked for.

The memory estimate is measured, not guessed: `scripts/bench_train_memory.py` measures the peak RSS
of a few training steps on CPU (fp32, HMVE encoder, AdamW) per backbone at several image sizes,
batch sizes and fragment lengths, and fits

    peak_bytes = a + b * batch_size * fragment_length * im_size**2

per backbone (docs/bench/train_memory_cpu.json). On CUDA the slope comes from the peak allocated
memory of the paper's configuration on an H200 (docs/bench/train_gpu_h200.json), per precision.
The estimate covers the training process; loader workers add their decode buffers on top.

Nothing here imports torch at module level (the parser of `polyp-ssl train --help` imports this file).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polyp_ssl.config import TrainConfig

log = logging.getLogger(__name__)

GIB = 1024**3

# CPU, fp32: arch -> (a bytes, b bytes per pixel of a batch) from docs/bench/train_memory_cpu.json
CPU_FIT: dict[str, tuple[float, float]] = {
    "resnet18": (1284254765, 669.19),
    "resnet50": (1519805392, 2050.49),
}
# CUDA: the paper's configuration (resnet50, batch 60 x 8 frames x 232 px) on an H200,
# torch.cuda.max_memory_allocated: 50.4 GiB in fp32, 22.4 GiB in bf16-mixed (+ channels-last)
CUDA_PAPER_PIXELS = 60 * 8 * 232 * 232
CUDA_PAPER_PEAK = {"32": 50.4 * GIB, "bf16-mixed": 22.4 * GIB, "16-mixed": 22.4 * GIB}
CUDA_CONTEXT_BYTES = 0.5 * GIB  # CUDA context and cuDNN workspace, outside max_memory_allocated
WARN_FRACTION = 0.85  # an estimate above this share of what is available gets a warning


@dataclass(frozen=True)
class MemoryVerdict:
    """The outcome of the memory check: ok, warn (near the limit) or refuse (cannot fit)."""

    level: str  # ok | warn | refuse | unknown
    message: str
    estimate: float | None = None
    available: float | None = None


def estimate_train_bytes(
    arch: str, im_size: int, batch_size: int, fragment_length: int, device: str = "cpu", precision: str = "32"
) -> float | None:
    """Estimated peak memory of one training process (bytes), or None when the backbone was not
    measured or the fragment length is not fixed (-1: whole tracklets)."""
    if fragment_length < 1 or arch not in CPU_FIT:
        return None
    pixels = float(batch_size) * fragment_length * im_size * im_size
    a, b = CPU_FIT[arch]
    if device == "cpu":
        return a + b * pixels
    # CUDA: the resnet50 slope measured on the GPU, scaled for other backbones by their CPU slope ratio
    peak = CUDA_PAPER_PEAK.get(precision, CUDA_PAPER_PEAK["32"])
    b_cuda = peak / CUDA_PAPER_PIXELS * (b / CPU_FIT["resnet50"][1])
    return CUDA_CONTEXT_BYTES + b_cuda * pixels


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes(
    proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")
) -> tuple[int, str] | None:
    """Memory this process can still use and where the number comes from: the smaller of
    /proc/meminfo MemAvailable and the cgroup's limit minus its usage (v2, else v1). None when
    neither can be read (not Linux)."""
    found: list[tuple[int, str]] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            found.append((max(limit - usage, 0), f"the cgroup limit {cgroup / limit_file}"))
            break
    return min(found) if found else None


def current_rss_bytes(proc: Path = Path("/proc")) -> int:
    """Resident memory of this process now (0 when unknown). It is already out of MemAvailable, yet
    part of the estimate (Python, torch, the catalog), so the check adds it back."""
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cuda_free_bytes(index: int) -> int | None:
    """Free memory of CUDA device `index` (bytes), None when it cannot be asked."""
    try:
        import torch

        return int(torch.cuda.mem_get_info(index)[0])
    except Exception:
        return None


def _largest_batch(fits: Any, batch_size: int, n_views: int) -> int:
    """The largest multiple of n_views below batch_size for which `fits(batch)` holds (0: none).
    The estimate grows with the batch, so a bisection over the multiples finds it in O(log) calls
    whatever batch_size says."""
    lo, hi = 0, (batch_size - 1) // n_views  # multiples k * n_views with k in [1, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * n_views):
            lo = mid
        else:
            hi = mid - 1
    return lo * n_views


def memory_verdict(
    settings: dict[str, Any], device: str, available: float | None, source: str, processes: int = 1
) -> MemoryVerdict:
    """Pure: the estimate for `settings` (TrainConfig fields) against `available` bytes."""
    arch, im, batch = settings["sfe_backbone_arch"], settings["im_size"], settings["batch_size"]
    frames, n_views = settings["fragment_length"], settings["n_views"]
    precision = str(settings.get("precision", "32"))

    def estimate(b: int) -> float | None:
        one = estimate_train_bytes(arch, im, b, frames, device, precision)
        return None if one is None else one * processes

    total = estimate(batch)
    if total is None or available is None:
        why = "no measurement for this backbone or fragment length" if total is None else "memory unknown"
        return MemoryVerdict("unknown", f"memory check skipped: {why}")
    what = f"--sfe_backbone_arch {arch} --im_size {im} --batch_size {batch} --fragment_length {frames}" + (
        f" x {processes} processes" if processes > 1 else ""
    )
    where = "on the GPU" if device != "cpu" else "in RAM"
    head = (
        f"estimated peak memory {total / GIB:.1f} GiB {where} for {what}; "
        f"{available / GIB:.1f} GiB available ({source})"
    )
    if total <= WARN_FRACTION * available:
        return MemoryVerdict("ok", head, total, available)
    if total <= available:
        return MemoryVerdict("warn", f"{head}: close to the limit", total, available)
    fit_batch = _largest_batch(lambda b: (estimate(b) or 0) <= WARN_FRACTION * available, batch, n_views)
    lower = f"--batch_size (to {fit_batch} or less)" if fit_batch else "--batch_size"
    hint = (
        f"lower {lower}, --fragment_length or --im_size"
        + (", or use --sfe_backbone_arch resnet18" if arch != "resnet18" else "")
        + (", or --precision bf16-mixed" if device != "cpu" and precision == "32" else "")
        + "; --skip_memory_check runs anyway"
    )
    return MemoryVerdict("refuse", f"{head}: it would not fit; {hint}", total, available)


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _device_count(devices: str) -> int | None:
    text = str(devices).strip()
    if text == "auto":
        return None
    if "," in text:
        return len([x for x in text.split(",") if x.strip()])
    try:
        return int(text)
    except ValueError:
        return None


def device_problem(accelerator: str, devices: str, precision: str, cuda_count: int) -> str | None:
    """Pure: why the accelerator flags cannot run on a machine with `cuda_count` CUDA GPUs (None: fine)."""
    wants_gpu = accelerator in ("gpu", "cuda")
    if wants_gpu and cuda_count == 0:
        return (
            f"--accelerator {accelerator}: no CUDA GPU is visible on this machine "
            "(torch.cuda.is_available() is False); use --accelerator cpu, or auto"
        )
    n = _device_count(devices)
    if accelerator == "auto" and cuda_count == 0 and n is not None and n > 1:
        # Lightning would start n CPU processes (DDP over gloo), each holding the whole model: asked
        # for with --accelerator cpu (tests do), never guessed from a GPU count on a host without GPUs
        return (
            f"--devices {devices}: this machine has no CUDA GPU, and --accelerator auto would start "
            f"{n} CPU processes; pass --accelerator cpu to train with {n} CPU processes, or --devices 1"
        )
    if wants_gpu and n is not None and n > cuda_count:
        return f"--devices {devices}: this machine has {cuda_count} CUDA GPU(s)"
    if wants_gpu and "," in str(devices):
        ids = [int(x) for x in str(devices).split(",") if x.strip().isdigit()]
        if any(i >= cuda_count for i in ids):
            return f"--devices {devices}: GPU ids go from 0 to {cuda_count - 1} on this machine"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and cuda_count == 0)
    if on_cpu and precision == "16-mixed":
        return "--precision 16-mixed needs a GPU; on CPU use --precision 32 or bf16-mixed"
    return None


def check_before_training(cfg: TrainConfig, skip_memory: bool = False) -> MemoryVerdict | None:
    """Raise ValueError (one line) when the device flags cannot run here or the run cannot fit in
    memory; log a warning near the limit. Returns the memory verdict (None when skipped)."""
    cuda_count = _cuda_count()
    t, stream = cfg.trainer, cfg.stream
    problem = device_problem(t.accelerator, t.devices, t.precision, cuda_count)
    if problem:
        raise ValueError(problem)
    if skip_memory:
        return None
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and cuda_count > 0)
    settings = {
        "sfe_backbone_arch": cfg.encoder.sfe_backbone_arch,
        "im_size": stream.im_size,
        "batch_size": stream.batch_size,
        "fragment_length": stream.fragment_length,
        "n_views": stream.n_views,
        "precision": t.precision,
    }
    if on_gpu:
        index = int(os.environ.get("LOCAL_RANK", "0") or 0)
        free = cuda_free_bytes(index)
        verdict = memory_verdict(settings, "cuda", free, f"free on cuda:{index}")
    else:
        found = available_memory_bytes()
        if found:
            found = (found[0] + current_rss_bytes(), found[1])
        # every CPU process (one per device, or per torchrun rank on this node) holds its own model
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or _device_count(t.devices) or 1
        verdict = memory_verdict(
            settings, "cpu", found[0] if found else None, found[1] if found else "", processes
        )
    if verdict.level == "refuse":
        raise ValueError(verdict.message)
    if verdict.level == "warn":
        log.warning("%s", verdict.message)
    else:
        log.info("%s", verdict.message)
    return verdict
