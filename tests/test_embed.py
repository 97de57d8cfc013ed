"""`polyp-ssl embed`: rows and keys, vectors against a direct encoder call, caching, fragments, the
init and descriptor encoders, and bad inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from polyp_ssl.checkpoint import load_encoder, sha256_file
from polyp_ssl.eval.embed import (
    EmbedError,
    EmbedOptions,
    EncoderChoice,
    embeddings_file,
    ensure_embeddings,
    frame_plan,
    main,
)
from polyp_ssl.eval.embeddings import read_embeddings, read_metadata
from polyp_ssl.fragments import count_fragments
from polyp_ssl.transforms import load_frames
from tests.embed_factory import make_ckpt, make_tiny_root, tracklet_rows
from tests.sample_helpers import read_tracklet_sample as _sample


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("embed")
    root = make_tiny_root(base / "root")
    ckpt = make_ckpt(base / "tiny.ckpt")
    return root, ckpt


def test_frame_plan_matches_direct_definition():
    # whole tracklet: every stride-th frame
    assert frame_plan(10, -1, 4, 64) == [(-1, [0, 4, 8])]
    # capped: evenly subsampled, first and last kept
    ((_, idx),) = frame_plan(200, -1, 1, 5)
    assert idx == [0, 50, 100, 149, 199]
    # fragments: consecutive pieces of strided frames, short last one dropped or padded
    assert frame_plan(20, 2, 3, 64) == [(0, [0, 3]), (1, [6, 9]), (2, [12, 15])]
    assert frame_plan(20, 2, 3, 64, drop_last=False)[-1] == (3, [18, 18])
    for n in range(1, 40):
        for length in (1, 2, 3, 8):
            assert len(frame_plan(n, length, 4, 64)) == count_fragments(n, length, 4, True)
    with pytest.raises(EmbedError):
        frame_plan(10, 2, 0, 64)


def test_embed_rows_vectors_metadata_and_cache(env, capsys):
    root, ckpt = env
    path = embeddings_file(root, ckpt, split="test", batch_size=5, progress=False)
    emb = read_embeddings(path, root=root)
    rows = tracklet_rows(root, "test")
    assert [r["tracklet_id"] for r in rows] == list(emb.tracklet_id)  # catalog order, one row each
    assert list(emb.identity_id) == [r["identity_id"] for r in rows]
    assert list(emb.start_frame) == [r["start_frame"] for r in rows]
    assert (emb.fragment_index == -1).all()
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (len(rows), 32)
    meta = read_metadata(path)
    assert meta["checkpoint_sha256"] == sha256_file(ckpt)
    # defaults came from the checkpoint's config
    assert meta["params"]["im_size"] == 32 and meta["params"]["bbox_scale_factor"] == 3.0

    # a direct encoder call on one tracklet (strided frames, anchor crops) gives the same vector
    encoder, _ = load_encoder(ckpt)
    k = 4
    m, jpegs = _sample(root, rows[k])
    idx = list(range(0, m.n_frames, 4))
    frames = load_frames([jpegs[i] for i in idx], [m.boxes_in_crop[i] for i in idx], 32, 3.0)
    with torch.inference_mode():
        direct = encoder.embed(frames[None], pooling="cls")[0].numpy()
    np.testing.assert_allclose(emb.vectors[k], direct, rtol=1e-4, atol=1e-5)

    # same inputs: the file is reused, not rewritten
    mtime = path.stat().st_mtime_ns
    again = ensure_embeddings(
        root, EncoderChoice(ckpt), EmbedOptions(split="test", batch_size=7, progress=False)
    )
    assert again.reused and again.path == path and path.stat().st_mtime_ns == mtime
    assert again.summary() == f"embeddings up to date, reusing {path}"
    # another parameter: another file
    other = embeddings_file(root, ckpt, split="test", im_size=48, progress=False)
    assert other != path
    assert not np.allclose(read_embeddings(other).vectors, emb.vectors)


def test_fragments_and_batching_do_not_change_vectors(env):
    root, ckpt = env
    p1 = embeddings_file(
        root,
        ckpt,
        split="val",
        fragment_length=2,
        fragment_stride=4,
        batch_size=3,
        name="frag_a",
        progress=False,
    )
    p2 = embeddings_file(
        root,
        ckpt,
        split="val",
        fragment_length=2,
        fragment_stride=4,
        batch_size=64,
        name="frag_b",
        progress=False,
    )
    a, b = read_embeddings(p1), read_embeddings(p2)
    rows = tracklet_rows(root, "val")
    assert len(a) == sum(count_fragments(r["n_frames"], 2, 4, True) for r in rows)
    # 32 frames at stride 4 = 8 strided frames: four fragments of 2 per tracklet
    assert set(a.fragment_index) == {0, 1, 2, 3} and len(a) == 4 * len(rows)
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-4, atol=1e-5)


def test_init_baseline_is_seeded_and_differs_from_checkpoint(env):
    root, ckpt = env
    a = embeddings_file(root, f"init:{ckpt}", split="test", name="init_a", progress=False)
    b = embeddings_file(root, f"init:{ckpt}", split="test", name="init_b", progress=False)
    c = embeddings_file(root, f"init:{ckpt}", split="test", name="init_c", init_seed=7, progress=False)
    trained = embeddings_file(root, ckpt, split="test", progress=False)
    va, vb, vc = (read_embeddings(p).vectors for p in (a, b, c))
    np.testing.assert_array_equal(va, vb)
    assert not np.allclose(va, vc)
    assert not np.allclose(va, read_embeddings(trained).vectors)
    meta = read_metadata(a)
    assert meta["encoder_kind"] == "init" and meta["params"]["im_size"] == 32  # the checkpoint's data config


def test_descriptor_equals_direct_histograms(env):
    from polyp_ssl.ingest.synth.descriptor import describe_tracklet

    root, _ = env
    path = embeddings_file(root, None, encoder="descriptor", split="test", progress=False)
    emb = read_embeddings(path, root=root)
    rows = tracklet_rows(root, "test")
    m, jpegs = _sample(root, rows[2])
    idx = list(range(0, m.n_frames, 4))
    imgs = [np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB")) for i in idx]
    direct = describe_tracklet(imgs, [m.boxes_in_crop[i] for i in idx])
    np.testing.assert_allclose(emb.vectors[2], direct, rtol=1e-6)
    assert read_metadata(path)["checkpoint_sha256"] is None


def test_cli_bad_inputs(env, tmp_path, capsys):
    root, ckpt = env
    # a checkpoint of another encoder type than asked
    assert main(["--encoder_ckpt", str(ckpt), "--dataset_root", str(root), "--encoder_type", "sfe"]) == 2
    err = capsys.readouterr().err
    assert "holds a 'hmve' encoder" in err and "--encoder_type 'sfe'" in err and str(ckpt) in err
    # an empty split
    assert main(["--encoder_ckpt", str(ckpt), "--dataset_root", str(root), "--split", "holdout"]) == 2
    err = capsys.readouterr().err
    assert "split 'holdout' has no tracklets" in err and "shards.parquet" in err
    # a root that was never ingested
    assert main(["--encoder_ckpt", str(ckpt), "--dataset_root", str(tmp_path)]) == 2
    assert "polyp-ssl ingest" in capsys.readouterr().err
    # a missing checkpoint, a file that is not a checkpoint
    assert main(["--encoder_ckpt", str(tmp_path / "none.ckpt"), "--dataset_root", str(root)]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--encoder_ckpt", str(bad), "--dataset_root", str(root)]) == 2
    assert f"{bad}: is text, not a checkpoint" in capsys.readouterr().err
    assert not (root / "embeddings" / "bad_test").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(env):
    root, ckpt = env
    cpu = read_embeddings(embeddings_file(root, ckpt, split="test", device="cpu", progress=False))
    gpu = read_embeddings(
        embeddings_file(root, ckpt, split="test", device="cuda", name="on_cuda", progress=False)
    )
    a = cpu.vectors / np.linalg.norm(cpu.vectors, axis=1, keepdims=True)
    b = gpu.vectors / np.linalg.norm(gpu.vectors, axis=1, keepdims=True)
    assert (a * b).sum(axis=1).min() > 0.98  # bf16 autocast: close in direction, not bit-equal
