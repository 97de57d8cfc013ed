"""Paired comparison of training methods: every arm x seed trained for the same steps, one report.

Each arm is a named set of `polyp-ssl train` flags; every arm runs once per seed (the same seed
gives every arm the same initial weights and, where the sampler allows, the same data order) for
exactly `--max_steps` optimizer steps. One `polyp-ssl report` then evaluates every run's
`last.ckpt` plus one run's `init.ckpt` (the shared initialisation) on the same test split, with
paired bootstrap differences against `--baseline`. The last line printed is one JSON object: per
arm the mean and spread over seeds of retrieval mAP and re-id AUROC, and per run the paired
difference vs the baseline with its 95% interval, read from the report's results.parquet.

    python scripts/compare_methods.py --synth --out cmp --seeds 0 1 --max_steps 200
    python scripts/compare_methods.py --root data/rc27 --out cmp --seeds 0 1 2 --max_steps 2000 \\
        --device gpu --backbone resnet50 --im_size 232 --batch_size 60 --n_views 5

`--synth` generates a root shaped like the paper's data (27 training, 19 test videos, and a small
validation split), `--scale` shrinks the video counts for CPU runs. `polyp-ssl synth` splits a
quarter of the videos to val and to test; to get the paper's proportions the script calls the
generator's Python API with its own split counts instead of the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("compare_methods")

# arm name -> the train flags that define it (everything else is shared by every arm)
ARMS: dict[str, list[str]] = {
    "ntssl": ["--sampler", "temporaltemperaturebag", "--loss_type", "mil-nce", "--loss_weights", "1", "1"],
    "ntssl_fragment_only": [
        "--sampler",
        "temporaltemperaturebag",
        "--loss_type",
        "mil-nce",
        "--loss_weights",
        "1",
        "0",
    ],
    "tracklet": ["--sampler", "tracklet", "--loss_type", "mil-nce", "--loss_weights", "1", "1"],
    "supcon_same_bags": [
        "--sampler",
        "temporaltemperaturebag",
        "--loss_type",
        "supervised",
        "--loss_weights",
        "1",
        "1",
    ],
    "multipos_labels": ["--sampler", "multipos", "--loss_type", "mil-nce", "--loss_weights", "1", "1"],
}
METRICS = (("retrieval", "mAP"), ("reid", "AUROC"))
# the paper's data: 27 training videos, 19 test videos; a small val split for monitoring and counting
PAPER_SPLITS = {"train": 27, "val": 4, "test": 19}
MIN_SPLITS = {"train": 2, "val": 1, "test": 2}


class CompareError(Exception):
    """A configuration or run failure, reported as one line."""


def synth_split_counts(scale: float) -> dict[str, int]:
    """Video counts per split at `scale` of the paper's, each at least MIN_SPLITS."""
    return {s: max(MIN_SPLITS[s], round(n * scale)) for s, n in PAPER_SPLITS.items()}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def train_command(arm: str, seed: int, root: Path, runs: Path, a: argparse.Namespace) -> list[str]:
    """The `polyp-ssl train` command of one arm and seed; the arm's flags come last but before
    `--train_args`, which may override anything."""
    accel = {"gpu": "gpu", "cuda": "gpu", "cpu": "cpu"}.get(a.device, a.device)
    return [
        *a.cli,
        "train",
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(runs),
        "--exp_name",
        run_name(arm, seed),
        "--seed",
        str(seed),
        "--max_steps",
        str(a.max_steps),
        "--max_epochs",
        str(a.max_epochs),
        "--sampler_ttb_schedule",
        a.ttb_schedule,
        "--batch_size",
        str(a.batch_size),
        "--n_views",
        str(a.n_views),
        "--im_size",
        str(a.im_size),
        "--sfe_backbone_arch",
        a.backbone,
        "--accelerator",
        accel,
        "--aug_anchorcrop",
        "--eval_aug_anchorcrop",
        *ARMS[arm],
        *shlex.split(a.train_args),
    ]


def report_command(
    ckpts: list[Path], root: Path, out: Path, baseline: str, a: argparse.Namespace
) -> list[str]:
    device = "cuda" if a.device in ("gpu", "cuda") else a.device
    return [
        *a.cli,
        "report",
        *map(str, ckpts),
        "--dataset_root",
        str(root),
        "--out",
        str(out),
        "--overwrite",  # a rerun reports again: its report replaces the earlier one
        "--baselines",
        "descriptor",
        "--baseline",
        baseline,
        "--device",
        device,
        *shlex.split(a.report_args),
    ]


def baseline_row(choice: str, arms: list[str], seeds: list[int]) -> tuple[str, str]:
    """(report row label, run name of the init) for `--baseline init|ARM`."""
    init_run = run_name(arms[0], seeds[0])
    if choice == "init":
        return f"{init_run}/init", init_run
    if choice not in arms:
        raise CompareError(f"--baseline {choice!r}: not 'init' nor one of the arms ({', '.join(arms)})")
    return f"{run_name(choice, seeds[0])}/last", init_run


def summarise(results_path: Path, arms: list[str], seeds: list[int], init_label: str) -> dict:
    """Per arm: mean, min, max, std over seeds of each metric, and each run's paired difference vs
    the baseline with its interval; the init row alone. Only the latest report run is read."""
    import pyarrow.parquet as pq

    table = pq.read_table(results_path).to_pylist()
    latest = max(r["created"] for r in table)
    rows = [r for r in table if r["created"] == latest]
    cell = {(r["checkpoint"], r["task"], r["metric"]): r for r in rows}

    def entry(label: str, task: str, metric: str) -> dict | None:
        r = cell.get((label, task, metric))
        if r is None:
            return None
        return {
            "value": r["value"],
            "ci": [r.get("value_ci_low"), r.get("value_ci_high")],
            "diff_vs_baseline": r.get("diff_vs_baseline"),
            "diff_ci": [r.get("diff_ci_low"), r.get("diff_ci_high")],
        }

    out: dict = {"baseline": rows[0].get("baseline") if rows else None, "arms": {}, "init": {}}
    for task, metric in METRICS:
        out["init"][f"{task}/{metric}"] = entry(init_label, task, metric)
    for arm in arms:
        per_metric: dict = {}
        for task, metric in METRICS:
            runs = {str(s): entry(f"{run_name(arm, s)}/last", task, metric) for s in seeds}
            values = [e["value"] for e in runs.values() if e is not None and e["value"] is not None]
            diffs = [e["diff_vs_baseline"] for e in runs.values() if e and e["diff_vs_baseline"] is not None]
            per_metric[f"{task}/{metric}"] = {
                "mean": statistics.fmean(values) if values else None,
                "min": min(values) if values else None,
                "max": max(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "mean_diff_vs_baseline": statistics.fmean(diffs) if diffs else None,
                "seeds": runs,
            }
        out["arms"][arm] = per_metric
    return out


def paired_rows(results_path: Path, baseline: str) -> dict:
    """From one report's latest rows: the baseline minus each other row, per metric of METRICS,
    with its paired 95% interval (the report gives row minus baseline; signs and bounds flipped)."""
    import pyarrow.parquet as pq

    table = pq.read_table(results_path).to_pylist()
    latest = max(r["created"] for r in table)
    out: dict = {}
    for r in table:
        if r["created"] != latest or r["checkpoint"] == baseline or (r["task"], r["metric"]) not in METRICS:
            continue
        if r.get("diff_vs_baseline") is None:
            continue
        out.setdefault(r["checkpoint"], {})[f"{r['task']}/{r['metric']}"] = {
            "baseline_minus_row": -r["diff_vs_baseline"],
            "ci": [-r["diff_ci_high"], -r["diff_ci_low"]],
        }
    return out


def make_synth(data: Path, a: argparse.Namespace) -> dict[str, int]:
    """Generate the synthetic videos with the paper's split proportions (see the module doc)."""
    from polyp_ssl.ingest.synth import generate as gen

    counts = synth_split_counts(a.scale)
    cfg = gen.SynthConfig(
        videos=sum(counts.values()),
        frames_per_video=a.synth_frames,
        width=a.synth_width,
        height=a.synth_height,
        seed=a.synth_seed,
        splits=(counts["train"], counts["val"], counts["test"]),
    )
    summary = gen.generate(cfg, data, workers=a.workers)
    if summary["splits"] != counts:
        raise CompareError(f"{data}: synthetic splits {summary['splits']} differ from {counts}")
    return counts


def run(cmd: list[str], dry: bool, what: str) -> float:
    """Run one command (or print it with --dry_run); its output goes to ours. Returns seconds."""
    print(shlex.join(cmd), file=sys.stderr if not dry else sys.stdout, flush=True)
    if dry:
        return 0.0
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise CompareError(f"{what} failed (exit {rc}): {shlex.join(cmd)}")
    return time.perf_counter() - t0


def global_step(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def shared_inits(runs: Path, arms: list[str], seeds: list[int]) -> dict[str, bool]:
    """Per seed: whether every arm's init.ckpt holds the same encoder weights (the pairing)."""
    import torch

    from polyp_ssl.checkpoint import load_encoder

    out = {}
    for seed in seeds:
        states = [
            load_encoder(runs / run_name(arm, seed) / "checkpoints" / "init.ckpt")[0].state_dict()
            for arm in arms
        ]
        out[str(seed)] = all(
            st.keys() == states[0].keys() and all(torch.equal(st[k], states[0][k]) for k in st)
            for st in states[1:]
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", type=Path, help="an ingested root (shards/ and catalog/)")
    src.add_argument("--synth", action="store_true", help="generate and ingest OUT/data")
    ap.add_argument("--out", type=Path, required=True, help="work folder: data/, runs/, report/")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max_steps", type=int, default=200, help="optimizer steps of every run")
    ap.add_argument(
        "--max_epochs",
        type=int,
        default=50,
        help="length of the bag temperature schedule; must not end a run before max_steps",
    )
    ap.add_argument(
        "--ttb_schedule",
        default="steps",
        choices=["steps", "epochs"],
        help="train --sampler_ttb_schedule: steps (default here) sweeps the bag temperature over the "
        "epochs --max_steps trains; epochs is the paper's schedule over --max_epochs",
    )
    ap.add_argument("--baseline", default="init", help="'init' (the shared initialisation) or an arm")
    ap.add_argument(
        "--pooled_vs",
        default=None,
        help="an arm (default ntssl when it is one of --arms): that arm minus every other arm, pooled "
        "over the seeds (mean paired difference with a two-level bootstrap interval: seeds, then test "
        "polyps), under the key 'pooled'",
    )
    ap.add_argument(
        "--ci_resamples", type=int, default=2000, help="bootstrap resamples of the pooled intervals"
    )
    ap.add_argument(
        "--paired_vs",
        default=None,
        help="an arm: also report, seed by seed, that arm minus every other arm of the same seed "
        "(and the seed's init), paired over the same resampled test polyps (OUT/report_vs_ARM_sSEED)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "cuda", "auto"])
    ap.add_argument("--backbone", default=None, help="default resnet18 on cpu, resnet50 on gpu")
    ap.add_argument("--im_size", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=20)
    ap.add_argument("--n_views", type=int, default=5)
    ap.add_argument("--train_args", default="", help="more train flags, one string (override the above)")
    ap.add_argument("--report_args", default="", help="more report flags, one string")
    ap.add_argument("--scale", type=float, default=1.0, help="--synth: fraction of the paper's video counts")
    ap.add_argument("--synth_frames", type=int, default=660)
    ap.add_argument("--synth_width", type=int, default=384)
    ap.add_argument("--synth_height", type=int, default=320)
    ap.add_argument("--synth_seed", type=int, default=0)
    ap.add_argument("--store_size", type=int, default=256, help="--synth: ingest --store-size")
    ap.add_argument("--workers", type=int, default=2, help="--synth: generator and ingest processes")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--debug", action="store_true", help="a traceback with the one-line error")
    return ap


def bag_noise(root: Path, a: argparse.Namespace) -> dict:
    """How noisy each sampler's positives are on the training split at the runs' settings: per
    sampler the fraction of bag members (anchor excluded) that show the anchor's polyp and the
    fraction from the anchor's own tracklet (polyp_ssl.diversity.bag_positive_rates); for the
    temporal temperature bags, every trained epoch at the temperature of the runs' schedule
    (--ttb_schedule), and the schedule's end."""
    from polyp_ssl.diversity import bag_positive_rates
    from polyp_ssl.epoch_plan import epoch_bags
    from polyp_ssl.span_index import build_span_index
    from polyp_ssl.stream import StreamParams, build_index, default_schedule, epoch_batches

    p = StreamParams(
        batch_size=a.batch_size,
        n_views=a.n_views,
        max_epochs=a.max_epochs,
        sampler_ttb_schedule=a.ttb_schedule,
    )
    index = build_index(root, "train", p)
    _, frags = build_span_index(index, p)
    per_epoch = epoch_batches(index.total_anchors, p.n_bags, 1, 0)[1]
    schedule = default_schedule(p, a.max_steps, per_epoch)
    last = max(0, (a.max_steps - 1) // per_epoch)
    out: dict = {"steps_per_epoch": per_epoch, "epochs_trained": last + 1, "ttb_schedule": a.ttb_schedule}

    def rates(sampler: str, epoch: int, temperature: float) -> dict:
        bags, _ = epoch_bags(frags, sampler, p.n_views, 0, epoch, temperature)
        got = bag_positive_rates(bags, frags.identity, frags.tracklet)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in got.items()}

    out["temporal_per_epoch"] = [
        {
            "epoch": e,
            "temperature": round(schedule.at(e), 3),
            **rates("temporaltemperaturebag", e, schedule.at(e)),
        }
        for e in range(last + 1)
    ]
    out["temporal_first_epoch"] = out["temporal_per_epoch"][0]
    out["temporal_last_epoch"] = out["temporal_per_epoch"][-1]
    t_end = p.sampler_ttb_tmax
    out["temporal_end_of_schedule"] = {"temperature": t_end, **rates("temporaltemperaturebag", last, t_end)}
    out["tracklet"] = rates("tracklet", 0, 1.0)
    out["multipos"] = rates("multipos", 0, 1.0)
    return out


def pooled_differences(root: Path, runs: Path, a: argparse.Namespace) -> dict:
    """`--pooled_vs` arm minus every other arm and minus `init` (each seed's step-0 weights), per
    metric of METRICS: the mean over seeds of the paired difference on the test split, with a 95%
    interval from a two-level bootstrap (seeds, then test polyps shared by both arms;
    polyp_ssl.eval.intervals.pooled_paired_interval). The
    embeddings are the report's (same protocol: the report's defaults; reused from its cache)."""
    from polyp_ssl.eval.embed import EmbedOptions, EncoderChoice, ensure_embeddings
    from polyp_ssl.eval.embeddings import read_embeddings
    from polyp_ssl.eval.intervals import pooled_paired_interval
    from polyp_ssl.eval.task_intervals import CiOptions
    from polyp_ssl.eval.tasks import run_reid, run_retrieval

    ci = CiOptions(resamples=a.ci_resamples)
    device = "cuda" if a.device in ("gpu", "cuda") else a.device
    stats: dict[tuple[str, int], dict] = {}
    for arm in [*a.arms, "init"]:
        for seed in a.seeds:
            # "init": the seed's step-0 weights (every arm of a seed starts from them, same_init_per_seed)
            ckpt = runs / run_name(a.arms[0], seed) / "checkpoints" / "init.ckpt"
            if arm != "init":
                ckpt = runs / run_name(arm, seed) / "checkpoints" / "last.ckpt"
            made = ensure_embeddings(
                root, EncoderChoice(str(ckpt)), EmbedOptions(split="test", device=device)
            )
            emb = read_embeddings(made.path, split="test", root=root)
            stats[(arm, seed)] = {
                "retrieval": run_retrieval(emb, ci).stats,
                "reid": run_reid(emb, ci).stats,
            }
    ref = a.pooled_vs
    out: dict = {"arm": ref, "seeds": a.seeds, "unit": ci.unit, "resamples": ci.resamples, "level": ci.level}
    for arm in [*a.arms, "init"]:
        if arm == ref:
            continue
        per_metric: dict = {}
        for task, metric in METRICS:
            iv = pooled_paired_interval(
                [stats[(ref, s)][task][metric] for s in a.seeds],
                [stats[(arm, s)][task][metric] for s in a.seeds],
                n_resamples=ci.resamples,
                seed=ci.seed,
                level=ci.level,
            )
            per_metric[f"{task}/{metric}"] = {
                "estimate": iv.estimate,
                "ci": [iv.low, iv.high],
                "n_units": iv.n_units,
            }
        out[f"{ref}_minus_{arm}"] = per_metric
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    try:
        return _main(a)
    except CompareError as e:
        if a.debug:
            raise
        print(f"compare_methods: {e}", file=sys.stderr)
        return 2


def check_device(device: str, dry_run: bool) -> None:
    """--device gpu / cuda on a host without a CUDA device: refused before any data is generated
    or ingested (a --dry_run only prints the commands, so it may plan a GPU run anywhere)."""
    if dry_run or device not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise CompareError(
            f"--device {device}: no CUDA device on this host (torch.cuda.is_available() is False); "
            "use --device cpu, or --dry_run to print the commands"
        )


def _main(a: argparse.Namespace) -> int:
    if a.max_steps < 1:
        raise CompareError(f"--max_steps {a.max_steps}: use >= 1 (runs are compared at equal steps)")
    if not 0 < a.scale <= 10:
        raise CompareError(f"--scale {a.scale}: use a value in (0, 10]")
    if len(set(a.seeds)) != len(a.seeds) or len(set(a.arms)) != len(a.arms):
        raise CompareError("--seeds and --arms must not repeat")
    if a.pooled_vs is not None and a.pooled_vs not in a.arms:
        raise CompareError(f"--pooled_vs {a.pooled_vs!r}: not one of the arms ({', '.join(a.arms)})")
    a.pooled_vs = a.pooled_vs or ("ntssl" if "ntssl" in a.arms else None)
    check_device(a.device, a.dry_run)
    a.backbone = a.backbone or ("resnet50" if a.device in ("gpu", "cuda") else "resnet18")
    a.cli = [str(Path(sys.executable).with_name("polyp-ssl"))]
    if not Path(a.cli[0]).exists():
        a.cli = [sys.executable, "-m", "polyp_ssl"]
    out = a.out.resolve()
    runs, report = out / "runs", out / "report"
    summary: dict = {
        "arms": a.arms,
        "seeds": a.seeds,
        "max_steps": a.max_steps,
        "backbone": a.backbone,
        "im_size": a.im_size,
        "batch_size": a.batch_size,
        "n_views": a.n_views,
        "ttb_schedule": a.ttb_schedule,
        "seconds": {},
    }
    if a.synth:
        root = out / "data"
        counts = synth_split_counts(a.scale)
        summary["synth_videos"] = counts
        if a.dry_run:
            print(f"# synth: {counts} videos x {a.synth_frames} frames into {root} (generator API)")
        elif (root / "catalog").exists():
            log.info("%s is already ingested; reusing it", root)
        else:
            t0 = time.perf_counter()
            out.mkdir(parents=True, exist_ok=True)
            try:
                make_synth(root, a)
            except ValueError as e:
                raise CompareError(f"{root}: {e}") from e
            summary["seconds"]["synth"] = time.perf_counter() - t0
        if a.dry_run or not (root / "catalog").exists():
            summary["seconds"]["ingest"] = run(
                [
                    *a.cli,
                    "ingest",
                    str(root),
                    "--store-size",
                    str(a.store_size),
                    "--workers",
                    str(a.workers),
                    "--no-progress",
                ],
                a.dry_run,
                "ingest",
            )
    else:
        root = a.root.resolve()
        if not (root / "catalog").is_dir():
            raise CompareError(f"--root {root}: no catalog/ (run polyp-ssl ingest first)")
    summary["dataset_root"] = str(root)
    if not a.dry_run:
        summary["bag_noise"] = bag_noise(root, a)
        log.info("bag positives on the training split: %s", json.dumps(summary["bag_noise"]))
    baseline, init_run = baseline_row(a.baseline, a.arms, a.seeds)

    steps: dict = {}
    for seed in a.seeds:  # seeds outermost: a cut-short comparison still has complete pairs
        for arm in a.arms:
            name = run_name(arm, seed)
            last = runs / name / "checkpoints" / "last.ckpt"
            if not a.dry_run and last.exists() and global_step(last) == a.max_steps:
                log.info("%s: already trained to %d steps; reusing it", name, a.max_steps)
            else:
                cmd = train_command(arm, seed, root, runs, a)
                if not a.dry_run and last.exists():  # cut short earlier: continue it
                    cmd.append("--resume")
                summary["seconds"][f"train/{name}"] = run(cmd, a.dry_run, f"train {name}")
            if not a.dry_run:
                steps[name] = global_step(last)
                if steps[name] != a.max_steps:
                    raise CompareError(
                        f"{last}: stopped at step {steps[name]}, not --max_steps {a.max_steps} "
                        f"(raise --max_epochs; runs are compared at equal steps)"
                    )
    ckpts = [runs / run_name(arm, s) / "checkpoints" / "last.ckpt" for s in a.seeds for arm in a.arms]
    ckpts.append(runs / init_run / "checkpoints" / "init.ckpt")
    summary["seconds"]["report"] = run(report_command(ckpts, root, report, baseline, a), a.dry_run, "report")
    summary["report"] = str(report / "report.md")
    if not a.dry_run:
        summary["steps"] = steps
        summary["same_init_per_seed"] = shared_inits(runs, a.arms, a.seeds)
        if not all(summary["same_init_per_seed"].values()):
            log.warning("arms of one seed start from different weights: %s", summary["same_init_per_seed"])
        from polyp_ssl.eval.report import run_init_label  # the report's row name of a run's init.ckpt

        summary.update(summarise(report / "results.parquet", a.arms, a.seeds, run_init_label([init_run])))
    if not a.dry_run and a.pooled_vs in a.arms and len(a.arms) > 1:
        summary["pooled"] = pooled_differences(root, runs, a)
        log.info("pooled over seeds: %s", json.dumps(_finite(summary["pooled"])))
    if a.paired_vs:
        if a.paired_vs not in a.arms:
            raise CompareError(f"--paired_vs {a.paired_vs!r}: not one of the arms ({', '.join(a.arms)})")
        summary["paired_vs"] = {"arm": a.paired_vs, "seeds": {}}
        for seed in a.seeds:
            names = [run_name(arm, seed) for arm in a.arms]
            ckpts = [runs / n / "checkpoints" / "last.ckpt" for n in names]
            ckpts.append(runs / names[0] / "checkpoints" / "init.ckpt")
            out_s = out / f"report_vs_{a.paired_vs}_s{seed}"
            base = f"{run_name(a.paired_vs, seed)}/last"
            summary["seconds"][f"report_vs/s{seed}"] = run(
                report_command(ckpts, root, out_s, base, a), a.dry_run, f"report vs {base}"
            )
            if not a.dry_run:
                summary["paired_vs"]["seeds"][str(seed)] = paired_rows(out_s / "results.parquet", base)
    print(json.dumps(_finite(summary), default=str))
    return 0


def _finite(x: object) -> object:
    """NaN (a metric the data could not give) as null, so the output is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
