"""The rows of a report: checkpoints (one row per distinct content), their initialisation rows
(a run's step-0 weights or a fresh init of the config), the descriptor, zoo models and given
embeddings files; each with its provenance and the row its differences are taken against."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polyp_ssl.eval import embed as embed_mod
from polyp_ssl.eval.embed import DESCRIPTOR, INIT_PREFIX
from polyp_ssl.shards.hashing import file_sha256

log = logging.getLogger("polyp_ssl.eval.report")  # the command's name in its log lines

# init: each run's own step-0 weights (checkpoints/init.ckpt) where the run has them, else a fresh
# init of the same config; fresh_init: always the fresh init (random weights drawn with seed 0)
BASELINES = ("init", "fresh_init", DESCRIPTOR)
RUN_INIT_FILE = "init.ckpt"  # polyp_ssl.callbacks.INIT_CKPT (not imported: that pulls in lightning)


class ReportError(ValueError):
    """Inputs the report cannot use; the message names the file and the field."""


@dataclass
class Subject:
    """One row of the table: a checkpoint, a baseline, or a given embeddings file."""

    label: str
    # "checkpoint" (trained) | "run_init" (a run's step-0 weights, init.ckpt) | "init" (fresh init of
    # a config) | "descriptor" | "zoo" | "embeddings"
    kind: str
    spec: str  # what ensure_embeddings takes (checkpoint, init:..., descriptor, zoo:NAME=PATH) or the file
    sha256: str | None = None
    names: list[str] = field(default_factory=list)  # every checkpoint name with these bytes
    reference: str | None = None  # label of this row's initialisation row (differences by default)

    @property
    def provenance(self) -> str:
        """Where the row's weights come from, in words (report.md and results.parquet)."""
        return {
            "checkpoint": "trained checkpoint",
            "run_init": "the run's step-0 weights (checkpoints/init.ckpt)",
            "init": f"fresh random init of the same encoder config (seed {embed_mod.DEFAULT_INIT_SEED})",
            DESCRIPTOR: "hand-made colour descriptor, no weights",
            "zoo": "foundation model from local weights",
            "embeddings": "given embeddings file",
        }.get(self.kind, self.kind)

    @property
    def is_trained(self) -> bool:
        return self.kind in ("checkpoint", "embeddings")


def resolve_checkpoints(paths: Sequence[str | Path]) -> list[Path]:
    """A run folder stands for every checkpoint it holds: last.ckpt, best, and init.ckpt (the
    run's own step-0 weights, the before of a before/after comparison)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            cdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            found = sorted(cdir.glob("*.ckpt"), key=lambda c: (c.name != "last.ckpt", c.name))
            if not found:
                raise ReportError(f"{p}: a run folder without checkpoints ({cdir}/*.ckpt)")
            out.extend(found)
        elif p.is_file():
            from polyp_ssl.checkpoint import check_checkpoint_kind

            check_checkpoint_kind(p)  # empty, text, Parquet: named (CheckpointError, exit 2)
            out.append(p)
        else:
            raise ReportError(f"{p}: no such checkpoint file or run folder")
    return out


def checkpoint_label(path: Path) -> str:
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.stem}"
    return path.stem


def run_name(path: Path) -> str:
    """The run a checkpoint belongs to: RUN of RUN/checkpoints/X.ckpt, else its folder's name."""
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name


def run_init_label(runs: Sequence[str]) -> str:
    """Row label of a run's own step-0 weights, e.g. `init (step-0 weights of demo)`."""
    return f"init (step-0 weights of {' = '.join(runs)})"


def fresh_init_label(arch: str) -> str:
    """Row label of a fresh init of an encoder config, e.g. `fresh init (hmve_resnet18, seed 0)`."""
    return f"fresh init ({arch}, seed {embed_mod.DEFAULT_INIT_SEED})"


def _is_run_init(path: Path) -> bool:
    return path.name == RUN_INIT_FILE


def checkpoint_subjects(ckpts: Sequence[Path]) -> list[Subject]:
    """One subject per distinct content (sha256): checkpoints with the same bytes (last and best of
    a run that never improved, or arms that share their step-0 weights) are one row listing every
    name, e.g. `demo/last = demo/best`. A group of init.ckpt files only is a run-init row."""
    groups: dict[str, list[Path]] = {}
    for c in ckpts:
        groups.setdefault(file_sha256(c, what="checkpoint"), []).append(c)
    subjects = []
    for digest, paths in groups.items():
        names = list(dict.fromkeys(checkpoint_label(p) for p in paths))
        if len(paths) > 1:
            log.info("%s hold the same bytes; evaluated once, as one row", ", ".join(map(str, paths)))
        if all(_is_run_init(p) for p in paths):
            runs = list(dict.fromkeys(run_name(p) for p in paths))
            subjects.append(Subject(run_init_label(runs), "run_init", str(paths[0]), digest, names))
        else:
            main = [p for p in paths if not _is_run_init(p)][0]
            subjects.append(Subject(" = ".join(names), "checkpoint", str(main), digest, names))
    return subjects


def _fresh_init(s: Subject, inits: dict[str, Subject]) -> Subject:
    """The fresh-init row of s's encoder config (one per distinct config)."""
    src = embed_mod.resolve_source(INIT_PREFIX + s.spec)
    if src.identity not in inits:
        label = fresh_init_label(src.label.removeprefix("init_"))
        inits[src.identity] = Subject(label, "init", INIT_PREFIX + s.spec, None, [label])
    return inits[src.identity]


def init_subjects(subjects: list[Subject], baselines: Sequence[str]) -> list[Subject]:
    """The initialisation rows the baselines ask for, and each trained row's `reference`: with
    `init`, a run's own step-0 weights (its checkpoints/init.ckpt, given or found beside the
    checkpoint) and a fresh init only for a checkpoint whose run has none; with `fresh_init`, a
    fresh init of every distinct config. A run-init row given as a checkpoint is referenced too."""
    by_sha = {s.sha256: s for s in subjects if s.sha256}
    added: list[Subject] = []
    inits: dict[str, Subject] = {}
    for s in [s for s in subjects if s.kind == "checkpoint"]:
        own = Path(s.spec).with_name(RUN_INIT_FILE)
        ref = None
        if own.is_file() and Path(s.spec).parent.name == "checkpoints":
            digest = file_sha256(own, what="checkpoint")
            ref = by_sha.get(digest)
            if ref is None and "init" in baselines:
                ref = Subject(
                    run_init_label([run_name(own)]), "run_init", str(own), digest, [checkpoint_label(own)]
                )
                by_sha[digest] = ref
                added.append(ref)
            if ref is not None and ref.kind != "run_init":
                ref = None  # a trained checkpoint with the bytes of init.ckpt: not its own reference
        if "fresh_init" in baselines or (ref is None and "init" in baselines):
            fresh = _fresh_init(s, inits)
            if ref is None:
                ref = fresh
        s.reference = ref.label if ref is not None else None
    return added + list(inits.values())


def build_subjects(
    ckpts: Sequence[Path], baselines: Sequence[str], embeddings: Sequence[Path] = ()
) -> list[Subject]:
    """Checkpoints (one row per distinct content), then the initialisation rows (init_subjects),
    then the descriptor, zoo models and given embeddings files."""
    for b in baselines:
        if b not in BASELINES and not b.startswith(embed_mod.ZOO_PREFIX):
            raise ReportError(
                f"--baselines: unknown baseline {b!r} (choose from {', '.join(BASELINES)}, zoo:NAME=PATH)"
            )
    subjects = checkpoint_subjects(ckpts)
    subjects.extend(init_subjects(subjects, baselines))
    if DESCRIPTOR in baselines:
        subjects.append(Subject("hand-made descriptor", DESCRIPTOR, DESCRIPTOR, None))
    for b in baselines:  # foundation models from local weights (eval.zoo), in the order given
        if b.startswith(embed_mod.ZOO_PREFIX):
            if "=" not in b:
                raise ReportError(f"--baselines {b}: write zoo:NAME=PATH (the local weights file or folder)")
            src = embed_mod.resolve_source(b)
            zoo = src.config["zoo"]
            label = zoo["name"]
            if any(s.label == label for s in subjects):  # two weights of one entry: name them apart
                label = f"{label} ({Path(zoo['weights']).stem})"
            subjects.append(Subject(label, "zoo", src.spec, zoo["weights_sha256"]))
    for e in embeddings:
        subjects.append(Subject(Path(e).stem, "embeddings", str(e), None))
    return subjects
