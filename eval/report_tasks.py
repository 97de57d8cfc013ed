"""The tasks of a report, for one row (a checkpoint, a baseline or a file): each task's
vectors read once per split (`EmbeddingSource`), the task run through eval.tasks, and a task the
data cannot support skipped with its reason (`TaskSkipped`; an error when the task was named)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval import embed as embed_mod
from polyp_ssl.eval.embed import EmbedError, EmbedOptions, EncoderChoice, NoItemsError
from polyp_ssl.eval.embeddings import Embeddings, read_embeddings
from polyp_ssl.eval.intervals import Interval, UnitStatistic
from polyp_ssl.eval.report_subjects import ReportError, Subject
from polyp_ssl.eval.task_intervals import DEFAULT_CI_RESAMPLES, CiOptions
from polyp_ssl.shards.embeddings_cache import EmbeddingsCache

log = logging.getLogger("polyp_ssl.eval.report")  # the command's name in its log lines

TASKS = ("retrieval", "reid", "size", "histology", "count")


class TaskSkipped(Exception):
    """The data cannot support a task (e.g. no labels); the reason goes into the report."""


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

    def __init__(
        self,
        subject: Subject,
        opts: ReportOptions,
        result: SubjectResult,
        announce: Callable[[str], None] = print,
    ) -> None:
        self.subject, self.opts, self.result, self.announce = subject, opts, result, announce
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
            kind = self.subject.kind
            choice = EncoderChoice(
                self.subject.spec, encoder_type=o.encoder_type if kind in ("checkpoint", "run_init") else None
            )
            options = EmbedOptions(
                split=split,
                fragment_length=fragment_length,
                fragment_stride=o.fragment_stride,
                im_size=o.im_size,
                bbox_scale_factor=o.bbox_scale_factor,
                pooling=o.pooling,
                batch_size=o.batch_size,
                device=o.device,
                progress=o.progress,
                min_tracklet_frames=o.min_tracklet_frames,
                max_frames=o.max_frames,
                cache=o.cache,
            )
            made = embed_mod.ensure_embeddings(o.root, choice, options)
            self.announce(made.summary())
            path = made.path
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

    @property
    def splits_read(self) -> set[str]:
        return {k[0] for k in self._cache}


def _identities(emb: Embeddings) -> np.ndarray:
    missing = [i for i, v in enumerate(emb.identity_id) if v is None or v == ""]
    if len(missing) == len(emb):
        raise TaskSkipped(f"split {emb.split[0] if len(emb) else '?'} has no identity labels")
    if missing:
        raise TaskSkipped(f"{len(missing)} of {len(emb)} tracklets lack identity_id")
    return emb.identity_id.astype(str)


def task_retrieval(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    from polyp_ssl.eval.tasks import run_retrieval

    emb = src.get("test").tracklet_level()
    ident = _identities(emb)
    if len(set(ident)) == len(ident):
        raise TaskSkipped("no two test tracklets share a polyp: no query has a positive")
    t = run_retrieval(emb, opts.ci)
    res = t.result
    return TaskOutcome(
        "retrieval",
        t.metrics,
        0.0,
        note=f"{res.n_queries} queries, {res.n_excluded} without a positive excluded",
        stats=t.stats,
        ci=t.intervals(),
    )


def task_reid(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    from polyp_ssl.eval.tasks import run_reid

    emb = src.get("test").tracklet_level()
    ident = _identities(emb)
    if len(set(ident)) == len(ident):
        raise TaskSkipped("no two test tracklets share a polyp: no positive pair")
    if len(set(ident)) < 2:
        raise TaskSkipped("every test tracklet is the same polyp: no negative pair")
    t = run_reid(emb, opts.ci)
    res = t.result
    return TaskOutcome(
        "reid",
        t.metrics,
        0.0,
        note=f"{res.n_pairs} pairs, {res.n_positive} same-polyp",
        extra=res,
        stats=t.stats,
        ci=t.intervals(),
    )


def task_size(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    return _probe_task("size", src, opts)


def task_histology(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    return _probe_task("histology", src, opts)


def _probe_rows(task: str, src: EmbeddingSource, opts: ReportOptions):
    """The labelled rows of the probe splits: (parts, ids, y, vectors, videos); TaskSkipped when
    no row, or only one class, has a label."""
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
    if np.unique(y[keep]).size < 2:
        raise TaskSkipped(
            f"every labelled {where} polyp has the same {task} class ({int(y[keep][0])}); "
            + probe.protocol_hint(parts)
        )
    return parts, ids[keep], y[keep], vectors[keep], vids[keep], left_out


def _probe_task(task: str, src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    """MLP probe on frozen fragment embeddings of the polyps the encoder never trained on
    (`probe_splits`, default val + test, as the paper probes on held-out videos), 70/30 split by
    polyp (stratified, seeded); rows of polyps without a usable label are left out and counted."""
    from polyp_ssl.eval import probe
    from polyp_ssl.eval.tasks import ProbeSides, run_probe

    parts, ids, y, x, vids, left_out = _probe_rows(task, src, opts)
    train, val = probe.split_by_identity(ids, y, 0.7, seed=opts.seed)
    sides = ProbeSides(
        probe.ProbeData(x[train], y[train], ids[train]), probe.ProbeData(x[val], y[val], ids[val]), vids[val]
    )
    try:
        with warnings.catch_warnings():
            # a small val side may hold one class; the metrics stay defined, sklearn's notice is noise
            warnings.simplefilter("ignore", UserWarning)
            where = {"embeddings": [str(e.path) for e in parts]}
            t = run_probe(task, sides, probe.ProbeConfig(seed=opts.seed), opts.ci, where)
    except probe.OneClassError as e:
        raise TaskSkipped(f"{e}; {probe.protocol_hint(parts)}") from e
    except probe.ProbeError as e:
        raise TaskSkipped(str(e)) from e
    res, m = t.result, t.metrics
    names = (
        {"F1": "identity_weighted_macro_f1", "accuracy": "accuracy"}
        if task == "size"
        else {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy"}
    )
    metrics = {k: m[v] for k, v in names.items()}
    stats = {k: t.stats[v] for k, v in names.items() if v in t.stats}
    ci = t.intervals(names)
    left = sum(left_out.values())
    note = (
        f"{res.n_train} train / {res.n_val} val fragments, {res.n_train_polyps} / {res.n_val_polyps} "
        f"polyps; {left} rows without a label left out; "
        f"{sum(int(e.meta.get('n_tracklets_too_short') or 0) for e in parts)} tracklets shorter than one "
        "fragment"
    )
    if res.degenerate:
        note += f"; **degenerate probe**: {res.degenerate}"
    # extra: the probe's result (its val labels and predictions: report.html's confusion matrix)
    return TaskOutcome(
        task, metrics, 0.0, note=note, stats=stats, degenerate=res.degenerate, ci=ci, extra=res
    )


def task_count(src: EmbeddingSource, opts: ReportOptions) -> TaskOutcome:
    """Agglomerative clustering per video; threshold chosen on val at pairwise FPR <= count_fpr."""
    from polyp_ssl.eval import count
    from polyp_ssl.eval.embeddings import tracklet_spans
    from polyp_ssl.eval.tasks import run_count

    if not src.has_split("val"):
        raise TaskSkipped("counting chooses its threshold on the val split, which has no tracklets")
    spans = tracklet_spans(opts.root)
    videos, files = {}, {}
    for split in ("val", "test"):
        emb = src.get(split).tracklet_level()
        files[split] = str(emb.path)
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
        t = run_count(videos["val"], videos["test"], opts.ci, max_fpr=opts.count_fpr, provenance=files)
    except count.CountError as e:
        raise TaskSkipped(str(e)) from e
    res = t.result
    met = "met" if res.fpr_target_met else "NOT met (lowest-FPR threshold used)"
    note = (
        f"agglomerative, threshold {res.value:.2f} chosen on val (val FPR {res.val_fpr:.3f}, target "
        f"{met}); {len(res.per_video)} test videos"
    )
    return TaskOutcome("count", t.metrics, 0.0, note=note, stats=t.stats, ci=t.intervals())


TASK_FUNCS: dict[str, Callable[[EmbeddingSource, ReportOptions], TaskOutcome]] = {
    "retrieval": task_retrieval,
    "reid": task_reid,
    "size": task_size,
    "histology": task_histology,
    "count": task_count,
}


def evaluate_subject(
    subject: Subject, opts: ReportOptions, announce: Callable[[str], None] = print
) -> SubjectResult:
    """Every task of `opts.tasks` for one row; a task the data cannot support is skipped with its
    reason (an error with --tasks naming it)."""
    result = SubjectResult(subject)
    src = EmbeddingSource(subject, opts, result, announce)
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
        outcome.time_s = time.perf_counter() - t0
        result.outcomes.append(outcome)
    if "test" in src.splits_read:
        result.test = src.get("test").tracklet_level()
    return result


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
