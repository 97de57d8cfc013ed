"""What an evaluation output is called and what it says about where its numbers came from.

Pure functions used by `polyp-ssl eval | probe | count` (eval/cli.py) and `report`:

- `output_name`: the folder of one result, named by what produced it (task, encoder = checkpoint
  stem + short hash, splits, protocol) plus a short hash of every input that changes the numbers,
  so two runs that differ in anything never write the same path (unless `--out` is given);
- `infer_probe_task`: the probe task of a command that has no `--task`, from the flags of the
  seed's size and histology commands;
- `setting_mismatches`: the embedding settings that differ from the checkpoint's training
  settings, one line each;
- `training_split_overlap`: whether a split is the one the encoder was trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_NAME_OK = re.compile(r"[^A-Za-z0-9_.+-]+")

# Flags that only the seed's histology module has (polypsense.downstream.histology.cli) and flags
# that only its size module has (polypsense.downstream.size.cli); `--n_classes` alone means size,
# the seed's size command being the one without a class mapping.
HISTOLOGY_ONLY_FLAGS = (
    "--class_mapping", "--gradient_clip_val", "--gradient_clip_algorithm", "--videomae_pretrained"
)
SIZE_ONLY_FLAGS = ("--dataset_type",)
SIZE_HINT_FLAGS = ("--n_classes",)

# (embedding parameter, training setting, flag): compared by `setting_mismatches`
COMPARED_SETTINGS = (
    ("im_size", "im_size", "--data_im_size"),
    ("bbox_scale_factor", "bbox_scale_factor", "--data_bbox_scale_factor"),
    ("fragment_stride", "fragment_stride", "--data_fragment_stride"),
    ("fragment_length", "fragment_length", "--data_fragment_length"),
    ("pooling", "encoder_pooling", "--encoder_pooling"),
)


class TaskInferenceError(ValueError):
    """The probe task cannot be read from the flags given."""


def short_hash(obj: Any, n: int = 8) -> str:
    """The first `n` hex digits of the sha256 of `obj` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def slug(text: str) -> str:
    """A file-name-safe form of `text` (letters, digits, `_ . + -`)."""
    return _NAME_OK.sub("-", str(text)).strip("-.") or "x"


def protocol_tag(protocol: str | None) -> str:
    """`paper` for the paper's protocol, `custom` for any other, `unknown` when not recorded
    (the full protocol string is in the output's JSON; the hash in the name tells them apart)."""
    if not protocol:
        return "unknown"
    return "paper" if str(protocol).startswith("paper") else "custom"


def encoder_label(meta: Mapping[str, Any], path: str | Path) -> str:
    """`{checkpoint stem}-{6 hex of its sha256}` of an embeddings file's metadata; other encoders
    (init, descriptor, zoo) by their kind and identity; a file without metadata by its stem."""
    ident = meta.get("checkpoint_sha256") or meta.get("encoder_identity")
    spec = meta.get("checkpoint")
    kind = meta.get("encoder_kind")
    if spec and kind in (None, "checkpoint") and ident:
        return slug(f"{Path(str(spec)).stem}-{str(ident)[:6]}")
    if kind and ident:
        return slug(f"{kind}-{short_hash(ident, 6)}")
    return slug(Path(path).stem)


def output_name(
    task: str, encoder: str, splits: Sequence[str], protocol: str | None, inputs: Mapping[str, Any],
    prefix: str | None = None,
) -> str:
    """`[{prefix}_]{task}_{encoder}_{split+split}_{protocol tag}_{hash of inputs}`; `inputs` holds
    everything else that changes the numbers (embedding files' cache keys, task settings)."""
    parts = [prefix] if prefix else []
    parts += [task, encoder, "+".join(splits) or "all", protocol_tag(protocol), short_hash(dict(inputs))]
    return slug("_".join(slug(p) for p in parts))


def given_flags(argv: Iterable[str]) -> set[str]:
    """The long options named in argv (`--flag value` or `--flag=value`), up to a `--`."""
    out = set()
    for tok in argv:
        if tok == "--":
            break
        if tok.startswith("--"):
            out.add(tok.split("=", 1)[0])
    return out


def infer_probe_task(argv: Iterable[str]) -> tuple[str, str]:
    """(task, why) for a probe command without `--task`, by the seed's module semantics: a flag of
    the histology module only (`--class_mapping`, `--gradient_clip_*`) means histology; otherwise
    a flag of the size module (`--dataset_type`, `--n_classes`) means size. Both kinds, or
    neither: TaskInferenceError."""
    flags = given_flags(argv)
    hist = sorted(f for f in flags if f in HISTOLOGY_ONLY_FLAGS)
    size_only = sorted(f for f in flags if f in SIZE_ONLY_FLAGS)
    if hist and size_only:
        raise TaskInferenceError(
            f"cannot infer the probe task: {', '.join(hist)} is a flag of the histology probe and "
            f"{', '.join(size_only)} one of the size probe; pass --task size or --task histology"
        )
    if hist:
        return "histology", f"{hist[0]} given (a flag of the seed's histology probe)"
    size = size_only or sorted(f for f in flags if f in SIZE_HINT_FLAGS)
    if size:
        return "size", f"{size[0]} given without --class_mapping (the seed's size probe)"
    raise TaskInferenceError(
        "cannot infer the probe task: pass --task size or --task histology (without --task, "
        "--class_mapping means histology and --n_classes / --dataset_type mean size, as in the seed's "
        "commands)"
    )


def setting_mismatches(params: Mapping[str, Any], training: Mapping[str, Any]) -> list[str]:
    """One line per embedding setting that differs from the checkpoint's training setting, e.g.
    `--data_im_size 232 differs from the checkpoint's im_size 96`. Whole-tracklet embeddings
    (fragment_length -1, the evaluation protocol) are not compared with the training fragment
    length; settings a side does not record are not compared."""
    lines = []
    for pkey, tkey, flag in COMPARED_SETTINGS:
        used, trained = params.get(pkey), training.get(tkey)
        if used is None or trained is None or used in ("none", 0, 0.0):
            continue
        if pkey == "fragment_length" and int(used) < 0:
            continue
        same = float(used) == float(trained) if _is_number(used) and _is_number(trained) else used == trained
        if not same:
            lines.append(
                f"{flag} {_fmt(used)} differs from the checkpoint's {tkey} {_fmt(trained)} "
                "(the encoder was trained with that; results may not be comparable)"
            )
    return lines


def training_split_overlap(
    root: str | Path | None, split: str | None, training: Mapping[str, Any]
) -> str | None:
    """The checkpoint's training split as `ROOT:SPLIT` when (root, split) is it, else None."""
    troot, tsplit = training.get("dataset_root"), training.get("split")
    if root is None or split is None or not troot or not tsplit or str(tsplit) != str(split):
        return None
    try:
        same = Path(str(troot)).resolve() == Path(root).resolve()
    except OSError:
        same = False
    return f"{troot}:{tsplit}" if same else None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
