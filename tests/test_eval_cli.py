"""`polyp-ssl eval | probe | count` end to end on tiny catalogs, and their error messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from polyp_ssl.eval.cli import count_main, eval_main, probe_main
from polyp_ssl.eval.embeddings import EmbeddingsError, read_embeddings, write_embeddings
from polyp_ssl.eval.metrics import reid_from_vectors, retrieval_from_vectors
from tests.eval_factory import make_eval_root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_eval_root(tmp_path_factory.mktemp("evalroot"), splits={"val": 3, "test": 4}, noise=0.6)


@pytest.fixture(scope="module")
def frag_root(tmp_path_factory) -> Path:
    return make_eval_root(
        tmp_path_factory.mktemp("fragroot"),
        splits={"train": 12, "val": 4},
        polyps_per_video=4,
        fragments_per_tracklet=2,
        tag="frag",
    )


def test_embeddings_roundtrip_and_atomic(tmp_path):
    cols = {
        "tracklet_id": ["a#0", "b#0"],
        "sample_key": ["a_0", "b_0"],
        "split": ["test", "test"],
        "video_id": ["v", "v"],
        "identity_id": ["a", None],
        "fragment_index": [-1, -1],
        "start_frame": [3, 9],
    }
    vec = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = write_embeddings(
        tmp_path / "e.parquet", cols, vec, {"manifest_sha256": "x", "params": {"split": "test"}}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["e.parquet"]  # no temporary left behind
    emb = read_embeddings(path, split="test")
    np.testing.assert_array_equal(emb.vectors, vec)
    assert emb.identity_id.tolist() == ["a", None] and emb.start_frame.tolist() == [3, 9]
    assert emb.meta["dim"] == 3 and "created" in emb.meta
    assert pq.read_schema(path).field("vector").type.list_size == 3
    with pytest.raises(EmbeddingsError, match="split 'val' is empty"):
        read_embeddings(path, split="val")


def test_eval_retrieval_and_reid_outputs(root, tmp_path, capsys):
    emb_path = root / "embeddings" / "test.parquet"
    emb = read_embeddings(emb_path)
    assert eval_main(["--task", "retrieval", "--embeddings", str(emb_path), "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "metrics_retrieval.json").read_text())
    want = retrieval_from_vectors(emb.vectors, emb.identity_id)
    assert got["mAP"] == pytest.approx(want.mAP) and got["HR@1"] == pytest.approx(want.hr[1])
    assert got["n_tracklets"] == 36 and got["n_excluded"] == 0
    assert eval_main(["--task", "reid", "--embeddings", str(emb_path), "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "metrics_reid.json").read_text())
    want = reid_from_vectors(emb.vectors, emb.identity_id)
    assert got["AUROC"] == pytest.approx(want.auroc) and got["AUPR"] == pytest.approx(want.aupr)
    for png in ("reid_roc.png", "reid_pr.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    out = capsys.readouterr().out
    assert "AUROC" in out and "mAP" in out
    # default output folder: ROOT/eval/{exp_name}_{task}_{encoder}_{split}_{protocol}_{hash}
    assert eval_main(["--task", "retrieval", "--embeddings", str(emb_path), "--exp_name", "x"]) == 0
    assert len(list((root / "eval").glob("x_retrieval_*_test_custom_*/metrics_retrieval.json"))) == 1


def test_eval_bad_inputs_fail_clearly(root, frag_root, tmp_path, capsys):
    emb_path = root / "embeddings" / "test.parquet"
    # embeddings of another dataset
    assert eval_main(["--task", "reid", "--embeddings", str(emb_path), "--dataset_root", str(frag_root)]) == 2
    assert "another dataset" in capsys.readouterr().err
    # an empty split
    assert eval_main(["--task", "reid", "--embeddings", str(emb_path), "--split", "train"]) == 2
    assert "split 'train' is empty" in capsys.readouterr().err
    # not an embeddings file
    assert eval_main(["--task", "reid", "--embeddings", str(root / "catalog" / "polyps.parquet")]) == 2
    assert "not an embeddings file" in capsys.readouterr().err
    # a split without identity labels
    emb = read_embeddings(emb_path)
    cols = {
        c: getattr(emb, c).tolist()
        for c in ("tracklet_id", "sample_key", "split", "video_id", "fragment_index", "start_frame")
    }
    cols["identity_id"] = [None] * len(emb)
    nolab = write_embeddings(tmp_path / "nolab.parquet", cols, emb.vectors, emb.meta)
    assert eval_main(["--task", "retrieval", "--embeddings", str(nolab), "--dataset_root", str(root)]) == 2
    assert "no identity labels" in capsys.readouterr().err
    # expected dimension
    assert eval_main(["--task", "reid", "--embeddings", str(emb_path), "--encoder_out_dim", "256"]) == 2
    assert "16-d" in capsys.readouterr().err
    # nothing to read
    assert eval_main(["--task", "reid"]) == 2
    assert "--embeddings" in capsys.readouterr().err


def test_probe_cli_split_by_polyp_and_given_sides(frag_root, tmp_path, capsys):
    train = frag_root / "embeddings" / "train.parquet"
    val = frag_root / "embeddings" / "val.parquet"
    args = ["--max_epochs", "3", "--out", str(tmp_path)]
    assert probe_main(["--task", "size", "--train_embeddings", str(train), *args]) == 0
    got = json.loads((tmp_path / "probe_size.json").read_text())
    assert got["split_rule"].startswith("70/30")
    assert got["n_train_polyps"] + got["n_val_polyps"] == 48
    assert got["n_val_polyps"] == 14  # 24 small + 24 large polyps, 30% of each class
    assert set(got["metrics"]) >= {"accuracy", "identity_weighted_macro_f1", "balanced_accuracy"}
    assert (
        probe_main(
            ["--task", "histology", "--train_embeddings", str(train), "--val_embeddings", str(val), *args]
        )
        == 0
    )
    got = json.loads((tmp_path / "probe_histology.json").read_text())
    # HISTOLOGY per polyp p: AD, HP, AD, SSL -> all four known; 12 videos x 4 polyps x 3 tracklets x 2
    assert got["n_train"] == 288 and got["n_val"] == 96 and got["left_out"]["train"] == {}
    # --dataset_root with the seed's default split names
    assert (
        probe_main(
            [
                "--task",
                "size",
                "--dataset_root",
                str(frag_root),
                "--train_split",
                "train",
                "--val_split",
                "val",
                "--train_embeddings",
                str(train),
                "--val_embeddings",
                str(val),
                *args,
                "--overwrite",  # replaces the first size probe's result in the same --out
            ]
        )
        == 0
    )
    capsys.readouterr()


def test_probe_bad_inputs(root, frag_root, tmp_path, capsys):
    train = frag_root / "embeddings" / "train.parquet"
    # mismatched dims
    emb = read_embeddings(frag_root / "embeddings" / "val.parquet")
    cols = {
        c: getattr(emb, c).tolist()
        for c in (
            "tracklet_id",
            "sample_key",
            "split",
            "video_id",
            "identity_id",
            "fragment_index",
            "start_frame",
        )
    }
    wide = write_embeddings(
        frag_root / "embeddings" / "wide.parquet", cols, np.hstack([emb.vectors, emb.vectors]), emb.meta
    )
    assert (
        probe_main(["--task", "size", "--train_embeddings", str(train), "--val_embeddings", str(wide)]) == 2
    )
    assert "16-d but val embeddings" in capsys.readouterr().err
    wide.unlink()
    # a split without the task's labels: every histology unknown
    import pyarrow as pa

    polyps = pq.read_table(root / "catalog" / "polyps.parquet")
    hist = pa.array(["NO POLYP"] * polyps.num_rows, type=pa.string())
    nolabel = tmp_path / "nolabel"
    (nolabel / "catalog").mkdir(parents=True)
    pq.write_table(
        polyps.set_column(polyps.schema.get_field_index("histology"), "histology", hist),
        nolabel / "catalog" / "polyps.parquet",
    )
    (nolabel / "catalog" / "manifest.json").write_bytes((root / "catalog" / "manifest.json").read_bytes())
    assert (
        probe_main(
            [
                "--task",
                "histology",
                "--train_embeddings",
                str(root / "embeddings" / "test.parquet"),
                "--dataset_root",
                str(nolabel),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no histology labels" in err and "NO POLYP" in err
    # the seed's raw annotation files: a clear pointer to `polyp-ssl ingest`
    raw = tmp_path / "raw"
    (raw / "annotations").mkdir(parents=True)
    (raw / "annotations" / "instances_train.json").write_text("{}")
    assert (
        probe_main(
            [
                "--task",
                "size",
                "--train_images",
                str(raw / "images"),
                "--train_annotations",
                str(raw / "annotations" / "instances_train.json"),
            ]
        )
        == 2
    )
    assert "polyp-ssl ingest" in capsys.readouterr().err


def test_count_cli(root, tmp_path, capsys):
    args = [
        "--val_embeddings",
        str(root / "embeddings" / "val.parquet"),
        "--test_embeddings",
        str(root / "embeddings" / "test.parquet"),
        "--out",
        str(tmp_path),
    ]
    assert count_main([*args, "--temporal_constraint"]) == 0
    got = json.loads((tmp_path / "count.json").read_text())
    assert got["temporal_constraint"] and got["val_fpr"] <= 0.05 and got["fpr_target_met"]
    assert len(got["per_video"]) == 4 and got["test_fragmentation_rate"] > 0
    assert got["test_fragmentation_rate"] == pytest.approx(
        np.mean([r["n_clusters"] / r["n_polyps"] for r in got["per_video"]])
    )
    assert count_main([*args, "--method", "affinity", "--grid", "-1", "-0.5", "0", "--overwrite"]) == 0
    assert json.loads((tmp_path / "count.json").read_text())["value"] in (-1.0, -0.5, 0.0)
    assert "fragmentation" in capsys.readouterr().out
    assert count_main(["--val_embeddings", str(root / "embeddings" / "val.parquet")]) == 2
    assert "--test_embeddings" in capsys.readouterr().err


def test_eval_and_count_embed_an_ingested_root_once(tmp_path, capsys):
    """--dataset_root + --encoder_ckpt: embeddings made by `eval.embed` (the generator's
    descriptor stands in for a network here), then reused."""
    from tests.shard_factory import make_root

    # 30 frames: exactly the default protocol's minimum, so every tracklet is embedded
    r = make_root(tmp_path / "ingested", videos={"val": 2, "test": 2}, frames_per_tracklet=30)
    assert eval_main(["--task", "reid", "--dataset_root", str(r), "--encoder_ckpt", "descriptor"]) == 0
    files = sorted((r / "embeddings").glob("*.parquet"))
    assert len(files) == 1 and read_embeddings(files[0], root=r).split.tolist() == ["test"] * 8
    assert (
        count_main(["--dataset_root", str(r), "--encoder_ckpt", "descriptor", "--temporal_constraint"]) == 0
    )
    assert len(list((r / "embeddings").glob("*.parquet"))) == 2
    assert "reusing" in capsys.readouterr().out


def test_tracklet_level_of_fragment_rows(frag_root):
    emb = read_embeddings(frag_root / "embeddings" / "val.parquet")
    trk = emb.tracklet_level()
    assert len(trk) == len(emb) // 2 and (trk.fragment_index == -1).all()
    tid = trk.tracklet_id[3]
    rows = emb.vectors[emb.tracklet_id == tid]
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(trk.vectors[3], unit.mean(axis=0), rtol=1e-5)
    assert trk.start_frame[3] == emb.start_frame[emb.tracklet_id == tid].min()
    assert list(dict.fromkeys(emb.tracklet_id)) == trk.tracklet_id.tolist()  # file order kept
