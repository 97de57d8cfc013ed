"""Loading the tracklet encoder alone, from a Lightning checkpoint or from an exported encoder file.

Accepted files, recognised by their contents (never by their names):

- a Lightning checkpoint of `polyp-ssl train` (`state_dict` with `encoder.*` keys,
  `hyper_parameters.config`);
- a Lightning checkpoint of the NT-SSL reference training (the paper's released model;
  `polyp_ssl.reference_ckpt` maps its hyper-parameters and key names);
- an exported encoder (`export_encoder`, version 2): a safetensors file whose metadata holds
  ``format = "polyp-ssl-encoder"``, ``version = "2"``, ``config_json`` (the run config as JSON) and
  ``source_sha256``, and whose tensors are the encoder's state dict;
- the older exported encoder (version 1): a ``torch.save`` dict of plain values
  ``{"format": "polyp-ssl-encoder", "version": 1, "config_json": ..., "state_dict": {name: tensor}}``.

Torch files are read with ``torch.load(weights_only=True)``: a file that needs pickled Python
objects is refused. Safetensors files hold no code at all.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from polyp_ssl.config import setting_range_problem
from polyp_ssl.encoders import ENCODER_TYPES, EncoderConfig, TrackletEncoder, build_encoder
from polyp_ssl.reference_ckpt import ReferenceCheckpointError, is_reference_checkpoint, read_reference
from polyp_ssl.shards.files import check_regular, open_regular
from polyp_ssl.shards.textio import loads_json
from polyp_ssl.shards.writer import file_sha256, fsync_dir

EXPORT_FORMAT = "polyp-ssl-encoder"
EXPORT_VERSION = 1  # the torch.save format, still read
EXPORT_SAFETENSORS_VERSION = "2"  # what export_encoder writes
ENCODER_PREFIX = "encoder."

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot give a tracklet encoder (bad input: exit 2)."""

    bad_input = True


RUN_LAST_CKPT = Path("checkpoints") / "last.ckpt"  # what a run folder stands for where a file is expected
# what a checkpoint file starts with: a torch zip, a torch pickle (the legacy format), safetensors
# (8-byte header length, then a JSON object)
TORCH_ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"
PARQUET_MAGIC = b"PAR1"
SNIFF_BYTES = 4096  # read to tell text from binary


def resolve_checkpoint_path(spec: str | os.PathLike[str], what: str = "checkpoint") -> Path:
    """The checkpoint file that `spec` names: a file whose contents are a checkpoint's (see
    `check_checkpoint_kind`), or a run folder of `polyp-ssl train`, which stands for its
    checkpoints/last.ckpt (as `report` takes run folders), said in one log line. Anything else
    is a CheckpointError naming the path and what it is (missing, empty, text, Parquet, a folder
    that is not a run). The one resolution of `--encoder_ckpt` for every command."""
    path = Path(spec)
    if path.is_dir():
        last = path / RUN_LAST_CKPT
        if last.is_file():
            log.info("%s is a run folder: using its %s", path, RUN_LAST_CKPT)
            path = last
        elif (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
            raise CheckpointError(
                f"{path}: is a run folder without {RUN_LAST_CKPT} (training has not written a checkpoint "
                "yet); give a checkpoint file of its checkpoints/"
            )
        else:
            raise CheckpointError(
                f"{path}: is a folder, not a {what} file (a run folder of `polyp-ssl train` holds "
                f"{RUN_LAST_CKPT})"
            )
    elif not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: no such file or run folder")
    check_checkpoint_kind(path, what)
    return path


def checkpoint_kind(path: str | os.PathLike[str], what: str = "checkpoint") -> str:
    """What a file is, by its first bytes (never by its name): "torch" (a torch zip or pickle),
    "safetensors", "empty", "parquet", "text" or "binary" (none of these). A FIFO or device is
    refused without being read (shards.files.check_regular)."""
    path = Path(path)
    size = check_regular(path, what).st_size
    if size == 0:
        return "empty"
    with open_regular(path, what) as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith(TORCH_ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return "torch"
    if head[8:9] == b"{":  # a safetensors header (its sizes: check_safetensors_header)
        return "safetensors"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if _looks_like_text(head):
        return "text"
    return "binary"


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 without NUL bytes (a truncated last character allowed)."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and len(head) == SNIFF_BYTES
    return True


def check_checkpoint_kind(path: str | os.PathLike[str], what: str = "checkpoint") -> str:
    """`checkpoint_kind` of a file that must be a checkpoint: "torch" or "safetensors", else one
    CheckpointError naming the file and what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a {what} file")
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: {what} file not found")
    kind = checkpoint_kind(path, what)
    if kind in ("torch", "safetensors"):
        return kind
    problem = {
        "empty": "is empty (0 bytes; a copy or a save that never finished?), not a checkpoint",
        "parquet": "is a Parquet file (embeddings? pass it with --embeddings), not a checkpoint",
        "text": "is text, not a checkpoint" + _text_hint(path),
        "binary": "is not a checkpoint (neither a torch file, zip or pickle, nor safetensors)",
    }[kind]
    raise CheckpointError(f"{path}: {problem}")


def _text_hint(path: Path) -> str:
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return f" (an encoder at initialisation from a run config: init:{path})"
    return ""


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    return file_sha256(path, chunk, "checkpoint")


MAX_CHECKPOINT_BYTES = 16 << 30  # a checkpoint file read whole (a ResNet-50 run with its optimizer: ~0.3 GB)
MAX_ZIP_RECORDS = 100_000  # records of a torch zip file (one per tensor storage, plus a few)
MAX_ENCODER_PARAMS = 1_000_000_000  # what a config may ask for (the paper's encoder: ~27 M)
MIN_BYTES_PER_PARAM = 2  # every weight is stored in the file (bfloat16 at the least)
# what a config with no weights behind it (`init:CONFIG`) may build: 0.8 GB in float32 (the largest
# allow-listed backbone, wide_resnet101_2, is 125 M)
MAX_INIT_PARAMS = 200_000_000
MAX_SAFETENSORS_HEADER = 16 << 20  # an exported encoder's header: a few KiB; a ViT-L's: ~100 KiB
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# settings of a run config, besides the encoder's own, whose size drives memory where a model from a
# file is used (embedding: im_size and the crop; training from it: batch, views, fragments, projector)
MODEL_SIZE_SETTINGS = (
    "im_size",
    "bbox_scale_factor",
    "batch_size",
    "n_views",
    "fragment_length",
    "fragment_stride",
    "eval_n_views",
    "eval_batch_size",
    "eval_fragment_length",
    "val_max_frames",
    "d_proj",
)
# torchvision backbones an encoder may name, with their parameter count (without `fc`) and feature size
BACKBONES = {
    "resnet18": (11_176_512, 512),
    "resnet34": (21_284_672, 512),
    "resnet50": (23_508_032, 2048),
    "resnet101": (42_500_160, 2048),
    "resnet152": (58_143_808, 2048),
    "resnext50_32x4d": (22_979_904, 2048),
    "resnext101_32x8d": (86_742_336, 2048),
    "resnext101_64x4d": (81_406_272, 2048),
    "wide_resnet50_2": (66_834_240, 2048),
    "wide_resnet101_2": (124_837_696, 2048),
}


def check_checkpoint_file(path: Path, what: str = "checkpoint") -> None:
    """The one check of a weights file (a checkpoint, an exported encoder, zoo or backbone weights)
    before torch.load or safetensors reads anything: a file larger than MAX_CHECKPOINT_BYTES is
    refused; a safetensors file's header (`check_safetensors_header`) must describe tensors that lie
    within the file; a torch zip file may not have records that could make it allocate more than
    the file holds: more than MAX_ZIP_RECORDS records, a record whose declared size exceeds the
    file, or records whose sizes add up to more than the file (records that overlap). The zip
    central directory is read with `zipfile`, nothing is extracted. CheckpointError names the
    file and the record."""
    size = check_regular(path, what).st_size  # a FIFO or device (/dev/zero): refused, never read
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, more than the {MAX_CHECKPOINT_BYTES} a {what} may have")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # a safetensors file (a torch zip starts with PK, a torch pickle with 0x80)
        check_safetensors_header(path, size)
        return
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # not a zip: torch.load's own reading (legacy format) or its error
    n_records = _zip_record_count(path, size)
    if n_records > MAX_ZIP_RECORDS:
        raise CheckpointError(f"{path}: a zip of {n_records} records, more than {MAX_ZIP_RECORDS}")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable zip checkpoint ({e})") from e
    total = 0
    for info in infos:
        if info.file_size > size or info.compress_size > size:
            raise CheckpointError(
                f"{path}: record {info.filename[:200]!r} declares {info.file_size} bytes, "
                f"more than the whole {size} byte file"
            )
        total += info.file_size
    if total > size:
        raise CheckpointError(
            f"{path}: its {len(infos)} records declare {total} bytes, more than the {size} byte file "
            "(records that overlap)"
        )


def _zip_record_count(path: Path, size: int) -> int:
    """The record count of a zip's end-of-central-directory record (zip64 when it says 0xFFFF),
    read before `zipfile` builds one object per record; 0 when there is none to read."""
    tail_len = min(size, 22 + 65535)
    with open(path, "rb") as f:
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            return 0
        count = int.from_bytes(tail[at + 10 : at + 12], "little")
        if count != 0xFFFF or at < 20 or tail[at - 20 : at - 16] != b"PK\x06\x07":
            return count
        offset = int.from_bytes(tail[at - 12 : at - 4], "little")  # of the zip64 end record
        if offset + 40 > size:
            return 0
        f.seek(offset)
        record = f.read(40)
    if record[:4] != b"PK\x06\x06":
        return 0
    return int.from_bytes(record[32:40], "little")


def check_safetensors_header(path: Path, size: int) -> None:
    """The header of a safetensors file of `size` bytes, checked before any tensor is read: at most
    MAX_SAFETENSORS_HEADER bytes of JSON, every tensor a known dtype whose shape's bytes equal its
    data_offsets span, each span inside the data, the spans together no larger than the data."""
    with open_regular(path, "checkpoint") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header of {n} bytes (the file has {size}, the limit is "
                f"{MAX_SAFETENSORS_HEADER})"
            )
        text = f.read(n)
    try:
        header = loads_json(text, path)
    except ValueError as e:
        raise CheckpointError(f"{path}: safetensors header is not JSON ({str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data = size - 8 - n
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            total += _tensor_span(path, str(name)[:100], entry, data)
    if total > data:
        raise CheckpointError(
            f"{path}: safetensors tensors declare {total} bytes, more than the {data} bytes of data "
            "(tensors that overlap)"
        )


def _tensor_span(path: Path, name: str, entry: Any, data: int) -> int:
    """Bytes of one safetensors header entry, checked against the `data` bytes of the file."""
    where = f"{path}: safetensors tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: its header entry is not an object")
    shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(type(d) is int and 0 <= d < 1 << 63 for d in shape)
    ):
        raise CheckpointError(f"{where}: field 'shape' is not a list of at most 64 sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data
    ):
        raise CheckpointError(
            f"{where}: field 'data_offsets' {str(offsets)[:60]} is not a span within the {data} bytes of data"
        )
    span = offsets[1] - offsets[0]
    itemsize = SAFETENSORS_DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
    if itemsize is not None:
        count = 1
        for d in sorted(shape):  # a 0 first: no product grows past the data
            count *= d
            if count * itemsize > data:
                break
        if count * itemsize != span:
            raise CheckpointError(
                f"{where}: field 'shape' {str(shape)[:60]} of {dtype} does not fit its {span} byte span"
            )
    return span


def check_model_config(
    config: Any,
    where: str | os.PathLike[str],
    file_size: int | None = None,
    max_params: int = MAX_ENCODER_PARAMS,
) -> EncoderConfig:
    """The one check of a model configuration read from a file (a checkpoint's, an exported
    encoder's, an `init:` config), before anything is built or allocated: a mapping; the encoder
    type and backbone are names of the allow-lists (ENCODER_TYPES, BACKBONES), not lists or tagged
    objects; the sizes that drive memory where the model is used (MODEL_SIZE_SETTINGS such as
    im_size, sfe_d_model, hmve_dropout) within polyp_ssl.config.SETTING_BOUNDS; the encoder's
    estimated parameters (`estimate_encoder_params`) at most `max_params`, and, for weights from a
    file of `file_size` bytes, no more than it can hold at MIN_BYTES_PER_PARAM bytes each.
    CheckpointError: one line naming `where` (the file) and the field."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: its config is a {type(config).__name__}, not a mapping of settings")
    choices = {"encoder_type": ENCODER_TYPES, "sfe_backbone_arch": tuple(sorted(BACKBONES))}
    for name, allowed in choices.items():
        value = config.get(name, getattr(EncoderConfig, name))
        if not isinstance(value, str) or value not in allowed:
            kind = "" if isinstance(value, str) else f" (a {type(value).__name__}, not a name)"
            raise CheckpointError(
                f"{where}: config field {name!r} = {str(value)[:60]!r}{kind}: one of {', '.join(allowed)}"
            )
    for name in ("sfe_d_model", "hmve_dropout", *MODEL_SIZE_SETTINGS):
        problem = setting_range_problem(name, config[name]) if name in config else None
        if problem:
            raise CheckpointError(f"{where}: config field {name!r} = {problem}")
    cfg = EncoderConfig.from_flat(config)
    try:
        n = estimate_encoder_params(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    too_many = n > max_params
    if too_many or (file_size is not None and n * MIN_BYTES_PER_PARAM > file_size):
        held = f"the file ({file_size} bytes) cannot hold them" if file_size is not None else ""
        limit = f"the limit is {max_params}" if too_many else ""
        raise CheckpointError(
            f"{where}: its config asks for an encoder of about {n} parameters ({cfg.encoder_type}, "
            f"{cfg.sfe_backbone_arch}, hmve_d_model {cfg.hmve_d_model}, hmve_n_layers {cfg.hmve_n_layers}, "
            f"hmve_d_feedforward {cfg.hmve_d_feedforward}); " + " and ".join(filter(None, (held, limit)))
        )
    return cfg


def estimate_encoder_params(cfg: EncoderConfig) -> int:
    """Parameters of the encoder `cfg` describes, computed from its settings without building it;
    CheckpointError (naming the field) for an unknown backbone or an encoder type, width, depth or
    head count that is not a positive integer."""
    if cfg.encoder_type not in ENCODER_TYPES:
        raise CheckpointError(
            f"config field 'encoder_type' = {str(cfg.encoder_type)[:60]!r}: one of {ENCODER_TYPES}"
        )
    if cfg.sfe_backbone_arch not in BACKBONES:
        raise CheckpointError(
            f"config field 'sfe_backbone_arch' = {str(cfg.sfe_backbone_arch)[:60]!r}: "
            f"one of {sorted(BACKBONES)}"
        )
    backbone, feat = BACKBONES[cfg.sfe_backbone_arch]
    if cfg.encoder_type == "sfe":
        return backbone
    dims = {}
    for name in ("hmve_d_model", "hmve_n_layers", "hmve_n_heads", "hmve_d_feedforward"):
        v = getattr(cfg, name)
        if type(v) is not int or not 1 <= v <= 1 << 20:
            raise CheckpointError(
                f"config field {name!r} = {str(v)[:40]!r}: an integer in [1, {1 << 20}] is needed"
            )
        dims[name] = v
    d, ff, layers = dims["hmve_d_model"], dims["hmve_d_feedforward"], dims["hmve_n_layers"]
    # attention in/out projections 4 d^2 + 4 d, feed-forward 2 d ff + d + ff, two layer norms 4 d
    per_layer = 4 * d * d + 4 * d + 2 * d * ff + d + ff + 4 * d
    return backbone + feat * d + d + layers * per_layer + (d if cfg.encoder_type == "hmve" else 0)


def check_encoder_fits(path: Path, cfg: EncoderConfig, state: dict[str, Any]) -> None:
    """Before the encoder is built (its config passed `check_model_config`): every tensor of
    `state` compared with the shapes of the same encoder built on the meta device (no memory),
    naming the first key that is missing, unexpected or of another shape."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_encoder(cfg).state_dict().items()}
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config does not describe an encoder ({e})") from e
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{path}: state dict lacks {key!r} (shape {list(shape)}) for its config")
        value = state[key]
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise CheckpointError(f"{path}: state dict entry {key!r} is a {kind}, not a tensor")
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"{path}: state dict entry {key!r} has shape {list(value.shape)}, the config's encoder "
                f"needs {list(shape)}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            f"{path}: state dict has {len(extra)} key(s) the encoder lacks, e.g. {str(extra[0])[:100]!r}"
        )


def _read(path: Path, map_location: Any) -> Any:
    check_checkpoint_kind(path)  # empty, text, Parquet, a folder: named, never handed to torch
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for other formats
        raise CheckpointError(f"{path}: {_torch_load_problem(e)}") from e


def _torch_load_problem(e: Exception) -> str:
    """What a failed weights-only torch.load says about the file, without torch's advice to load it
    with weights_only=False (which would run the code a pickle holds)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, pickle.UnpicklingError):
        detail = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("WeightsUnpickler error")), ""
        )
        return "holds pickled Python objects, which torch.load(weights_only=True) refuses" + (
            f": {detail[:200]}" if detail else ""
        )
    # torch's first sentence says what failed; the rest is advice ("an internal miniz error ...")
    first = lines[0].split(". ", 1)[0][:200] if lines else "no message"
    return f"a torch file that cannot be read ({type(e).__name__}: {first}); truncated or damaged?"


def check_loadable(path: str | os.PathLike[str], training_state: bool = False) -> None:
    """Raise CheckpointError unless `path` loads with ``torch.load(weights_only=True)`` (run before
    handing a checkpoint to anything that might unpickle it). With `training_state`, it must also be
    a Lightning checkpoint a run can continue from (weights, optimizer and loop states)."""
    path = Path(path)
    obj = _read(path, "cpu")
    if training_state:
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: not a training checkpoint (top level is {type(obj).__name__})")
        missing = [k for k in ("state_dict", "global_step", "loops", "optimizer_states") if k not in obj]
        if missing:
            raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")


def read_encoder_state(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[dict, dict]:
    """``(encoder state dict, run config)`` from any file of the module docstring's list."""
    path = Path(path)
    if check_checkpoint_kind(path) == "safetensors":
        return _read_safetensors(path)
    obj = _read(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(obj).__name__}, not a dict)")
    if obj.get("format") == EXPORT_FORMAT:
        if obj.get("version") != EXPORT_VERSION:
            raise CheckpointError(f"{path}: exported encoder version {obj.get('version')!r} is not supported")
        try:
            config = loads_json(obj["config_json"], path)
            state = obj["state_dict"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: exported encoder file is incomplete ({e})") from e
        return state, config
    if is_reference_checkpoint(obj):
        try:
            return read_reference(obj)
        except ReferenceCheckpointError as e:
            raise CheckpointError(f"{path}: NT-SSL reference checkpoint: {e}") from e
    if "state_dict" in obj:
        config = (obj.get("hyper_parameters") or {}).get("config")
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{path}: Lightning checkpoint without hyper_parameters.config: not written by NTSSLModule"
            )
        state = {
            k[len(ENCODER_PREFIX) :]: v for k, v in obj["state_dict"].items() if k.startswith(ENCODER_PREFIX)
        }
        if not state:
            raise CheckpointError(f"{path}: checkpoint has no `encoder.*` weights")
        return state, config
    raise CheckpointError(
        f"{path}: unknown checkpoint format (neither a Lightning checkpoint with `state_dict` nor an "
        f"exported encoder with format={EXPORT_FORMAT!r}); keys: {sorted(map(str, obj))[:8]}"
    )


def load_encoder(
    path: str | os.PathLike[str], map_location: Any = "cpu"
) -> tuple[TrackletEncoder, dict[str, Any]]:
    """The trained tracklet encoder (eval mode) and the run's config. Pretrained backbone weights are
    not resolved again: the checkpoint holds every weight."""
    state, config = read_encoder_state(path, map_location)
    size = Path(path).stat().st_size if Path(path).is_file() else None
    cfg = replace(check_model_config(config, path, size), sfe_backbone_weights=None)
    check_encoder_fits(Path(path), cfg, state)
    try:
        encoder = build_encoder(cfg)
        encoder.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: encoder weights do not fit its config {cfg}: {e}") from e
    encoder.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    encoder.eval()
    return encoder, config


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """An exported encoder (version 2): metadata checked first, tensors read only after."""
    from safetensors import safe_open

    check_checkpoint_file(path)  # the size bound of every checkpoint and the header's tensor spans

    def opened():
        return safe_open(str(path), framework="pt", device="cpu")

    try:
        with opened() as f:
            meta = f.metadata() or {}
    except Exception as e:  # SafetensorError for a malformed header or truncated data
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path}: safetensors file without metadata format={EXPORT_FORMAT!r} (found "
            f"{str(meta.get('format'))[:60]!r}): not an encoder written by `polyp-ssl export`"
        )
    if meta.get("version") != EXPORT_SAFETENSORS_VERSION:
        version = str(meta.get("version"))[:20]
        raise CheckpointError(f"{path}: exported encoder version {version!r} is not supported")
    try:
        config = loads_json(meta["config_json"], path)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: exported encoder metadata field 'config_json' is missing or not JSON ({e})"
        ) from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: exported encoder metadata field 'config_json' is not a JSON object")
    check_model_config(config, path, path.stat().st_size)  # before any tensor is read
    try:
        with opened() as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return state, config


def export_encoder(
    ckpt: str | os.PathLike[str], out_path: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Write the encoder of `ckpt` (any accepted file) to `out_path`: a safetensors file, the run
    config as JSON in its metadata, loadable without Lightning. The file appears complete or not at
    all (temporary file, fsync, rename); an existing `out_path` is an error unless `overwrite`."""
    ckpt, out = Path(ckpt), Path(out_path)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a folder; give the output file name (e.g. encoder.safetensors)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    from safetensors.torch import save

    source_sha256 = sha256_file(ckpt) if ckpt.is_file() else ""
    encoder, config = load_encoder(ckpt, "cpu")  # validates that the weights fit the config
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_SAFETENSORS_VERSION,
        "config_json": json.dumps(config, sort_keys=True),
        "source_sha256": source_sha256,
    }
    data = _canonical_safetensors(save(tensors, metadata=metadata))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            _link_new(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys: the library's
    header order varies between runs, and the same encoder should give the same bytes (the same
    sha256, so embeddings computed from it are found again). Tensor data and offsets are unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _link_new(tmp: Path, out: Path) -> None:
    """Give `tmp` the name `out` unless `out` exists, atomically where hard links work."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)") from None
    except OSError:  # a file system without hard links
        if out.exists():
            raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)") from None
        os.replace(tmp, out)
