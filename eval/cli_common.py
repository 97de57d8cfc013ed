"""What the per-task commands (`polyp-ssl eval | probe | count`) share: the encoder flags and
the embeddings they make or read, the checks of their inputs, the output folder and result
JSON, the provenance warnings and the printed table."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval.embeddings import Embeddings, infer_root, read_embeddings, read_metadata
from polyp_ssl.eval.intervals import Interval
from polyp_ssl.eval.task_intervals import CiOptions
from polyp_ssl.shards.remote import display_url, remote_root


class CliError(ValueError):
    pass


def add_encoder_flags(p: argparse.ArgumentParser, fragment_length: int, drop_last: bool = True) -> None:
    from polyp_ssl.eval.embed import (
        DEFAULT_FRAME_BUDGET,
        DEFAULT_MAX_FRAMES,
        DEFAULT_MIN_TRACKLET_FRAMES,
        add_cache_flag,
    )
    from polyp_ssl.eval.reference_flags import ENCODER_CHOICES, POOLING_CHOICES

    g = p.add_argument_group("encoder (when embeddings are computed here)")
    g.add_argument(
        "--encoder_ckpt",
        help="checkpoint; embeddings are computed once and cached (ROOT/embeddings, or the user cache "
        "when the root is read-only: --cache_dir)",
    )
    g.add_argument(
        "--encoder",
        type=encoder_choice_type,
        default=None,
        help="zoo:NAME: a foundation-model baseline from local --weights instead of --encoder_ckpt "
        "(docs/zoo.md); descriptor: the synthetic data's hand-made descriptor",
    )
    g.add_argument("--weights", help="zoo encoders: the locally downloaded weights file or snapshot folder")
    g.add_argument(
        "--encoder_type", choices=ENCODER_CHOICES, help="expected type (sfe, mve, hmve); another is an error"
    )
    g.add_argument("--encoder_pooling", choices=POOLING_CHOICES, default="cls", help="cls or mean")
    g.add_argument("--encoder_out_dim", type=int, help="expected embedding size; another is an error")
    g.add_argument("--data_fragment_length", type=int, default=fragment_length, help="-1 = whole tracklet")
    g.add_argument("--data_fragment_stride", type=int, default=4, help="take every N-th frame of a tracklet")
    g.add_argument(
        "--data_fragment_drop_last",
        action="store_true",
        default=drop_last,
        help="drop a tracklet's short last fragment (else pad it by repeating its last frame)",
    )
    g.add_argument("--data_im_size", type=int, default=None, help="default: the checkpoint's")
    g.add_argument("--data_bbox_scale_factor", type=float, default=None, help="default: the checkpoint's")
    g.add_argument(
        "--data_aug_anchorcrop",
        action="store_true",
        help="the deterministic anchor crop (the reference's meaning); required when an encoder runs: "
        "the root stores crops, not whole frames",
    )
    g.add_argument(
        "--data_aug_normalize", action="store_true", help="accepted: the encoder always normalises"
    )
    g.add_argument(
        "--min_tracklet_frames",
        type=int,
        default=DEFAULT_MIN_TRACKLET_FRAMES,
        help="tracklets with fewer frames are left out (default 30, the paper's protocol)",
    )
    g.add_argument(
        "--max_frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help="cap whole tracklets at this many strided frames (default: no cap, the paper's protocol)",
    )
    g.add_argument(
        "--frame_budget", type=int, default=DEFAULT_FRAME_BUDGET, help="padded frames per embedding batch"
    )
    g.add_argument("--batch_size_embed", type=int, default=32, help="batch size of the embedding run")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (embedding run)")
    g.add_argument("--num_workers", type=int, default=0, help="accepted for compatibility; unused")
    add_cache_flag(g)


def encoder_choice_type(text: str) -> str:
    from polyp_ssl.eval.embed import encoder_choice

    return encoder_choice(text)


def has_encoder(args: argparse.Namespace) -> bool:
    """An encoder to run: --encoder_ckpt, or --encoder zoo:NAME / descriptor."""
    return bool(args.encoder_ckpt or getattr(args, "encoder", None) not in (None, "checkpoint"))


def ensure_file(args: argparse.Namespace, root: str | Path, split: str) -> Path:
    """The embeddings file of (root, split) for args.encoder_ckpt (or --encoder), computed when missing."""
    from polyp_ssl.eval.embed import DESCRIPTOR, EmbedOptions, EncoderChoice, ensure_embeddings

    encoder = getattr(args, "encoder", None) or "checkpoint"
    # the hand-made descriptor reads the stored crops' box regions: no anchor crop to choose
    if not args.data_aug_anchorcrop and DESCRIPTOR not in (str(args.encoder_ckpt), encoder):
        raise CliError(
            "--data_aug_anchorcrop not given: without it the reference code embeds whole frames, but an "
            "ingested root stores only the crop around each box; pass --data_aug_anchorcrop (the "
            "deterministic anchor crop, as in the paper's commands)"
        )
    if args.encoder_type not in (None, "sfe", "mve", "hmve"):
        raise CliError(f"--encoder_type {args.encoder_type}: an encoder polyp-ssl does not build")
    choice = EncoderChoice(
        args.encoder_ckpt,
        encoder=encoder,
        weights=getattr(args, "weights", None),
        encoder_type=args.encoder_type,
    )
    options = EmbedOptions(
        split=split,
        fragment_length=args.data_fragment_length,
        fragment_stride=args.data_fragment_stride,
        im_size=args.data_im_size,
        bbox_scale_factor=args.data_bbox_scale_factor,
        pooling=args.encoder_pooling,
        max_frames=args.max_frames,
        drop_last=args.data_fragment_drop_last,
        min_tracklet_frames=args.min_tracklet_frames,
        batch_size=args.batch_size_embed,
        device=args.device,
        frame_budget=args.frame_budget,
        cache=cache_for(args, root),
    )
    result = ensure_embeddings(root, choice, options)
    print(result.summary())
    return result.path


def cache_for(args: argparse.Namespace, root: str | Path):
    """Where `root`'s embeddings are cached (eval.embed.resolve_cache), said in one line the first
    time a command asks for that root."""
    from polyp_ssl.eval.embed import resolve_cache

    said = vars(args).setdefault("_caches", {})
    key = str(Path(root).resolve())
    if key not in said:
        said[key] = resolve_cache(root, args.cache_dir)
        print(said[key].describe())
    return said[key]


def check_root(root: str | Path) -> Path:
    """`root` as a Path once it holds a catalog (CliError otherwise). A root in an object store
    (shards.remote) is read where it is; readers take its URL back from the Path
    (shards.remote.remote_root)."""
    from polyp_ssl.shards.tables import NoCatalogError, require_catalog

    root = Path(root)
    try:
        require_catalog(root)
    except NoCatalogError as e:  # the one "no catalog" message of every command, exit 2
        raise CliError(str(e)) from None
    return root


def refuse_track_root(root: str | Path | None, what: str) -> None:
    """Before any embedding is made: refuse `what` on a root whose identities are tracker tracks
    (shards.identities; one line, exit 2). A root without a catalog is check_root's to name."""
    if root is None:
        return
    from polyp_ssl.shards.identities import TrackIdentitiesError, require_polyp_identities
    from polyp_ssl.shards.tables import CatalogError

    try:
        require_polyp_identities(check_root(root), what)
    except TrackIdentitiesError:
        raise
    except CatalogError:
        return  # an older or unreadable catalog: the command's own checks name it, as they did


def track_root_refusal(argv: list[str], what: str) -> str | None:
    """The refusal line for a command line whose --dataset_root (either spelling, `=VALUE` or
    the next word) is an ingested root of tracker-track identities; None otherwise (no such
    flag, no catalog: the command itself reports those)."""
    from polyp_ssl.shards.identities import TrackIdentitiesError, require_polyp_identities

    root = None
    for i, word in enumerate(argv):
        name, eq, value = word.partition("=")
        if name in ("--dataset_root", "--dataset-root"):
            root = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    if root is None:
        return None
    try:
        require_polyp_identities(root, what)
    except TrackIdentitiesError as exc:
        return str(exc)
    except Exception:  # any other problem with the root is the command's own to report
        return None
    return None


def load_file(path: str | Path, split: str | None, root: str | Path | None) -> tuple[Embeddings, Path | None]:
    """Read a file, checked against `root` (or the root it lives in / names)."""
    if root is None:
        meta = read_metadata(path) if Path(path).is_file() else {}
        root = infer_root(path, meta)
    emb = read_embeddings(path, split=split, root=root)
    return emb, (Path(root) if root is not None else None)


def default_split(path: str | Path) -> str | None:
    """The split recorded in a file's parameters (None: use every row)."""
    try:
        meta = read_metadata(path)
    except Exception:  # unreadable: read_embeddings will say why
        return None
    return (meta.get("params") or {}).get("split") or meta.get("split")


def output_dir(
    args: argparse.Namespace, root: Path | None, emb_path: str | Path | None, default_name: str
) -> Path:
    """--out as given; else a folder named by what produced the result (eval.outputs.output_name),
    prefixed by --exp_name: two runs that differ in any input never share a folder. --exp_name
    is one plain name (shards.ids), so the folder stays inside `{runs_dir or root}/eval`."""
    if args.out:
        return Path(args.out)
    if args.exp_name:
        from polyp_ssl.shards.ids import path_component

        path_component(args.exp_name, "--exp_name")  # UnsafeIdError (a ValueError): exit 2
    name = f"{args.exp_name}_{default_name}" if args.exp_name else default_name
    if args.runs_dir:
        return Path(args.runs_dir) / "eval" / name
    if root is not None:
        refuse_outputs_in_store(args, root)
        return writable_default(root / "eval" / name)
    return writable_default(Path(emb_path).resolve().parent / "eval" / name)


def refuse_outputs_in_store(args: argparse.Namespace, root: str | Path | None) -> None:
    """CliError (one line, exit 2) when a command's outputs would go into a dataset root in an
    object store (no --out, no --runs_dir): a root in a bucket is read, never written."""
    url = remote_root(root) if root is not None else None
    if url is not None and not getattr(args, "out", None) and not getattr(args, "runs_dir", None):
        raise CliError(
            f"{display_url(url)} is in an object store, where outputs are never written: give --out DIR "
            "or --runs_dir DIR for the outputs"
        )


def writable_default(out: Path) -> Path:
    """The default output folder (in the dataset root, or beside the embeddings file) when it can
    be written; on a read-only mount an error naming --out / --runs_dir (a root is never written)."""
    from polyp_ssl.shards.embeddings_cache import writable_folder

    existing = next((p for p in (out, *out.parents) if p.is_dir()), None)
    if existing is not None and not writable_folder(existing):
        raise CliError(
            f"{existing} is not writable (a read-only dataset root?): give --out DIR or --runs_dir DIR "
            "for the outputs"
        )
    return out


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=jsonable) + "\n")
    os.replace(tmp, path)
    return path


def write_result(out: Path, name: str, obj: Any, overwrite: bool, stage: Path | None = None) -> Path:
    """The result JSON `name` (with the figures already in `stage`) put into `out` complete; an
    earlier run's result there is refused unless --overwrite (eval.outputs)."""
    from polyp_ssl.eval.outputs import new_stage, publish, refuse_existing

    refuse_existing(out, [name], overwrite)
    stage = stage or new_stage(out)
    write_json(stage / name, obj)
    return publish(stage, out, name)


def jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def format_rows(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    out = []
    for k, v in rows:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        out.append(f"  {k:<{width}}  {text}")
    return "\n".join(out)


def protocol_of(emb: Embeddings) -> str:
    """The evaluation protocol that produced an embeddings file (older files: from its parameters)."""
    from polyp_ssl.eval.embed import protocol_string

    if emb.meta.get("protocol"):
        return str(emb.meta["protocol"])
    params = emb.meta.get("params") or {}
    return protocol_string({**params, "min_tracklet_frames": params.get("min_tracklet_frames", 0)})


def check_dim(args: argparse.Namespace, emb: Embeddings) -> None:
    if args.encoder_out_dim is not None and emb.dim != args.encoder_out_dim:
        raise CliError(f"{emb.path}: vectors are {emb.dim}-d but --encoder_out_dim is {args.encoder_out_dim}")


_TRAINING: dict[str, dict[str, Any]] = {}  # checkpoint -> its flat training config, read once


def side_provenance(prog: str, side: str, emb: Embeddings, root: Path | None) -> dict[str, Any]:
    """Where one side's vectors come from (root, split, encoder), its settings that differ from the
    checkpoint's training settings and whether it is the encoder's own training split; the
    differences and the overlap are printed as one warning line each."""
    from polyp_ssl.eval.tasks import side_source

    src = side_source(emb, root, _TRAINING, logging.getLogger("polyp_ssl.eval.cli"))
    for line in src.differ:
        print(f"{prog}: warning: {side}: {line}", file=sys.stderr)
    for o in src.overlap:
        print(
            f"{prog}: warning: {side} split {o} is the split the encoder was trained on "
            f"({emb.meta.get('checkpoint')}); its numbers are not held-out results",
            file=sys.stderr,
        )
    return src.as_dict()


def file_name_inputs(emb: Embeddings) -> dict[str, Any]:
    """What identifies an embeddings file's vectors in an output name."""
    key = emb.meta.get("cache_key") or str(Path(emb.path).resolve())
    return {"key": key, "root": emb.meta.get("dataset_root")}


def with_intervals(
    metrics: dict[str, Any],
    ivs: dict[str, Interval],
    ci: CiOptions,
    rows: list[tuple[str, Any]],
    row_metric: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`metrics` plus {name_ci: [low, high]} for every interval, and the interval settings under
    "ci"; the table row of a metric (named as the metric, or by `row_metric`: row label -> metric)
    gets its interval appended. Nothing changes without intervals (disabled)."""
    from polyp_ssl.eval.intervals import interval_entries

    if not ivs:
        return metrics
    n_units = {iv.n_units for iv in ivs.values()}
    out = {**metrics, **interval_entries(ivs)}
    out["ci"] = {**ci.as_dict(), "n_units": max(n_units)}
    for i, (k, v) in enumerate(rows):
        key = (row_metric or {}).get(k, k)
        if key in ivs and isinstance(v, float):
            rows[i] = (k, f"{v:.4f} [{ivs[key].low:.4f}, {ivs[key].high:.4f}]")
    return out


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())
    return bar


def reference_flags(p: argparse.ArgumentParser, clis: list[str]) -> None:
    from polyp_ssl.eval.reference_flags import TABLES, add_missing_flags, own_flags

    own_flags(p)
    add_missing_flags(p, [TABLES[c] for c in clis])


def apply_reference(p: argparse.ArgumentParser, args: argparse.Namespace, clis: list[str]) -> None:
    """The reference flags' notices and refusals (eval.reference_flags), then their meaning here."""
    from polyp_ssl.eval.reference_flags import TABLES, apply

    stages = getattr(args, "stages", None)
    apply(p, args, [TABLES[c] for c in clis], p.prog)
    if stages and "reid" in clis:
        splits = {"test": "test", "validate": "val"}
        bad = [s for s in stages if s not in splits]
        if bad or len(stages) != 1:
            raise CliError(f"--stages {' '.join(stages)}: give one of test, validate (one run per stage)")
        if args.split and args.split != splits[stages[0]]:
            raise CliError(f"--stages {stages[0]} and --split {args.split} disagree")
        args.split = splits[stages[0]]
    if getattr(args, "encoder_features_source", None) not in (None, "encoder"):
        raise CliError("--encoder_features_source projector: not supported (embeddings are the encoder's)")
    if args.encoder_pooling not in ("cls", "mean"):
        raise CliError(
            f"--encoder_pooling {args.encoder_pooling}: a pooling of the reference's other encoders; "
            "hmve embeds with cls or mean"
        )


def raw_to_ingested(images: str | None, annotations: str | None, flag: str) -> tuple[Path, str] | None:
    """Map the seed's --*_images/--*_annotations to (ingested root, split)."""
    if not annotations and not images:
        return None
    if annotations:
        ann = Path(annotations)
        name = ann.stem
        if not name.startswith("instances_"):
            raise CliError(f"--{flag}_annotations {ann}: expected a file named instances_{{split}}.json")
        split = name[len("instances_") :]
        root = ann.parent.parent
    else:
        raise CliError(f"--{flag}_images needs --{flag}_annotations (the split is read from its name)")
    if not (root / "catalog" / "manifest.json").is_file():
        raise CliError(
            f"--{flag}_annotations {ann} is a raw dataset file; the probe reads ingested roots. Run "
            f"`polyp-ssl ingest {root} --out OUT` first, then pass --dataset_root OUT "
            f"(--train_split/--val_split) or --train_embeddings/--val_embeddings"
        )
    return root, split


def probe_side(args: argparse.Namespace, path: str | None, root: Path | None, split: str | None):
    """(Embeddings, root) of one side: a given file, or embedded here from (root, split)."""
    if path:
        return load_file(path, default_split(path), root)
    if root is None or split is None:
        return None, None
    if not has_encoder(args):
        raise CliError(
            f"embedding split {split!r} of {root} needs --encoder_ckpt (or pass *_embeddings files)"
        )
    f = ensure_file(args, root, split)
    return load_file(f, split, root)


def eval_source(args: argparse.Namespace) -> tuple[Embeddings, Path | None, Path]:
    if args.embeddings:
        root = check_root(args.dataset_root) if args.dataset_root else None
        split = args.split or default_split(args.embeddings)
        emb, root = load_file(args.embeddings, split, root)
        return emb, root, Path(args.embeddings)
    if not (args.dataset_root and has_encoder(args)):
        raise CliError(
            "give --embeddings FILE, or --dataset_root ROOT with --encoder_ckpt CKPT (or --encoder zoo:NAME "
            "--weights PATH)"
        )
    root = check_root(args.dataset_root)
    refuse_outputs_in_store(args, root)  # before anything is embedded
    split = args.split or "test"
    path = ensure_file(args, root, split)
    emb, root = load_file(path, split, root)
    return emb, root, path
