"""The evaluation tasks, one function each, called by the per-task commands (`polyp-ssl eval`,
`probe`, `count`: eval/cli_run.py) and by `polyp-ssl report` (eval/report_tasks.py).

Each takes vectors already read (an `Embeddings` at tracklet level, probe sides, or videos
grouped for counting) and the interval options, and returns a `TaskResult`: the headline
metrics, the task's full result (for the JSON outputs and the figures), the bootstrap statistics
and their intervals (empty when disabled), and the provenance of the vectors. What a caller does
with a task the data cannot support (an error naming the flag, or a skipped row) stays with
the caller; the functions neither print nor write files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval.embeddings import Embeddings
from polyp_ssl.eval.intervals import Interval, UnitStatistic
from polyp_ssl.eval.task_intervals import CiOptions, intervals
from polyp_ssl.shards.retrieval import DEFAULT_MEMORY_BYTES, rows_per_block


@dataclass
class TaskResult:
    """One task's numbers: `metrics` (name -> value), `result` (RetrievalResult, ReidResult,
    ProbeResult or CountResult), `stats` (metric -> bootstrap statistic, empty when intervals are
    disabled), `ci` (the interval settings: the counting unit is always the video) and
    `provenance` (where the vectors come from). The intervals are drawn on request
    (`intervals`), so a command computes them at the point its output names them."""

    task: str
    metrics: dict[str, float]
    result: Any
    stats: dict[str, UnitStatistic] = field(default_factory=dict, repr=False)
    ci: CiOptions | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def intervals(self, names: Mapping[str, str] | None = None) -> dict[str, Interval]:
        """Metric -> its bootstrap interval ({} when disabled); `names` (name shown -> metric of
        `stats`) picks and renames the metrics, in its order."""
        if not self.stats or self.ci is None:
            return {}
        stats = self.stats
        if names is not None:
            stats = {k: self.stats[v] for k, v in names.items() if v in self.stats}
        return intervals(stats, self.ci)


def vectors_provenance(emb: Embeddings) -> dict[str, Any]:
    """The embeddings file, split(s), protocol and encoder of a set of vectors."""
    return {
        "embeddings": str(emb.path),
        "split": sorted({str(s) for s in emb.split}),
        "protocol": emb.meta.get("protocol"),
        "checkpoint": emb.meta.get("checkpoint"),
        "checkpoint_sha256": emb.meta.get("checkpoint_sha256"),
    }


def require_polyps(emb: Embeddings, what: str) -> None:
    """Refuse `what` on vectors of a root whose identities are tracker tracks, not polyps
    (shards.identities: TrackIdentitiesError, bad input); the root is where the file lives or the
    one its metadata names (nothing to check when neither is there)."""
    from polyp_ssl.eval.embeddings import infer_root
    from polyp_ssl.shards.identities import require_polyp_identities

    root = infer_root(emb.path, emb.meta)
    if root is not None:
        require_polyp_identities(root, what)


def _finish(
    task: str, metrics: dict[str, float], result: Any, stats: dict, ci: CiOptions, provenance: dict
) -> TaskResult:
    return TaskResult(task, metrics, result, stats, ci, provenance)


def run_retrieval(
    emb: Embeddings,
    ci: CiOptions,
    scope: str = "split",
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    progress: Callable[[int], None] | None = None,
) -> TaskResult:
    """Retrieval over the tracklets of `emb` (tracklet level): mAP, HR@1, HR@5; `scope` "split"
    ranks every other tracklet (the paper), "video" those of the query's video."""
    from polyp_ssl.eval.metrics import retrieval_from_vectors

    require_polyps(emb, "retrieval scoring")
    res = retrieval_from_vectors(
        emb.vectors,
        emb.identity_id,
        video=emb.video_id,
        scope=scope,
        memory_bytes=memory_bytes,
        rows_per_chunk=rows_per_block(len(emb), memory_bytes=memory_bytes),
        progress=progress,
    )
    stats = {}
    if ci.enabled:
        from polyp_ssl.eval.task_intervals import retrieval_stats

        stats = retrieval_stats(res.ap, res.hits, res.valid, emb.identity_id, emb.video_id, ci.unit)
    metrics = {"mAP": res.mAP, "HR@1": res.hr[1], "HR@5": res.hr[5]}
    return _finish("retrieval", metrics, res, stats, ci, vectors_provenance(emb))


def run_reid(emb: Embeddings, ci: CiOptions, progress: Callable[[int], None] | None = None) -> TaskResult:
    """Re-identification over every pair of tracklets of `emb` (tracklet level): AUROC, AUPR."""
    from polyp_ssl.eval.metrics import reid_from_vectors

    require_polyps(emb, "re-identification scoring")
    res = reid_from_vectors(emb.vectors, emb.identity_id, progress=progress)
    stats = {}
    if ci.enabled:
        from polyp_ssl.eval.task_intervals import reid_stats

        stats = reid_stats(emb.vectors, emb.identity_id, emb.video_id, ci.unit)
    return _finish("reid", {"AUROC": res.auroc, "AUPR": res.aupr}, res, stats, ci, vectors_provenance(emb))


@dataclass
class ProbeSides:
    """The two sides of a probe (eval.probe.ProbeData) and the video of each val row (the
    bootstrap unit when intervals resample videos)."""

    train: Any
    val: Any
    val_video: np.ndarray


def run_probe(
    task: str, sides: ProbeSides, cfg: Any, ci: CiOptions, provenance: dict[str, Any] | None = None
) -> TaskResult:
    """A size or histology probe (eval.probe.run_probe, config `cfg`) trained on `sides.train`,
    measured on `sides.val`: every metric of eval.probe.probe_metrics. OneClassError / ProbeError
    (ValueErrors) pass through."""
    from polyp_ssl.eval.probe import run_probe as train_and_measure

    res = train_and_measure(sides.train, sides.val, cfg)
    stats = {}
    if ci.enabled:
        from polyp_ssl.eval.task_intervals import probe_stats

        stats = probe_stats(res.y_true, res.y_pred, sides.val.identity, sides.val_video, ci.unit)
    return _finish(task, dict(res.metrics), res, stats, ci, dict(provenance or {}))


def run_count(
    val: Sequence,
    test: Sequence,
    ci: CiOptions,
    method: str = "agglomerative",
    temporal: bool = False,
    max_fpr: float = 0.05,
    grid: Sequence[float] | None = None,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> TaskResult:
    """Polyp counting: the operating point chosen on the `val` videos at pooled pairwise FPR <=
    `max_fpr`, fragmentation rate and FPR measured on `test`; intervals resample videos whatever
    `ci.unit` says (clusters live within a video)."""
    from polyp_ssl.eval.count import evaluate_counting

    res = evaluate_counting(val, test, method, temporal, max_fpr, grid, seed)
    ci = replace(ci, unit="video")
    stats = {}
    if ci.enabled:
        from polyp_ssl.eval.task_intervals import count_stats

        stats = count_stats(res.per_video)
    metrics = {"fragmentation_rate": res.test_fragmentation, "FPR": res.test_fpr}
    return _finish("count", metrics, res, stats, ci, dict(provenance or {}))


def training_config(
    emb: Embeddings, cache: dict[str, dict[str, Any]], log: logging.Logger | None = None
) -> dict[str, Any]:
    """The flat training config of the checkpoint that made `emb` ({} for other encoders, or when
    the checkpoint is no longer where the file says); read once per checkpoint into `cache`."""
    spec = emb.meta.get("checkpoint")
    if not spec or emb.meta.get("encoder_kind") not in (None, "checkpoint") or not Path(spec).is_file():
        return {}
    key = str(Path(spec).resolve())
    if key not in cache:
        from polyp_ssl.checkpoint import read_encoder_state
        from polyp_ssl.eval.embed_source import flat_config

        try:
            cache[key] = flat_config(read_encoder_state(spec)[1])
        except Exception as e:  # the embeddings are already made: comparing settings is a courtesy
            logging.getLogger(__name__).warning(
                "%s: training settings not readable (%s); not compared", spec, e
            )
            cache[key] = {}
    return cache[key]


@dataclass
class SideSource:
    """Where one side's vectors come from (`as_dict`: the JSON's `*_side`), and the checkpoint
    settings they differ in and the splits the encoder was trained on (one warning each)."""

    dataset_root: str | None
    split: list[str]
    embeddings: str
    differ: list[str]
    overlap: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset_root": self.dataset_root,
            "split": self.split,
            "embeddings": self.embeddings,
            "settings_differ_from_training": self.differ,
            "encoder_training_split": bool(self.overlap),
        }


def side_source(
    emb: Embeddings, root: Path | None, cache: dict[str, dict[str, Any]], log: logging.Logger | None = None
) -> SideSource:
    """The provenance of one side's vectors, compared with the checkpoint's training settings."""
    from polyp_ssl.eval.outputs import setting_mismatches, training_split_overlap

    splits = sorted({str(s) for s in emb.split})
    training = training_config(emb, cache, log)
    differ = setting_mismatches(emb.meta.get("params") or {}, training)
    overlap = [o for s in splits if (o := training_split_overlap(root, s, training))]
    from polyp_ssl.shards.remote import display_url, remote_root

    url = remote_root(root) if root is not None else None  # a root in an object store: its URL
    where = str(root.resolve()) if root is not None else emb.meta.get("dataset_root")
    if url is not None:
        where = display_url(url)
    return SideSource(where, splits, str(emb.path), differ, overlap)


__all__ = [
    "ProbeSides",
    "SideSource",
    "TaskResult",
    "run_count",
    "run_probe",
    "run_reid",
    "run_retrieval",
    "side_source",
    "training_config",
    "vectors_provenance",
]
