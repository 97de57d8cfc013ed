"""The paper's evaluation protocol as the default: tracklets of at least 30 frames, every 4th frame,
no cap; the protocol named in every output; long tracklets embedded in chunks, exactly; positions
over a video's annotated frames; an older catalog refused with the command that remakes it."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from polyp_ssl.checkpoint import load_encoder
from polyp_ssl.eval.cli import eval_main
from polyp_ssl.eval.embed import Item, batched_by_frames, embeddings_file
from polyp_ssl.eval.embed import main as embed_main
from polyp_ssl.eval.embeddings import read_embeddings, read_metadata
from polyp_ssl.eval.report import main as report_main
from polyp_ssl.fragments import cut_tracklet
from polyp_ssl.shards.sample import TrackletSample
from polyp_ssl.shards.schema import CATALOG_VERSION
from polyp_ssl.transforms import load_frames
from tests.embed_factory import make_ckpt, tracklet_rows
from tests.shard_factory import make_root

PAPER = "paper: min 30 frames, stride 4, all frames"
ALL = "custom: min 1 frames, stride 4, all frames"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("protocol_ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two test videos, two polyps each, three tracklets per polyp of 40 or 20 frames: polyp 0 has
    one tracklet of 40 frames, polyp 1 two (k = t * 2 + p picks the length)."""
    return make_root(
        tmp_path_factory.mktemp("protocol_mixed") / "root",
        videos={"test": 2},
        polyps_per_video=2,
        tracklets_per_polyp=3,
        frames_per_tracklet=[40, 40, 20, 40, 20, 20],
    )


@pytest.fixture(scope="module")
def long_root(tmp_path_factory):
    """One test video: a tracklet of 300 frames (75 at stride 4) and one of 40 (10 at stride 4)."""
    return make_root(
        tmp_path_factory.mktemp("protocol_long") / "root",
        videos={"test": 1},
        polyps_per_video=2,
        tracklets_per_polyp=1,
        frames_per_tracklet=[300, 40],
    )


def _sample(root, row):
    """The JSON and frame JPEGs of one tracklet, read by member name (independent of eval.embed)."""
    with tarfile.open(root / row["shard"]) as tar:
        meta = TrackletSample.from_json(tar.extractfile(f"{row['sample_key']}.json").read())
        jpegs = [tar.extractfile(f"{row['sample_key']}.{i:04d}.jpg").read() for i in range(meta.n_frames)]
    return meta, jpegs


def _direct_cls(ckpt, root, row, indices):
    """The CLS embedding of exactly these frames of one tracklet, by a direct encoder call."""
    encoder, _ = load_encoder(ckpt)
    meta, jpegs = _sample(root, row)
    frames = load_frames([jpegs[i] for i in indices], [meta.boxes_in_crop[i] for i in indices], 32, 3.0)
    with torch.inference_mode():
        return encoder.embed(frames[None], pooling="cls")[0].numpy()


# --------------------------------------------------------------------- tracklets of 30 frames or more


def test_retrieval_and_reid_keep_tracklets_of_30_frames_by_default(mixed, ckpt, tmp_path, capsys):
    rows = tracklet_rows(mixed, "test")
    assert sorted({r["n_frames"] for r in rows}) == [20, 40]
    long_ids = [r["tracklet_id"] for r in rows if r["n_frames"] >= 30]
    assert len(long_ids) == 6 and len(rows) == 12

    def run(task, *extra):
        out = tmp_path / f"{task}{len(extra)}"
        argv = ["--task", task, "--dataset_root", str(mixed), "--encoder_ckpt", str(ckpt)]
        assert eval_main([*argv, "--data_aug_anchorcrop", "--out", str(out), *extra]) == 0
        return json.loads((out / f"metrics_{task}.json").read_text())

    default, everything = run("retrieval"), run("retrieval", "--min_tracklet_frames", "1")
    assert default["n_tracklets"] == 6 and default["protocol"] == PAPER
    assert everything["n_tracklets"] == 12 and everything["protocol"] == ALL
    emb_default = read_embeddings(default["embeddings"], root=mixed)
    emb_all = read_embeddings(everything["embeddings"], root=mixed)
    assert list(emb_default.tracklet_id) == long_ids
    assert list(emb_all.tracklet_id) == [r["tracklet_id"] for r in rows]
    assert read_metadata(default["embeddings"])["n_tracklets_below_min"] == 6
    assert "protocol" in capsys.readouterr().out

    # the default metrics are those of the >= 30 subset of all tracklets (vectors do not depend on
    # which other tracklets were embedded), computed here with scikit-learn
    keep = np.isin(emb_all.tracklet_id, long_ids)
    np.testing.assert_allclose(emb_all.vectors[keep], emb_default.vectors, rtol=1e-5, atol=1e-6)
    x = emb_default.vectors / np.linalg.norm(emb_default.vectors, axis=1, keepdims=True)
    s, ident = x @ x.T, emb_default.identity_id.astype(str)
    aps = []
    for q in range(len(ident)):
        others = np.arange(len(ident)) != q
        if (ident[others] == ident[q]).any():
            aps.append(average_precision_score(ident[others] == ident[q], s[q, others]))
    assert len(aps) == 4 and default["n_excluded"] == 2  # polyp 0 of each video has one long tracklet
    assert default["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)

    reid, reid_all = run("reid"), run("reid", "--min_tracklet_frames", "1")
    iu = np.triu_indices(len(ident), 1)
    assert reid["n_pairs"] == 15 and reid["n_positive_pairs"] == 2
    assert reid["AUROC"] == pytest.approx(roc_auc_score(ident[iu[0]] == ident[iu[1]], s[iu]), abs=1e-6)
    assert reid_all["n_pairs"] == 66 and reid_all["protocol"] == ALL


def test_report_names_the_protocol_in_results_and_markdown(mixed, ckpt, tmp_path):
    argv = [str(ckpt), "--dataset_root", str(mixed), "--baselines", "none", "--tasks", "retrieval,reid"]
    assert report_main([*argv, "--out", str(tmp_path / "paper")]) == 0
    assert report_main([*argv, "--out", str(tmp_path / "all"), "--min_tracklet_frames", "1"]) == 0
    for out, protocol in (("paper", PAPER), ("all", ALL)):
        rows = pq.read_table(tmp_path / out / "results.parquet").to_pylist()
        assert {(r["task"], r["metric"]) for r in rows} == {
            ("retrieval", "mAP"),
            ("retrieval", "HR@1"),
            ("retrieval", "HR@5"),
            ("reid", "AUROC"),
            ("reid", "AUPR"),
        }
        assert {r["protocol"] for r in rows} == {protocol}
        assert f"- protocol: {protocol} (retrieval" in (tmp_path / out / "report.md").read_text()
    paper, alls = (
        {r["metric"]: r["value"] for r in pq.read_table(tmp_path / out / "results.parquet").to_pylist()}
        for out in ("paper", "all")
    )
    assert paper["mAP"] != pytest.approx(alls["mAP"])  # the short tracklets changed the numbers


# --------------------------------------------------------------------- no cap, --max_frames, chunks


def test_a_long_tracklet_is_embedded_with_every_strided_frame(long_root, ckpt):
    rows = tracklet_rows(long_root, "test")
    k = next(i for i, r in enumerate(rows) if r["n_frames"] == 300)
    path = embeddings_file(long_root, ckpt, split="test", progress=False)
    emb, meta = read_embeddings(path, root=long_root), read_metadata(path)
    assert len(emb) == 2 and meta["n_tracklets_capped"] == 0 and meta["params"]["max_frames"] is None
    assert meta["protocol"] == PAPER
    every = list(range(0, 300, 4))
    assert len(every) == 75 and every[-1] == 296
    direct = _direct_cls(ckpt, long_root, rows[k], every)
    np.testing.assert_allclose(emb.vectors[k], direct, rtol=1e-4, atol=1e-5)

    # --max_frames 10: 10 frames evenly over the 75, first and last kept; the 40-frame tracklet
    # (10 strided frames) is not capped
    capped_path = embeddings_file(long_root, ckpt, split="test", max_frames=10, progress=False)
    capped, cmeta = read_embeddings(capped_path), read_metadata(capped_path)
    assert cmeta["n_tracklets_capped"] == 1
    assert cmeta["protocol"] == "custom: min 30 frames, stride 4, at most 10 frames"
    picks = [0, 32, 64, 100, 132, 164, 196, 232, 264, 296]  # every[round(i * 74 / 9)], by hand
    direct = _direct_cls(ckpt, long_root, rows[k], picks)
    np.testing.assert_allclose(capped.vectors[k], direct, rtol=1e-4, atol=1e-5)
    assert not np.allclose(capped.vectors[k], emb.vectors[k], atol=1e-4)
    np.testing.assert_allclose(capped.vectors[1 - k], emb.vectors[1 - k], rtol=1e-5, atol=1e-6)


def test_chunked_embedding_equals_one_pass(long_root, ckpt):
    whole = embeddings_file(long_root, ckpt, split="test", name="budget_large", progress=False)
    # 16 frames: the 75-frame tracklet runs its backbone in 5 chunks (the last of 11), the
    # 10-frame one is an ordinary batch
    chunked = embeddings_file(
        long_root, ckpt, split="test", name="budget_16", frame_budget=16, progress=False
    )
    a, b = read_embeddings(whole), read_embeddings(chunked)
    assert list(a.tracklet_id) == list(b.tracklet_id)
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=0, atol=1e-5)


def test_batches_stay_within_the_frame_budget():
    lengths = [3, 5, 5, 2, 9, 1, 1, 1, 12, 4]
    items = [Item(None, -1, list(range(n))) for n in lengths]  # type: ignore[arg-type]
    batches = list(batched_by_frames(iter(items), batch_size=3, frame_budget=10))
    assert [len(it.indices) for b in batches for it in b] == lengths  # order kept, nothing lost
    for b in batches:
        padded = len(b) * max(len(it.indices) for it in b)
        assert len(b) <= 3 and (padded <= 10 or len(b) == 1)
    assert [[len(it.indices) for it in b] for b in batches] == [[3, 5], [5, 2], [9], [1, 1, 1], [12], [4]]


def test_frame_flags_are_checked(long_root, ckpt, capsys):
    base = ["--encoder_ckpt", str(ckpt), "--dataset_root", str(long_root)]
    for flag, value in (("--min_tracklet_frames", "0"), ("--max_frames", "0"), ("--frame_budget", "0")):
        assert embed_main([*base, flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err


# --------------------------------------------------------------------- positions, catalog version


def test_positions_are_over_the_annotated_frames(tmp_path):
    """A video of 50 images annotated on frames 5..44 only: the first tracklet starts at
    position 0, the last (frames 30..44) at (30 - 5) / (44 - 5)."""
    from polyp_ssl.ingest.cli import main as ingest_main
    from polyp_ssl.shards.reader import iter_samples
    from polyp_ssl.shards.sample import sample_meta
    from tests.ingest_fixtures import Track, moving
    from tests.ingest_fixtures import make_root as make_raw

    a, b = list(range(5, 20)), list(range(30, 45))
    videos = {
        ("seqP", None): (
            50,
            [
                Track("seqP_1", a, moving(20, 20, 24, 20, a), 4.0, "AD"),
                Track("seqP_2", b, moving(90, 60, 20, 18, b), 7.0, "HP"),
            ],
        )
    }
    make_raw(str(tmp_path), videos)
    assert ingest_main([str(tmp_path), "--no-progress"]) == 0
    trk = {r["tracklet_id"]: r for r in pq.read_table(tmp_path / "catalog" / "tracklets.parquet").to_pylist()}
    assert trk["seqP_1#0"]["position_in_video"] == 0.0
    assert trk["seqP_2#0"]["position_in_video"] == pytest.approx(25 / 39)
    metas = {}
    for path in sorted((tmp_path / "shards" / "train").glob("*.tar")):
        for s in iter_samples([path]):
            m = sample_meta(s)
            metas[m.tracklet_id] = m
    assert {(m.video_first_frame, m.video_last_frame) for m in metas.values()} == {(5, 44)}
    # training fragments of 4 frames at stride 1: the first starts the video's annotated span,
    # the last tracklet's start at frames 30, 34, 38 (its 3 frames left over are dropped)
    first = cut_tracklet(metas["seqP_1#0"].frame_ids, 5, 44, 4, 1, True)
    last = cut_tracklet(metas["seqP_2#0"].frame_ids, 5, 44, 4, 1, True)
    assert first[0].position == 0.0
    assert [f.position for f in last] == pytest.approx([25 / 39, 29 / 39, 33 / 39])


def test_an_older_catalog_is_refused_with_the_reingest_command(tmp_path, ckpt, capsys):
    root = make_root(tmp_path / "old", videos={"test": 1}, frames_per_tracklet=30)
    manifest = root / "catalog" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 1, "catalog_version": 1}))
    source = ["--dataset_root", str(root), "--encoder_ckpt", str(ckpt)]
    runs = (
        lambda: embed_main(source),
        lambda: eval_main(["--task", "reid", *source, "--data_aug_anchorcrop"]),
    )
    for run in runs:
        assert run() == 2
        err = capsys.readouterr().err
        assert (
            str(manifest) in err
            and "field 'version' is 1" in err
            and f"catalog version {CATALOG_VERSION}" in err
        )
        assert "polyp-ssl ingest RAW_ROOT --out ROOT --overwrite" in err and "Traceback" not in err
    assert not (root / "embeddings").exists() or not list((root / "embeddings").glob("*.parquet"))


def test_an_anchor_crop_wider_than_the_stored_crops_is_refused(tmp_path, ckpt, capsys):
    root = make_root(tmp_path / "narrow", videos={"test": 1}, frames_per_tracklet=30, crop_scale=2.5)
    manifest = root / "catalog" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "parameters": {"crop_scale": 2.5}}))
    base = ["--encoder_ckpt", str(ckpt), "--dataset_root", str(root)]
    assert embed_main(base) == 2  # the checkpoint's bbox_scale_factor 3 > the root's crop scale 2.5
    err = capsys.readouterr().err
    assert "--data_bbox_scale_factor 3 is larger than the crop scale 2.5" in err and str(manifest) in err
    assert not (root / "embeddings").exists() or not list((root / "embeddings").glob("*.parquet"))
    assert embed_main([*base, "--data_bbox_scale_factor", "2.5"]) == 0
