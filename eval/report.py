"""`polyp-ssl report`: every downstream task for a set of checkpoints and the untrained baselines,
into one results table (OUT/results.parquet, appended) and one OUT/report.md with figures.

Each encoder is run once per split it needs (eval/embed.py caches the files under
ROOT/embeddings/, or the user cache when the root is read-only); every task then reads those
vectors. A task that the data cannot support
(no labels of that kind, a single class, no validation split for counting) is skipped with its
reason in the report; asked for explicitly with --tasks, it is an error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval import embed as embed_mod
from polyp_ssl.eval.embed import DESCRIPTOR, INIT_PREFIX, EmbedError, NoItemsError
from polyp_ssl.eval.embeddings import Embeddings, EmbeddingsError, read_embeddings
from polyp_ssl.eval.intervals import Interval, UnitStatistic
from polyp_ssl.eval.outputs import OutputExists, replacing_folder
from polyp_ssl.eval.plots import intervals_png, save_figure
from polyp_ssl.eval.task_intervals import DEFAULT_CI_RESAMPLES, CiOptions, add_ci_flags, intervals
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser
from polyp_ssl.shards.embeddings_cache import EmbeddingsCache

log = logging.getLogger(__name__)

TASKS = ("retrieval", "reid", "size", "histology", "count")
# init: each run's own step-0 weights (checkpoints/init.ckpt) where the run has them, else a fresh
# init of the same config; fresh_init: always the fresh init (random weights drawn with seed 0)
BASELINES = ("init", "fresh_init", DESCRIPTOR)
RUN_INIT_FILE = "init.ckpt"  # polyp_ssl.callbacks.INIT_CKPT (not imported: that pulls in lightning)
# lower is better: a negative difference is an improvement
LOWER_IS_BETTER = {("count", "fragmentation_rate"), ("count", "FPR")}
# (task, metric) columns of the table, in order; value formatting per metric
COLUMNS: list[tuple[str, str]] = [
    ("retrieval", "mAP"),
    ("retrieval", "HR@1"),
    ("retrieval", "HR@5"),
    ("reid", "AUROC"),
    ("reid", "AUPR"),
    ("size", "F1"),
    ("size", "accuracy"),
    ("histology", "accuracy"),
    ("histology", "balanced_accuracy"),
    ("count", "fragmentation_rate"),
    ("count", "FPR"),
]
RESULTS_FILE = "results.parquet"
REPORT_FILE = "report.md"


class ReportError(ValueError):
    """Inputs the report cannot use; the message names the file and the field."""


class TaskSkipped(Exception):
    """The data cannot support a task (e.g. no labels); the reason goes into the report."""


# ----------------------------------------------------------------------------- subjects


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
        groups.setdefault(embed_mod.sha256_file(c), []).append(c)
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
            digest = embed_mod.sha256_file(own)
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


# ----------------------------------------------------------------------------- tasks


@dataclass
class ReportOptions:
    root: Path
    out: Path
    tasks: tuple[str, ...] = TASKS
    strict_tasks: bool = False  # tasks named explicitly: a task that cannot run is an error
    device: str = "auto"
    batch_size: int = 32
    im_size: int | None = None
    bbox_scale_factor: float | None = None
    fragment_stride: int = 4
    pooling: str = "cls"
    encoder_type: str | None = None
    min_tracklet_frames: int = embed_mod.DEFAULT_MIN_TRACKLET_FRAMES  # the paper's protocol
    max_frames: int | None = embed_mod.DEFAULT_MAX_FRAMES  # None: every strided frame
    probe_fragment_length: int = 8
    probe_splits: tuple[str, ...] = ("val", "test")
    projection: str = "auto"
    gallery_queries: int = 4
    seed: int = 42
    count_fpr: float = 0.05
    progress: bool = True
    ci_unit: str = "polyp"  # bootstrap unit of the intervals (eval.task_intervals); count: always video
    ci_resamples: int = DEFAULT_CI_RESAMPLES  # 0: no intervals
    ci_seed: int = 0
    # row the paired differences are taken against (None: each row's initialisation, choose_references)
    baseline: str | None = None
    cache: EmbeddingsCache | None = None  # where embeddings are cached (None: the root's default rule)

    @property
    def ci(self) -> CiOptions:
        return CiOptions(unit=self.ci_unit, resamples=self.ci_resamples, seed=self.ci_seed)


@dataclass
class TaskOutcome:
    task: str
    metrics: dict[str, float]
    time_s: float
    note: str = ""
    degenerate: str | None = None  # a probe that learned nothing: why (eval.probe.degenerate_reason)
    extra: Any = None
    stats: dict[str, UnitStatistic] = field(default_factory=dict, repr=False)  # metric -> bootstrap statistic
    ci: dict[str, Interval] = field(default_factory=dict)  # metric -> its interval (empty: disabled)


@dataclass
class SubjectResult:
    subject: Subject
    outcomes: list[TaskOutcome] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    test: Embeddings | None = None
    files: list[str] = field(default_factory=list)


class EmbeddingSource:
    """Embeddings of one subject, computed on first use and kept for the other tasks."""

    def __init__(self, subject: Subject, opts: ReportOptions, result: SubjectResult) -> None:
        self.subject, self.opts, self.result = subject, opts, result
        self._cache: dict[tuple[str, int], Embeddings] = {}

    def get(self, split: str, fragment_length: int = -1) -> Embeddings:
        key = (split, fragment_length)
        if key in self._cache:
            return self._cache[key]
        o = self.opts
        if self.subject.kind == "embeddings":  # a given file serves every task as it is
            emb = read_embeddings(self.subject.spec, split=split, root=o.root)
            path = Path(self.subject.spec)
        else:
            path = embed_mod.ensure_embeddings(
                o.root,
                self.subject.spec,
                split=split,
                fragment_length=fragment_length,
                fragment_stride=o.fragment_stride,
                im_size=o.im_size,
                bbox_scale_factor=o.bbox_scale_factor,
                pooling=o.pooling,
                batch_size=o.batch_size,
                device=o.device,
                encoder_type=o.encoder_type if self.subject.kind in ("checkpoint", "run_init") else None,
                progress=o.progress,
                min_tracklet_frames=o.min_tracklet_frames,
                max_frames=o.max_frames,
                cache=o.cache,
            )
            emb = read_embeddings(path, split=split, root=o.root)
        if str(path) not in self.result.files:
            self.result.files.append(str(path))
        self._cache[key] = emb
        return emb

    def has_split(self, split: str) -> bool:
        if self.subject.kind == "embeddings":
            emb = read_embeddings(self.subject.spec, root=self.opts.root)
            return bool((emb.split == split).any())
        try:
            embed_mod.split_shards(self.opts.root, split)
        except EmbedError:
            return False
        return True


def _identities(emb: Embeddings) -> np.ndarray:
    missing = [i for i, v in enumerate(emb.identity_id) if v is None or v == ""]
    if len(missing) == len(emb):
        raise TaskSkipped(f"split {emb.split[0] if len(emb) else '?'} has no identity labels")
    if missing:
        raise TaskSkipped(f"{len(missing)} of {len(emb)} tracklets lack identity_id")
    return emb.identity_id.astype(str)


def task_retrieval(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    from polyp_ssl.eval.metrics import retrieval_from_vectors

    emb = src.get("test").tracklet_level()
    ident = _identities(emb)
    if len(set(ident)) == len(ident):
        raise TaskSkipped("no two test tracklets share a polyp: no query has a positive")
    res = retrieval_from_vectors(emb.vectors, ident)
    stats = {}
    if opts.ci.enabled:
        from polyp_ssl.eval.task_intervals import retrieval_stats

        stats = retrieval_stats(res.ap, res.hits, res.valid, ident, emb.video_id, opts.ci_unit)
    return TaskOutcome(
        "retrieval",
        {"mAP": res.mAP, "HR@1": res.hr[1], "HR@5": res.hr[5]},
        0.0,
        note=f"{res.n_queries} queries, {res.n_excluded} without a positive excluded",
        stats=stats,
    )


def task_reid(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    from polyp_ssl.eval.metrics import reid_from_vectors

    emb = src.get("test").tracklet_level()
    ident = _identities(emb)
    if len(set(ident)) == len(ident):
        raise TaskSkipped("no two test tracklets share a polyp: no positive pair")
    if len(set(ident)) < 2:
        raise TaskSkipped("every test tracklet is the same polyp: no negative pair")
    res = reid_from_vectors(emb.vectors, ident)
    stats = {}
    if opts.ci.enabled:
        from polyp_ssl.eval.task_intervals import reid_stats

        stats = reid_stats(emb.vectors, ident, emb.video_id, opts.ci_unit)
    return TaskOutcome(
        "reid",
        {"AUROC": res.auroc, "AUPR": res.aupr},
        0.0,
        note=f"{res.n_pairs} pairs, {res.n_positive} same-polyp",
        extra=res,
        stats=stats,
    )


def task_size(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    return _probe_task("size", src, opts)


def task_histology(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    return _probe_task("histology", src, opts)


def _probe_task(task: str, src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    """MLP probe on frozen fragment embeddings of the polyps the encoder never trained on
    (`probe_splits`, default val + test, as the paper probes on held-out videos), 70/30 split by
    polyp (stratified, seeded); rows of polyps without a usable label are left out and counted."""
    from polyp_ssl.eval import probe
    from polyp_ssl.eval.embeddings import polyp_labels

    parts = []
    for split in opts.probe_splits:
        if split != "test" and not src.has_split(split):
            continue
        try:
            parts.append(src.get(split, opts.probe_fragment_length))
        except NoItemsError as e:
            raise TaskSkipped(f"{e}; set --probe_fragment_length shorter or -1") from e
    where = "+".join(opts.probe_splits)
    ids = np.concatenate([e.identity_id for e in parts]).astype(str)
    vids = np.concatenate([e.video_id for e in parts]).astype(str)
    vectors = np.concatenate([e.vectors for e in parts])
    labels = polyp_labels(opts.root)
    y, left_out = probe.task_labels(ids, task, labels.size_mm, labels.histology, labels.dataset_id)
    keep = y >= 0
    if not keep.any():
        reasons = ", ".join(f"{n} {why}" for why, n in left_out.most_common()) or "no rows"
        raise TaskSkipped(f"no {where} polyp has a {task} label ({reasons})")
    ids, y, x, vids = ids[keep], y[keep], vectors[keep], vids[keep]
    if np.unique(y).size < 2:
        raise TaskSkipped(
            f"every labelled {where} polyp has the same {task} class ({int(y[0])}); "
            + probe.protocol_hint(parts)
        )
    train, val = probe.split_by_identity(ids, y, 0.7, seed=opts.seed)
    try:
        with warnings.catch_warnings():
            # a small val side may hold one class; the metrics stay defined, sklearn's notice is noise
            warnings.simplefilter("ignore", UserWarning)
            res = probe.run_probe(
                probe.ProbeData(x[train], y[train], ids[train]),
                probe.ProbeData(x[val], y[val], ids[val]),
                probe.ProbeConfig(seed=opts.seed),
            )
    except probe.OneClassError as e:
        raise TaskSkipped(f"{e}; {probe.protocol_hint(parts)}") from e
    except probe.ProbeError as e:
        raise TaskSkipped(str(e)) from e
    m = res.metrics
    metrics = (
        {"F1": m["identity_weighted_macro_f1"], "accuracy": m["accuracy"]}
        if task == "size"
        else {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
    )
    stats = {}
    if opts.ci.enabled:
        from polyp_ssl.eval.task_intervals import probe_stats

        all_stats = probe_stats(res.y_true, res.y_pred, ids[val], vids[val], opts.ci_unit)
        names = {"F1": "identity_weighted_macro_f1"}
        stats = {k: all_stats[names.get(k, k)] for k in metrics}
    left = sum(left_out.values())
    note = (
        f"{res.n_train} train / {res.n_val} val fragments, {res.n_train_polyps} / {res.n_val_polyps} "
        f"polyps; {left} rows without a label left out; "
        f"{sum(int(e.meta.get('n_tracklets_too_short') or 0) for e in parts)} tracklets shorter than one "
        "fragment"
    )
    if res.degenerate:
        note += f"; **degenerate probe**: {res.degenerate}"
    return TaskOutcome(task, metrics, 0.0, note=note, stats=stats, degenerate=res.degenerate)


def task_count(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    """Agglomerative clustering per video; threshold chosen on val at pairwise FPR <= count_fpr."""
    from polyp_ssl.eval import count
    from polyp_ssl.eval.embeddings import tracklet_spans

    if not src.has_split("val"):
        raise TaskSkipped("counting chooses its threshold on the val split, which has no tracklets")
    spans = tracklet_spans(opts.root)
    videos = {}
    for split in ("val", "test"):
        emb = src.get(split).tracklet_level()
        ident = _identities(emb)
        tids = emb.tracklet_id.astype(str)
        missing = [t for t in tids if t not in spans]
        if missing:
            raise ReportError(f"{emb.path}: tracklet {missing[0]!r} is not in the catalog of {opts.root}")
        videos[split] = count.group_videos(
            emb.video_id.astype(str),
            ident,
            emb.vectors,
            [spans[t][0] for t in tids],
            [spans[t][1] for t in tids],
        )
    if not any(count.pair_counts(np.arange(v.n), v.identity)[1] for v in videos["val"]):
        raise TaskSkipped(
            "no val video shows two different polyps: the pairwise FPR is 0 at every threshold and "
            "cannot choose one"
        )
    try:
        res = count.evaluate_counting(
            videos["val"], videos["test"], method="agglomerative", max_fpr=opts.count_fpr
        )
    except count.CountError as e:
        raise TaskSkipped(str(e)) from e
    met = "met" if res.fpr_target_met else "NOT met (lowest-FPR threshold used)"
    note = (
        f"agglomerative, threshold {res.value:.2f} chosen on val (val FPR {res.val_fpr:.3f}, target "
        f"{met}); {len(res.per_video)} test videos"
    )
    from polyp_ssl.eval.task_intervals import count_stats

    stats = count_stats(res.per_video) if opts.ci.enabled else {}
    return TaskOutcome(
        "count",
        {"fragmentation_rate": res.test_fragmentation, "FPR": res.test_fpr},
        0.0,
        note=note,
        stats=stats,
    )


TASK_FUNCS: dict[str, Callable[[EmbeddingSource, ReportOptions], TaskOutcome]] = {
    "retrieval": task_retrieval,
    "reid": task_reid,
    "size": task_size,
    "histology": task_histology,
    "count": task_count,
}


def evaluate_subject(subject: Subject, opts: ReportOptions) -> SubjectResult:
    result = SubjectResult(subject)
    src = EmbeddingSource(subject, opts, result)
    for task in opts.tasks:
        t0 = time.perf_counter()
        try:
            outcome = TASK_FUNCS[task](src, opts)
        except TaskSkipped as e:
            if opts.strict_tasks:
                raise ReportError(f"{subject.label}: task {task} cannot run: {e}") from e
            result.skipped[task] = str(e)
            log.warning("%s: %s skipped: %s", subject.label, task, e)
            continue
        if outcome.stats:  # counting clusters within a video: its unit is the video
            ci = replace(opts.ci, unit="video") if task == "count" else opts.ci
            outcome.ci = intervals(outcome.stats, ci)
        outcome.time_s = time.perf_counter() - t0
        result.outcomes.append(outcome)
    if "test" in {k[0] for k in src._cache}:
        result.test = src.get("test").tracklet_level()
    return result


# ----------------------------------------------------------------------------- results table


def task_split(task: str, opts: ReportOptions) -> str:
    """The split(s) a task's numbers come from: test (retrieval, re-id), the probe splits (70/30
    by polyp inside them), val+test for counting (threshold on val, measured on test)."""
    if task in ("size", "histology"):
        return "+".join(opts.probe_splits)
    return "val+test" if task == "count" else "test"


def task_settings(task: str, opts: ReportOptions) -> str:
    """The settings behind a task's numbers, as sorted JSON (one string column of results)."""
    import json

    settings: dict[str, Any] = {
        "im_size": opts.im_size,  # None: each checkpoint's own
        "bbox_scale_factor": opts.bbox_scale_factor,
        "fragment_stride": opts.fragment_stride,
        "pooling": opts.pooling,
        "min_tracklet_frames": opts.min_tracklet_frames,
        "max_frames": opts.max_frames,
        "seed": opts.seed,
    }
    if task in ("size", "histology"):
        settings["fragment_length"] = opts.probe_fragment_length
    if task == "count":
        settings["max_fpr"] = opts.count_fpr
    return json.dumps(settings, sort_keys=True)


def result_rows(
    res: SubjectResult,
    created: str,
    protocol: str | None = None,
    opts: ReportOptions | None = None,
    diffs: dict[tuple[str, str], Interval] | None = None,
    baseline: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, metric): the value, its interval (value_ci_low/high, null without one) and,
    for a row other than the baseline, the paired difference to `baseline` with its interval."""
    rows = []
    for o in res.outcomes:
        for metric, value in o.metrics.items():
            iv = o.ci.get(metric)
            d = (diffs or {}).get((o.task, metric))
            ci_unit = None
            if iv is not None and opts is not None:
                ci_unit = "video" if o.task == "count" else opts.ci_unit
            rows.append(
                {
                    "checkpoint": res.subject.label,
                    "checkpoint_path": res.subject.spec,
                    "checkpoint_sha256": res.subject.sha256,
                    "task": o.task,
                    "metric": metric,
                    "value": float(value),
                    "time_s": round(o.time_s, 4),
                    "created": created,
                    "protocol": protocol,
                    "dataset_root": str(Path(opts.root).resolve()) if opts else None,
                    "split": task_split(o.task, opts) if opts else None,
                    "settings": task_settings(o.task, opts) if opts else None,
                    "value_ci_low": iv.low if iv is not None else None,
                    "value_ci_high": iv.high if iv is not None else None,
                    "ci_level": iv.level if iv is not None else None,
                    "ci_unit": ci_unit,
                    "ci_n_units": iv.n_units if iv is not None else None,
                    "ci_resamples": iv.n_resamples if iv is not None else None,
                    "ci_seed": opts.ci_seed if iv is not None and opts is not None else None,
                    "baseline": baseline if d is not None else None,
                    "diff_vs_baseline": d.estimate if d is not None else None,
                    "diff_ci_low": d.low if d is not None else None,
                    "diff_ci_high": d.high if d is not None else None,
                    "kind": res.subject.kind,
                    "provenance": res.subject.provenance,
                    "checkpoint_names": list(res.subject.names) or None,
                    "probe_degenerate": o.degenerate,
                }
            )
    return rows


def results_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("checkpoint", pa.string()),
            ("checkpoint_path", pa.string()),
            ("checkpoint_sha256", pa.string()),
            ("task", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("time_s", pa.float64()),
            ("created", pa.string()),
            ("protocol", pa.string()),  # the evaluation protocol (eval.embed.protocol_string)
            ("dataset_root", pa.string()),  # the ingested root, resolved
            ("split", pa.string()),  # the split(s) the numbers come from (task_split)
            ("settings", pa.string()),  # JSON of the embedding and task settings (task_settings)
            # bootstrap interval of value (null: disabled, or a file from before the intervals)
            ("value_ci_low", pa.float64()),
            ("value_ci_high", pa.float64()),
            ("ci_level", pa.float64()),
            ("ci_unit", pa.string()),  # polyp | video (what a resample draws)
            ("ci_n_units", pa.int64()),
            ("ci_resamples", pa.int64()),
            ("ci_seed", pa.int64()),
            # paired difference value - baseline's value, same resamples (null on the baseline row)
            ("baseline", pa.string()),
            ("diff_vs_baseline", pa.float64()),
            ("diff_ci_low", pa.float64()),
            ("diff_ci_high", pa.float64()),
            # what the row is: checkpoint | run_init | init (fresh) | descriptor | zoo | embeddings,
            # in words, and every checkpoint name with these bytes (one row per distinct sha256)
            ("kind", pa.string()),
            ("provenance", pa.string()),
            ("checkpoint_names", pa.list_(pa.string())),
            # size/histology: why the probe's numbers say nothing (one class predicted or on a side)
            ("probe_degenerate", pa.string()),
        ]
    )


def append_results(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Append rows to results.parquet (rewritten whole under a temporary name, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = results_schema()
    new = pa.Table.from_pylist(rows, schema=schema)
    if path.is_file():
        try:
            old = pq.read_table(path)
            for name in schema.names:  # a file from before a column: null there
                if name not in old.schema.names:
                    old = old.append_column(name, pa.nulls(len(old), schema.field(name).type))
            old = old.select(schema.names).cast(schema)
        except Exception as e:
            raise ReportError(f"{path}: existing results file is not a results table ({e})") from e
        new = pa.concat_tables([old, new])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(new, tmp)
    tmp.replace(path)
    return path


def format_value(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if metric == "fragmentation_rate":
        return f"{value:.2f}"
    return f"{100 * value:.1f}"


def format_interval(metric: str, value: float | None, iv: Interval | None, signed: bool = False) -> str:
    """`47.0 [41.2, 52.9]` (percent; the fragmentation rate as it is); without an interval, the value."""

    def one(x: float | None) -> str:
        text = format_value(metric, x)
        return f"+{text}" if signed and x is not None and np.isfinite(x) and x > 0 else text

    if iv is None or not (np.isfinite(iv.low) and np.isfinite(iv.high)):
        return one(value)
    return f"{one(value)} [{one(iv.low)}, {one(iv.high)}]"


def _columns(results: Sequence[SubjectResult]) -> list[tuple[str, str]]:
    have = {(o.task, m) for r in results for o in r.outcomes for m in o.metrics}
    return [c for c in COLUMNS if c in have] + sorted(have - set(COLUMNS))


def degenerate_flags(res: SubjectResult) -> str:
    """`size: majority class only: predicts class 0 for all 21 rows; histology: ...` ('' if none)."""
    return "; ".join(f"{o.task}: {o.degenerate}" for o in res.outcomes if o.degenerate)


def markdown_table(results: Sequence[SubjectResult]) -> str:
    """One row per subject, one column per (task, metric) that any subject has; with intervals,
    each cell is `value [low, high]`. A probe whose numbers say nothing (one class predicted, or one
    class on a side) has its cells marked `(!)` and its reason in a last `flags` column."""
    cols = _columns(results)
    flagged = any(degenerate_flags(r) for r in results)
    head = "| encoder | " + " | ".join(f"{t} {m}" for t, m in cols) + (" | flags |" if flagged else " |")
    sep = "|---|" + "|".join("---:" for _ in cols) + ("|---|" if flagged else "|")
    lines = [head, sep]
    for r in results:
        vals = {(o.task, m): (v, o.ci.get(m)) for o in r.outcomes for m, v in o.metrics.items()}
        bad = {o.task for o in r.outcomes if o.degenerate}
        cells = " | ".join(
            format_interval(m, *vals.get((t, m), (None, None))) + (" (!)" if t in bad else "")
            for t, m in cols
        )
        flags = f" | {degenerate_flags(r) or '-'} |" if flagged else " |"
        lines.append(f"| {r.subject.label} | {cells}{flags}")
    return "\n".join(lines)


def find_row(results: Sequence[SubjectResult], name: str) -> SubjectResult:
    """The row whose label, or one of whose checkpoint names (e.g. `demo/init`), is `name`."""
    for r in results:
        if name == r.subject.label or name in r.subject.names:
            return r
    labels = ", ".join(repr(r.subject.label) for r in results)
    raise ReportError(f"--baseline {name!r}: no such row (rows: {labels})")


def choose_references(results: Sequence[SubjectResult], name: str | None) -> dict[str, SubjectResult]:
    """Row label -> the row its differences are taken against: `name` for every other row when the
    user names one (--baseline); by default a trained row's own initialisation (its run's step-0
    weights, else the fresh init of its config) and, for the other rows, the first initialisation
    row (else the first reference row: descriptor or zoo; else the first row). Initialisation rows
    themselves get no difference by default."""
    if not results:
        return {}
    if name is not None:
        base = find_row(results, name)
        return {r.subject.label: base for r in results if r is not base}
    by_label = {r.subject.label: r for r in results}
    inits = [r for r in results if r.subject.kind in ("run_init", "init")]
    others = [r for r in results if not r.subject.is_trained]
    fallback = (inits or others or list(results))[0]
    refs: dict[str, SubjectResult] = {}
    for r in results:
        if r in inits:
            continue
        ref = by_label.get(r.subject.reference or "", fallback)
        if ref is not r:
            refs[r.subject.label] = ref
    return refs


def paired_differences(
    results: Sequence[SubjectResult], refs: dict[str, SubjectResult], opts: ReportOptions
) -> dict[str, dict[tuple[str, str], Interval]]:
    """Per row with a reference (choose_references): (task, metric) -> interval of row - reference,
    both on the same resamples (eval.intervals.paired_interval)."""
    from polyp_ssl.eval.task_intervals import paired

    out: dict[str, dict[tuple[str, str], Interval]] = {}
    for r in results:
        ref = refs.get(r.subject.label)
        if ref is None:
            continue
        base = {o.task: o for o in ref.outcomes}
        diffs: dict[tuple[str, str], Interval] = {}
        for o in r.outcomes:
            b = base.get(o.task)
            if b is None or not o.stats or not b.stats:
                continue
            ci = replace(opts.ci, unit="video") if o.task == "count" else opts.ci
            for metric, iv in paired(o.stats, b.stats, ci).items():
                diffs[(o.task, metric)] = iv
        out[r.subject.label] = diffs
    return out


def difference_table(
    results: Sequence[SubjectResult],
    refs: dict[str, SubjectResult],
    diffs: dict[str, dict[tuple[str, str], Interval]],
) -> str:
    """Row - reference per metric, `+3.1 [0.5, 5.8]` (percentage points; an interval excluding 0 is a
    difference the resampled units support); a `minus` column when the rows have different
    references. Lower-is-better columns say so in their header."""
    cols = _columns(results)
    several = len({id(ref) for ref in refs.values()}) > 1
    names = [f"{t} {m}" + (" (lower is better)" if (t, m) in LOWER_IS_BETTER else "") for t, m in cols]
    head = "| encoder | " + ("minus | " if several else "") + " | ".join(names) + " |"
    sep = "|---|" + ("---|" if several else "") + "|".join("---:" for _ in cols) + "|"
    lines = [head, sep]
    for r in results:
        ref = refs.get(r.subject.label)
        if ref is None:
            continue
        d = diffs.get(r.subject.label, {})
        cells = " | ".join(
            format_interval(m, d[(t, m)].estimate, d[(t, m)], signed=True) if (t, m) in d else "-"
            for t, m in cols
        )
        minus = f"{ref.subject.label} | " if several else ""
        lines.append(f"| {r.subject.label} | {minus}{cells} |")
    return "\n".join(lines)


def plot_intervals(results: Sequence[SubjectResult], out_dir: Path) -> list[Path]:
    """One panel per (task, metric): every row's value with its interval as a horizontal bar."""
    panels = []
    for t, m in _columns(results):
        labels, vals, lows, highs = [], [], [], []
        for r in results:
            for o in r.outcomes:
                if o.task == t and m in o.metrics and m in o.ci:
                    iv = o.ci[m]
                    labels.append(r.subject.label)
                    vals.append(o.metrics[m])
                    lows.append(iv.low)
                    highs.append(iv.high)
        if labels:
            scale = 1.0 if m == "fragmentation_rate" else 100.0
            arrays = [scale * np.asarray(a, dtype=np.float64) for a in (vals, lows, highs)]
            panels.append((f"{t} {m}", labels, *arrays))
    if not panels:
        return []
    return [intervals_png(out_dir / "intervals.png", panels)]


# ----------------------------------------------------------------------------- figures


def plot_reid_curves(results: Sequence[SubjectResult], out_dir: Path) -> list[Path]:
    """ROC and PR curves of re-identification, every subject on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r.subject.label, o.extra) for r in results for o in r.outcomes if o.task == "reid" and o.extra]
    if not curves:
        return []
    paths = []
    for name, xlab, ylab, getx, gety, auc_name in (
        ("reid_roc.png", "false positive rate", "true positive rate", "fpr", "tpr", "auroc"),
        ("reid_pr.png", "recall", "precision", "recall", "precision", "aupr"),
    ):
        fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
        for label, res in curves:
            x, y = np.asarray(getattr(res, getx)), np.asarray(getattr(res, gety))
            if name == "reid_roc.png":
                x, y = np.r_[0.0, x, 1.0], np.r_[0.0, y, 1.0]
                order = np.lexsort((y, x))
                ax.plot(x[order], y[order], label=f"{label} ({100 * getattr(res, auc_name):.1f})")
            else:
                order = np.argsort(x, kind="stable")
                ax.step(
                    x[order], y[order], where="post", label=f"{label} ({100 * getattr(res, auc_name):.1f})"
                )
        if name == "reid_roc.png":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlab)
        ax.set_ylabel(ylab)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title("re-identification " + ("ROC" if "roc" in name else "precision-recall"))
        ax.legend(fontsize=7, loc="lower right" if "roc" in name else "upper right")
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / name))
    return paths


def training_curves(results: Sequence[SubjectResult], out_dir: Path) -> list[Path]:
    """The training curves (eval.curves) of every run whose checkpoint is evaluated, one PNG per
    run folder with CSV logs; a log that cannot be read is a warning, not a failed report."""
    from polyp_ssl.eval.curves import CurvesError, curves_for, run_of_checkpoint

    runs: list[Path] = []
    for r in results:
        run = run_of_checkpoint(r.subject.spec) if r.subject.kind in ("checkpoint", "run_init") else None
        if run is not None and run.resolve() not in [x.resolve() for x in runs]:
            runs.append(run)
    paths = []
    for run in runs:
        try:
            paths.append(curves_for(run, out_dir)[0])
        except CurvesError as e:
            log.warning("training curves of %s not drawn: %s", run, e)
    return paths


def _slug(text: str) -> str:
    return embed_mod.sanitize_name(text.replace("/", "_").replace(" ", "_").replace("(", "").replace(")", ""))


def gallery_for(res: SubjectResult, opts: ReportOptions, crop_scale: float) -> Path | None:
    from polyp_ssl.eval.gallery import pick_gallery_rows, plot_gallery, read_middle_crops

    emb = res.test
    if emb is None or len(emb) < 2:
        return None
    rows = pick_gallery_rows(emb.vectors, emb.identity_id.astype(str), opts.gallery_queries, k=5)
    if not rows:
        return None
    shard_of = _shard_of(opts.root)
    needed = sorted({i for r in rows for i in [r.query, *r.results]})
    keys = [(shard_of[str(emb.tracklet_id[i])], str(emb.sample_key[i])) for i in needed]
    crops = dict(zip(needed, read_middle_crops(opts.root, keys, crop_scale, size=64), strict=True))
    return plot_gallery(
        [crops[r.query] for r in rows],
        [[crops[i] for i in r.results] for r in rows],
        [r.correct for r in rows],
        opts.out / f"gallery_{_slug(res.subject.label)}.png",
        query_labels=[str(emb.identity_id[r.query]) for r in rows],
        title=f"retrieval top-5, {res.subject.label}: green = same polyp, red = another",
    )


def _shard_of(root: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    from polyp_ssl.shards.locations import UnsafeLocation, check_shard_value

    path = root / "catalog" / "tracklets.parquet"
    t = pq.read_table(path, columns=["tracklet_id", "shard"]).to_pydict()
    try:
        for tid, rel in zip(t["tracklet_id"], t["shard"], strict=True):
            check_shard_value(rel, path, f"tracklet {tid!r}")
    except UnsafeLocation as exc:
        raise ReportError(str(exc)) from None
    return dict(zip(t["tracklet_id"], t["shard"], strict=True))


def projection_for(res: SubjectResult, opts: ReportOptions) -> Path | None:
    from polyp_ssl.eval.projection import plot_projection, project_2d

    emb = res.test
    if emb is None or len(emb) < 3:
        return None
    method = opts.projection
    if method == "auto":
        method = "tsne" if len(emb) <= 150 else "pca"  # exact t-SNE is cheap up to a few hundred
    xy = project_2d(emb.vectors, method=method, seed=opts.seed)
    path = opts.out / f"projection_{_slug(res.subject.label)}.png"
    return plot_projection(
        xy,
        emb.identity_id.astype(str),
        path,
        title=f"{res.subject.label}: test tracklets ({method.upper()}), colour = polyp",
    )


# ----------------------------------------------------------------------------- report.md


def report_protocol(opts: ReportOptions) -> str:
    """The evaluation protocol of the whole-tracklet tasks, e.g. `paper: min 30 frames, stride 4,
    all frames` (eval.embed.protocol_string)."""
    return embed_mod.protocol_string(
        {
            "min_tracklet_frames": opts.min_tracklet_frames,
            "fragment_stride": opts.fragment_stride,
            "fragment_length": -1,
            "max_frames": opts.max_frames,
        }
    )


def write_report_md(
    path: Path,
    results: Sequence[SubjectResult],
    figures: dict[str, list[Path]],
    opts: ReportOptions,
    created: str,
    command: str,
    refs: dict[str, SubjectResult] | None = None,
    diffs: dict[str, dict[tuple[str, str], Interval]] | None = None,
) -> Path:
    from polyp_ssl.eval.embeddings import manifest_sha256

    lines = [
        "# Evaluation report",
        "",
        f"- dataset root: `{opts.root}` (catalog manifest sha256 `{manifest_sha256(opts.root)[:16]}`)",
        f"- created: {created}",
        f"- command: `{command}`",
        f"- protocol: {report_protocol(opts)} (retrieval, re-identification, counting; probes: "
        f"fragments of {opts.probe_fragment_length} frames of the same tracklets)",
        "",
        "## Results",
        "",
        "Percentages except the fragmentation rate (predicted clusters per true polyp, lower is better,",
        "1.0 is perfect). Retrieval, re-identification: test split, whole tracklets; size and",
        f"histology: MLP probe on frozen fragment embeddings of the {'+'.join(opts.probe_splits)} "
        "polyps, 70/30 split by polyp;",
        f"counting: threshold chosen on val at pairwise FPR <= {opts.count_fpr}, measured on test.",
        "",
        markdown_table(results),
        "",
    ]
    if any(o.ci for r in results for o in r.outcomes):
        c = opts.ci
        lines += [
            f"In brackets: {round(100 * c.level)}% bootstrap interval ({c.resamples} resamples of the "
            f"test {c.unit}s, seed {c.seed}; counting resamples videos).",
            "",
        ]
    if refs and diffs and any(diffs.values()):
        bases = list(dict.fromkeys(r.subject.label for r in refs.values()))
        minus = bases[0] if len(bases) == 1 else "the row named in `minus` (each row's initialisation)"
        lines += [
            f"## Difference vs {bases[0]}" if len(bases) == 1 else "## Differences",
            "",
            f"Row minus {minus}, in percentage points (fragmentation rate: as it is), positive when "
            "the row is higher (for the columns marked lower is better, a negative difference is an "
            "improvement), with the 95% interval of the paired bootstrap (both encoders on the same "
            "resamples). An interval that excludes 0 is a difference the data supports.",
            "",
            difference_table(results, refs, diffs),
            "",
        ]
    notes = []
    for r in results:
        for o in r.outcomes:
            if o.note:
                notes.append(f"- {r.subject.label}, {o.task}: {o.note} ({o.time_s:.1f} s)")
        for task, why in r.skipped.items():
            notes.append(f"- {r.subject.label}, {task}: **skipped**: {why}")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    if any(figures.values()):
        lines += ["## Figures", ""]
        for title, paths in figures.items():
            for p in paths:
                lines += [f"### {title}: {p.stem}", "", f"![{p.stem}]({p.name})", ""]
    lines += ["## Encoders", "", "| encoder | kind | provenance | source | sha256 |", "|---|---|---|---|---|"]
    for r in results:
        s = r.subject
        lines.append(f"| {s.label} | {s.kind} | {s.provenance} | `{s.spec}` | {(s.sha256 or '-')[:16]} |")
    lines += ["", "## Embeddings files", ""]
    for r in results:
        for f in r.files:
            lines.append(f"- {r.subject.label}: `{f}`")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- the job


def run_report(
    checkpoints: Sequence[str | Path],
    opts: ReportOptions,
    baselines: Sequence[str] = BASELINES,
    embeddings: Sequence[str | Path] = (),
    command: str = "polyp-ssl report",
) -> list[SubjectResult]:
    opts.root = Path(opts.root)
    opts.out = Path(opts.out)
    for e in embeddings:  # a file of another dataset is refused before any work
        read_embeddings(e, root=opts.root)
    if not checkpoints and not embeddings and opts.baseline is None:
        raise ReportError(
            "nothing to compare: give checkpoints or run folders (RUN_OR_CKPT) or --embeddings FILE; "
            "baselines alone are compared only when --baseline names the row to compare with"
        )
    subjects = build_subjects(resolve_checkpoints(checkpoints), baselines, [Path(e) for e in embeddings])
    if not subjects:
        raise ReportError("nothing to evaluate: give checkpoints, run folders, --embeddings or --baselines")
    if opts.baseline is not None:  # a misspelt row name is refused before any work
        find_row([SubjectResult(s) for s in subjects], opts.baseline)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for i, subject in enumerate(subjects, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(subjects)}] {subject.label}", flush=True)
        res = evaluate_subject(subject, opts)
        results.append(res)
        summary = ", ".join(
            f"{o.task} {m} {format_value(m, v)}" for o in res.outcomes for m, v in o.metrics.items()
        )
        print(f"    {summary or 'no task ran'} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if degenerate_flags(res):
            print(f"    warning: degenerate probe: {degenerate_flags(res)}", flush=True)
    refs = choose_references(results, opts.baseline)
    diffs = paired_differences(results, refs, opts) if len(results) > 1 and opts.ci.enabled else {}
    rows = [
        row
        for r in results
        for row in result_rows(
            r,
            created,
            report_protocol(opts),
            opts,
            diffs.get(r.subject.label),
            refs[r.subject.label].subject.label if r.subject.label in refs else None,
        )
    ]
    append_results(opts.out / RESULTS_FILE, rows)
    figures: dict[str, list[Path]] = {"intervals": plot_intervals(results, opts.out)}
    figures["re-identification curves"] = plot_reid_curves(results, opts.out)
    scale = _crop_scale(opts, results)
    figures["retrieval gallery"] = [p for r in results if (p := gallery_for(r, opts, scale))]
    figures["2-D projection"] = [p for r in results if (p := projection_for(r, opts))]
    figures["training curves"] = training_curves(results, opts.out)
    write_report_md(opts.out / REPORT_FILE, results, figures, opts, created, command, refs, diffs)
    return results


def _crop_scale(opts: ReportOptions, results: Sequence[SubjectResult]) -> float:
    if opts.bbox_scale_factor:
        return opts.bbox_scale_factor
    from polyp_ssl.eval.embeddings import read_metadata

    for r in results:
        for f in r.files:
            s = (read_metadata(f).get("params") or {}).get("bbox_scale_factor")
            if s:
                return float(s)
    return embed_mod.DEFAULT_BBOX_SCALE


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="polyp-ssl report", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    p.add_argument(
        "checkpoints",
        nargs="*",
        metavar="RUN_OR_CKPT",
        help="checkpoint files or run folders (a run folder = its checkpoints/*.ckpt)",
    )
    p.add_argument("--dataset_root", required=True, help="an ingested root (shards/ and catalog/)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder for report.md, results.parquet, figures (default: report/{root}_{tasks}_"
        "{protocol}_{hash of the inputs}, so reports of other inputs never share a folder)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the output folder holds an earlier report: replace it whole (once the new one is complete)",
    )
    p.add_argument(
        "--baselines",
        default="init,descriptor",
        help="comma-separated: init (each run's step-0 weights, checkpoints/init.ckpt; a fresh init of "
        "the same config where the run has none), fresh_init (always the fresh init, seed 0), "
        "descriptor, zoo:NAME=PATH (a foundation model from local weights, docs/zoo.md); 'none' for none",
    )
    p.add_argument("--embeddings", nargs="*", default=[], help="also evaluate these embeddings files")
    p.add_argument(
        "--tasks",
        default="all",
        help=f"comma-separated from {','.join(TASKS)}, or all "
        "(with all, a task the data cannot support is skipped; named, it is an error)",
    )
    p.add_argument("--encoder_type", choices=["sfe", "mve", "hmve"], help="expected type of every checkpoint")
    p.add_argument("--data_im_size", type=int, default=None, help="default: each checkpoint's im_size")
    p.add_argument(
        "--data_bbox_scale_factor",
        type=float,
        default=None,
        help="default: each checkpoint's bbox_scale_factor",
    )
    p.add_argument("--data_fragment_stride", type=int, default=4, help="take every N-th frame of a tracklet")
    p.add_argument("--probe_fragment_length", type=int, default=8, help="fragment length for the probes")
    p.add_argument(
        "--min_tracklet_frames",
        type=int,
        default=embed_mod.DEFAULT_MIN_TRACKLET_FRAMES,
        help="tracklets with fewer frames are left out of every task (default 30, the paper's protocol)",
    )
    p.add_argument(
        "--max_frames",
        type=int,
        default=embed_mod.DEFAULT_MAX_FRAMES,
        help="cap whole tracklets at this many strided frames (default: no cap, the paper's protocol)",
    )
    p.add_argument(
        "--probe_splits",
        default="val,test",
        help="splits whose polyps the probes use (70/30 by polyp); default the held-out val,test",
    )
    p.add_argument(
        "--encoder_pooling",
        choices=["cls", "mean"],
        default="cls",
        help="tracklet embedding: CLS output or mean",
    )
    p.add_argument("--batch_size", type=int, default=32, help="tracklets per embedding batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--projection",
        choices=["auto", "pca", "tsne"],
        default="auto",
        help="2-D map of the embeddings figure",
    )
    p.add_argument(
        "--gallery_queries",
        type=int,
        default=4,
        help="query tracklets shown in the gallery figure",
    )
    p.add_argument(
        "--count_fpr",
        type=float,
        default=0.05,
        help="counting: pooled pairwise FPR allowed on val",
    )
    p.add_argument("--seed", type=int, default=42, help="random seed (probes, projection, gallery)")
    add_ci_flags(p)
    embed_mod.add_cache_flag(p)
    p.add_argument(
        "--baseline",
        default=None,
        metavar="ROW_NAME",
        help="row (its label, or a checkpoint name it lists, e.g. demo/init) the paired differences are "
        "taken against (default: each trained row's own initialisation)",
    )
    return p


def default_out(
    opts: ReportOptions, checkpoints: Sequence[str], baselines: Sequence[str], embeddings: Sequence[str]
) -> Path:
    """report/{root name}_{tasks}_{protocol tag}_{hash}: the hash covers the root, the evaluated
    checkpoints, baselines and embeddings files (resolved paths) and every option, so the same
    command names the same folder (refused there unless --overwrite) and any other gets its own."""
    from dataclasses import asdict

    from polyp_ssl.eval.outputs import protocol_tag, short_hash, slug

    settings = {k: v for k, v in asdict(opts).items() if k not in ("out", "progress", "cache")}
    inputs = {
        "settings": settings,
        "root": str(Path(opts.root).resolve()),
        "checkpoints": sorted(str(Path(c).resolve()) for c in checkpoints),
        "baselines": sorted(baselines),
        "embeddings": sorted(str(Path(e).resolve()) for e in embeddings),
    }
    tasks = "all" if set(opts.tasks) == set(TASKS) else "+".join(opts.tasks)
    tag = protocol_tag(report_protocol(opts))
    name = f"{Path(opts.root).resolve().name}_{tasks}_{tag}_{short_hash(inputs)}"
    return Path("report") / slug(name)


def parse_probe_splits(text: str) -> tuple[str, ...]:
    """`val,test` -> ("val", "test"); at least one split."""
    splits = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not splits:
        raise ReportError(f"--probe_splits: no split in {text!r} (e.g. val,test)")
    return splits


def parse_tasks(text: str) -> tuple[tuple[str, ...], bool]:
    if text.strip() == "all":
        return TASKS, False
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ReportError(f"--tasks: unknown task(s) {bad} (choose from {', '.join(TASKS)} or all)")
    return tasks, True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tasks, strict = parse_tasks(args.tasks)
        baselines = (
            []
            if args.baselines.strip() in ("", "none")
            else [b.strip() for b in args.baselines.split(",") if b.strip()]
        )
        opts = ReportOptions(
            root=Path(args.dataset_root),
            out=Path(args.out) if args.out else Path("report"),
            tasks=tasks,
            strict_tasks=strict,
            device=args.device,
            batch_size=args.batch_size,
            im_size=args.data_im_size,
            bbox_scale_factor=args.data_bbox_scale_factor,
            fragment_stride=args.data_fragment_stride,
            pooling=args.encoder_pooling,
            encoder_type=args.encoder_type,
            probe_fragment_length=args.probe_fragment_length,
            probe_splits=parse_probe_splits(args.probe_splits),
            min_tracklet_frames=args.min_tracklet_frames,
            max_frames=args.max_frames,
            projection=args.projection,
            gallery_queries=args.gallery_queries,
            seed=args.seed,
            count_fpr=args.count_fpr,
            ci_unit=args.ci_unit,
            ci_resamples=args.ci_resamples,
            ci_seed=args.ci_seed,
            baseline=args.baseline,
        )
        try:
            opts.ci.validate()
        except ValueError as e:
            raise ReportError(str(e)) from None
        if not args.out:
            opts.out = default_out(opts, args.checkpoints, baselines, args.embeddings)
        opts.cache = embed_mod.resolve_cache(opts.root, args.cache_dir)
        print(opts.cache.describe())
        final = opts.out  # written complete beside it, then swapped in (eval.outputs.replacing_folder)
        with replacing_folder(final, args.overwrite, (REPORT_FILE, RESULTS_FILE)) as opts.out:
            command = "polyp-ssl report " + " ".join(argv)
            results = run_report(args.checkpoints, opts, baselines, args.embeddings, command=command)
        opts.out = final
    except (ReportError, EmbedError, EmbeddingsError, OutputExists) as e:
        print(f"polyp-ssl report: error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(results))
    print(f"\nreport: {opts.out / REPORT_FILE}\nresults: {opts.out / RESULTS_FILE}")
    return 0
