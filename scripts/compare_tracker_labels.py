"""Train NT-SSL on a tracker's output, or on the annotated tracklets of the same videos, and
evaluate both on the annotated twin: what a tracker's faults cost a trained encoder.

    python scripts/compare_tracker_labels.py --out cmp_mot --seeds 0 1 --max_steps 100

Steps (every one a `polyp-ssl` command, printed as it runs):
1. a synthetic dataset in the MOT layout with a tracker's faults (`synth --layout mot`, through
   the generator's API to choose the split sizes): OUT/raw;
2. `convert mot OUT/raw OUT/tracks-root --tracks OUT/raw/tracks` (identities: tracks) and
   `convert mot OUT/raw OUT/gt-root` (the gt.txt: polyp identities), each ingested;
3. per seed, `train` on each root's train split, same flags and steps (arms `tracks` and `gt`;
   the same seed gives both the same initial weights);
4. `eval --task retrieval` and `--task reid` of every last.ckpt, and of the shared init.ckpt,
   on the gt root's test split (bootstrap 95% intervals over polyps).
The last line printed is one JSON object (also written to --json): per arm the metrics of every
seed with intervals, their mean over seeds, and per seed the paired difference tracks - gt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("tracks", "gt")
TASKS = (("retrieval", "mAP"), ("reid", "AUROC"))


def run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def make_data(a: argparse.Namespace, cli: list[str], log: Path) -> dict:
    from polyp_ssl.ingest.synth.generate import SynthConfig
    from polyp_ssl.ingest.synth.layouts import write_layout

    raw = a.out / "raw"
    if not (raw / "synth_layout.json").is_file():
        cfg = SynthConfig(
            videos=sum(a.splits), frames_per_video=a.frames, width=a.width, height=a.height,
            seed=a.synth_seed, splits=tuple(a.splits),
        )  # fmt: skip
        write_layout("mot", cfg, raw, workers=1)
    for arm in ARMS:
        root = a.out / f"{arm}-root"
        if (root / "catalog" / "manifest.json").is_file():
            continue
        tracks = ["--tracks", str(raw / "tracks"), "--min-conf", str(a.min_conf)] if arm == "tracks" else []
        run([*cli, "convert", "mot", str(raw), str(root), *tracks, "--no-progress"], log)
        run(
            [*cli, "ingest", str(root), "--store-size", str(a.store_size), "--workers", "1", "--no-progress"],
            log,
        )
    return json.loads((raw / "synth_layout.json").read_text())


def train(a: argparse.Namespace, cli: list[str], arm: str, seed: int, log: Path) -> Path:
    ckpt = a.out / "runs" / f"{arm}_s{seed}" / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    run(
        [
            *cli, "train", "--dataset_root", str(a.out / f"{arm}-root"), "--split", "train",
            "--runs_dir", str(a.out / "runs"), "--exp_name", f"{arm}_s{seed}", "--seed", str(seed),
            "--max_steps", str(a.max_steps), "--max_epochs", "1000", "--batch_size", str(a.batch_size),
            "--n_views", str(a.n_views), "--im_size", str(a.im_size), "--fragment_length",
            str(a.fragment_length), "--min_tracklet_length", str(a.min_tracklet_length),
            "--sfe_backbone_arch", "resnet18", "--accelerator", "cpu", "--num_workers", "0",
            "--aug_anchorcrop", "--eval_aug_anchorcrop", "--limit_val_batches", "0",
            "--sampler", "temporaltemperaturebag", "--loss_type", "mil-nce", "--logger", "csv",
        ],
        log,
    )  # fmt: skip
    return ckpt


def evaluate(a: argparse.Namespace, cli: list[str], ckpt: Path, name: str, log: Path) -> dict:
    out: dict = {}
    for task, key in TASKS:
        folder = a.out / "eval" / name
        path = folder / f"metrics_{task}.json"
        if not path.is_file():
            run(
                [
                    *cli, "eval", "--task", task, "--dataset_root", str(a.out / "gt-root"), "--split",
                    "test", "--encoder_ckpt", str(ckpt), "--out", str(folder), "--ci_resamples",
                    str(a.ci_resamples), "--overwrite", "--data_aug_anchorcrop",
                ],
                log,
            )  # fmt: skip
        m = json.loads(path.read_text())
        out[key] = {"value": m[key], "ci95": m.get(f"{key}_ci")}
        if key == "mAP":
            out["queries"] = m.get("n_queries")
    return out


def paired_map_difference(a: argparse.Namespace, seed: int, resamples: int = 2000) -> dict:
    """mAP(tracks) - mAP(gt) of one seed with a paired bootstrap over test polyps: both encoders'
    per-query APs on the same tracklets, polyps drawn with replacement (seed 0)."""
    import numpy as np

    from polyp_ssl.eval.embeddings import read_embeddings
    from polyp_ssl.eval.metrics import retrieval_from_vectors

    ap = {}
    for arm in ARMS:
        m = json.loads((a.out / "eval" / f"{arm}_s{seed}" / "metrics_retrieval.json").read_text())
        emb = read_embeddings(m["embeddings"]).tracklet_level()
        order = np.argsort(emb.tracklet_id.astype(str))
        ident = emb.identity_id.astype(str)[order]
        res = retrieval_from_vectors(emb.vectors[order], ident)
        ap[arm] = (res.ap, res.valid, ident)
    (ap_t, valid, ident), (ap_g, valid_g, ident_g) = ap["tracks"], ap["gt"]
    assert (valid == valid_g).all() and (ident == ident_g).all()  # the same queries
    diff, ident = (ap_t - ap_g)[valid], ident[valid]
    polyps = np.unique(ident)
    sums = np.array([diff[ident == p].sum() for p in polyps])
    counts = np.array([(ident == p).sum() for p in polyps])
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(polyps), size=(resamples, len(polyps)))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return {"mAP_difference": float(diff.mean()), "ci95": [float(np.quantile(boot, 0.025)),
            float(np.quantile(boot, 0.975))], "queries": int(valid.sum()), "polyps": len(polyps)}  # fmt: skip


def summary(results: dict, seeds: list[int]) -> dict:
    arms = {}
    for arm in ARMS:
        per_seed = {s: results[f"{arm}_s{s}"] for s in seeds}
        arms[arm] = {
            "per_seed": per_seed,
            "mean": {k: statistics.fmean(r[k]["value"] for r in per_seed.values()) for _, k in TASKS},
            "sd": {
                k: statistics.stdev([r[k]["value"] for r in per_seed.values()]) if len(seeds) > 1 else None
                for _, k in TASKS
            },
        }
    diffs = {
        k: [results[f"tracks_s{s}"][k]["value"] - results[f"gt_s{s}"][k]["value"] for s in seeds]
        for _, k in TASKS
    }
    return {"arms": arms, "paired_difference_tracks_minus_gt": diffs}


def paired(a: argparse.Namespace, seeds: list[int]) -> dict:
    return {f"s{s}": paired_map_difference(a, s) for s in seeds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max_steps", type=int, default=100)
    ap.add_argument("--splits", type=int, nargs=3, default=[8, 2, 8], help="train val test videos")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--height", type=int, default=160)
    ap.add_argument("--synth_seed", type=int, default=0)
    ap.add_argument("--min_conf", type=float, default=0.4)
    ap.add_argument("--store_size", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=10)
    ap.add_argument("--n_views", type=int, default=5)
    ap.add_argument("--im_size", type=int, default=64)
    ap.add_argument("--fragment_length", type=int, default=4)
    ap.add_argument("--min_tracklet_length", type=int, default=16)
    ap.add_argument("--ci_resamples", type=int, default=1000)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cli = [str(Path(sys.executable).with_name("polyp-ssl"))]
    log = a.out / "commands.log"
    t0 = time.time()
    layout = make_data(a, cli, log)
    results: dict = {}
    for seed in a.seeds:  # seed-major: a stopped run still has complete pairs
        for arm in ARMS:
            ckpt = train(a, cli, arm, seed, log)
            results[f"{arm}_s{seed}"] = evaluate(a, cli, ckpt, f"{arm}_s{seed}", log)
        init = ckpt.with_name("init.ckpt")
        results[f"init_s{seed}"] = evaluate(a, cli, init, f"init_s{seed}", log)
    out = {
        "benchmark": "compare_tracker_labels",
        "what": "NT-SSL trained on a tracker's output (identities: tracks) vs on the annotated tracklets "
        "(gt.txt) of the same synthetic videos, equal steps, paired seeds; both evaluated on the gt root's "
        "test split",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "tracker_faults": layout.get("faults"),
        "tracker_fault_counts": layout.get("counts"),
        "init": {f"s{s}": results[f"init_s{s}"] for s in a.seeds},
        **summary(results, a.seeds),
        "paired_bootstrap_mAP_tracks_minus_gt": paired(a, a.seeds),
        "seconds": round(time.time() - t0, 1),
    }
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
