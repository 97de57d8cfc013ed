"""Size and histology probes: a small classifier trained on frozen, cached embeddings.

Only vectors are trained on (the encoder ran once, in `polyp-ssl embed`), so a probe takes seconds
on a CPU. Labels come from the catalog's polyps table, joined by identity_id:
- size: 0 diminutive (<= 5 mm), 1 larger (`shards.labels.size_binary`);
- histology: 1 adenoma, 0 non-adenoma (`shards.labels.histology_binary`, per `class_mapping`).
Rows whose polyp has no usable label are left out and counted by reason.

Metrics on the validation rows: accuracy, balanced accuracy, macro F1, and the identity-weighted
macro F1 (each row weighs 1 / number of validation rows of its polyp, so every polyp counts the
same whatever its number of fragments).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from polyp_ssl.shards.labels import DEFAULT_MAPPING, histology_binary, size_binary

log = logging.getLogger(__name__)

TASKS = ("size", "histology")


class ProbeError(ValueError):
    """Inputs a probe cannot be trained on; the message says which and why."""


class OneClassError(ProbeError):
    """The training rows hold one class only: nothing to learn. Callers that know the protocol add
    what it kept (`protocol_hint`)."""


def protocol_hint(parts: Sequence) -> str:
    """What the evaluation protocol left of the embeddings files `parts` (eval.embeddings.Embeddings:
    their rows and metadata), naming the flag that keeps more: `the protocol kept 5 of 18 tracklets
    (13 shorter than --min_tracklet_frames 30), 40 fragments; lower --min_tracklet_frames ...`."""
    kept = sum(len(set(map(str, e.tracklet_id))) for e in parts)
    rows = sum(len(e.tracklet_id) for e in parts)
    unit = "fragments" if any((np.asarray(e.fragment_index) >= 0).any() for e in parts) else "rows"
    below = sum(int(e.meta.get("n_tracklets_below_min") or 0) for e in parts)
    short = sum(int(e.meta.get("n_tracklets_too_short") or 0) for e in parts)
    mins = {(e.meta.get("params") or {}).get("min_tracklet_frames") for e in parts} - {None}
    flag = (
        f"--min_tracklet_frames {'/'.join(str(m) for m in sorted(mins))}" if mins else "--min_tracklet_frames"
    )
    text = f"the protocol kept {kept} of {kept + below + short} tracklets ({below} shorter than {flag}"
    if short:
        text += f", {short} shorter than one fragment"
    if below or short:
        return f"{text}), {rows} {unit}; lower --min_tracklet_frames to keep more (both classes)"
    return f"{text}), {rows} {unit}; none left out: the labelled polyps themselves hold one class"


def degenerate_reason(y_val: np.ndarray, y_pred: np.ndarray) -> str | None:
    """Why a probe's validation numbers say nothing about the embeddings, or None: the validation
    side holds one class (balanced accuracy and F1 are then degenerate), or the probe predicts one
    class for every row (it learned the majority class only)."""
    reasons = []
    val_classes = np.unique(np.asarray(y_val))
    if val_classes.size == 1:
        reasons.append(f"validation rows hold one class only ({val_classes.tolist()})")
    pred_classes = np.unique(np.asarray(y_pred))
    if pred_classes.size == 1 and len(y_pred) > 1:
        reasons.append(
            f"majority class only: predicts class {int(pred_classes[0])} for all {len(y_pred)} rows"
        )
    return "; ".join(reasons) or None


@dataclass
class ProbeConfig:
    n_classes: int = 2
    cls_type: str = "mlp"  # mlp | linear
    cls_hidden_dim: int = 256
    cls_init: str = "default"  # default (PyTorch's) | normal (linear: N(0, 0.01)) | xavier | zeros
    cls_use_layer_norm: bool = False  # linear probe: LayerNorm before the Linear (the reference's flag)
    pos_weight: float | None = None  # BCE weight of the positive class (two classes)
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"  # norm | value
    dropout: float = 0.1
    opt_type: str = "adamw"  # adamw | sgd
    opt_lr: float = 1e-4
    opt_weight_decay: float = 0.0
    lr_sched_type: str = "onecycle"  # onecycle | none
    max_epochs: int = 20
    batch_size: int = 64
    seed: int = 42

    def validate(self) -> None:
        checks = [
            (self.cls_type in ("mlp", "linear"), f"cls_type must be mlp or linear, got {self.cls_type!r}"),
            (
                self.cls_init in ("default", "normal", "xavier", "zeros"),
                f"cls_init must be default, normal, xavier or zeros, got {self.cls_init!r}",
            ),
            (
                self.gradient_clip_algorithm in ("norm", "value"),
                f"gradient_clip_algorithm must be norm or value, got {self.gradient_clip_algorithm!r}",
            ),
            (
                self.pos_weight is None or self.pos_weight > 0,
                f"pos_weight must be > 0, got {self.pos_weight}",
            ),
            (self.opt_type in ("adamw", "sgd"), f"opt_type must be adamw or sgd, got {self.opt_type!r}"),
            (
                self.lr_sched_type in ("onecycle", "none"),
                f"lr_sched_type must be onecycle or none, got {self.lr_sched_type!r}",
            ),
            (self.n_classes >= 2, f"n_classes must be >= 2, got {self.n_classes}"),
            (self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.opt_lr > 0, f"opt_lr must be > 0, got {self.opt_lr}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ProbeError(msg)


# ----------------------------------------------------------------------------------- labels


def task_labels(
    identity_ids: Sequence[str],
    task: str,
    size_mm: dict[str, float | None],
    histology: dict[str, str | None],
    dataset_id: dict[str, str | None] | None = None,
    class_mapping: str = DEFAULT_MAPPING,
) -> tuple[np.ndarray, Counter]:
    """Per row: the task's class (int64), -1 where left out; and the count of rows left out,
    by reason ("size unknown", "histology 'NO POLYP'", "identity not in catalog", ...)."""
    if task not in TASKS:
        raise ProbeError(f"task must be one of {TASKS}, got {task!r}")
    y = np.full(len(identity_ids), -1, dtype=np.int64)
    skipped: Counter = Counter()
    for i, ident in enumerate(identity_ids):
        if ident not in size_mm:
            skipped["identity not in catalog"] += 1
            continue
        if task == "size":
            label = size_binary(size_mm[ident])
            if label is None:
                skipped["size unknown"] += 1
                continue
        else:
            raw = histology.get(ident)
            ds = (dataset_id or {}).get(ident)
            label = histology_binary(raw, ds, class_mapping)
            if label is None:
                skipped[
                    "histology unknown" if raw is None else f"histology {raw!r} not in {class_mapping}"
                ] += 1
                continue
        y[i] = label
    return y, skipped


def count_by_vocabulary(
    identity_ids: Sequence[str], y: np.ndarray, dataset_id: dict[str, str | None] | None = None
) -> dict[str, dict[str, int]]:
    """Polyps per histology vocabulary (`shards.labels.vocabulary_name` of their dataset) and class:
    {"sun": {"adenoma": 3, "non-adenoma": 2, "left out": 1}, ...}; one polyp counted once."""
    from polyp_ssl.shards.labels import vocabulary_name

    seen: dict[str, int] = {}
    for ident, label in zip(identity_ids, y, strict=True):
        seen.setdefault(str(ident), int(label))
    out: dict[str, Counter] = {}
    names = {1: "adenoma", 0: "non-adenoma"}
    for ident, label in seen.items():
        vocab = vocabulary_name((dataset_id or {}).get(ident))
        out.setdefault(vocab, Counter())[names.get(label, "left out")] += 1
    return {v: dict(sorted(c.items())) for v, c in sorted(out.items())}


def split_by_identity(
    identity_ids: Sequence[str], y: np.ndarray, train_fraction: float = 0.7, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, val) row masks of a split by polyp, stratified by the polyp's label.

    Each class's polyps are shuffled (seeded) and the first round(train_fraction * n) go to
    train; a class of at least two polyps keeps one on each side. All rows of a polyp land on
    the same side. A polyp whose rows disagree on the label is an error."""
    ids = np.asarray(identity_ids, dtype=object).astype(str)
    y = np.asarray(y)
    label_of: dict[str, int] = {}
    for ident, lab in zip(ids, y, strict=True):
        if label_of.setdefault(ident, int(lab)) != int(lab):
            raise ProbeError(f"polyp {ident!r} has rows with different labels")
    rng = np.random.default_rng(seed)
    train_ids: set[str] = set()
    for cls in sorted(set(label_of.values())):
        members = sorted(i for i, lab in label_of.items() if lab == cls)
        rng.shuffle(members)
        k = int(round(train_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        train_ids.update(members[:k])
    train = np.array([i in train_ids for i in ids], dtype=bool)
    return train, ~train


def identity_weights(identity_ids: Sequence[str]) -> np.ndarray:
    """1 / (number of rows of the row's identity)."""
    ids = np.asarray(identity_ids, dtype=object).astype(str)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse.reshape(-1)]


def probe_metrics(y_true: np.ndarray, y_pred: np.ndarray, identity_ids: Sequence[str]) -> dict[str, float]:
    labels = np.unique(np.r_[y_true, y_pred])
    with warnings.catch_warnings():
        # one class on the val side: sklearn's notice is noise here, degenerate_reason flags it
        warnings.simplefilter("ignore", UserWarning)
        return _metrics(y_true, y_pred, identity_ids, labels)


def _metrics(y_true: np.ndarray, y_pred: np.ndarray, identity_ids: Sequence[str], labels: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        "identity_weighted_macro_f1": float(
            f1_score(
                y_true,
                y_pred,
                average="macro",
                labels=labels,
                sample_weight=identity_weights(identity_ids),
                zero_division=0,
            )
        ),
    }


# ------------------------------------------------------------------------------------ model


def build_probe(dim: int, cfg: ProbeConfig):
    """MLP (LayerNorm, Linear to hidden, GELU, Dropout, Linear) or a single Linear; one output
    logit for two classes (BCE), n_classes logits otherwise (cross-entropy)."""
    from torch import nn

    out = 1 if cfg.n_classes == 2 else cfg.n_classes
    if cfg.cls_type == "mlp":
        model = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, cfg.cls_hidden_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.cls_hidden_dim, out),
        )
    else:
        layers = [nn.LayerNorm(dim)] if cfg.cls_use_layer_norm else []
        model = nn.Sequential(*layers, nn.Linear(dim, out))
    if cfg.cls_init == "normal":
        # the reference: only its linear probe honours cls_init (normal std 0.01, zero bias)
        if cfg.cls_type == "linear":
            nn.init.normal_(model[-1].weight, mean=0.0, std=0.01)
            nn.init.zeros_(model[-1].bias)
    elif cfg.cls_init != "default":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                if cfg.cls_init == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def train_probe(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig):
    """Train on CPU; seeded, the shuffling order from a seeded generator. Returns the model and
    the per-epoch mean training loss. Runs on one thread: the model is tiny, and more threads only
    contend (and make results depend on the machine's thread count)."""
    import torch

    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y, cfg)
    finally:
        torch.set_num_threads(threads)


def _train(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig):
    import torch
    from torch import nn

    if x.shape[0] == 0:
        raise ProbeError("no training rows")
    if y.min() < 0 or y.max() >= cfg.n_classes:
        raise ProbeError(f"training labels must be in [0, {cfg.n_classes}), got {y.min()}..{y.max()}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_probe(x.shape[1], cfg)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    if cfg.opt_type == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.opt_lr, weight_decay=cfg.opt_weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.opt_lr, momentum=0.9, weight_decay=cfg.opt_weight_decay
        )
    steps = math.ceil(xt.shape[0] / cfg.batch_size)
    sched = None
    if cfg.lr_sched_type == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.opt_lr, total_steps=steps * cfg.max_epochs
        )
    if cfg.n_classes == 2:
        pw = None if cfg.pos_weight is None else torch.tensor(float(cfg.pos_weight))
        loss_fn: nn.Module = nn.BCEWithLogitsLoss(pos_weight=pw)
    else:
        loss_fn = nn.CrossEntropyLoss()
    history = []
    model.train()
    for _ in range(cfg.max_epochs):
        order = torch.randperm(xt.shape[0], generator=gen)
        total = 0.0
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            logits = model(xt[idx])
            if cfg.n_classes == 2:
                loss = loss_fn(logits.squeeze(1), yt[idx].float())
            else:
                loss = loss_fn(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.gradient_clip_val is not None:
                if cfg.gradient_clip_algorithm == "value":
                    nn.utils.clip_grad_value_(model.parameters(), cfg.gradient_clip_val)
                else:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clip_val)
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / xt.shape[0])
    model.eval()
    return model, history


def predict(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    import torch

    with torch.inference_mode():
        logits = model(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    if n_classes == 2:
        return (logits.squeeze(1) > 0).long().numpy()
    return logits.argmax(1).numpy()


@dataclass
class ProbeData:
    """Rows of one side of a probe: vectors, labels (>= 0) and the polyp of each row."""

    x: np.ndarray
    y: np.ndarray
    identity: np.ndarray

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.identity)):
            raise ProbeError(f"{len(self.x)} vectors, {len(self.y)} labels, {len(self.identity)} identities")


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    n_train: int
    n_val: int
    n_train_polyps: int
    n_val_polyps: int
    train_class_counts: dict[int, int]
    val_class_counts: dict[int, int]
    loss_history: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    degenerate: str | None = None  # degenerate_reason: one validation class, or one predicted class
    # the val rows' labels and predictions (for bootstrap intervals); not part of the JSON
    y_true: np.ndarray | None = field(default=None, repr=False)
    y_pred: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("y_true")
        out.pop("y_pred")
        return out


def run_probe(train: ProbeData, val: ProbeData, cfg: ProbeConfig) -> ProbeResult:
    if train.x.shape[1] != val.x.shape[1]:
        raise ProbeError(f"train vectors are {train.x.shape[1]}-d but val vectors are {val.x.shape[1]}-d")
    if len(val.y) == 0:
        raise ProbeError("no validation rows with a label")
    leak = set(map(str, train.identity)) & set(map(str, val.identity))
    if leak:
        raise ProbeError(f"{len(leak)} polyps on both train and val sides (e.g. {sorted(leak)[0]!r})")
    if np.unique(train.y).size < 2:
        raise OneClassError(
            f"training rows hold one class only ({np.unique(train.y).tolist()}); cannot train"
        )
    model, history = train_probe(train.x, train.y, cfg)
    pred = predict(model, val.x, cfg.n_classes)
    return ProbeResult(
        metrics=probe_metrics(val.y, pred, val.identity),
        n_train=len(train.y),
        n_val=len(val.y),
        n_train_polyps=len(set(map(str, train.identity))),
        n_val_polyps=len(set(map(str, val.identity))),
        train_class_counts={
            int(k): int(v) for k, v in zip(*np.unique(train.y, return_counts=True), strict=True)
        },
        val_class_counts={int(k): int(v) for k, v in zip(*np.unique(val.y, return_counts=True), strict=True)},
        loss_history=history,
        config=asdict(cfg),
        degenerate=degenerate_reason(val.y, pred),
        y_true=np.asarray(val.y),
        y_pred=np.asarray(pred),
    )
