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

and how a result reaches its folder (never stale, never half-written):

- `refuse_existing` / `new_stage` / `publish` (eval, probe, count): a command's result files in
  its output folder (which other commands' results may share) are refused when an earlier run
  left them, unless `--overwrite`; the new ones are written complete into a staging folder
  inside it, then renamed in, the result JSON last (the old one is removed first, so a kill
  never pairs an old JSON with new figures);
- `replacing_folder` (report): a whole output folder, written complete beside the old one and
  exchanged with it in one rename (`renameat2(RENAME_EXCHANGE)` where the kernel has it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from polyp_ssl.shards.lock import process_alive

log = logging.getLogger(__name__)

_NAME_OK = re.compile(r"[^A-Za-z0-9_.+-]+")

# Flags that only the seed's histology module has (polypsense.downstream.histology.cli) and flags
# that only its size module has (polypsense.downstream.size.cli); `--n_classes` alone means size,
# the seed's size command being the one without a class mapping.
HISTOLOGY_ONLY_FLAGS = (
    "--class_mapping",
    "--gradient_clip_val",
    "--gradient_clip_algorithm",
    "--videomae_pretrained",
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
    task: str,
    encoder: str,
    splits: Sequence[str],
    protocol: str | None,
    inputs: Mapping[str, Any],
    prefix: str | None = None,
) -> str:
    """`[{prefix}_]{task}_{encoder}_{split+split}_{protocol tag}_{hash of inputs}`; `inputs` holds
    everything else that changes the numbers (embedding files' cache keys, task settings)."""
    parts = [prefix] if prefix else []
    parts += [task, encoder, "+".join(splits) or "all", protocol_tag(protocol), short_hash(dict(inputs))]
    return slug("_".join(slug(p) for p in parts))


def given_flags(argv: Iterable[str]) -> set[str]:
    """The long options named in argv (`--flag value` or `--flag=value`), up to a `--`, in their
    underscore spelling (`--class-mapping` is `--class_mapping`, as the parsers accept both)."""
    out = set()
    for tok in argv:
        if tok == "--":
            break
        if tok.startswith("--"):
            out.add("--" + tok[2:].split("=", 1)[0].replace("-", "_"))
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


# ------------------------------------------------------------------ result files and folders

STAGE_PREFIX = ".polyp-ssl-new-"  # a staging folder of a run writing its results: + pid
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class OutputExists(ValueError):
    """An earlier run's result is where this run would write, and --overwrite was not given."""


def refuse_existing(folder: Path, names: Sequence[str], overwrite: bool) -> None:
    """OutputExists naming the folder, the earlier result and the flag, when one of `names`
    (this command's result files) is already in `folder` and `overwrite` is false."""
    found = [n for n in names if (Path(folder) / n).exists()]
    if found and not overwrite:
        raise OutputExists(
            f"{folder} already holds {found[0]} of an earlier run: pass --overwrite to replace it, "
            "or choose another --out"
        )


def _remove_dead_stages(parent: Path, prefix: str) -> None:
    """Staging folders of killed runs (`{prefix}{pid}`, that pid gone) in `parent`."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(parent):
            tail = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
            if tail.isdigit() and not process_alive(int(tail)) and entry.is_dir(follow_symlinks=False):
                log.info("removing %s, left by a killed run", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)


def new_stage(folder: Path) -> Path:
    """An empty staging folder inside `folder` (same file system: its files are renamed in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(folder, STAGE_PREFIX)
    stage = folder / f"{STAGE_PREFIX}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def publish(stage: Path, folder: Path, result: str) -> Path:
    """Move the complete files of `stage` into `folder`: the old `result` file is removed first,
    the other files (figures) are renamed in next, `result` last (its rename is the commit);
    the staging folder is removed. Returns the result's path."""
    folder = Path(folder)
    (folder / result).unlink(missing_ok=True)
    for entry in sorted(os.listdir(stage)):
        if entry != result:
            os.replace(stage / entry, folder / entry)
    os.replace(stage / result, folder / result)
    shutil.rmtree(stage, ignore_errors=True)
    return folder / result


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one rename (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: Path, dst: Path) -> None:
    """Put the complete folder `new` at `dst`, the old `dst` (if any) then deleted. With an old
    `dst` the two are exchanged in one rename where the kernel can; else the old one is renamed
    aside first (a kill between the two renames leaves both beside `dst`, none at it)."""
    new, dst = Path(new), Path(dst)
    if not dst.exists() or (dst.is_dir() and not any(os.scandir(dst))):
        os.replace(new, dst)  # a rename onto an empty folder replaces it
        return
    if _exchange(new, dst):
        shutil.rmtree(new, ignore_errors=True)  # holds the old output now
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replacing_folder(folder: Path, overwrite: bool, names: Sequence[str]) -> Iterator[Path]:
    """A folder beside `folder` to write a whole output into; on success it replaces `folder`.

    Refused (OutputExists) when `folder` holds one of `names` (an earlier output) and `overwrite`
    is false, or when it holds other files (it is not an earlier output: never replaced)."""
    folder = Path(folder)
    refuse_existing(folder, names, overwrite)
    if folder.is_dir() and any(os.scandir(folder)) and not any((folder / n).exists() for n in names):
        raise OutputExists(
            f"{folder} holds files but no earlier output ({', '.join(names)}): choose a new or empty --out"
        )
    if folder.exists() and not folder.is_dir():
        raise OutputExists(f"{folder} is not a folder: choose another --out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{folder.name}.new-"
    _remove_dead_stages(folder.parent, prefix)
    tmp = folder.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, folder)
