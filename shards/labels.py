"""Histology and size labels for the probes, defined once (docs/method.md "Histology" and "Size").

Each dataset names histology its own way; `histology_binary` maps every known name to
1 (adenoma), 0 (non-adenoma) or None (unknown or excluded). Matching ignores case and runs of
whitespace. Callers leave None labels out of a task and count them (`count_histology`).
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from collections.abc import Iterable

ADENOMA = 1
NON_ADENOMA = 0

# dataset -> {label as the dataset writes it: class}; None = known label, excluded from the task.
VOCABULARIES: dict[str, dict[str, int | None]] = {
    "realcolon": {
        "AD": ADENOMA,
        "HP": NON_ADENOMA,
        "SSL": NON_ADENOMA,
        "TSA": NON_ADENOMA,
        "NO POLYP": None,
        "OTHER": None,
    },
    "sun": {
        "Low-grade adenoma": ADENOMA,
        "High-grade adenoma": ADENOMA,
        "Hyperplastic polyp": NON_ADENOMA,
        "Sessile serrated lesion": NON_ADENOMA,
        "Traditional serrated adenoma": NON_ADENOMA,
    },
    "polypsize": {
        "Tubular Adenoma": ADENOMA,
        "Tubular Adenoma With High-Grade Dysplasia (HGD)": ADENOMA,
        "Tubulovillous Adenoma": ADENOMA,
        "Hyperplastic Polyp": NON_ADENOMA,
        "Sessile Serrated Lesion (SSL)": NON_ADENOMA,
        "Inflammatory Polyp": NON_ADENOMA,
    },
    "polypsset": {
        "adenomatous": ADENOMA,
        "hyperplastic": NON_ADENOMA,
    },
}

# Spellings of dataset ids that select one vocabulary (compared after `_norm_dataset`).
DATASET_ALIASES: dict[str, str] = {
    "realcolon": "realcolon",
    "rc": "realcolon",
    "sun": "sun",
    "sundatabase": "sun",
    "polypsize": "polypsize",
    "polypsset": "polypsset",
}

# Named mappings (the reference code's --class_mapping). Each turns the class of the vocabulary
# into the task label; labels not listed map to None.
#   ad_vs_hp         docs/method.md: adenoma (1) vs every non-adenoma (0). The default.
#   ad_vs_hp_strict  adenoma (1) vs hyperplastic only (0); serrated and inflammatory lesions excluded.
_HYPERPLASTIC = {"hp", "hyperplastic polyp", "hyperplastic"}
DEFAULT_MAPPING = "ad_vs_hp"
MAPPINGS = ("ad_vs_hp", "ad_vs_hp_strict")

_WS = re.compile(r"\s+")


def normalize_label(label: str) -> str:
    return _WS.sub(" ", label.strip()).casefold()


def _norm_dataset(dataset: str) -> str:
    return re.sub(r"[^a-z0-9]", "", dataset.casefold())


_NORMALIZED: dict[str, dict[str, int | None]] = {
    ds: {normalize_label(k): v for k, v in vocab.items()} for ds, vocab in VOCABULARIES.items()
}
_ALL: dict[str, int | None] = {}
for _vocab in _NORMALIZED.values():
    for _k, _v in _vocab.items():
        if _k in _ALL and _ALL[_k] != _v:  # pragma: no cover - guards edits of the tables above
            raise AssertionError(f"histology label {_k!r} maps differently in two datasets")
        _ALL[_k] = _v


def vocabulary_name(dataset: str | None) -> str:
    """The vocabulary a dataset id selects ("realcolon", "sun", ...), "all" for None or an id that
    names no known dataset (its labels are looked up in every vocabulary)."""
    return DATASET_ALIASES.get(_norm_dataset(dataset), "all") if dataset is not None else "all"


def vocabulary_for(dataset: str | None) -> dict[str, int | None]:
    """The normalised vocabulary of `dataset`; every dataset's together for None or an id that
    names no known dataset (dataset ids of user data vary: "rc27", "mysite", ...)."""
    if dataset is None:
        return _ALL
    name = DATASET_ALIASES.get(_norm_dataset(dataset))
    return _NORMALIZED[name] if name else _ALL


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(value)


def histology_binary(
    label: str | None, dataset: str | None = None, mapping: str = DEFAULT_MAPPING
) -> int | None:
    """1 adenoma, 0 non-adenoma, None unknown or excluded by `mapping`."""
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown histology mapping {mapping!r}; known: {', '.join(MAPPINGS)}")
    if _is_missing(label):
        return None
    if not isinstance(label, str):
        raise TypeError(f"histology label must be a string, got {type(label).__name__}: {label!r}")
    key = normalize_label(label)
    cls = vocabulary_for(dataset).get(key)
    if cls is None:
        return None
    if mapping == "ad_vs_hp_strict" and cls == NON_ADENOMA and key not in _HYPERPLASTIC:
        return None
    return cls


def count_histology(
    labels: Iterable[str | None],
    datasets: Iterable[str | None] | None = None,
    mapping: str = DEFAULT_MAPPING,
) -> tuple[list[int | None], Counter]:
    """Map many labels; also count the ones that map to None, by original label ("<missing>"
    for null), so a caller can report what it left out."""
    labels = list(labels)
    datasets = [None] * len(labels) if datasets is None else list(datasets)
    if len(datasets) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(datasets)} datasets")
    out: list[int | None] = []
    left_out: Counter = Counter()
    for label, ds in zip(labels, datasets, strict=True):
        y = histology_binary(label, ds, mapping)
        out.append(y)
        if y is None:
            left_out["<missing>" if _is_missing(label) else str(label)] += 1
    return out, left_out


DIMINUTIVE_MAX_MM = 5.0


def size_binary(size_mm: float | int | None) -> int | None:
    """0 diminutive (<= 5 mm), 1 larger, None unknown (None or NaN). A negative size is an error."""
    if _is_missing(size_mm):
        return None
    if isinstance(size_mm, bool) or not isinstance(size_mm, numbers.Real):
        raise TypeError(f"size_mm must be a number, got {type(size_mm).__name__}: {size_mm!r}")
    if math.isinf(float(size_mm)) or size_mm < 0:
        raise ValueError(f"size_mm must be a finite non-negative number of millimetres, got {size_mm!r}")
    return 0 if size_mm <= DIMINUTIVE_MAX_MM else 1
