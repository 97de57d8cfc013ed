"""Time and peak memory of retrieval and re-identification on random tracklet embeddings.

Each (N, task) runs in a fresh process so its peak resident memory is its own. Identities:
about `--per_identity` tracklets each (REAL-Colon has tens of tracklets per polyp), vectors =
identity centre + noise, 256-d. Prints one JSON object per run, then a summary list.

    .venv/bin/python scripts/bench_eval.py --n 10000 50000 [200000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def data(
    n: int, dim: int, per_identity: int, noise: float = 1.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_ids = max(2, n // per_identity)
    ids = rng.integers(0, n_ids, n)
    centres = rng.normal(size=(n_ids, dim)).astype(np.float32)
    x = centres[ids] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return x, ids


def one(n: int, task: str, dim: int, per_identity: int, memory_mb: int, noise: float) -> dict:
    sys.path.insert(0, str(ROOT))
    from polyp_ssl.eval.metrics import reid_from_vectors, retrieval_from_vectors

    x, ids = data(n, dim, per_identity, noise)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    if task == "retrieval":
        r = retrieval_from_vectors(x, ids, memory_bytes=memory_mb * 2**20)
        out = {"mAP": r.mAP, "HR@1": r.hr[1], "HR@5": r.hr[5], "n_excluded": r.n_excluded}
    else:
        r = reid_from_vectors(x, ids)
        out = {"AUROC": r.auroc, "AUPR": r.aupr, "n_pairs": r.n_pairs, "n_positive_pairs": r.n_positive}
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "task": task,
        "n": n,
        "dim": dim,
        "noise": noise,
        "n_identities": int(np.unique(ids).size),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),  # all threads; wall time depends on the machine's load
        "peak_rss_mb": round(peak / 1024, 1),
        "data_rss_mb": round(base_rss / 1024, 1),
        **out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000])
    p.add_argument("--tasks", nargs="+", default=["retrieval", "reid"], choices=["retrieval", "reid"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--per_identity", type=int, default=20)
    p.add_argument("--memory_mb", type=int, default=512, help="retrieval block memory")
    p.add_argument(
        "--noise",
        type=float,
        default=1.5,
        help="noise / identity-centre scale: 1.5 easy (mAP ~0.97), 2.5 hard (~0.37 at N=2000)",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--one", nargs=2, metavar=("N", "TASK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        res = one(int(args.one[0]), args.one[1], args.dim, args.per_identity, args.memory_mb, args.noise)
        print(json.dumps(res))
        return 0
    results = []
    for n in args.n:
        for task in args.tasks:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(n),
                task,
                "--dim",
                str(args.dim),
                "--per_identity",
                str(args.per_identity),
                "--memory_mb",
                str(args.memory_mb),
                "--noise",
                str(args.noise),
            ]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                res = {"task": task, "n": n, "error": f"over {args.timeout} s"}
            except subprocess.CalledProcessError as e:
                res = {"task": task, "n": n, "error": e.stderr.strip().splitlines()[-1:]}
            print(json.dumps(res), flush=True)
            results.append(res)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
