"""Foundation-model baselines from local weights (eval/zoo.py): every entry loads its release's
file format offline, embeds a split with its own preprocessing, and a file of another model is
refused by key name."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from polyp_ssl.eval import zoo
from polyp_ssl.eval.embed import (
    EmbedError,
    EmbedOptions,
    EncoderChoice,
    embeddings_file,
    ensure_embeddings,
    resolve_source,
)
from polyp_ssl.eval.embeddings import read_embeddings, read_metadata
from tests.embed_factory import make_ckpt, make_tiny_root, tracklet_rows
from tests.zoo_factory import TINY_SIZE, WRITERS, dinov2_hf_folder, gastronet_resnet50_file


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every hub download function, and sockets themselves, fail: the zoo must never need them."""

    def refuse(*args, **kwargs):
        raise NetworkUsed("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import huggingface_hub
    import timm.models._builder as timm_builder
    import timm.models._hub as timm_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(timm_hub, "download_cached_file", refuse)
    monkeypatch.setattr(timm_hub, "load_state_dict_from_hf", refuse)
    monkeypatch.setattr(timm_builder, "load_pretrained", refuse)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_tiny_root(tmp_path_factory.mktemp("zoo_root") / "root")


class _Files(dict):
    """name -> a random-weight file in that entry's release format, written on first use."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def __missing__(self, name: str) -> Path:
        self[name] = WRITERS[name](self.folder / f"{name}.pth")
        return self[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return _Files(tmp_path_factory.mktemp("zoo_weights"))


@pytest.fixture(scope="module")
def encoders(files):
    """name -> the zoo encoder loaded from its release-format file, loaded once for the module."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = zoo.make_zoo_encoder(zoo.get_spec(name), files[name])
        return cache[name]

    return get


# ----------------------------------------------------------------------------- every entry


# DINOv2 ViT-B/14 shares ViT-S/14's file format (only sizes differ): its full-size run is slow-only
ENTRIES = [pytest.param(n, marks=pytest.mark.slow) if n == "dinov2-vitb14" else n for n in sorted(WRITERS)]


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_loads_release_format_and_embeds_split(name, root, files, capsys):
    spec = zoo.get_spec(name)
    path = embeddings_file(
        root,
        None,
        encoder=f"zoo:{name}",
        weights=files[name],
        split="test",
        im_size=TINY_SIZE[name],
        progress=False,
    )
    emb = read_embeddings(path, split="test", root=root)
    assert len(emb) == len(tracklet_rows(root, "test"))
    assert emb.dim == spec.dim
    assert np.isfinite(emb.vectors).all() and emb.vectors.std(axis=0).max() > 0
    meta = read_metadata(path)
    assert meta["encoder_kind"] == "zoo"
    z = meta["encoder_zoo"]
    assert z["name"] == name and z["weights_sha256"] == zoo.weights_sha256(files[name], spec)
    assert z["preprocessing"]["mean"] == list(spec.mean) and z["preprocessing"]["std"] == list(spec.std)
    assert meta["license_notice"] == spec.notice
    assert meta["params"]["im_size"] == TINY_SIZE[name]
    assert meta["params"]["pooling"] == ("cls" if spec.family == "vit" else "avg")


def test_hf_snapshot_folder_gives_the_official_files_vectors(tmp_path, encoders):
    """HF Dinov2Model names (split q/k/v, lambda1, layernorm) map onto timm's exactly: the same
    weights as a .pth, a safetensors snapshot and a pytorch_model.bin snapshot embed identically."""
    spec = zoo.get_spec("dinov2-vits14")
    frames = torch.randint(0, 256, (2, 3, 3, 28, 28), dtype=torch.uint8)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with torch.inference_mode():
        a = encoders("dinov2-vits14").embed(frames, mask)
        b = zoo.make_zoo_encoder(spec, dinov2_hf_folder(tmp_path / "snap")).embed(frames, mask)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_hf_snapshot_with_pytorch_model_bin(tmp_path, files):
    spec = zoo.get_spec("dinov2-vits14")
    frames = torch.randint(0, 256, (1, 2, 3, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        a = zoo.make_zoo_encoder(spec, files["dinov2-vits14"]).embed(frames)
        b = zoo.make_zoo_encoder(spec, dinov2_hf_folder(tmp_path / "snap_bin", bin_file=True)).embed(frames)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_hf_snapshot_of_another_size_refused_by_config_field(tmp_path):
    folder = dinov2_hf_folder(tmp_path / "snap")  # ViT-S/14: hidden_size 384
    want = r"config\.json: field 'hidden_size' is 384, zoo:dinov2-vitb14 has 768"
    with pytest.raises(EmbedError, match=want):
        resolve_source(None, "zoo:dinov2-vitb14", folder)


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_preprocessing_of_a_constant_image(name):
    """A constant image becomes (v/255 - mean) / std per channel, at the model's input size
    (EndoViT: its own statistics; the others: ImageNet's)."""
    spec = zoo.get_spec(name)
    assert (spec.mean, spec.std) == (
        (zoo.ENDOVIT_MEAN, zoo.ENDOVIT_STD) if name == "endovit" else (zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)
    )
    v = 200
    x = torch.full((1, 3, 40, 40), v, dtype=torch.uint8)
    out = zoo.preprocess(x, spec)
    assert out.shape == (1, 3, spec.input_size, spec.input_size)
    want = (v / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full_like(out[0, c], float(want[c])), atol=1e-5)


def test_frame_vector_is_cls_of_the_normalised_input(encoders, monkeypatch):
    """DINOv2's frame vector: the CLS token after the final norm of the ImageNet-normalised crop;
    `mean` pooling: the mean of every output token. The tracklet vector: mean over real frames."""
    enc = encoders("dinov2-vits14")
    assert enc.token_pooling == "cls"
    x = torch.full((1, 3, 28, 28), 90, dtype=torch.uint8)
    manual = (torch.full((1, 3, 28, 28), 90 / 255.0) - torch.tensor(zoo.IMAGENET_MEAN).view(1, 3, 1, 1)) / (
        torch.tensor(zoo.IMAGENET_STD).view(1, 3, 1, 1)
    )
    with torch.inference_mode():
        tokens = enc.model.forward_features(manual)
        torch.testing.assert_close(enc.frame_vectors(x), tokens[:, 0], rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(enc, "token_pooling", "mean")
        torch.testing.assert_close(enc.frame_vectors(x), tokens.mean(dim=1), rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(enc, "token_pooling", "cls")
        a = torch.randint(0, 256, (1, 1, 3, 28, 28), dtype=torch.uint8)
        frames = torch.cat([x[None], a, torch.zeros_like(a)], dim=1)  # two real frames, one padded
        mask = torch.tensor([[True, True, False]])
        want = (enc.frame_vectors(x) + enc.frame_vectors(a[0])) / 2
        torch.testing.assert_close(enc.embed(frames, mask), want, rtol=1e-5, atol=1e-5)


def test_default_input_size_is_the_models(files):
    src = resolve_source(f"zoo:endovit={files['endovit']}")
    assert src.kind == "zoo" and src.config["im_size"] == 224


def test_dinov2_position_grid_resampled_from_518(files, encoders):
    """The official file's 37x37 grid is resampled to the 16x16 grid of a 224 px model."""
    assert tuple(torch.load(files["dinov2-vits14"], weights_only=True)["pos_embed"].shape) == (1, 1370, 384)
    assert tuple(encoders("dinov2-vits14").model.pos_embed.shape) == (1, 1 + 16 * 16, 384)


# ----------------------------------------------------------------------------- refusals


def test_file_of_another_model_refused_naming_the_first_missing_key(files):
    want = r"resnet50\.pth: not the dinov2-vits14 weights .*: key 'cls_token' is missing"
    with pytest.raises(zoo.ZooError, match=want):
        zoo.load_model(zoo.get_spec("dinov2-vits14"), files["imagenet-resnet50"])


def test_file_of_another_size_refused_naming_the_tensor(files):
    want = r"not the dinov2-vitb14 weights .*: key 'cls_token' has shape \(1, 1, 384\), the model's is"
    with pytest.raises(zoo.ZooError, match=want):
        zoo.load_model(zoo.get_spec("dinov2-vitb14"), files["dinov2-vits14"])


def test_extra_key_refused_by_name(tmp_path):
    path = tmp_path / "rn50_extra.pth"
    gastronet_resnet50_file(path)
    sd = torch.load(path, weights_only=True)
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(zoo.ZooError, match=r"key 'layer5\.0\.conv1\.weight' is unexpected"):
        zoo.load_model(zoo.get_spec("gastronet-resnet50"), path)


def test_ssl_prefixes_and_containers_are_removed(tmp_path):
    """SSL releases keep the backbone under `module.` / `backbone.`, sometimes inside a
    {"teacher": ...} or {"state_dict": ...} container: mapped to the same keys."""
    import torchvision

    with torch.device("meta"):
        sd = torchvision.models.resnet50(weights=None).state_dict()
    plain = zoo.convert_resnet(dict(sd), tmp_path)
    assert "fc.weight" not in plain and "conv1.weight" in plain
    for wrapped in (
        {"module.backbone." + k: v for k, v in sd.items()},
        {"teacher": {"backbone." + k: v for k, v in sd.items()}},
        {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
    ):
        got = zoo.convert_resnet(wrapped, tmp_path)
        assert got.keys() == plain.keys() and all(got[k] is plain[k] for k in plain)


def test_prefixed_gastronet_file_loads(tmp_path):
    path = gastronet_resnet50_file(tmp_path / "prefixed.pth", prefix="backbone.")
    model = zoo.load_model(zoo.get_spec("gastronet-resnet50"), path)
    assert model.num_features == 2048


class Payload:
    """Stands for any Python object a pickle could construct."""


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(zoo.ZooError, match=r"evil\.pth: not a plain weights file"):
        zoo.load_model(zoo.get_spec("endovit"), path)


def test_missing_weights_and_unknown_name(tmp_path):
    with pytest.raises(EmbedError, match=r"zoo:endovit: needs --weights PATH, the locally downloaded"):
        resolve_source(None, "zoo:endovit", None)
    with pytest.raises(EmbedError, match=r"no such file or folder"):
        resolve_source(None, "zoo:endovit", tmp_path / "absent.pth")
    with pytest.raises(EmbedError, match=r"zoo:dino: unknown zoo encoder \(choose from .*dinov2-vits14"):
        resolve_source("zoo:dino=x.pth")
    with pytest.raises(EmbedError, match=r"--weights is for zoo encoders"):
        resolve_source("descriptor", "descriptor", tmp_path)


def test_cli_refuses_mismatched_file_in_one_line_and_writes_nothing(root, files, capsys):
    from polyp_ssl.eval.embed import main

    before = sorted((root / "embeddings").glob("*")) if (root / "embeddings").is_dir() else []
    rc = main(
        [
            "--dataset_root",
            str(root),
            "--encoder",
            "zoo:gastronet-resnet50",
            "--weights",
            str(files["surgenet-caformer"]),
            "--data_im_size",
            "32",
            "--name",
            "refused",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("polyp-ssl embed: error: ")
    assert "surgenet-caformer.pth: not the gastronet-resnet50 weights" in err[0]
    assert "key 'conv1.weight' is missing" in err[0]
    after = sorted((root / "embeddings").glob("*")) if (root / "embeddings").is_dir() else []
    assert after == before


# ----------------------------------------------------------------------------- notices, cache


def test_license_notice_printed_once(files, capsys, monkeypatch):
    monkeypatch.setattr(zoo, "_NOTICES_SHOWN", set())
    spec = zoo.get_spec("gastronet-resnet50")
    zoo.make_zoo_encoder(spec, files["gastronet-resnet50"])
    zoo.show_notice(spec)
    zoo.show_notice(zoo.get_spec("dinov2-vits14"))  # Apache-2.0: nothing to print
    err = capsys.readouterr().err
    assert err.count("notice: ") == 1 and "CC BY-NC-ND 4.0" in err


def test_cache_reused_for_same_weights_and_recomputed_for_others(root, files, tmp_path, capsys, monkeypatch):
    kw = {"encoder": "zoo:imagenet-resnet50", "split": "val", "im_size": 32, "progress": False}
    first = embeddings_file(root, None, weights=files["imagenet-resnet50"], **kw)
    capsys.readouterr()
    with monkeypatch.context() as m:  # a cached file is reused without loading the weights
        m.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("weights loaded for a cached file"))
        again = ensure_embeddings(
            root,
            EncoderChoice(None, encoder=kw["encoder"], weights=files["imagenet-resnet50"]),
            EmbedOptions(split="val", im_size=32, progress=False),
        )
    assert again.reused and again.path == first
    other = tmp_path / "copy.pth"
    shutil.copyfile(files["imagenet-resnet50"], other)  # same bytes elsewhere: the same file
    assert embeddings_file(root, None, weights=other, **kw) == first
    sd = torch.load(other, weights_only=True)
    sd["conv1.weight"] = sd["conv1.weight"] + 1.0
    torch.save(sd, other)
    changed = embeddings_file(root, None, weights=other, **kw)
    assert changed != first
    assert read_metadata(changed)["cache_key"] != read_metadata(first)["cache_key"]


# ----------------------------------------------------------------------------- commands


def test_eval_command_with_zoo_encoder(root, files, tmp_path):
    from polyp_ssl.eval.cli import eval_main

    rc = eval_main(
        [
            "--task",
            "retrieval",
            "--dataset_root",
            str(root),
            "--encoder",
            "zoo:dinov2-vits14",
            "--weights",
            str(files["dinov2-vits14"]),
            "--data_aug_anchorcrop",
            "--data_im_size",
            "28",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "metrics_retrieval.json").read_text())
    assert m["n_tracklets"] == len(tracklet_rows(root, "test")) and 0 <= m["mAP"] <= 1


def test_report_puts_checkpoint_init_descriptor_and_zoo_rows_in_one_table(root, files, tmp_path):
    import pyarrow.parquet as pq

    from polyp_ssl.eval.report import main

    ckpt = make_ckpt(tmp_path / "tiny.ckpt")
    out = tmp_path / "report"
    baselines = (
        f"init,descriptor,zoo:imagenet-resnet50={files['imagenet-resnet50']},"
        f"zoo:dinov2-vits14={files['dinov2-vits14']}"
    )
    rc = main(
        [
            str(ckpt),
            "--dataset_root",
            str(root),
            "--out",
            str(out),
            "--baselines",
            baselines,
            "--tasks",
            "retrieval,reid",
            "--data_im_size",
            "28",
            "--projection",
            "pca",
            "--gallery_queries",
            "1",
        ]
    )
    assert rc == 0
    text = (out / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "retrieval mAP" not in line]
    labels = [line.split("|")[1].strip() for line in table if not line.startswith("| encoder")]
    for want in ("tiny", "hand-made descriptor", "imagenet-resnet50", "dinov2-vits14"):
        assert any(lab == want for lab in labels), (want, labels)
    assert any(lab.startswith("fresh init (") for lab in labels)  # a loose checkpoint: no init.ckpt
    res = pq.read_table(out / "results.parquet").to_pylist()
    zoo_rows = [r for r in res if r["checkpoint"] == "dinov2-vits14"]
    assert {r["metric"] for r in zoo_rows} >= {"mAP", "AUROC"}
    sha = zoo.weights_sha256(files["dinov2-vits14"], zoo.get_spec("dinov2-vits14"))
    assert zoo_rows[0]["checkpoint_sha256"] == sha
    assert len({r["checkpoint"] for r in res}) == 5


def test_probe_and_count_accept_zoo_encoders(root, files, tmp_path):
    """--encoder zoo:NAME --weights PATH wherever --encoder_ckpt is accepted."""
    from polyp_ssl.eval.cli import count_main, count_parser, eval_parser, probe_parser

    flags = ["--encoder", "zoo:endovit", "--weights", "w.pth"]
    for parser, task in (
        (eval_parser(), ["--task", "reid"]),
        (probe_parser(), ["--task", "size"]),
        (count_parser(), []),
    ):
        args = parser.parse_args(flags + task)
        assert (args.encoder, args.weights) == ("zoo:endovit", "w.pth")
    weights = str(files["gastronet-resnet50"])
    rc = count_main(
        [
            "--dataset_root",
            str(root),
            "--encoder",
            "zoo:gastronet-resnet50",
            "--weights",
            weights,
            "--data_aug_anchorcrop",
            "--data_im_size",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "count.json").read_text())
    assert "zoo_gastronet_resnet50" in result["test_embeddings"]
    assert read_metadata(result["val_embeddings"])["encoder_zoo"]["name"] == "gastronet-resnet50"
