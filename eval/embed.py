"""`polyp-ssl embed`: run a frozen encoder once over a split, cache the vectors as {name}.parquet.

Three kinds of encoder share one path:
- a training checkpoint (`--encoder_ckpt runs/x/checkpoints/last.ckpt`);
- the same encoder at initialisation, the untrained baseline (`--encoder_ckpt init:SPEC`, SPEC a
  checkpoint, the run's `config.yaml`, or an architecture `hmve-resnet18`; random weights drawn
  with `--init_seed`, never downloaded);
- the synthetic generator's hand-made descriptor (`--encoder descriptor`), a colour/texture
  vector of the box regions of the stored crops (ingest.synth.descriptor);
- a foundation-model baseline from local weights (`--encoder zoo:NAME --weights PATH`, or the one
  string `zoo:NAME=PATH`; eval/zoo.py, docs/zoo.md), with its own preprocessing; its cache identity
  is the weights' sha256, the preprocessing and the zoo version.

The evaluation protocol is the paper's by default: only tracklets of at least
`--min_tracklet_frames` frames (30, before striding) are embedded, and a whole tracklet
(`--data_fragment_length -1`) is every `--data_fragment_stride`-th frame (4) as one sequence, with
no cap. Batches are filled by frame count (`--frame_budget` padded frames), so memory stays bounded
whatever the tracklet lengths; a tracklet longer than the budget is embedded alone, its backbone
run over chunks of `frame_budget` frames (exact: the backbone is per frame, in eval mode). An
explicit `--max_frames N` subsamples longer tracklets to N evenly spaced frames (first and last
kept). The file metadata names the protocol (`protocol`) and counts the tracklets left out or
capped.

A file is reused when it was made from the same inputs: the cache key is the sha256 of the
checkpoint's sha256 (or the init config / descriptor version), the embedding parameters and the
catalog manifest's sha256. The file is cached in ROOT/embeddings when the root is writable, else
(or always, with `--cache_dir DIR` / POLYP_SSL_CACHE) in the root's folder of a user cache
(shards/embeddings_cache.py); an existing file is found in either place, so a read-only root is
never written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from polyp_ssl.eval import embeddings as emb_io
from polyp_ssl.eval.embed_compute import Computed, compute_vectors, resolve_device
from polyp_ssl.eval.embed_params import (
    DEFAULT_BBOX_SCALE,
    DEFAULT_FRAME_BUDGET,
    DEFAULT_IM_SIZE,
    DEFAULT_INIT_SEED,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MIN_TRACKLET_FRAMES,
    DEFAULT_STRIDE,
    DESCRIPTOR,
    EMBED_VERSION,
    INIT_PREFIX,
    ZOO_PREFIX,
    EmbedError,
    EmbedOptions,
    EmbedParams,
    EmbedResult,
    EncoderChoice,
    EncoderSource,
    NoItemsError,
    cache_key,
    default_name,
    protocol_string,
    sanitize_name,
)
from polyp_ssl.eval.embed_read import (
    Item,
    batched_by_frames,
    checked_meta,
    checked_samples,
    decode_rgb,
    frame_plan,
    iter_items,
    split_shards,
    split_tracklet_count,
)
from polyp_ssl.eval.embed_source import (
    build_init_encoder,
    encoder_fields,
    flat_config,
    init_config,
    load_source_encoder,
    resolve_params,
)
from polyp_ssl.eval.embeddings import read_metadata, write_embeddings
from polyp_ssl.shards.cli_help import DefaultsHelpFormatter
from polyp_ssl.shards.cli_parser import FlagParser
from polyp_ssl.shards.embeddings_cache import EmbeddingsCache, embeddings_cache
from polyp_ssl.shards.hashing import file_sha256
from polyp_ssl.shards.ids import UnsafeIdError, path_component
from polyp_ssl.shards.remote import display_url, remote_root

log = logging.getLogger(__name__)


def manifest_sha256(root: str | Path) -> str:
    try:
        return emb_io.manifest_sha256(root)
    except emb_io.EmbeddingsError as e:
        raise EmbedError(str(e)) from e


# ----------------------------------------------------------------------------- the encoder


def resolve_source(
    encoder_ckpt: str | Path | None, encoder: str = "checkpoint", weights: str | Path | None = None
) -> EncoderSource:
    """Identify the encoder without loading weights (the checkpoint is hashed, not unpickled)."""
    if str(encoder).startswith(ZOO_PREFIX) or str(encoder_ckpt).startswith(ZOO_PREFIX):
        return _zoo_source(encoder_ckpt, encoder, weights)
    if weights is not None:
        raise EmbedError("--weights is for zoo encoders (--encoder zoo:NAME); a checkpoint holds its weights")
    if encoder not in ("checkpoint", DESCRIPTOR):
        raise EmbedError(f"--encoder {encoder!r}: choose checkpoint, descriptor or zoo:NAME")
    if encoder == DESCRIPTOR or str(encoder_ckpt) == DESCRIPTOR:
        from polyp_ssl.ingest.synth import descriptor as desc

        version = str(getattr(desc, "DESCRIPTOR_VERSION", "1"))
        return EncoderSource(DESCRIPTOR, DESCRIPTOR, f"descriptor-v{version}", DESCRIPTOR)
    if encoder_ckpt is None:
        raise EmbedError("--encoder_ckpt is required (a checkpoint, init:SPEC, or use --encoder descriptor)")
    spec = str(encoder_ckpt)
    if spec.startswith(INIT_PREFIX):
        config = init_config(spec[len(INIT_PREFIX) :])
        enc = encoder_fields(config)
        ident = hashlib.sha256(json.dumps(enc, sort_keys=True, default=str).encode()).hexdigest()
        arch = enc.get("sfe_backbone_arch", "")
        etype = enc.get("encoder_type", "")
        label = sanitize_name(f"init_{etype}_{arch}".rstrip("_"))
        return EncoderSource("init", spec, f"init-{ident}", label, config)
    from polyp_ssl.checkpoint import CheckpointError, resolve_checkpoint_path

    try:  # a run folder stands for its last.ckpt; empty, text, Parquet, other folders: named here
        path = resolve_checkpoint_path(spec)
    except CheckpointError as e:
        raise EmbedError(f"--encoder_ckpt {e}") from None
    digest = file_sha256(path, what="checkpoint")
    return EncoderSource("checkpoint", str(path), digest, sanitize_name(_ckpt_label(path)))


def _zoo_source(encoder_ckpt, encoder: str, weights) -> EncoderSource:
    """A zoo encoder: `--encoder zoo:NAME --weights PATH` or `zoo:NAME=PATH` (eval.zoo)."""
    from polyp_ssl.eval.zoo import ZooError, resolve_zoo, show_notice

    text = str(encoder) if str(encoder).startswith(ZOO_PREFIX) else str(encoder_ckpt)
    if str(encoder).startswith(ZOO_PREFIX) and encoder_ckpt is not None:
        raise EmbedError(f"--encoder {encoder} and --encoder_ckpt {encoder_ckpt}: give one encoder")
    try:
        src = resolve_zoo(text, weights)
    except ZooError as e:
        raise EmbedError(str(e)) from None
    spec = src.spec
    show_notice(spec)  # once per process, also when the vectors come from the cache
    config = {"im_size": spec.input_size, "zoo": src.metadata()}
    label = sanitize_name(f"zoo_{spec.name}")
    return EncoderSource("zoo", f"{ZOO_PREFIX}{spec.name}={src.weights}", src.identity, label, config)


def _ckpt_label(path: Path) -> str:
    # runs/{exp}/checkpoints/last.ckpt -> {exp}_last
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}_{path.stem}"
    return path.stem


def describe_item(item: Item) -> np.ndarray:
    from polyp_ssl.ingest.synth.descriptor import describe_tracklet

    raw = item.raw or {}
    images = {i: decode_rgb(raw[i], item.meta.crop_sizes[i]) for i in raw}
    boxes = [item.meta.boxes_in_crop[i] for i in item.indices]
    vec = describe_tracklet([images[i] for i in item.indices], boxes)
    return np.asarray(vec, dtype=np.float32).reshape(-1)


# ----------------------------------------------------------------------------- the job


def ensure_embeddings(
    root: str | Path, source: EncoderChoice, options: EmbedOptions | None = None
) -> EmbedResult:
    """The cached embeddings file of `source` over a split of `root`, computed only when no file
    made from the same inputs is cached (`options.cache`, default: the rule for `root` without
    --cache_dir). Phases: check the request, identify the encoder, resolve the parameters, look
    in the cache, compute, write."""
    options = options or EmbedOptions()
    root = remote_root(root) or Path(root)  # a root in an object store stays its URL
    mhash = _check_request(root, options)
    enc = resolve_source(source.ckpt, source.encoder, source.weights)
    options.check()
    params, model, config = _resolve_encoder(root, enc, source, options)
    identity = enc.identity if enc.kind != "init" else f"{enc.identity}-seed{source.init_seed}"
    key = cache_key(identity, params, mhash)
    made = _Made(enc, params, config, identity, key, mhash, source.init_seed)
    out_name = sanitize_name(options.name) if options.name else default_name(enc, params, key)
    cache = options.cache or resolve_cache(root)
    found = find_cached(cache, f"{out_name}.parquet", key)
    if found is not None:
        log.debug("embeddings up to date: %s", found)
        return EmbedResult(found, reused=True)
    path = cache.prepare() / f"{out_name}.parquet"
    if enc.kind == "zoo":
        model, _ = load_source_encoder(enc, source.init_seed, None, params.pooling)
    expected = split_tracklet_count(root, options.split)
    t0 = time.perf_counter()
    done = compute_vectors(root, params, enc, model, options, expected, describe_item)
    elapsed = time.perf_counter() - t0
    mat = _matrix(root, enc, options, done)
    meta = _metadata(root, made, mat, done, elapsed)
    write_embeddings(path, done.columns, mat, meta)
    result = EmbedResult(
        path,
        reused=False,
        n_rows=int(mat.shape[0]),
        dim=int(mat.shape[1]),
        elapsed_s=elapsed,
        protocol=protocol_string(params),
        n_below_min=len(done.below_min),
        min_tracklet_frames=options.min_tracklet_frames,
    )
    log.debug("%s", result.summary())
    return result


def _check_request(root: Any, options: EmbedOptions) -> str:
    """The catalog manifest's sha256, once the root, the split and the file name are usable."""
    check_catalog_version(root)  # a root of an older catalog version: refused, with the re-ingest command
    mhash = manifest_sha256(root)
    split_shards(root, options.split)  # an unknown or empty split fails before any model is built
    if options.name is not None:
        try:
            path_component(options.name, "--name")
        except UnsafeIdError as exc:
            raise EmbedError(str(exc)) from None
    return mhash


def _resolve_encoder(
    root: Any, enc: EncoderSource, source: EncoderChoice, options: EmbedOptions
) -> tuple[EmbedParams, Any, dict[str, Any]]:
    """(parameters, encoder module or None, its config): a checkpoint's or init's encoder is loaded
    here (its data config fills the unset image size and crop scale); a zoo model's parameters
    are known without its weights, so a cached file is reused unloaded."""
    params = options.params()
    if enc.kind == DESCRIPTOR:
        return replace(params, im_size=0, bbox_scale_factor=0.0, pooling="none"), None, {}
    if enc.kind == "zoo":
        if source.encoder_type:
            raise EmbedError(f"--encoder_type {source.encoder_type} is for checkpoints, not {enc.spec}")
        config = {"im_size": enc.config["im_size"]}
        params = resolve_params(params, config, options.im_size, options.bbox_scale_factor)
        if enc.config["zoo"]["frame_pooling"] != "token":  # CNNs: the global average pool
            params = replace(params, pooling=enc.config["zoo"]["frame_pooling"])
        check_crop_scale(root, params.bbox_scale_factor)
        return params, None, {}
    model, config = load_source_encoder(enc, source.init_seed, source.encoder_type, options.pooling)
    params = resolve_params(params, config, options.im_size, options.bbox_scale_factor)
    check_crop_scale(root, params.bbox_scale_factor)
    return params, model, config


def _matrix(root: Any, enc: EncoderSource, options: EmbedOptions, done: Computed) -> np.ndarray:
    """The vectors as one float32 matrix; NoItemsError when the split gave no item."""
    if not done.vectors:
        raise NoItemsError(
            f"{root}: split {options.split!r} gave no items to embed ({len(done.below_min)} tracklets have "
            f"fewer than --min_tracklet_frames {options.min_tracklet_frames} frames; fragment_length "
            f"{options.fragment_length} at stride {options.fragment_stride} is longer than every other "
            "tracklet?)"
        )
    mat = np.concatenate(done.vectors, axis=0).astype(np.float32)
    if not np.isfinite(mat).all():
        raise EmbedError(f"{enc.spec}: the encoder produced non-finite values on split {options.split!r}")
    return mat


@dataclass(frozen=True)
class _Made:
    """What a file is made from: the encoder, the resolved parameters, the encoder's config, its
    identity, the cache key and the catalog manifest's sha256."""

    source: EncoderSource
    params: EmbedParams
    config: dict[str, Any]
    identity: str
    key: str
    mhash: str
    init_seed: int


def _metadata(root: Any, made: _Made, mat: np.ndarray, done: Computed, elapsed: float) -> dict[str, Any]:
    """The file's metadata: the cache key, the encoder, the parameters and protocol, what was left out."""
    source, params, config, identity = made.source, made.params, made.config, made.identity
    key, mhash, init_seed = made.key, made.mhash, made.init_seed
    n_capped, too_short, below_min = done.n_capped, done.too_short, done.below_min
    zoo_meta = source.config.get("zoo") if source.kind == "zoo" else None
    metadata = {
        "cache_key": key,
        "checkpoint": source.spec,
        "checkpoint_sha256": source.identity if source.kind == "checkpoint" else None,
        "encoder_kind": source.kind,
        "encoder_identity": identity,
        "encoder_config": encoder_fields(config) if config and source.kind != "zoo" else None,
        "encoder_zoo": zoo_meta,
        "license_notice": (zoo_meta or {}).get("license_notice"),
        "init_seed": init_seed if source.kind == "init" else None,
        "params": asdict(params),
        "protocol": protocol_string(params),
        "manifest_sha256": mhash,
        "dataset_root": root_text(root),
        "n_rows": int(mat.shape[0]),
        "dim": int(mat.shape[1]),
        "n_tracklets_capped": n_capped,
        "n_tracklets_too_short": len(too_short),
        "n_tracklets_below_min": len(below_min),
        "elapsed_s": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": EMBED_VERSION,
    }
    return metadata


def root_text(root: str | Path) -> str:
    """How a root is recorded: its resolved path, or the URL of a root in an object store (without
    a user name or password)."""
    url = remote_root(root)
    return display_url(url) if url is not None else str(Path(root).resolve())


def embeddings_file(root: str | Path, ckpt: str | Path | None, **settings: Any) -> Path:
    """`ensure_embeddings` with the settings as keywords: those of EncoderChoice (encoder,
    weights, init_seed, encoder_type) and of EmbedOptions (split, fragment_length, ...)."""
    choice_names = {f.name for f in fields(EncoderChoice)}
    choice = EncoderChoice(ckpt, **{k: v for k, v in settings.items() if k in choice_names})
    options = EmbedOptions(**{k: v for k, v in settings.items() if k not in choice_names})
    return ensure_embeddings(root, choice, options).path


def resolve_cache(root: str | Path, cache_dir: str | Path | None = None) -> EmbeddingsCache:
    """Where the embeddings of `root` are cached (shards.embeddings_cache: ROOT/embeddings when
    writable, else the user cache; `cache_dir` always); EmbedError for a root without a catalog."""
    check_catalog_version(root)
    return embeddings_cache(root, cache_dir)


def find_cached(cache: EmbeddingsCache, file_name: str, key: str) -> Path | None:
    """The first file named `file_name` in the cache's folders made from these inputs (`key`)."""
    other = []
    for folder in cache.read_dirs:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            existing = read_metadata(path)
        except Exception:  # unreadable file: recompute it
            existing = {}
        if existing.get("cache_key") == key:
            return path
        other.append(path)
    for path in other:
        log.info("%s was made from other inputs; recomputing", path)
    return None


def check_catalog_version(root: str | Path) -> None:
    """EmbedError when the root has no catalog or one of another version (shards.catalog.read_manifest:
    the message names the manifest and the re-ingest command). Positions and sample layout change
    between versions, so an old root is never embedded as if it were current."""
    from polyp_ssl.shards.tables import CatalogError, read_manifest

    try:
        read_manifest(root)
    except CatalogError as e:
        raise EmbedError(str(e)) from None


def check_crop_scale(root: str | Path, bbox_scale_factor: float) -> None:
    """EmbedError when the anchor crop is wider than the root's stored crops (it would be clamped
    to the stored window without a word)."""
    from polyp_ssl.transforms import check_crop_scale as check

    url = remote_root(root)
    if url is not None:  # the manifest as read from the store
        from polyp_ssl.shards.tables import read_manifest

        params = read_manifest(url).get("parameters")
        crop_scale = params.get("crop_scale") if isinstance(params, dict) else None
        if isinstance(crop_scale, int | float) and bbox_scale_factor > crop_scale + 1e-9:
            raise EmbedError(
                f"--data_bbox_scale_factor {bbox_scale_factor:g} is larger than the crop scale "
                f"{crop_scale:g} that {display_url(url)} was ingested with: pass "
                f"--data_bbox_scale_factor <= {crop_scale:g}"
            )
        return
    try:
        check(bbox_scale_factor, root, flag="--data_bbox_scale_factor")
    except ValueError as e:
        raise EmbedError(str(e)) from e


# ----------------------------------------------------------------------------- CLI


def encoder_choice(text: str) -> str:
    """argparse type of --encoder: checkpoint, descriptor or zoo:NAME (a known zoo entry)."""
    from polyp_ssl.eval.zoo import zoo_names

    if text in ("checkpoint", DESCRIPTOR):
        return text
    if text.startswith(ZOO_PREFIX) and text[len(ZOO_PREFIX) :].partition("=")[0] in zoo_names():
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: choose checkpoint, descriptor or zoo:NAME with NAME one of {', '.join(zoo_names())}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="polyp-ssl embed", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    p.add_argument(
        "--encoder_ckpt",
        help="checkpoint file, or init:SPEC (SPEC = checkpoint, config.yaml or "
        "an architecture like hmve-resnet18) for the encoder at initialisation",
    )
    p.add_argument(
        "--encoder",
        type=encoder_choice,
        default="checkpoint",
        help="checkpoint (--encoder_ckpt), descriptor (the synthetic generator's hand-made descriptor) or "
        "zoo:NAME, a foundation model from local --weights (docs/zoo.md)",
    )
    p.add_argument("--weights", help="zoo encoders: the locally downloaded weights file or snapshot folder")
    p.add_argument(
        "--encoder_type",
        choices=["sfe", "mve", "hmve"],
        help="expected encoder type; a checkpoint of another type is an error",
    )
    p.add_argument("--dataset_root", required=True, help="an ingested root (shards/ and catalog/)")
    p.add_argument("--split", default="test", help="catalog split to embed")
    p.add_argument("--data_fragment_length", type=int, default=-1, help="-1 = whole tracklet")
    p.add_argument(
        "--data_fragment_stride", type=int, default=DEFAULT_STRIDE, help="take every N-th frame of a tracklet"
    )
    p.add_argument(
        "--data_fragment_pad_last",
        action="store_true",
        help="pad the short last fragment by repeating its last frame instead of dropping it",
    )
    p.add_argument("--data_im_size", type=int, default=None, help="default: the checkpoint's im_size")
    p.add_argument(
        "--data_bbox_scale_factor",
        type=float,
        default=None,
        help="default: the checkpoint's bbox_scale_factor",
    )
    p.add_argument(
        "--encoder_pooling",
        choices=["cls", "mean"],
        default="cls",
        help="tracklet embedding: CLS output or mean",
    )
    p.add_argument(
        "--max_frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help="cap: whole tracklets longer than this (after striding) are evenly subsampled (default: no cap, "
        "the paper's protocol)",
    )
    p.add_argument(
        "--min_tracklet_frames",
        type=int,
        default=DEFAULT_MIN_TRACKLET_FRAMES,
        help="tracklets with fewer frames (before striding) are left out (default 30, the paper's protocol)",
    )
    p.add_argument(
        "--frame_budget",
        type=int,
        default=DEFAULT_FRAME_BUDGET,
        help="padded frames per embedding batch (memory bound; longer tracklets run in chunks)",
    )
    p.add_argument(
        "--init_seed",
        type=int,
        default=DEFAULT_INIT_SEED,
        help="seed of an init:SPEC encoder's random weights",
    )
    p.add_argument("--batch_size", type=int, default=32, help="tracklets per embedding batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--name", help="file name of the cached {name}.parquet (default: derived from the inputs)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="also write the embeddings to FILE (a copy of the cached file, written "
        "whole under a temporary name, then renamed)",
    )
    add_cache_flag(p)
    return p


def storage_options_arg(text: str) -> dict[str, Any]:
    """argparse type of --storage_options: the JSON object, which this command's reads of a root
    in an object store then use (shards.remote.use_storage_options)."""
    from polyp_ssl.shards.remote import StorageOptionsError, parse_storage_options, use_storage_options

    try:
        options = parse_storage_options(text)
    except StorageOptionsError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--storage_options: ")) from None
    use_storage_options(options)
    return options


def add_cache_flag(p: argparse.ArgumentParser) -> None:
    """`--cache_dir DIR` and `--storage_options JSON` (every command that embeds)."""
    p.add_argument(
        "--storage_options",
        metavar="JSON",
        type=storage_options_arg,
        default=None,
        help="a --dataset_root in an object store (s3://, gs://, https://): a JSON object of fsspec storage "
        "options beyond the standard environment and config files (AWS_ENDPOINT_URL, AWS_PROFILE, ...)",
    )
    p.add_argument(
        "--cache_dir",
        metavar="DIR",
        default=None,
        help="cache the embeddings under DIR (default: POLYP_SSL_CACHE if set, else ROOT/embeddings when the "
        "root is writable, else $XDG_CACHE_HOME/polyp-ssl or ~/.cache/polyp-ssl; never in an object store); "
        "files already cached in ROOT/embeddings are reused",
    )


def copy_out(src: Path, dst: str | Path) -> Path:
    """Copy an embeddings file to `dst` atomically (a reader never sees half a file)."""
    dst = Path(dst)
    if dst.is_dir():
        raise EmbedError(f"--out {dst} is a folder; give a file name, e.g. {dst / src.name}")
    if dst.resolve() == src.resolve():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def options_from_args(args: argparse.Namespace, cache: EmbeddingsCache) -> tuple[EncoderChoice, EmbedOptions]:
    """The encoder and options of `polyp-ssl embed`'s flags."""
    choice = EncoderChoice(
        args.encoder_ckpt,
        encoder=args.encoder,
        weights=args.weights,
        init_seed=args.init_seed,
        encoder_type=args.encoder_type,
    )
    options = EmbedOptions(
        split=args.split,
        fragment_length=args.data_fragment_length,
        fragment_stride=args.data_fragment_stride,
        im_size=args.data_im_size,
        bbox_scale_factor=args.data_bbox_scale_factor,
        pooling=args.encoder_pooling,
        max_frames=args.max_frames,
        drop_last=not args.data_fragment_pad_last,
        min_tracklet_frames=args.min_tracklet_frames,
        batch_size=args.batch_size,
        device=args.device,
        frame_budget=args.frame_budget,
        name=args.name,
        cache=cache,
    )
    return choice, options


def main(argv: list[str] | None = None) -> int:
    from polyp_ssl.eval.errors import run_cli

    args = build_parser().parse_args(argv)

    def run() -> int:
        cache = resolve_cache(args.dataset_root, args.cache_dir)
        print(cache.describe())
        result = ensure_embeddings(args.dataset_root, *options_from_args(args, cache))
        print(result.summary())
        if args.out:
            print(f"wrote {copy_out(result.path, args.out)}")
        return 0

    return run_cli("polyp-ssl embed", run, (EmbedError,))


_checked_samples = checked_samples  # the name tests use

__all__ = [
    "DEFAULT_BBOX_SCALE",
    "DEFAULT_FRAME_BUDGET",
    "DEFAULT_IM_SIZE",
    "DEFAULT_INIT_SEED",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MIN_TRACKLET_FRAMES",
    "DEFAULT_STRIDE",
    "DESCRIPTOR",
    "EMBED_VERSION",
    "INIT_PREFIX",
    "ZOO_PREFIX",
    "EmbedError",
    "EmbedOptions",
    "EmbedParams",
    "EmbedResult",
    "EncoderChoice",
    "EncoderSource",
    "Item",
    "NoItemsError",
    "add_cache_flag",
    "batched_by_frames",
    "build_init_encoder",
    "checked_meta",
    "checked_samples",
    "decode_rgb",
    "embeddings_file",
    "encoder_fields",
    "ensure_embeddings",
    "flat_config",
    "frame_plan",
    "init_config",
    "iter_items",
    "protocol_string",
    "resolve_cache",
    "resolve_device",
    "resolve_params",
    "resolve_source",
    "sanitize_name",
    "split_shards",
]
