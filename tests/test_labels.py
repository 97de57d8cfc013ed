"""Histology and size label mappings (docs/method.md "Histology", "Size")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyp_ssl.shards.labels import DEFAULT_MAPPING, count_histology, histology_binary, size_binary

# Every vocabulary string of docs/method.md, as the dataset writes it -> expected class.
TABLE = [
    ("realcolon", "AD", 1),
    ("realcolon", "HP", 0),
    ("realcolon", "SSL", 0),
    ("realcolon", "TSA", 0),
    ("realcolon", "NO POLYP", None),
    ("realcolon", "OTHER", None),
    ("sun", "Low-grade adenoma", 1),
    ("sun", "High-grade adenoma", 1),
    ("sun", "Hyperplastic polyp", 0),
    ("sun", "Sessile serrated lesion", 0),
    ("sun", "Traditional serrated adenoma", 0),
    ("polypsize", "Tubular Adenoma", 1),
    ("polypsize", "Tubular Adenoma With High-Grade Dysplasia (HGD)", 1),
    ("polypsize", "Tubulovillous Adenoma", 1),
    ("polypsize", "Hyperplastic Polyp", 0),
    ("polypsize", "Sessile Serrated Lesion (SSL)", 0),
    ("polypsize", "Inflammatory Polyp", 0),
    ("polypsset", "adenomatous", 1),
    ("polypsset", "hyperplastic", 0),
]


@pytest.mark.parametrize(("dataset", "label", "expected"), TABLE)
def test_every_vocabulary_string(dataset, label, expected):
    assert histology_binary(label, dataset) == expected
    assert histology_binary(label) == expected  # without a dataset: every vocabulary together
    assert histology_binary(f"  {label.upper()}  ") == expected
    assert histology_binary(label.lower().replace(" ", "   "), dataset) == expected


def test_default_mapping_is_the_seeds():
    assert DEFAULT_MAPPING == "ad_vs_hp"


@pytest.mark.parametrize(
    "label", ["", "adenoma", "polyp", "carcinoma", "AD HP", "Tubular", None, float("nan")]
)
def test_unknown_labels_are_none(label):
    assert histology_binary(label) is None


def test_dataset_restricts_vocabulary():
    # "AD" is a REAL-Colon code; PolypsSet writes "adenomatous"
    assert histology_binary("AD", "polypsset") is None
    assert histology_binary("adenomatous", "realcolon") is None
    assert histology_binary("AD", "REAL-Colon") == 1
    assert histology_binary("AD", "rc27-site") == 1  # an unknown dataset id falls back to all vocabularies


def test_strict_mapping_keeps_only_hyperplastic_as_negative():
    strict = {label: histology_binary(label, ds, mapping="ad_vs_hp_strict") for ds, label, _ in TABLE}
    assert strict["HP"] == 0 and strict["Hyperplastic polyp"] == 0 and strict["hyperplastic"] == 0
    assert strict["SSL"] is None and strict["Inflammatory Polyp"] is None and strict["TSA"] is None
    assert strict["AD"] == 1 and strict["Tubulovillous Adenoma"] == 1
    with pytest.raises(ValueError, match="unknown histology mapping"):
        histology_binary("AD", mapping="nope")


def test_non_string_label_is_an_error():
    with pytest.raises(TypeError):
        histology_binary(3)  # type: ignore[arg-type]


def test_count_histology_reports_left_out():
    labels = ["AD", "HP", "OTHER", None, "weird", "AD"]
    ys, left_out = count_histology(labels, ["realcolon"] * 6)
    assert ys == [1, 0, None, None, None, 1]
    assert left_out == {"OTHER": 1, "<missing>": 1, "weird": 1}
    assert sum(left_out.values()) == sum(y is None for y in ys)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 0),
        (1.0, 0),
        (5, 0),
        (5.0, 0),
        (5.0001, 1),
        (6, 1),
        (25.5, 1),
        (np.float32(4.9), 0),
        (np.int64(7), 1),
        (None, None),
        (float("nan"), None),
        (np.float64("nan"), None),
    ],
)
def test_size_binary(size, expected):
    assert size_binary(size) == expected


@pytest.mark.parametrize("bad", [-1.0, math.inf, "5"])
def test_size_binary_rejects_bad_sizes(bad):
    with pytest.raises((ValueError, TypeError)):
        size_binary(bad)
