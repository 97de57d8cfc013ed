"""Outputs that never collide or mislead: failed runs leave nothing that looks like a result,
every evaluation output is named by what produced it, results carry their dataset, split and
protocol."""

from __future__ import annotations

import json
import os

import pytest
from ingest_fixtures import Track, make_root, moving, write_coco

from polyp_ssl.ingest.cli import main as ingest_main


def _videos():
    return {
        ("v1", None): (12, [Track("v1_a", list(range(0, 10)), moving(10, 10, 20, 16, list(range(0, 10))))]),
        ("v2", None): (10, [Track("v2_a", list(range(2, 9)), moving(60, 40, 24, 20, list(range(2, 9))))]),
    }


def test_ingest_every_annotation_skipped_exits_1_and_writes_nothing(tmp_path, capsys):
    root, out = str(tmp_path / "raw"), tmp_path / "out"
    coco = make_root(root, videos=_videos())
    for a in coco["annotations"]:
        a["bbox"] = [10, 10, 0, 16]  # zero area: skipped in skip mode
    write_coco(root, "train", coco)
    n = len(coco["annotations"])
    rc = ingest_main([root, "--out", str(out), "--on-error", "skip", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"every input was skipped, no tracklet is left: {n} skipped (zero_area_box (skipped) {n})" in err
    assert "field 'bbox'" in err and "annotation" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # made by this run, left empty: removed (no shards/, no catalog/)


def test_ingest_partly_skipped_still_succeeds(tmp_path, capsys):
    root, out = str(tmp_path / "raw"), tmp_path / "out"
    coco = make_root(root, videos=_videos())
    bad = [a for a in coco["annotations"] if a["identity_id"] == "v2_a"]
    for a in bad:
        a["bbox"] = [10, 10, 0, 16]
    write_coco(root, "train", coco)
    assert ingest_main([root, "--out", str(out), "--on-error", "skip", "--no-progress"]) == 0
    assert (out / "catalog" / "manifest.json").is_file()
    capsys.readouterr()


def test_failed_ingest_leaves_no_folder_it_created(tmp_path, capsys):
    root = str(tmp_path / "raw")
    coco = make_root(root, videos=_videos())
    os.remove(os.path.join(root, "images", coco["images"][3]["file_name"]))  # a frame is missing
    # into a new folder: removed whole
    out = tmp_path / "new"
    assert ingest_main([root, "--out", str(out), "--no-progress"]) == 1
    assert not out.exists()
    # into an existing folder with other content: that content stays, nothing of the run does
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert ingest_main([root, "--out", str(out), "--no-progress"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # a shards/ folder that was there before is kept (empty or not)
    (out / "shards").mkdir()
    assert ingest_main([root, "--out", str(out), "--no-progress"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shards"]
    assert list((out / "shards").iterdir()) == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and json  # one line per failure


# ------------------------------------------------------------------ the seed's probe commands

# The seed's size and histology commands, verbatim (data paths and checkpoint are replaced below).
SEED_SIZE = """
--train_images=data/rsp/images --train_annotations=data/rsp/annotations/instances_train.json
--val_images=data/rsp/images --val_annotations=data/rsp/annotations/instances_val.json --dataset_type=coco
--seed=42 --max_epochs=20 --opt_type=adamw --opt_lr=0.0001 --opt_weight_decay=0 --lr_sched_type=onecycle
--batch_size=64 --data_im_size=232 --data_fragment_length=8 --data_fragment_stride=4
--data_fragment_drop_last --data_aug_anchorcrop --data_aug_normalize --num_workers=8 --n_classes=2
--cls_type=mlp --cls_init=default --cls_hidden_dim=256 --encoder_type=hmve --encoder_pooling=cls
--encoder_out_dim=256 --encoder_ckpt=path/to/checkpoint.ckpt --exp_name=my_size_exp
"""
SEED_HISTOLOGY = """
--train_images=data/rspp/images --train_annotations=data/rspp/annotations/instances_train.json
--val_images=data/rspp/images --val_annotations=data/rspp/annotations/instances_val.json --seed=42
--max_epochs=20 --opt_type=adamw --opt_lr=0.00001 --opt_weight_decay=0 --lr_sched_type=onecycle
--batch_size=64 --data_im_size=232 --data_fragment_length=8 --data_fragment_stride=4
--data_fragment_drop_last --data_aug_anchorcrop --data_aug_normalize --num_workers=8 --n_classes=2
--class_mapping=ad_vs_hp --cls_type=mlp --cls_init=default --cls_hidden_dim=256 --encoder_type=hmve
--encoder_pooling=cls --encoder_out_dim=256 --encoder_ckpt=path/to/checkpoint.ckpt --exp_name=my_size_exp
"""


@pytest.fixture(scope="module")
def seed_setup(tmp_path_factory):
    """A small ingested root (size and histology labels: AD, HP, AD per video) and a 256-d hmve
    checkpoint trained at 32 px on that root's train split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.embed_factory import make_ckpt, make_tiny_root

    base = tmp_path_factory.mktemp("seedprobe")
    root = make_tiny_root(base / "ingested", videos={"train": 1, "val": 1})
    path = root / "catalog" / "polyps.parquet"
    t = pq.read_table(path)
    hist = ["HP" if i.endswith("_1") else "AD" for i in t.column("identity_id").to_pylist()]
    pq.write_table(t.set_column(t.schema.get_field_index("histology"), "histology", pa.array(hist)), path)
    ckpt = make_ckpt(
        base / "checkpoint.ckpt", hmve_d_model=256, dataset_root=str(root), split="train", fragment_length=8
    )
    return root, ckpt


def _seed_argv(text: str, data: str, root, ckpt) -> list[str]:
    out = [a.replace(f"data/{data}", str(root)) for a in text.split()]
    return [a.replace("path/to/checkpoint.ckpt", str(ckpt)) for a in out]


@pytest.mark.parametrize(
    "task,text,data", [("size", SEED_SIZE, "rsp"), ("histology", SEED_HISTOLOGY, "rspp")]
)
def test_seed_probe_commands_run_unchanged(seed_setup, task, text, data, tmp_path, monkeypatch, capsys):
    from polyp_ssl.eval.cli import probe_main

    root, ckpt = seed_setup
    monkeypatch.chdir(tmp_path)
    assert probe_main(_seed_argv(text, data, root, ckpt)) == 0
    cap = capsys.readouterr()
    assert f"probe task: {task}" in cap.out
    # the 232-px setting on a 32-px checkpoint, and the encoder's own training split: printed
    assert "--data_im_size 232 differs from the checkpoint's im_size 32" in cap.err
    assert "--data_bbox_scale_factor" not in cap.err  # not given: the checkpoint's own
    assert f"probe train side split {root}:train is the split the encoder was trained on" in cap.err
    assert f"trains on {root.resolve()} split train and evaluates on {root.resolve()} split val" in cap.out
    pattern = f"my_size_exp_probe_{task}_checkpoint-*_train+val_paper_*/probe_{task}.json"
    (found,) = (root / "eval").glob(pattern)  # the two commands share --exp_name, not a folder
    got = json.loads(found.read_text())
    assert got["task"] == task and got["train_side"]["split"] == ["train"]
    assert got["val_side"]["split"] == ["val"]
    assert got["train_side"]["encoder_training_split"] and not got["val_side"]["encoder_training_split"]
    assert got["train_side"]["settings_differ_from_training"][0].startswith("--data_im_size 232")
    assert got["n_train_polyps"] == 3 and got["n_val_polyps"] == 3


def test_probe_task_inference_rule():
    from polyp_ssl.eval.outputs import TaskInferenceError, infer_probe_task

    assert infer_probe_task(["--n_classes=2", "--class_mapping", "ad_vs_hp"])[0] == "histology"
    assert infer_probe_task(["--gradient_clip_val", "1"])[0] == "histology"
    assert infer_probe_task(["--n_classes", "2"])[0] == "size"
    assert infer_probe_task(["--dataset_type=coco"])[0] == "size"
    with pytest.raises(TaskInferenceError, match="pass --task size or --task histology"):
        infer_probe_task(["--dataset_root", "x"])
    with pytest.raises(TaskInferenceError, match="--class_mapping is a flag of the histology probe"):
        infer_probe_task(["--class_mapping=ad_vs_hp", "--dataset_type=coco"])


def test_probe_without_task_or_hint_refuses_in_one_line(seed_setup, capsys):
    from polyp_ssl.eval.cli import probe_main

    root, _ = seed_setup
    assert probe_main(["--dataset_root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polyp-ssl probe: error: cannot infer the probe task") and "\n" not in err


def test_two_probes_with_different_splits_write_two_results(tmp_path, capsys):
    from polyp_ssl.eval.cli import probe_main
    from tests.eval_factory import make_eval_root

    root = make_eval_root(
        tmp_path / "r", splits={"train": 6, "val": 3}, polyps_per_video=4, fragments_per_tracklet=2
    )
    train, val = root / "embeddings" / "train.parquet", root / "embeddings" / "val.parquet"
    common = ["--task", "size", "--max_epochs", "2", "--exp_name", "same", "--train_embeddings", str(train)]
    assert probe_main(common) == 0  # 70/30 of train
    assert probe_main([*common, "--val_embeddings", str(val)]) == 0  # train, then val
    assert probe_main([*common, "--val_embeddings", str(val), "--opt_lr", "0.001"]) == 0  # another setting
    found = sorted((root / "eval").glob("same_probe_size_*/probe_size.json"))
    assert len(found) == 3, found
    rules = sorted(json.loads(f.read_text())["evaluates_on"] for f in found)
    assert rules[0].endswith("split val") and rules[2] == "the other 30% of its polyps"
    assert any("_train+70pct_" in str(f) for f in found) and any("_train+val_" in str(f) for f in found)
    # the same command again: the same folder, refused there; with --overwrite rewritten, not a fourth
    capsys.readouterr()
    assert probe_main(common) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert probe_main([*common, "--overwrite"]) == 0
    assert len(list((root / "eval").glob("same_probe_size_*"))) == 3
    capsys.readouterr()


def test_embed_out_file_is_a_complete_copy(tmp_path, capsys):
    from polyp_ssl.eval.embed import main as embed_main
    from polyp_ssl.eval.embeddings import read_embeddings
    from tests.shard_factory import make_root as make_shard_root

    root = make_shard_root(tmp_path / "r", videos={"test": 1}, frames_per_tracklet=30)
    dst = tmp_path / "mine" / "test_vectors.parquet"
    argv = ["--dataset_root", str(root), "--encoder", "descriptor", "--split", "test", "--out", str(dst)]
    assert embed_main(argv) == 0
    (cached,) = (root / "embeddings").glob("*.parquet")
    assert dst.read_bytes() == cached.read_bytes()
    assert len(read_embeddings(dst, root=root)) == 4
    assert [p.name for p in dst.parent.iterdir()] == ["test_vectors.parquet"]  # no temporary left
    assert f"wrote {dst}" in capsys.readouterr().out
    assert embed_main([*argv[:-1], str(tmp_path)]) == 2  # a folder: refused, one line
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_results_rows_name_root_split_protocol_and_settings(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from polyp_ssl.eval.report import (
        ReportOptions,
        Subject,
        SubjectResult,
        TaskOutcome,
        append_results,
        result_rows,
    )

    opts = ReportOptions(root=tmp_path, out=tmp_path, probe_splits=("val", "test"), im_size=96)
    res = SubjectResult(Subject("run/last", "checkpoint", "runs/run/checkpoints/last.ckpt", "ab" * 32))
    res.outcomes = [
        TaskOutcome("retrieval", {"mAP": 0.5}, 1.0),
        TaskOutcome("size", {"F1": 0.7}, 1.0),
        TaskOutcome("count", {"FPR": 0.01}, 1.0),
    ]
    rows = result_rows(res, "now", "paper: min 30 frames, stride 4, all frames", opts)
    splits = {r["task"]: r["split"] for r in rows}
    assert splits == {"retrieval": "test", "size": "val+test", "count": "val+test"}
    assert {r["dataset_root"] for r in rows} == {str(tmp_path.resolve())}
    settings = {r["task"]: json.loads(r["settings"]) for r in rows}
    assert settings["size"]["fragment_length"] == 8 and "fragment_length" not in settings["retrieval"]
    assert settings["retrieval"]["im_size"] == 96 and settings["count"]["max_fpr"] == 0.05
    # a results file from before these columns: appended to, old rows null there
    old = tmp_path / "results.parquet"
    pq.write_table(pa.table({"checkpoint": ["x"], "task": ["reid"], "metric": ["AUROC"], "value": [0.9],
                             "checkpoint_path": ["p"], "checkpoint_sha256": [None], "time_s": [1.0],
                             "created": ["then"]}), old)  # fmt: skip
    t = pq.read_table(append_results(old, rows))
    assert t.num_rows == 4 and t.column("split").to_pylist() == [None, "test", "val+test", "val+test"]


def test_report_default_folder_is_named_by_its_inputs(tmp_path):
    from polyp_ssl.eval.report import ReportOptions, default_out

    root = tmp_path / "synth"
    opts = ReportOptions(root=root, out=tmp_path)
    a = default_out(opts, ["runs/a"], ["init"], [])
    assert a == default_out(opts, ["runs/a"], ["init"], [])  # the same command: the same folder
    assert a.parent.name == "report" and a.name.startswith("synth_all_paper_")
    others = {
        default_out(opts, ["runs/b"], ["init"], []),
        default_out(opts, ["runs/a"], ["init", "descriptor"], []),
        default_out(ReportOptions(root=root, out=tmp_path, tasks=("reid",)), ["runs/a"], ["init"], []),
        default_out(ReportOptions(root=root, out=tmp_path, min_tracklet_frames=1), ["runs/a"], ["init"], []),
    }
    assert len(others) == 4 and a not in others
    assert any(p.name.startswith("synth_reid_paper_") for p in others)
    assert any(p.name.startswith("synth_all_custom_") for p in others)


def test_eval_of_two_splits_and_counting_write_apart(tmp_path, capsys):
    from polyp_ssl.eval.cli import count_main, eval_main
    from tests.eval_factory import make_eval_root

    root = make_eval_root(tmp_path / "r", splits={"val": 2, "test": 2})
    for split in ("val", "test"):
        emb = str(root / "embeddings" / f"{split}.parquet")
        assert eval_main(["--task", "retrieval", "--embeddings", emb, "--exp_name", "e"]) == 0
    found = sorted(p.parent.name for p in (root / "eval").glob("e_retrieval_*/metrics_retrieval.json"))
    assert len(found) == 2 and "_test_" in found[0] + found[1] and "_val_" in found[0] + found[1]
    got = json.loads((root / "eval" / found[0] / "metrics_retrieval.json").read_text())
    assert got["dataset_root"] == str(root.resolve()) and got["encoder_training_split"] is False
    val, test = (str(root / "embeddings" / f"{s}.parquet") for s in ("val", "test"))
    assert count_main(["--val_embeddings", val, "--test_embeddings", test]) == 0
    (c,) = (root / "eval").glob("count-agglomerative_*_val+test_*/count.json")
    assert json.loads(c.read_text())["test_side"]["split"] == ["test"]
    capsys.readouterr()


def test_setting_mismatches_one_line_each():
    from polyp_ssl.eval.outputs import setting_mismatches, training_split_overlap

    params = {"im_size": 232, "bbox_scale_factor": 5.0, "fragment_stride": 4, "fragment_length": -1,
              "pooling": "cls"}  # fmt: skip
    trained = {"im_size": 96, "bbox_scale_factor": 5, "fragment_stride": 2, "fragment_length": 8,
               "encoder_pooling": "cls"}  # fmt: skip
    lines = setting_mismatches(params, trained)
    assert [ln.split(" differs")[0] for ln in lines] == ["--data_im_size 232", "--data_fragment_stride 4"]
    assert "the checkpoint's im_size 96" in lines[0]
    # fragment embeddings are compared with the training fragment length; the descriptor's 0 is not
    assert setting_mismatches({"fragment_length": 4}, trained)[0].startswith("--data_fragment_length 4")
    assert setting_mismatches({"im_size": 0}, trained) == [] and setting_mismatches(params, {}) == []
    assert training_split_overlap("/r", "train", {"dataset_root": "/r", "split": "train"}) == "/r:train"
    assert training_split_overlap("/r", "val", {"dataset_root": "/r", "split": "train"}) is None
    assert training_split_overlap("/other", "train", {"dataset_root": "/r", "split": "train"}) is None
