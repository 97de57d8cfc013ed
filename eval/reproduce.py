"""`polyp-ssl reproduce`: the paper's table from the raw downloads in one command, resumable.

    polyp-ssl reproduce --realcolon RAW --sun RAW --polypsset RAW --polypsize BOXES.csv --out OUT
        [--budget quick|paper] [--baselines zoo:NAME=PATH,...] [--seeds N] [--settings FILE]

Converts each download, builds OUT/data/{rc27,rc19,rsp,rspp} with the paper's splits, ingests
them, trains the paper's configuration on rc27 and evaluates the trained encoder, its
initialisation and every baseline with the paper's protocol (retrieval and re-identification on
rc19, size on rsp, histology on rspp), then writes OUT/results.parquet, OUT/table.md and
OUT/report.html. Every stage is a child process of the project's own commands; the stages and
their records are in eval/reproduce_plan.py and eval/reproduce_stages.py. One run at a time holds
OUT (a lock); a second is refused. docs/reproduce.md walks through it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from polyp_ssl.eval.reproduce_budget import BUDGETS, apply_settings, budget
from polyp_ssl.eval.reproduce_plan import (
    DATASETS,
    REPORT_TASKS,
    SOURCES,
    Plan,
    ReproduceError,
    build_stages,
    check_inputs,
)
from polyp_ssl.eval.reproduce_stages import Outcome, StageFailed, StageRun, run_stages
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser

log = logging.getLogger(__name__)
PROG = "polyp-ssl reproduce"


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog=PROG, formatter_class=DefaultsHelpFormatter, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--realcolon", type=Path, help="REAL-Colon's download (SSS-VVV_frames/, SSS-VVV_annotations/, CSVs)"
    )
    p.add_argument("--sun", type=Path, help="SUN's download (caseN/, annotation_txt/, case_info.csv)")
    p.add_argument("--polypsset", type=Path, help="PolypsSet's download (train2019/, val2019/, test2019/)")
    p.add_argument(
        "--polypsize", type=Path, help="PolypSize as a box table (CSV or Parquet, docs/datasets.md)"
    )
    p.add_argument("--out", type=Path, required=True, help="working folder: data, runs, reports, the table")
    p.add_argument(
        "--budget",
        choices=BUDGETS,
        default="quick",
        help="paper: the seed's training command (ResNet-50 HMVE, 50 epochs; a GPU); "
        "quick: a ResNet-18 HMVE at 64 px for 60 steps, minutes on a CPU",
    )
    p.add_argument(
        "--baselines",
        default="descriptor",
        help="comma-separated baselines besides each run's initialisation: descriptor, "
        "zoo:NAME=PATH (local weights, docs/zoo.md), or none",
    )
    p.add_argument("--seeds", type=int, default=1, help="training runs, seeds 0 .. N-1, each a row")
    p.add_argument(
        "--settings",
        type=Path,
        help="JSON file of options put over the budget's, by command: "
        '{"train": {"max_steps": 200}, "ingest": {...}, "split": {...}, "report": {...}}',
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or auto (default: cpu for quick, auto for paper)"
    )
    p.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    return p


def parse_baselines(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    if names == ["none"]:
        return []
    for b in names:
        if b.startswith("zoo:"):
            name, _, path = b[4:].partition("=")
            if not name or not path:
                raise ReproduceError(f"--baselines: {b!r} is not zoo:NAME=PATH")
            if not Path(path).exists():
                raise ReproduceError(f"--baselines: {b!r}: {path} does not exist")
        elif b not in ("descriptor", "fresh_init"):
            raise ReproduceError(f"--baselines: {b!r} is not descriptor, fresh_init, zoo:NAME=PATH or none")
    return names


def make_plan(args: argparse.Namespace) -> Plan:
    inputs = {s: getattr(args, s) for s in SOURCES}
    check_inputs(inputs)
    if args.seeds < 1:
        raise ReproduceError(f"--seeds must be >= 1, got {args.seeds}")
    if args.workers < 1:
        raise ReproduceError(f"--workers must be >= 1, got {args.workers}")
    if args.out.exists() and not args.out.is_dir():
        raise ReproduceError(f"--out {args.out}: exists and is not a folder")
    for name, raw in inputs.items():  # OUT inside a download would change the download's listing
        folder = raw.parent if raw is not None and raw.is_file() else raw
        if folder is not None and args.out.resolve().is_relative_to(folder.resolve()):
            raise ReproduceError(f"--out {args.out}: inside --{name} {raw}; put OUT elsewhere")
    settings = budget(args.budget)
    if args.settings is not None:
        if not args.settings.is_file():
            raise ReproduceError(f"--settings {args.settings}: no such file")
        try:
            settings = apply_settings(settings, args.settings)
        except ValueError as exc:
            raise ReproduceError(f"--settings {exc}") from None
    device = args.device or ("cpu" if args.budget == "quick" else "auto")
    accelerator = {"cuda": "gpu", "cpu": "cpu"}.get(device, "auto")
    return Plan(
        args.out.absolute(),
        {s: (p.absolute() if p is not None else None) for s, p in inputs.items()},
        settings,
        args.seeds,
        parse_baselines(args.baselines),
        device,
        accelerator,
        args.workers,
    )


def header(plan: Plan, budget_name: str) -> list[str]:
    given = ", ".join(f"--{s} {p}" for s, p in plan.inputs.items() if p is not None) or "none"
    return [
        "# The paper's table, reproduced",
        "",
        f"Budget `{budget_name}`, {plan.seeds} training seed(s), baselines: init"
        + "".join(f", {b.split('=')[0]}" for b in plan.baselines)
        + f". Inputs: {given}.",
    ]


def run(plan: Plan, budget_name: str, say) -> Outcome:
    from polyp_ssl.eval.reproduce_table import HTML, RESULTS, TABLE, write_table

    not_run = {}
    for d in REPORT_TASKS:
        absent = [s for s in DATASETS[d] if plan.inputs[s] is None]
        if absent:
            not_run[d] = "needs --" + ", --".join(absent)
    run_reports = [d for d in REPORT_TASKS if d not in not_run]
    roots = {d: plan.path("data", d) for d in DATASETS}

    def table(ctx: StageRun) -> None:
        write_table(plan.out, run_reports, not_run, header(plan, budget_name), roots)

    def table_outputs() -> list[Path]:
        extra = [plan.path(HTML)] if plan.path(HTML).exists() else []
        return [plan.path(RESULTS), plan.path(TABLE), *extra]

    return run_stages(plan.out, build_stages(plan, table, table_outputs), say)


def main(argv: list[str] | None = None) -> int:
    from polyp_ssl.shards.lock import LockHeld, output_lock

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = make_plan(args)
    plan.out.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(line, flush=True)

    t0 = time.perf_counter()
    try:
        with output_lock(plan.out, PROG):
            outcome = run(plan, args.budget, say)
    except LockHeld as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if exc.code == 2 else 1
    total = time.perf_counter() - t0
    say(
        f"{len(outcome.ran)} stage(s) run, {len(outcome.skipped)} unchanged, "
        f"{len(outcome.not_run)} not run; {total:.1f} s. Table: {plan.out / 'table.md'}"
    )
    return 0
