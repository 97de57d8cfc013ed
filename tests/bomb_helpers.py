"""Memory-bounded child runs (RLIMIT_AS) and hostile checkpoints made from a good one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def run_limited(code: str, limit_bytes: int | None, timeout: float = 240) -> tuple[int, str, int]:
    """Run `code` in a child Python with RLIMIT_AS = limit_bytes; (exit code, stderr, peak VM)."""
    wrapped = (
        "import resource, sys\n"
        f"lim = {limit_bytes!r}\n"
        "if lim: resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
        "def _peak():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmPeak:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "import atexit\n"
        "atexit.register(lambda: sys.stderr.write(f'\\nVMPEAK {_peak()}\\n'))\n" + code
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapped], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VMPEAK ")]
    return proc.returncode, proc.stderr, peak[-1] if peak else -1


def bounded(code_clean: str, code_bomb: str, clean_rc: int = 0) -> tuple[int, str, int, int]:
    rc, err, base = run_limited(code_clean, None)
    assert rc == clean_rc and base > 0, err[-2000:]
    rc, err, peak = run_limited(code_bomb, base + GIB)
    print(f"peak VM: clean {base / 2**20:.0f} MiB, hostile {peak / 2**20:.0f} MiB (limit clean + 1024 MiB)")
    return rc, err, base, peak


def rewrite_config(src: Path, dst: Path, change) -> Path:
    obj = torch.load(src, weights_only=True)
    config = json.loads(obj["config_json"])
    change(config, obj["state_dict"])
    obj["config_json"] = json.dumps(config)
    torch.save(obj, dst)
    return dst


def patch_record_sizes(src: Path, dst: Path, size: int, which: int = 0, field: int = 24) -> Path:
    """Copy `src` (a torch zip) with the central-directory entry `which` declaring `size` bytes."""
    data = bytearray(src.read_bytes())
    at = -1
    for _ in range(which + 1):
        at = data.index(b"PK\x01\x02", at + 1)
    data[at + field : at + field + 4] = size.to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst
