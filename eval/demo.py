"""`polyp-ssl demo`: synthetic dataset -> ingest -> train on CPU -> report, end to end.

Each step runs the project's own command (`polyp-ssl synth|ingest|train|report`) with the
settings below and leaves a marker `OUT/steps/{step}.json` (its settings) when it completes. A
re-run skips every step whose marker matches its settings and whose output is still there, so an
interrupted demo resumes where it stopped; a step whose settings changed runs again, and so do
the steps after it.

Layout: OUT/data (dataset root, shards and catalog beside it), OUT/runs/demo (training run),
OUT/report (report.md, results.parquet, figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.shards.cli_parser import FlagParser

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """What each step runs with. The full demo trains a resnet18 HMVE at 64 px from scratch for
    a few minutes on 2 CPU cores; --quick shrinks every step to seconds."""

    synth: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def demo_settings(quick: bool) -> DemoSettings:
    train = {
        "encoder_type": "hmve",
        "sfe_backbone_arch": "resnet18",
        "sfe_d_model": 512,
        "hmve_d_model": 128,
        "hmve_n_layers": 1,
        "hmve_n_heads": 4,
        "hmve_d_feedforward": 256,
        "d_proj": 64,
        "im_size": 64,
        "bbox_scale_factor": 3.0,
        "fragment_length": 4,
        "fragment_stride": 4,
        "min_tracklet_length": 8,
        "n_views": 4,
        "batch_size": 32,
        "lr": 3e-4,
        "weight_decay": 1e-4,
        "max_epochs": 3,
        "num_workers": 1,
        "loss_type": "mil-nce",
        "loss_milnce_weights": [1.0, 1.0],
        "sampler": "temporaltemperaturebag",
        "seed": 42,
        "aug_anchorcrop": True,
        "eval_aug_anchorcrop": True,
        "aug_random_scale": True,
        "aug_jitter": True,
        "aug_hflip": True,
        "aug_vflip": True,
        "monitor": "none",
        "val_every_n_epochs": 3,
    }
    synth = {"videos": 12, "frames-per-video": 660, "width": 384, "height": 320, "seed": 0}
    ingest = {"store-size": 96, "crop-scale": 5.0}
    report = {"probe_fragment_length": 4, "batch_size": 16, "projection": "tsne"}
    if quick:
        # 320 frames per video: enough tracklets of the evaluation protocol's 30 frames for
        # polyps seen twice in the test split (retrieval and re-identification need them)
        synth = {"videos": 6, "frames-per-video": 320, "width": 128, "height": 112, "seed": 0}
        ingest = {"store-size": 48, "crop-scale": 5.0}
        train.update(
            {
                "im_size": 32,
                "max_epochs": 1,
                "max_steps": 3,
                "batch_size": 8,
                "num_workers": 0,
                "hmve_d_model": 32,
                "hmve_d_feedforward": 64,
                "d_proj": 16,
                "aug_random_scale": False,
                "aug_jitter": False,
                "aug_hflip": False,
                "aug_vflip": False,
            }
        )
        report.update({"batch_size": 16, "projection": "pca"})
    return DemoSettings(synth, ingest, train, report)


def flags(options: dict[str, Any], dash: str = "--") -> list[str]:
    """{"a": 1, "b": True, "c": [1, 2]} -> ["--a", "1", "--b", "--c", "1", "2"] (False omitted)."""
    out: list[str] = []
    for k, v in options.items():
        if v is False or v is None:
            continue
        out.append(f"{dash}{k}")
        if v is True:
            continue
        out.extend(str(x) for x in v) if isinstance(v, list | tuple) else out.append(str(v))
    return out


@dataclass
class Step:
    name: str
    settings: dict[str, Any]
    done: Callable[[], bool]  # the step's output exists and is complete
    run: Callable[[], int]


def _marker(out: Path, name: str) -> Path:
    return out / "steps" / f"{name}.json"


def step_is_done(out: Path, step: Step) -> bool:
    m = _marker(out, step.name)
    if not m.is_file():
        return False
    try:
        saved = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved == json.loads(json.dumps(step.settings)) and step.done()


def _mark(out: Path, step: Step) -> None:
    m = _marker(out, step.name)
    m.parent.mkdir(parents=True, exist_ok=True)
    tmp = m.with_suffix(".tmp")
    tmp.write_text(json.dumps(step.settings, sort_keys=True, indent=1))
    tmp.replace(m)


def _command(argv: list[str]) -> int:
    from polyp_ssl.entry import main as entry_main

    print("$ polyp-ssl " + " ".join(argv), flush=True)
    return entry_main(argv)


def report_inputs(out: Path) -> tuple[list[Path], list[str]]:
    """What the report step compares: the run's last and step-0 checkpoints, and the baselines."""
    ckpt = out / "runs" / "demo" / "checkpoints" / "last.ckpt"
    return [ckpt, ckpt.with_name("init.ckpt")], ["descriptor"]


def build_steps(out: Path, settings: DemoSettings, device: str = "cpu") -> list[Step]:
    data = out / "data"
    runs = out / "runs"
    report = out / "report"
    ckpt = runs / "demo" / "checkpoints" / "last.ckpt"

    def run_synth() -> int:
        if data.exists():  # an unfinished or outdated dataset: start it again
            shutil.rmtree(data)
        rc = _command(["synth", str(data), *flags(settings.synth)])
        # the dataset's measured properties (temporal association precision, difficulty, ...)
        return rc or _command(["synth", "--stats", str(data)])

    def run_ingest() -> int:
        for sub in ("shards", "catalog", "embeddings"):
            if (data / sub).exists():
                shutil.rmtree(data / sub)
        return _command(["ingest", str(data), *flags(settings.ingest)])

    def run_train() -> int:
        if (runs / "demo").exists():
            shutil.rmtree(runs / "demo")
        return _command(
            [
                "train",
                "--dataset_root",
                str(data),
                "--runs_dir",
                str(runs),
                "--exp_name",
                "demo",
                "--accelerator",
                "cpu" if device == "cpu" else "auto",
                "--devices",
                "1",
                *flags(settings.train),
            ]
        )

    def run_report() -> int:
        ckpts, baselines = report_inputs(out)
        return _command(
            [
                "report",
                *map(str, ckpts),
                "--dataset_root",
                str(data),
                "--out",
                str(report),
                "--baselines",
                ",".join(baselines),
                "--device",
                device,
                *flags(settings.report),
            ]
        )

    def fresh_report() -> int:
        # results.parquet is appended to; a re-run of this step starts a fresh report folder
        if report.exists():
            shutil.rmtree(report)
        return run_report()

    return [
        Step(
            "synth",
            {"synth": settings.synth},
            lambda: (data / "annotations" / "instances_test.json").is_file(),
            run_synth,
        ),
        Step(
            "ingest",
            {"synth": settings.synth, "ingest": settings.ingest},
            lambda: (data / "catalog" / "manifest.json").is_file(),
            run_ingest,
        ),
        Step(
            "train",
            {"synth": settings.synth, "ingest": settings.ingest, "train": settings.train},
            lambda: ckpt.is_file(),
            run_train,
        ),
        Step(
            "report",
            asdict(settings),
            lambda: (report / "report.md").is_file() and (report / "results.parquet").is_file(),
            fresh_report,
        ),
    ]


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def run_demo(out: Path, quick: bool = False, device: str = "cpu") -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(quick)
    steps = build_steps(out, settings, device)
    t_start = time.perf_counter()
    redo = False
    timings: dict[str, float] = {}
    for i, step in enumerate(steps, 1):
        header = f"== [{i}/{len(steps)}] {step.name} (elapsed {_clock(time.perf_counter() - t_start)})"
        if not redo and step_is_done(out, step):
            print(f"{header}: done before, reused", flush=True)
            continue
        print(header, flush=True)
        redo = True  # every later step depends on this one's output
        _marker(out, step.name).unlink(missing_ok=True)
        t0 = time.perf_counter()
        rc = step.run()
        timings[step.name] = time.perf_counter() - t0
        if rc != 0:
            print(
                f"polyp-ssl demo: step {step.name} failed (exit {rc}); fix and re-run to resume",
                file=sys.stderr,
            )
            return rc
        if not step.done():
            print(f"polyp-ssl demo: step {step.name} finished but its output is missing", file=sys.stderr)
            return 1
        _mark(out, step)
        print(f"   {step.name} finished in {_clock(timings[step.name])}", flush=True)
    total = time.perf_counter() - t_start
    print_summary(out, total, timings)
    return 0


def print_summary(out: Path, total: float, timings: dict[str, float]) -> None:
    import pyarrow.parquet as pq

    from polyp_ssl.eval.report import TASKS

    results = out / "report" / "results.parquet"
    rows = pq.read_table(results).to_pylist()
    last = max(r["created"] for r in rows)
    rows = [r for r in rows if r["created"] == last]
    print()
    print("\n".join(summary_table(rows)))
    print()
    missing = [t for t in TASKS if t not in {r["task"] for r in rows}]
    if missing:
        print(f"not in the table: {', '.join(missing)} (skipped; report.md says why)")
    if timings:
        print(
            "steps run: "
            + ", ".join(f"{k} {_clock(v)}" for k, v in timings.items())
            + f"; total {_clock(total)}"
        )
    print(f"report: {out / 'report' / 'report.md'}")


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table the demo prints (and README shows): one row per `checkpoint` of the
    results rows, one column per (task, metric) of eval.report.COLUMNS that they hold."""
    from polyp_ssl.eval.report import COLUMNS, format_value

    subjects = list(dict.fromkeys(r["checkpoint"] for r in rows))
    have = {(r["task"], r["metric"]) for r in rows}
    cols = [c for c in COLUMNS if c in have]
    vals = {(r["checkpoint"], r["task"], r["metric"]): r["value"] for r in rows}
    lines = ["| encoder | " + " | ".join(f"{t} {m}" for t, m in cols) + " |"]
    lines.append("|---|" + "|".join("---:" for _ in cols) + "|")
    for s in subjects:
        cells = " | ".join(format_value(m, vals.get((s, t, m))) for t, m in cols)
        lines.append(f"| {s} | {cells} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="polyp-ssl demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo", help="working folder (default ./demo)")
    p.add_argument("--quick", action="store_true", help="a tiny version that runs in about a minute")
    p.add_argument("--device", default="cpu", help="cpu (default) or auto/cuda for training and embedding")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"polyp-ssl demo: error: --out {out} is a file", file=sys.stderr)
        return 2
    return run_demo(out, quick=args.quick, device=args.device)
