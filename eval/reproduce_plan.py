"""The stages of `polyp-ssl reproduce`, from the four downloads to the paper's table.

    convert_realcolon   convert realcolon RAW --split-file paper      -> OUT/converted/realcolon
    convert_sun         convert sun RAW                               -> OUT/converted/sun
    convert_polypsset   convert polypsset RAW                         -> OUT/converted/polypsset
    convert_polypsize   convert table BOXES --dataset-id polypsize    -> OUT/converted/polypsize
    data_rc27           ingest converted/realcolon --splits train     -> OUT/data/rc27
    data_rc19           merge realcolon::val,test (split test), ingest -> OUT/data/rc19
    data_rsp            merge rc19 + SUN + PolypSize, split 70/30 by polyp (stratified by size), ingest
    data_rspp           merge rsp's sources + PolypsSet, split 70/30 by polyp (by histology), ingest
    train_sN            train on rc27 with seed N (`--resume` after a kill)  -> OUT/runs/ntssl_sN
    report_rc19         report --tasks retrieval,reid                 -> OUT/reports/rc19
    report_rsp          report --tasks size                           -> OUT/reports/rsp
    report_rspp         report --tasks histology                      -> OUT/reports/rspp
    table               OUT/results.parquet, OUT/table.md, OUT/report.html

A dataset whose source was not given is not built, and the stages that need it are not run; the
table marks their cells. Outputs are replaced only once their new version is complete: converted
roots are written beside the old one and swapped in; merge, split, ingest and report replace
their outputs themselves (`--overwrite`, staged); an outdated training run is set aside until the
new one finishes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyp_ssl.eval.reproduce_budget import flags
from polyp_ssl.eval.reproduce_stages import Stage, StageRun, listing_hash

# dataset -> the downloads it is built from
DATASETS: dict[str, tuple[str, ...]] = {
    "rc27": ("realcolon",),
    "rc19": ("realcolon",),
    "rsp": ("realcolon", "sun", "polypsize"),
    "rspp": ("realcolon", "sun", "polypsize", "polypsset"),
}
# dataset -> the report tasks measured on it (the paper's protocol)
REPORT_TASKS = {"rc19": ("retrieval", "reid"), "rsp": ("size",), "rspp": ("histology",)}
STRATIFY = {"rsp": "size", "rspp": "histology"}
SOURCES = ("realcolon", "sun", "polypsset", "polypsize")
RUN_PREFIX = "ntssl_s"


class ReproduceError(ValueError):
    """A bad input or option of `polyp-ssl reproduce` (one line, exit 2)."""

    bad_input = True


@dataclass
class Plan:
    out: Path
    inputs: dict[str, Path | None]  # source -> its download (None: omitted)
    settings: dict[str, dict[str, Any]]
    seeds: int = 1
    baselines: list[str] = field(default_factory=list)  # zoo:NAME=PATH, descriptor, ...
    device: str = "auto"
    accelerator: str = "auto"
    workers: int = 2

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)


def check_inputs(inputs: dict[str, Path | None]) -> None:
    """Each given download has its dataset's layout; else one line naming it (exit 2)."""
    expect = {
        "realcolon": ("a folder with SSS-VVV_annotations/ folders and lesion_info.csv", _is_realcolon),
        "sun": ("a folder with annotation_txt/ and case_info.csv", _is_sun),
        "polypsset": ("a folder with val2019/ or test2019/ (Image/, Annotation/)", _is_polypsset),
        "polypsize": ("a box table (.csv or .parquet, docs/datasets.md)", _is_table),
    }
    for name, path in inputs.items():
        if path is None:
            continue
        what, ok = expect[name]
        if not path.exists():
            raise ReproduceError(f"--{name} {path}: does not exist (expected {what})")
        if not ok(path):
            raise ReproduceError(f"--{name} {path}: not {name}'s download layout (expected {what})")


def _is_realcolon(p: Path) -> bool:
    return p.is_dir() and (p / "lesion_info.csv").is_file() and any(p.glob("*-*_annotations"))


def _is_sun(p: Path) -> bool:
    return p.is_dir() and (p / "annotation_txt").is_dir() and (p / "case_info.csv").is_file()


def _is_polypsset(p: Path) -> bool:
    return p.is_dir() and any((p / s / "Annotation").is_dir() for s in ("val2019", "test2019"))


def _is_table(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in (".csv", ".parquet")


def swap_in(new: Path, final: Path) -> None:
    """Put a complete `new` folder at `final`; the old one (if any) is removed only after."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)


def convert_stage(plan: Plan, source: str) -> Stage:
    raw = plan.inputs[source]
    final = plan.path("converted", source)
    kind = {"polypsize": "table"}.get(source, source)
    extra = {"realcolon": ["--split-file", "paper"], "polypsize": ["--dataset-id", "polypsize"]}
    opts = [*extra.get(source, []), "--no-progress"]

    def run(ctx: StageRun) -> None:
        new = final.with_name(f".{final.name}.new")
        if new.exists():
            shutil.rmtree(new)
        ctx.command(["convert", kind, str(raw), str(new), *opts])
        swap_in(new, final)

    identity: dict[str, Any] = {"command": ["convert", kind, str(raw), *opts]}
    if raw is not None:  # a table's frames are in its folder: that folder's listing
        identity["inputs"] = {source: listing_hash(raw.parent if raw.is_file() else raw)}
    return Stage(
        f"convert_{source}",
        identity,
        lambda: sorted((final / "annotations").glob("instances_*.json")) + [final / "convert_report.json"],
        run,
        missing=None if raw is not None else f"needs --{source}",
    )


def _ingested(root: Path) -> Callable[[], list[Path]]:
    """An ingested root's catalog files and shards."""
    return lambda: [
        root / "catalog" / "manifest.json",
        *sorted((root / "catalog").glob("*.parquet")),
        *sorted((root / "shards").glob("*/*.tar")),
    ]


def _missing(plan: Plan, dataset: str) -> str | None:
    absent = [s for s in DATASETS[dataset] if plan.inputs.get(s) is None]
    return f"needs --{', --'.join(absent)}" if absent else None


def data_stage(plan: Plan, dataset: str) -> Stage:
    """rc27 (ingest of the paper split's train), rc19 (val + test as one test split), rsp and rspp
    (merged sources split 70/30 by polyp, stratified by the task's label)."""
    root = plan.path("data", dataset)
    conv = {s: plan.path("converted", s) for s in SOURCES}
    ingest = [*flags(plan.settings["ingest"]), "--workers", str(plan.workers), "--overwrite", "--no-progress"]
    commands: list[list[str]]
    if dataset == "rc27":
        commands = [["ingest", str(conv["realcolon"]), "--splits", "train", "--out", str(root), *ingest]]
    else:
        sources = [f"{conv['realcolon']}::val,test"] + [str(conv[s]) for s in DATASETS[dataset][1:]]
        merge = ["convert", "merge", *sources, str(root), "--overwrite", "--no-progress"]
        commands = [merge + (["--split", "test"] if dataset == "rc19" else [])]
        if dataset in STRATIFY:
            split = flags(plan.settings["split"])
            commands.append(["split", str(root), "--by", "polyp", *split, "--stratify", STRATIFY[dataset]])
            commands[-1].append("--overwrite")
        commands.append(["ingest", str(root), *ingest])

    def run(ctx: StageRun) -> None:
        for argv in commands:
            ctx.command(argv)

    needs = tuple(f"convert_{s}" for s in DATASETS[dataset])
    return Stage(
        f"data_{dataset}", {"commands": commands}, _ingested(root), run, needs, _missing(plan, dataset)
    )


def run_dir(plan: Plan, seed: int) -> Path:
    return plan.path("runs", f"{RUN_PREFIX}{seed}")


def train_stage(plan: Plan, seed: int) -> Stage:
    folder = run_dir(plan, seed)
    argv = [
        "train",
        "--dataset_root",
        str(plan.path("data", "rc27")),
        "--runs_dir",
        str(folder.parent),
        "--exp_name",
        folder.name,
        "--seed",
        str(seed),
        "--accelerator",
        plan.accelerator,
        *flags(plan.settings["train"]),
    ]
    ckpts = folder / "checkpoints"

    def run(ctx: StageRun) -> None:
        outdated = folder.with_name(f".{folder.name}.outdated")
        if not ctx.resumed and folder.exists():  # another identity's run: set aside until this one ends
            if outdated.exists():
                shutil.rmtree(outdated)
            folder.rename(outdated)
        resume = ctx.resumed and (folder / "config.yaml").is_file()
        ctx.command(argv + (["--resume"] if resume else []))
        if outdated.exists():
            shutil.rmtree(outdated)

    return Stage(
        f"train_s{seed}",
        {"command": argv},
        lambda: [ckpts / "last.ckpt", ckpts / "init.ckpt"],
        run,
        ("data_rc27",),
        _missing(plan, "rc27"),
    )


def report_stage(plan: Plan, dataset: str) -> Stage:
    out = plan.path("reports", dataset)
    ckpts = [str(run_dir(plan, s) / "checkpoints" / "last.ckpt") for s in range(plan.seeds)]
    baselines = ",".join(["init", *plan.baselines])
    argv = [
        "report",
        *ckpts,
        "--dataset_root",
        str(plan.path("data", dataset)),
        "--out",
        str(out),
        "--overwrite",
        "--tasks",
        ",".join(REPORT_TASKS[dataset]),
        "--baselines",
        baselines,
        "--device",
        plan.device,
        *(["--probe_splits", "train,val"] if dataset in STRATIFY else []),
        *flags(plan.settings["report"]),
    ]
    zoo = {b: listing_hash(Path(b.split("=", 1)[1])) for b in plan.baselines if b.startswith("zoo:")}

    def run(ctx: StageRun) -> None:
        ctx.command(argv)

    needs = (f"data_{dataset}", *(f"train_s{s}" for s in range(plan.seeds)))
    return Stage(
        f"report_{dataset}",
        {"command": argv, "inputs": zoo},
        lambda: [out / "results.parquet", out / "report.md"],
        run,
        needs,
        _missing(plan, dataset),
    )


def build_stages(
    plan: Plan, table: Callable[[StageRun], None], table_outputs: Callable[[], list[Path]]
) -> list[Stage]:
    stages = [convert_stage(plan, s) for s in SOURCES]
    stages += [data_stage(plan, d) for d in DATASETS]
    stages += [train_stage(plan, s) for s in range(plan.seeds)]
    stages += [report_stage(plan, d) for d in REPORT_TASKS]
    run_reports = [d for d in REPORT_TASKS if _missing(plan, d) is None]
    stages.append(
        Stage(
            "table",
            {"reports": run_reports, "omitted": sorted(s for s, p in plan.inputs.items() if p is None)},
            table_outputs,
            table,
            tuple(f"report_{d}" for d in run_reports),
        )
    )
    return stages
