"""Model configurations and weights files from any source are bounded before anything is built or
allocated, and numeric settings are in range before any loop uses them (issue classes 3, 5 and 6).

One check of a model config (polyp_ssl.checkpoint.check_model_config: the backbone allow-list, the
sizes that drive memory such as im_size, the parameter estimate) serves checkpoints, exported
encoders, `init:` configs and the train settings; one check of a weights file
(check_checkpoint_file: size, zip records, safetensors header spans) serves checkpoints, exported
encoders, zoo `--weights` and `--sfe_backbone_weights`; one table of ranges
(polyp_ssl.config.SETTING_BOUNDS) serves `train --config`, the train flags and model configs.

The user-facing cases run the real `polyp-ssl` command: exit 2, one line naming the file and the
field. Bombs are measured in child processes limited to a clean run's peak + 1 GiB
(tests.test_bombs.run_limited)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from polyp_ssl.checkpoint import (
    MAX_INIT_PARAMS,
    CheckpointError,
    check_checkpoint_file,
    export_encoder,
    load_encoder,
)
from polyp_ssl.config import MAX_IM_SIZE
from polyp_ssl.eval.embed import EmbedError, resolve_source
from polyp_ssl.eval.zoo import ZooError, read_tensors
from polyp_ssl.memory import memory_verdict
from polyp_ssl.train_cli import resolve_config
from polyp_ssl.weights import WeightsError, read_state_dict
from tests.bomb_helpers import GIB, bounded, rewrite_config
from tests.embed_factory import make_ckpt
from tests.shard_factory import make_root

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "polyp-ssl"
TRAIN_FLAGS = ["--aug_anchorcrop", "--eval_aug_anchorcrop", "--accelerator", "cpu", "--devices", "1"]
TINY_TRAIN = [
    *TRAIN_FLAGS,
    "--num_workers",
    "0",
    "--batch_size",
    "4",
    "--n_views",
    "2",
    "--fragment_length",
    "2",
    "--im_size",
    "32",
    "--sfe_backbone_arch",
    "resnet18",
    "--hmve_d_model",
    "32",
    "--hmve_d_feedforward",
    "64",
    "--hmve_n_heads",
    "2",
    "--hmve_n_layers",
    "1",
    "--d_proj",
    "16",
    "--max_steps",
    "1",
    "--min_tracklet_length",
    "4",
]


# ---------------------------------------------------------------- factories


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("models") / "enc.pt")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> Path:
    return export_encoder(ckpt, tmp_path_factory.mktemp("export") / "enc.safetensors")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("models_root") / "root", videos={"train": 2, "val": 1})


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """A torchvision resnet18 state dict (random weights), as --sfe_backbone_weights takes."""
    import torchvision

    path = tmp_path_factory.mktemp("backbone") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def rewrite_export(src: Path, dst: Path, **changes) -> Path:
    """A copy of the exported encoder `src` whose metadata config has `changes`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["config_json"] = json.dumps({**json.loads(meta["config_json"]), **changes})
    save_file(tensors, str(dst), metadata=meta)
    return dst


def raw_safetensors(dst: Path, header: dict, data: bytes, declared_len: int | None = None) -> Path:
    """A safetensors file written byte by byte: 8-byte header length, JSON header, data."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    n = len(text) if declared_len is None else declared_len
    dst.write_bytes(n.to_bytes(8, "little") + text + data)
    return dst


def deflated_zeros(n_bytes: int) -> tuple[bytes, int]:
    """A raw deflate stream that inflates to `n_bytes` zeros (a multiple of 64 MiB), and its CRC-32:
    one compressed 64 MiB block repeated (each ends with a full flush, so none refers to another)."""
    chunk = bytes(64 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(n_bytes // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return block * (n_bytes // len(chunk)) + zlib.compressobj(9, zlib.DEFLATED, -15).flush(), crc


def write_zip(dst: Path, entries: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip of (name, payload, method 0 stored / 8 deflated, inflated size, crc) records, sizes in
    zip64 extra fields (a record may inflate past 4 GiB)."""
    out, central = bytearray(), bytearray()
    for name, payload, method, size, crc in entries:
        nm = name.encode()
        extra = struct.pack("<HHQQ", 1, 16, size, len(payload))
        at, big = len(out), 0xFFFFFFFF
        out += struct.pack(
            "<4s5H3I2H", b"PK\x03\x04", 45, 0, method, 0, 33, crc, big, big, len(nm), len(extra)
        )
        out += nm + extra + payload
        central += struct.pack(
            "<4s6H3I5HII",
            b"PK\x01\x02",
            45,
            45,
            0,
            method,
            0,
            33,
            crc,
            big,
            big,
            len(nm),
            len(extra),
            0,
            0,
            0,
            0,
            at,
        )
        central += nm + extra
    n = len(entries)
    out += central + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n, n, len(central), len(out), 0)
    dst.write_bytes(bytes(out))
    return dst


def inflating_torch_file(src: Path, dst: Path, inflated: int = 3 * GIB) -> Path:
    """`src` (a torch zip) rewritten with its largest tensor record deflated from `inflated` zero
    bytes: a valid zip of a few MiB whose record inflates to gigabytes (zipfile reads it back)."""
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        big = max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size).filename
        payload, crc = deflated_zeros(inflated)
        entries = [
            (i.filename, payload, 8, inflated, crc)
            if i.filename == big
            else (i.filename, zf.read(i.filename), 0, i.file_size, i.CRC)
            for i in infos
        ]
    return write_zip(dst, entries)


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """A 3 MiB torch file whose one tensor record inflates to 3 GiB."""
    folder = tmp_path_factory.mktemp("zipbomb")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, folder / "small.pth")
    return inflating_torch_file(folder / "small.pth", folder / "bomb.pth")


def polyp(*args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, check=False
    )


def one_error(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a refused command (exit 2, no traceback); log lines are skipped."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith(("INFO ", "WARNING ", "notice:", "Seed set"))
    ]
    assert len(lines) == 1 and lines[0].startswith(f"polyp-ssl {command}: "), proc.stderr[-3000:]
    return lines[0]


def embed_args(root: Path, *encoder: str) -> list[str]:
    return ["embed", *encoder, "--dataset_root", str(root), "--split", "val", "--device", "cpu"]


# ---------------------------------------------------------------- class 3: model configs


def test_the_tiny_models_load(ckpt, exported):
    for path in (ckpt, exported):
        encoder, config = load_encoder(path)
        assert config["im_size"] == 32 and encoder.out_dim == 32


def test_embed_refuses_a_checkpoint_with_im_size_30000_naming_file_field_and_bound(ckpt, root, tmp_path):
    bad = rewrite_config(ckpt, tmp_path / "huge_im.pt", lambda c, s: c.update(im_size=30000))
    line = one_error(polyp(*embed_args(root, "--encoder_ckpt", str(bad))), "embed")
    assert str(bad) in line and "'im_size' = 30000" in line and f"<= {MAX_IM_SIZE}" in line, line
    assert not (root / "embeddings").exists() or not list((root / "embeddings").glob("*.parquet"))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"im_size": 30000}, "'im_size' = 30000"),
        ({"n_views": 10**6}, "'n_views' = 1000000"),
        ({"fragment_length": 10**9}, "'fragment_length'"),
        ({"d_proj": 1 << 30}, "'d_proj'"),
        ({"bbox_scale_factor": float("inf")}, "'bbox_scale_factor' = inf"),
        ({"hmve_n_layers": 100_000}, "cannot hold them"),
        ({"sfe_backbone_arch": "vit_h_14"}, "'sfe_backbone_arch' = 'vit_h_14'"),
    ],
    ids=["im_size", "n_views", "fragment_length", "d_proj", "crop_scale_inf", "layers", "backbone"],
)
def test_an_exported_encoder_with_an_oversized_config_is_refused_before_its_tensors_are_read(
    exported, tmp_path, changes, field
):
    bad = rewrite_export(exported, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError, match="config field|asks for an encoder") as info:
        load_encoder(bad)
    assert str(bad) in str(info.value) and field in str(info.value), info.value
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_embed_refuses_an_exported_encoder_with_im_size_30000(exported, root, tmp_path):
    bad = rewrite_export(exported, tmp_path / "huge_im.safetensors", im_size=30000)
    line = one_error(polyp(*embed_args(root, "--encoder_ckpt", str(bad))), "embed")
    assert str(bad) in line and "'im_size' = 30000" in line, line


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "encoder_type: hmve\nsfe_backbone_arch: resnet18\nhmve_n_layers: 1000\n",
            f"the limit is {MAX_INIT_PARAMS}",
        ),
        ("encoder_type: hmve\nsfe_backbone_arch: resnet18\nhmve_d_feedforward: 1000000\n", "the limit is"),
        ("sfe_backbone_arch: vit_h_14\n", "'sfe_backbone_arch' = 'vit_h_14'"),
        ("sfe_backbone_arch: resnet18\nim_size: 30000\n", "'im_size' = 30000"),
        ("sfe_backbone_arch: [resnet18, resnet50]\n", "'sfe_backbone_arch'"),
        ("encoder_type: {hmve: 1}\nsfe_backbone_arch: resnet18\n", "'encoder_type'"),
    ],
    ids=["1000_layers", "ff_1e6", "unlisted_backbone", "im_size", "backbone_list", "type_mapping"],
)
def test_an_init_config_asking_for_a_huge_or_unknown_model_is_refused_naming_file_and_field(
    tmp_path, text, message
):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(EmbedError, match=message) as info:
        resolve_source(f"init:{config}")
    assert str(config) in str(info.value) and "\n" not in str(info.value), info.value


def test_an_init_architecture_spec_outside_the_allow_list_is_refused():
    with pytest.raises(EmbedError, match="'sfe_backbone_arch' = 'resnet999'"):
        resolve_source("init:hmve-resnet999")
    assert resolve_source("init:hmve-resnet18").kind == "init"


@pytest.mark.slow
def test_embed_refuses_an_init_config_of_1000_layers_in_one_line(root, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("encoder_type: hmve\nsfe_backbone_arch: resnet50\nhmve_n_layers: 1000\n")
    line = one_error(polyp(*embed_args(root, "--encoder_ckpt", f"init:{config}")), "embed")
    assert str(config) in line and "parameters" in line and str(MAX_INIT_PARAMS) in line, line


def test_train_refuses_a_backbone_outside_the_allow_list_and_a_huge_encoder(root, tmp_path):
    for flags, message in (
        (["--sfe_backbone_arch", "regnet_y_128gf"], "'sfe_backbone_arch' = 'regnet_y_128gf'"),
        (["--hmve_n_layers", "1000", "--hmve_d_model", "4096", "--hmve_n_heads", "8"], "parameters"),
    ):
        argv = ["--dataset_root", str(root), "--runs_dir", str(tmp_path), *TINY_TRAIN, *flags]
        with pytest.raises(ValueError, match=message):
            resolve_config(argv)


# ---------------------------------------------------------------- class 3: weights files


def test_the_inflating_record_is_a_real_zip_of_a_few_mib(zip_bomb):
    assert zip_bomb.stat().st_size < 4 << 20
    info = next(i for i in zipfile.ZipFile(zip_bomb).infolist() if "/data/" in i.filename)
    assert info.file_size == 3 * GIB and info.compress_type == zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(zip_bomb).open(info) as f:  # it really inflates: the first 64 MiB are zeros
        assert f.read(64 << 20) == bytes(64 << 20)


def test_zoo_weights_that_inflate_a_3_gib_record_are_refused_before_torch_load(zip_bomb, monkeypatch):
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ZooError, match=r"record .*data/0.* declares 3221225472 bytes") as info:
        read_tensors(zip_bomb)
    assert str(zip_bomb) in str(info.value) and not loads


@pytest.mark.slow
def test_embed_refuses_a_zoo_weights_zip_bomb_in_one_line(zip_bomb, root):
    args = embed_args(root, "--encoder", "zoo:imagenet-resnet50", "--weights", str(zip_bomb))
    line = one_error(polyp(*args), "embed")
    assert str(zip_bomb) in line and "declares 3221225472 bytes" in line, line


def test_backbone_weights_that_inflate_a_3_gib_record_are_refused_before_torch_load(zip_bomb, monkeypatch):
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(WeightsError, match=r"sfe_backbone_weights: .*declares 3221225472 bytes") as info:
        read_state_dict(zip_bomb)
    assert str(zip_bomb) in str(info.value) and not loads


@pytest.mark.slow
def test_train_refuses_backbone_weights_that_inflate_in_one_line_and_leaves_no_run(zip_bomb, root, tmp_path):
    runs = tmp_path / "runs"
    args = ["train", "--dataset_root", str(root), "--runs_dir", str(runs), "--exp_name", "bomb", *TINY_TRAIN]
    line = one_error(polyp(*args, "--sfe_backbone_weights", str(zip_bomb), cwd=tmp_path), "train")
    assert str(zip_bomb) in line and "declares 3221225472 bytes" in line, line
    assert not (runs / "bomb").exists()


def test_the_other_zip_checks_apply_to_backbone_weights(resnet18_file, tmp_path):
    """Declared sizes beyond the file (test_bombs' patch) and overlapping records, as --encoder_ckpt."""
    from tests.bomb_helpers import patch_record_sizes

    names = zipfile.ZipFile(resnet18_file).namelist()
    big = names.index(next(n for n in names if "/data/" in n))
    bad = patch_record_sizes(resnet18_file, tmp_path / "claims.pth", 0xFFFFFFF0, big)
    with pytest.raises(WeightsError, match="more than the whole"):
        read_state_dict(bad)
    assert read_state_dict(resnet18_file)["conv1.weight"].shape == (64, 3, 7, 7)


F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
SAFETENSORS_CASES = {
    "shape_beyond_span": (
        {"a": {**F32, "shape": [100000, 100000]}},
        16,
        None,
        "does not fit its 16 byte span",
    ),
    "offsets_beyond_data": ({"a": {**F32, "data_offsets": [0, 1 << 40]}}, 16, None, "not a span within"),
    "header_beyond_file": ({"a": F32}, 16, 1 << 40, "safetensors header of 1099511627776 bytes"),
    "overlapping": ({"a": F32, "b": F32, "c": F32}, 16, None, "tensors that overlap"),
    "negative_dim": ({"a": {**F32, "shape": [-1, 4]}}, 16, None, "field 'shape'"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_a_safetensors_header_declaring_sizes_beyond_the_file_is_refused_before_reading(case, tmp_path):
    header, n_data, declared, message = SAFETENSORS_CASES[case]
    path = raw_safetensors(tmp_path / "w.safetensors", header, bytes(n_data), declared)
    with pytest.raises(CheckpointError, match=message) as info:
        check_checkpoint_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(ZooError, match=message):  # zoo --weights
        read_tensors(path)
    with pytest.raises(CheckpointError, match=message):  # an exported encoder
        load_encoder(path)


def test_a_well_formed_safetensors_file_passes_the_header_check(tmp_path, exported):
    path = raw_safetensors(tmp_path / "w.safetensors", {"a": F32, "__metadata__": {"k": "v"}}, bytes(16))
    check_checkpoint_file(path)
    assert read_tensors(path)["a"].shape == (2, 2)
    check_checkpoint_file(exported)


# ---------------------------------------------------------------- class 3: numeric settings


def train_config(tmp_path: Path, root: Path, text: str, *flags: str):
    config = tmp_path / "settings.yaml"
    config.write_text(text)
    argv = ["--config", str(config), "--dataset_root", str(root), "--runs_dir", str(tmp_path), *TRAIN_FLAGS]
    return config, lambda: resolve_config([*argv, *flags])


@pytest.mark.parametrize(
    "value, message",
    [
        ("2.0e+62", r"setting 'batch_size' = 2e\+62: needs a finite number >= 1 and <= 65536"),
        ("2" + "0" * 62, r"setting 'batch_size' = 2e\+62: needs"),
        ("2e62", r"batch_size: invalid int value"),  # YAML 1.1 reads it as a string
        ("65537", r"setting 'batch_size' = 65537: needs"),
    ],
    ids=["float", "integer", "string", "just_above"],
)
def test_batch_size_2e62_in_a_config_file_is_refused_at_once(root, tmp_path, value, message):
    config, resolve = train_config(tmp_path, root, f"batch_size: {value}\nn_views: 2\n")
    started = time.monotonic()
    with pytest.raises(ValueError, match=message) as info:
        resolve()
    assert time.monotonic() - started < 2.0
    assert str(info.value).startswith(f"--config {config}: ")


def test_the_memory_check_answers_at_once_for_any_batch_size():
    """The largest batch that fits is found by bisection: a batch of 2**62 takes microseconds."""
    settings = {
        "sfe_backbone_arch": "resnet50",
        "im_size": 232,
        "batch_size": 2**62,
        "fragment_length": 8,
        "n_views": 5,
    }
    started = time.monotonic()
    verdict = memory_verdict(settings, "cpu", 64 * GIB, "test")
    assert time.monotonic() - started < 1.0
    assert verdict.level == "refuse" and "--batch_size (to " in verdict.message
    fit = int(verdict.message.split("--batch_size (to ")[1].split()[0])
    assert fit % 5 == 0 and fit > 0
    assert memory_verdict({**settings, "batch_size": fit}, "cpu", 64 * GIB, "t").level == "ok"
    assert memory_verdict({**settings, "batch_size": fit + 5}, "cpu", 64 * GIB, "t").level != "ok"


def test_train_refuses_batch_size_2e62_in_one_line_within_seconds(root, tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("batch_size: 2.0e+62\n")
    args = ["train", "--config", str(config), "--dataset_root", str(root), "--runs_dir", str(tmp_path / "r")]
    started = time.monotonic()
    line = one_error(polyp(*args, *TRAIN_FLAGS, timeout=120), "train")
    print(f"train --config batch_size: 2e62 refused in {time.monotonic() - started:.1f} s (with start-up)")
    assert str(config) in line and "'batch_size'" in line and "2e+62" in line, line


@pytest.mark.parametrize(
    "text, setting",
    [
        ("n_views: 100000\n", "n_views"),
        ("num_workers: 100000\n", "num_workers"),
        ("max_epochs: 1.0e+12\n", "max_epochs"),
        ("max_steps: 1.0e+30\n", "max_steps"),
        ("im_size: 30000\n", "im_size"),
        ("loss_temperature: 0\n", "loss_temperature"),
        ("hmve_dropout: 1.5\n", "hmve_dropout"),
        ("loss_milnce_weights: [1.0, .inf]\n", "loss_milnce_weights"),
        ("sampler_ttb_tmax: .nan\n", "sampler_ttb_tmax"),
        ("seed: -1\n", "seed"),
        ("lr: .inf\n", "lr"),
        ("lr: .nan\n", "lr"),
    ],
)
def test_settings_out_of_range_in_a_config_file_name_the_file_and_the_setting(root, tmp_path, text, setting):
    config, resolve = train_config(tmp_path, root, text)
    with pytest.raises(ValueError, match=f"setting '{setting}' = .*: needs a finite number") as info:
        resolve()
    assert str(config) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "inf"], "--lr inf: needs a finite number"),
        (["--lr", "nan"], "--lr nan: needs a finite number"),
        (["--batch_size", "99999999999999999999"], r"--batch_size 1e\+20: needs"),
        (["--im_size", "30000"], f"--im_size 30000: needs a finite number >= 8 and <= {MAX_IM_SIZE}"),
        (["--weight_decay", "-1"], "--weight_decay -1: needs"),
    ],
)
def test_flags_out_of_range_are_refused_naming_the_flag(root, tmp_path, flags, message):
    _, resolve = train_config(tmp_path, root, "{}\n", *flags)
    with pytest.raises(ValueError, match=message):
        resolve()


@pytest.mark.slow
def test_embed_refuses_an_im_size_flag_beyond_the_bound(ckpt, root):
    line = one_error(
        polyp(*embed_args(root, "--encoder_ckpt", str(ckpt), "--data_im_size", "30000")), "embed"
    )
    assert "--data_im_size" in line and str(MAX_IM_SIZE) in line, line


# ---------------------------------------------------------------- class 5 / 6: lr, names, messages


@pytest.mark.slow
@pytest.mark.parametrize("value", ["inf", ".inf", ".nan", "-.inf"])
def test_train_refuses_a_non_finite_lr_in_a_config_file_in_one_line(root, tmp_path, value):
    config = tmp_path / "settings.yaml"
    config.write_text(f"lr: {value}\n")
    if value == "inf":  # YAML reads `inf` as a string: a type error naming the setting
        with pytest.raises(ValueError, match=r"settings.yaml: lr: invalid float value"):
            train_config(tmp_path, root, config.read_text())[1]()
        return
    args = ["train", "--config", str(config), "--dataset_root", str(root), "--runs_dir", str(tmp_path / "r")]
    line = one_error(polyp(*args, *TRAIN_FLAGS, timeout=120), "train")
    assert str(config) in line and "'lr'" in line and "finite" in line, line
    assert not (tmp_path / "r").exists()


def test_a_list_as_backbone_name_in_a_checkpoint_names_the_file_and_the_field(ckpt, tmp_path):
    bad = rewrite_config(ckpt, tmp_path / "list.pt", lambda c, s: c.update(sfe_backbone_arch=["resnet18"]))
    with pytest.raises(
        CheckpointError, match=r"'sfe_backbone_arch' = \"\['resnet18'\]\" \(a list, not a name\)"
    ):
        load_encoder(bad)


@pytest.mark.slow
def test_embed_refuses_a_list_as_backbone_name_in_one_line(ckpt, root, tmp_path):
    bad = rewrite_config(ckpt, tmp_path / "list.pt", lambda c, s: c.update(sfe_backbone_arch=["resnet18"]))
    line = one_error(polyp(*embed_args(root, "--encoder_ckpt", str(bad))), "embed")
    assert str(bad) in line and "'sfe_backbone_arch'" in line and "a list" in line, line


def test_a_list_as_backbone_name_in_train_config_names_the_file_and_the_field(root, tmp_path):
    config, resolve = train_config(tmp_path, root, "sfe_backbone_arch: [resnet18]\n")
    with pytest.raises(ValueError, match="sfe_backbone_arch") as info:
        resolve()
    assert str(config) in str(info.value) and "\n" not in str(info.value)


def test_a_yaml_python_tag_in_train_config_is_refused_naming_the_file(root, tmp_path):
    config, resolve = train_config(
        tmp_path, root, "encoder_type: hmve\nsfe_backbone_arch: !!python/name:os.system\n"
    )
    with pytest.raises(ValueError) as info:
        resolve()
    text = str(info.value)
    assert str(config) in text and "python" in text and "\n" not in text, text


@pytest.mark.slow
@pytest.mark.parametrize("where", ["train", "embed_init"])
def test_a_yaml_python_tag_as_backbone_name_is_one_line_naming_the_file(root, tmp_path, where):
    config = tmp_path / "tagged.yaml"
    config.write_text("encoder_type: hmve\nsfe_backbone_arch: !!python/name:os.system\n")
    if where == "train":
        args = [
            "train",
            "--config",
            str(config),
            "--dataset_root",
            str(root),
            "--runs_dir",
            str(tmp_path / "r"),
        ]
        line = one_error(polyp(*args, *TRAIN_FLAGS, timeout=120), "train")
    else:
        line = one_error(polyp(*embed_args(root, "--encoder_ckpt", f"init:{config}")), "embed")
    assert str(config) in line and "python" in line, line
    assert "sfe_backbone_arch" in line or "line 2" in line, line


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, s: c.update(sfe_backbone_arch="resnet152"), "cannot hold them"),
        (lambda c, s: c.update(encoder_type={"name": "hmve"}), "'encoder_type'"),
        (lambda c, s: c.update(hmve_dropout=float("nan")), "'hmve_dropout' = nan"),
        (lambda c, s: c.update(sfe_d_model="2048"), "'sfe_d_model'"),
    ],
    ids=["another_backbone", "type_mapping", "dropout_nan", "d_model_string"],
)
def test_checkpoint_config_errors_are_one_line_naming_the_file(ckpt, tmp_path, change, message):
    bad = rewrite_config(ckpt, tmp_path / "bad.pt", change)
    with pytest.raises(CheckpointError) as info:
        load_encoder(bad)
    text = str(info.value)
    assert text.startswith(f"{bad}: ") and "\n" not in text, text
    assert message is None or message in text, text


def test_a_checkpoint_config_that_is_not_a_mapping_names_the_file(ckpt, tmp_path):
    obj = torch.load(ckpt, weights_only=True)
    obj["config_json"] = json.dumps(["resnet18"])
    torch.save(obj, tmp_path / "list_config.pt")
    with pytest.raises(CheckpointError, match=r"list_config.pt: its config is a list, not a mapping"):
        load_encoder(tmp_path / "list_config.pt")


# ---------------------------------------------------------------- bombs under a memory limit


LOAD = (
    "from polyp_ssl.checkpoint import CheckpointError, load_encoder\n"
    "try:\n    load_encoder({!r})\nexcept CheckpointError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n"
)
ZOO = (
    "from polyp_ssl.eval.zoo import ZooError, get_spec, load_model\n"
    "try:\n    load_model(get_spec('imagenet-resnet50'), Path({!r}))\n"
    "except ZooError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n"
)
BACKBONE = (
    "from polyp_ssl.encoders import EncoderConfig, build_encoder\n"
    "from polyp_ssl.weights import WeightsError\n"
    "try:\n    build_encoder(EncoderConfig(encoder_type='sfe', sfe_backbone_arch='resnet18',"
    " sfe_backbone_weights={!r}))\n"
    "except WeightsError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n"
)
INIT = (
    "from polyp_ssl.eval.embed import EmbedError, build_init_encoder, resolve_source\n"
    "try:\n    build_init_encoder(resolve_source({!r}).config, 0)\n"
    "except EmbedError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n"
)


def assert_bounded(code: str, clean: str, bomb: str, message: str) -> None:
    rc, err, base, peak = bounded(
        "from pathlib import Path\n" + code.format(clean), "from pathlib import Path\n" + code.format(bomb)
    )
    assert rc == 2 and "MemoryError" not in err and "Traceback" not in err, err[-2000:]
    assert message in err and peak < base + GIB, err[-2000:]


@pytest.mark.slow
def test_a_checkpoint_and_an_export_with_im_size_30000_stay_within_1_gib_of_a_clean_embed(
    ckpt, exported, root, tmp_path
):
    """`polyp-ssl embed` (in-process, in a limited child) refuses both before any frame is cropped."""
    code = (
        "from polyp_ssl.eval.embed import main\n"
        "sys.exit(main(['--encoder_ckpt', {!r}, '--dataset_root', ROOT, '--split', 'val', '--device', 'cpu',"
        " '--name', 'x', '--min_tracklet_frames', '4']))\n"
    ).replace("ROOT", repr(str(root)))
    for clean, bad in (
        (ckpt, rewrite_config(ckpt, tmp_path / "im.pt", lambda c, s: c.update(im_size=30000))),
        (exported, rewrite_export(exported, tmp_path / "im.safetensors", im_size=30000)),
    ):
        assert_bounded(code, str(clean), str(bad), "'im_size' = 30000")


@pytest.mark.slow
def test_zoo_and_backbone_zip_bombs_stay_within_1_gib_of_a_clean_load(zip_bomb, resnet18_file, tmp_path):
    from tests.zoo_factory import torchvision_resnet50_file

    resnet50 = torchvision_resnet50_file(tmp_path / "resnet50.pth")
    assert_bounded(ZOO, str(resnet50), str(zip_bomb), "declares 3221225472 bytes")
    assert_bounded(BACKBONE, str(resnet18_file), str(zip_bomb), "declares 3221225472 bytes")


@pytest.mark.slow
def test_an_init_config_of_1000_layers_stays_within_1_gib_of_a_clean_init(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("encoder_type: hmve\nsfe_backbone_arch: resnet18\nhmve_n_layers: 1000\n")
    assert_bounded(INIT, "init:hmve-resnet18", f"init:{config}", "the limit is")


@pytest.mark.slow
def test_an_export_of_100000_layers_stays_within_1_gib_of_a_clean_load(exported, tmp_path):
    bad = rewrite_export(exported, tmp_path / "layers.safetensors", hmve_n_layers=100_000)
    assert_bounded(LOAD, str(exported), str(bad), "cannot hold them")
