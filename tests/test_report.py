"""`polyp-ssl report`: files and figures, results rows, agreement of the table with an independent
computation, appending, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from polyp_ssl.eval.embeddings import read_embeddings
from polyp_ssl.eval.gallery import cosine_top_k, pick_gallery_rows, plot_gallery
from polyp_ssl.eval.projection import plot_projection, project_2d
from polyp_ssl.eval.report import COLUMNS, main, markdown_table, resolve_checkpoints
from polyp_ssl.shards.schema import CATALOG_VERSION
from tests.embed_factory import make_ckpt, make_tiny_root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    root = make_tiny_root(base / "root")
    run_dir = base / "runs" / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    make_ckpt(run_dir / "checkpoints" / "last.ckpt")
    out = base / "out"
    argv = [
        str(run_dir),
        "--dataset_root",
        str(root),
        "--out",
        str(out),
        "--probe_fragment_length",
        "2",
        "--batch_size",
        "16",
        "--projection",
        "pca",
    ]
    assert main(argv) == 0
    return root, run_dir, out, argv


def _png_ok(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        assert im.width > 50 and im.height > 50


def test_report_files_and_figures(run):
    root, _, out, _ = run
    md = (out / "report.md").read_text()
    for label in ("tiny/last", "fresh init (hmve_resnet18, seed 0)", "hand-made descriptor"):
        assert f"| {label} |" in md
    for name in (
        "reid_roc.png",
        "reid_pr.png",
        "gallery_tiny_last.png",
        "projection_tiny_last.png",
        "gallery_hand-made_descriptor.png".replace("-", "_"),
    ):
        _png_ok(out / name)
        assert f"({name})" in md
    assert "- protocol: paper: min 30 frames, stride 4, all frames (retrieval" in md
    # histology: every polyp of the tiny root is "AD": one class, so skipped and said why
    assert "histology: **skipped**" in md


def test_results_rows_and_values(run):
    root, run_dir, out, _ = run
    t = pq.read_table(out / "results.parquet")
    assert t.column_names[:12] == [
        "checkpoint",
        "checkpoint_path",
        "checkpoint_sha256",
        "task",
        "metric",
        "value",
        "time_s",
        "created",
        "protocol",
        "dataset_root",
        "split",
        "settings",
    ]
    rows = t.to_pylist()
    assert {r["dataset_root"] for r in rows} == {str(root.resolve())}
    assert {(r["task"], r["split"]) for r in rows if r["task"] in ("retrieval", "count")} <= {
        ("retrieval", "test"),
        ("count", "val+test"),
    }
    assert all(json.loads(r["settings"])["min_tracklet_frames"] == 30 for r in rows)
    # the defaults are the paper's evaluation protocol, named on every row
    assert {r["protocol"] for r in rows} == {"paper: min 30 frames, stride 4, all frames"}
    subjects = {r["checkpoint"] for r in rows}
    # no init.ckpt in the run: its initialisation row is a fresh init of the same config, named so
    assert subjects == {"tiny/last", "fresh init (hmve_resnet18, seed 0)", "hand-made descriptor"}
    expected = {
        ("retrieval", "mAP"),
        ("retrieval", "HR@1"),
        ("retrieval", "HR@5"),
        ("reid", "AUROC"),
        ("reid", "AUPR"),
        ("size", "F1"),
        ("size", "accuracy"),
        ("count", "fragmentation_rate"),
        ("count", "FPR"),
    }
    for s in subjects:
        got = {(r["task"], r["metric"]) for r in rows if r["checkpoint"] == s}
        assert got == expected, s
    for r in rows:
        assert r["time_s"] >= 0
        if r["metric"] != "fragmentation_rate":
            assert 0.0 <= r["value"] <= 1.0
    trained = [r for r in rows if r["checkpoint"] == "tiny/last"]
    assert trained[0]["checkpoint_sha256"] and len(trained[0]["checkpoint_sha256"]) == 64

    # retrieval mAP and re-id AUROC against scikit-learn on the embeddings the report used
    emb_file = next(p for p in (root / "embeddings").glob("tiny_last_test_trk_*.parquet"))
    emb = read_embeddings(emb_file)
    x = emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)
    s = x @ x.T
    ident = emb.identity_id.astype(str)
    aps = []
    for q in range(len(ident)):
        others = np.arange(len(ident)) != q
        y = ident[others] == ident[q]
        if y.any():
            aps.append(average_precision_score(y, s[q, others]))
    iu = np.triu_indices(len(ident), 1)
    auroc = roc_auc_score(ident[iu[0]] == ident[iu[1]], s[iu])
    val = {(r["task"], r["metric"]): r["value"] for r in trained}
    assert val[("retrieval", "mAP")] == pytest.approx(np.mean(aps), abs=1e-6)
    assert val[("reid", "AUROC")] == pytest.approx(auroc, abs=1e-6)


def test_rerun_is_refused_or_replaces_and_reuses_embeddings(run, capsys):
    root, _, out, argv = run
    before = pq.read_table(out / "results.parquet")
    n_files = len(list((root / "embeddings").glob("*.parquet")))
    capsys.readouterr()
    # a second report to the same --out: refused, the first one kept
    assert main([*argv, "--baselines", "none", "--tasks", "retrieval"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert pq.read_table(out / "results.parquet").equals(before)
    # --overwrite: the new report replaces the old one (not appended to it)
    assert main([*argv, "--baselines", "none", "--tasks", "retrieval", "--overwrite"]) == 0
    assert "reusing" in capsys.readouterr().out
    t = pq.read_table(out / "results.parquet")
    assert t.num_rows == 3  # mAP, HR@1, HR@5 of the one checkpoint
    assert len(list((root / "embeddings").glob("*.parquet"))) == n_files


def test_resolve_checkpoints(tmp_path):
    run_dir = tmp_path / "r" / "checkpoints"
    run_dir.mkdir(parents=True)
    for name in ("epoch=3-best.ckpt", "last.ckpt"):
        (run_dir / name).write_bytes(b"x")
    assert [p.name for p in resolve_checkpoints([tmp_path / "r"])] == ["last.ckpt", "epoch=3-best.ckpt"]


def test_bad_inputs(run, tmp_path, capsys):
    root, run_dir, out, _ = run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # a checkpoint of another encoder type than asked
    o1 = str(tmp_path / "o1")
    assert main([str(ckpt), "--dataset_root", str(root), "--out", o1, "--encoder_type", "sfe"]) == 2
    assert "holds a 'hmve' encoder, but --encoder_type 'sfe'" in capsys.readouterr().err
    # embeddings of another dataset
    other = make_tiny_root(tmp_path / "other", seed=5)
    # another manifest of the current catalog version (an older version is refused before embedding)
    (other / "catalog" / "manifest.json").write_text(json.dumps({"version": CATALOG_VERSION, "other": True}))
    from polyp_ssl.eval.embed import embeddings_file

    foreign = embeddings_file(other, ckpt, split="test", progress=False)
    assert (
        main(
            [
                "--embeddings",
                str(foreign),
                "--baselines",
                "none",
                "--dataset_root",
                str(root),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    assert "embeddings of another dataset" in capsys.readouterr().err
    # an empty split
    no_test = make_tiny_root(tmp_path / "notest", videos={"train": 1, "val": 1})
    assert main([str(ckpt), "--dataset_root", str(no_test), "--out", str(tmp_path / "o3")]) == 2
    assert "split 'test' has no tracklets" in capsys.readouterr().err
    # a split without labels for a labelled task asked for by name
    polyps = pq.read_table(root / "catalog" / "polyps.parquet")
    unlabelled = polyps.set_column(
        polyps.schema.get_field_index("size_mm"), "size_mm", pa.nulls(polyps.num_rows, pa.float64())
    )
    pq.write_table(unlabelled, root / "catalog" / "polyps.parquet")
    try:
        assert (
            main(
                [
                    str(ckpt),
                    "--dataset_root",
                    str(root),
                    "--out",
                    str(tmp_path / "o4"),
                    "--tasks",
                    "size",
                    "--baselines",
                    "none",
                    "--probe_fragment_length",
                    "2",
                ]
            )
            == 2
        )
        assert "task size cannot run: no val+test polyp has a size label" in capsys.readouterr().err
    finally:
        pq.write_table(polyps, root / "catalog" / "polyps.parquet")
    for d in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / d / "report.md").exists()


def test_table_gallery_projection_from_arrays(tmp_path):
    from polyp_ssl.eval.report import Subject, SubjectResult, TaskOutcome

    res = [
        SubjectResult(
            Subject("a", "checkpoint", "a.ckpt"),
            [
                TaskOutcome("retrieval", {"mAP": 0.5}, 1.0),
                TaskOutcome("count", {"fragmentation_rate": 1.25}, 1.0),
            ],
        )
    ]
    table = markdown_table(res)
    assert "| a | 50.0 | 1.25 |" in table and table.index("retrieval mAP") < table.index("count")
    assert [c for c in COLUMNS if c[0] == "reid"] == [("reid", "AUROC"), ("reid", "AUPR")]

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8))
    ids = np.repeat(["p0", "p1", "p2", "p3"], 5)
    vecs = centres[np.repeat(np.arange(4), 5)] + 0.01 * rng.normal(size=(20, 8))
    # nearest neighbours of a tight cluster are its own members
    assert set(cosine_top_k(vecs, 0, 4)) == {1, 2, 3, 4}
    rows = pick_gallery_rows(vecs, ids, n_queries=3, k=4)
    assert len(rows) == 3 and all(all(r.correct) for r in rows)
    crops = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(20)]
    p = plot_gallery(
        [crops[r.query] for r in rows],
        [[crops[i] for i in r.results] for r in rows],
        [r.correct for r in rows],
        tmp_path / "g.png",
    )
    _png_ok(p)
    for method in ("pca", "tsne"):
        xy = project_2d(vecs, method)
        assert xy.shape == (20, 2) and np.isfinite(xy).all()
        _png_ok(plot_projection(xy, ids, tmp_path / f"{method}.png"))
    # PCA of well separated clusters keeps each cluster tighter than the spread between them
    xy = project_2d(vecs, "pca")
    within = np.mean([xy[ids == i].std(axis=0).sum() for i in set(ids)])
    assert within < xy.std(axis=0).sum() / 3
