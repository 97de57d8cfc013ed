"""Probes: the split by polyp, the labels, the identity-weighted F1, and training behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from polyp_ssl.eval.probe import (
    ProbeConfig,
    ProbeData,
    ProbeError,
    build_probe,
    identity_weights,
    probe_metrics,
    run_probe,
    split_by_identity,
    task_labels,
)


def rows_per_polyp(n_polyps: int, seed: int, pos_fraction: float = 0.3):
    """Polyp p has 1..6 rows; label 1 for about pos_fraction of the polyps."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_polyps) < pos_fraction).astype(int)
    counts = rng.integers(1, 7, n_polyps)
    ids = np.repeat([f"p{i}" for i in range(n_polyps)], counts)
    y = np.repeat(labels, counts)
    return ids, y


def test_split_by_identity_no_leak_stratified_seeded():
    ids, y = rows_per_polyp(60, seed=0)
    train, val = split_by_identity(ids, y, 0.7, seed=5)
    assert not (train & val).any() and (train | val).all()
    assert not set(ids[train]) & set(ids[val])
    for cls in (0, 1):
        polyps = {i for i, c in zip(ids, y, strict=True) if c == cls}
        in_train = {i for i in polyps if i in set(ids[train])}
        assert len(in_train) == round(0.7 * len(polyps))
    again, _ = split_by_identity(ids, y, 0.7, seed=5)
    other, _ = split_by_identity(ids, y, 0.7, seed=6)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_split_keeps_a_rare_class_on_both_sides():
    ids = np.array(["a", "b", "c", "d", "e", "f"])
    y = np.array([0, 0, 0, 0, 1, 1])
    train, val = split_by_identity(ids, y, 0.7, seed=0)
    assert y[train].tolist().count(1) == 1 and y[val].tolist().count(1) == 1
    with pytest.raises(ProbeError, match="different labels"):
        split_by_identity(np.array(["a", "a"]), np.array([0, 1]))


def test_identity_weighted_f1_equals_direct_computation():
    rng = np.random.default_rng(1)
    ids, y = rows_per_polyp(40, seed=1, pos_fraction=0.5)
    pred = np.where(rng.random(len(y)) < 0.75, y, 1 - y)
    w = np.array([1.0 / np.sum(ids == i) for i in ids])
    f1s = []
    for cls in (0, 1):
        tp = np.sum(w * ((pred == cls) & (y == cls)))
        fp = np.sum(w * ((pred == cls) & (y != cls)))
        fn = np.sum(w * ((pred != cls) & (y == cls)))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    m = probe_metrics(y, pred, ids)
    assert m["identity_weighted_macro_f1"] == pytest.approx(np.mean(f1s), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    np.testing.assert_allclose(identity_weights(ids), w)
    # every polyp weighs 1 in total
    assert identity_weights(ids).sum() == pytest.approx(len(set(ids)))


def test_task_labels_map_and_count_unknown():
    ids = ["a", "b", "c", "d", "e", "zz"]
    size = {"a": 3.0, "b": 5.0, "c": 5.5, "d": None, "e": 12.0}
    hist = {"a": "AD", "b": "HP", "c": "NO POLYP", "d": None, "e": "SSL"}
    ds = dict.fromkeys(size, "realcolon")
    y, skipped = task_labels(ids, "size", size, hist, ds)
    assert y.tolist() == [0, 0, 1, -1, 1, -1]
    assert skipped == {"size unknown": 1, "identity not in catalog": 1}
    y, skipped = task_labels(ids, "histology", size, hist, ds)
    assert y.tolist() == [1, 0, -1, -1, 0, -1]
    assert skipped["histology unknown"] == 1 and skipped["identity not in catalog"] == 1
    assert sum(skipped.values()) == 3


def separable(n_polyps: int, rows: int, dim: int, seed: int, shift: float = 2.0):
    """Polyps of class 1 sit `shift` away along one axis: a probe should learn that."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_polyps) % 2
    ids = np.repeat([f"p{i}" for i in range(n_polyps)], rows)
    y = np.repeat(labels, rows)
    centres = rng.normal(size=(n_polyps, dim)) * 0.5
    centres[:, 0] += shift * labels
    x = (np.repeat(centres, rows, axis=0) + 0.3 * rng.normal(size=(len(y), dim))).astype(np.float32)
    return x, y, ids


@pytest.mark.parametrize("cls_type,opt,sched", [("mlp", "adamw", "onecycle"), ("linear", "sgd", "none")])
def test_probe_learns_separable_and_stays_at_chance_on_shuffled_labels(cls_type, opt, sched):
    x, y, ids = separable(80, 4, 16, seed=0, shift=3.0)
    train, val = split_by_identity(ids, y, 0.7, seed=0)
    cfg = ProbeConfig(
        cls_type=cls_type,
        opt_type=opt,
        lr_sched_type=sched,
        opt_lr=3e-3,
        max_epochs=30,
        batch_size=32,
        seed=0,
    )
    res = run_probe(ProbeData(x[train], y[train], ids[train]), ProbeData(x[val], y[val], ids[val]), cfg)
    assert res.metrics["accuracy"] > 0.95
    assert res.loss_history[-1] < res.loss_history[0]
    # labels shuffled by polyp: nothing to learn
    perm = np.random.default_rng(1).permutation(80)
    y_shuf = np.repeat((np.arange(80) % 2)[perm], 4)
    train, val = split_by_identity(ids, y_shuf, 0.7, seed=0)
    res = run_probe(
        ProbeData(x[train], y_shuf[train], ids[train]), ProbeData(x[val], y_shuf[val], ids[val]), cfg
    )
    assert 0.2 < res.metrics["balanced_accuracy"] < 0.8


def test_probe_is_seeded_and_supports_multiclass():
    x, y, ids = separable(30, 3, 8, seed=2)
    y3 = np.repeat(np.arange(30) % 3, 3)
    x = x + np.repeat(np.eye(8)[np.arange(30) % 3] * 4, 3, axis=0).astype(np.float32)
    train, val = split_by_identity(ids, y3, 0.7, seed=0)
    cfg = ProbeConfig(n_classes=3, max_epochs=20, opt_lr=3e-3, seed=7)
    a = run_probe(ProbeData(x[train], y3[train], ids[train]), ProbeData(x[val], y3[val], ids[val]), cfg)
    b = run_probe(ProbeData(x[train], y3[train], ids[train]), ProbeData(x[val], y3[val], ids[val]), cfg)
    assert a.loss_history == b.loss_history and a.metrics == b.metrics
    assert a.metrics["accuracy"] > 0.9


def test_probe_architecture_and_bad_inputs():
    import torch

    mlp = build_probe(12, ProbeConfig(cls_hidden_dim=256))
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["LayerNorm", "Linear", "GELU", "Dropout", "Linear"]
    assert mlp[1].out_features == 256 and mlp[-1].out_features == 1 and mlp[3].p == 0.1
    zero = build_probe(4, ProbeConfig(cls_type="linear", cls_init="zeros", n_classes=3))
    assert torch.count_nonzero(zero[0].weight) == 0 and zero[0].out_features == 3
    x, y, ids = separable(10, 2, 4, seed=0)
    with pytest.raises(ProbeError, match="4-d"):
        run_probe(
            ProbeData(x, y, ids), ProbeData(np.zeros((2, 5), np.float32), y[:2], ids[:2]), ProbeConfig()
        )
    with pytest.raises(ProbeError, match="both train and val"):
        run_probe(ProbeData(x, y, ids), ProbeData(x[:2], y[:2], ids[:2]), ProbeConfig())
    with pytest.raises(ProbeError, match="opt_type"):
        ProbeConfig(opt_type="adam").validate()
