"""The bad-input corpus (tests/bad_corpus.py) through the real `polyp-ssl` CLI: every case exits
non-zero with a message naming the file, id and field, and writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bad_corpus import COCO_CASES, RC_CASES, BadCase, build_corpus, coco_videos, files_under
from ingest_fixtures import make_root, write_coco

from polyp_ssl.entry import main as entry_main
from polyp_ssl.shards.labels import count_histology

MIN_CASES = 15


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, BadCase]:
    cases = build_corpus(tmp_path_factory.mktemp("bad"))
    return {c.name: c for c in cases}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = entry_main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def names() -> list[str]:
    # the same names build_corpus makes, without building it at collection time
    cli = ["negative_workers", "part_index_past_count", "part_not_a_fraction", "shard_max_bytes_zero",
           "shard_max_bytes_not_a_size", "unknown_on_error", "jpeg_quality_out_of_range",
           "resume_and_overwrite", "out_is_a_file", "convert_unknown_link"]  # fmt: skip
    return (
        [f"coco/{n}" for n in COCO_CASES] + [f"realcolon/{n}" for n in RC_CASES] + [f"cli/{n}" for n in cli]
    )


def test_corpus_is_large_enough_and_named_as_listed(corpus):
    assert sorted(corpus) == sorted(names())
    groups = {c.group for c in corpus.values()}
    assert groups == {"coco", "realcolon", "cli"}
    assert len(corpus) >= MIN_CASES
    assert sum(c.group == "coco" for c in corpus.values()) >= 15


@pytest.mark.parametrize("name", names())
def test_bad_input_is_refused_with_a_specific_message_and_nothing_written(corpus, capsys, name):
    case = corpus[name]
    kept = {k: Path(case.out, k).read_bytes() for k in case.keep}
    rc, err = run_cli(case.argv, capsys)
    assert rc not in (0, None), err
    missing = [w for w in case.words if w not in err]
    assert not missing, f"message lacks {missing}: {err}"
    assert "Traceback" not in err
    assert files_under(case.out) == sorted(case.keep), files_under(case.out)
    for k, data in kept.items():
        assert Path(case.out, k).read_bytes() == data


def test_the_good_inputs_of_the_corpus_do_work(corpus, capsys, tmp_path):
    """The cases differ from a working input by their one defect only."""
    some = corpus["coco/bbox_nan"]
    good_root = os.path.join(os.path.dirname(os.path.dirname(some.out)), "_coco_good")
    rc, err = run_cli(["ingest", good_root, "--no-progress", "--out", str(tmp_path / "ing")], capsys)
    assert rc == 0, err
    good_raw = os.path.join(os.path.dirname(os.path.dirname(some.out)), "_rc_good")
    rc, err = run_cli(["convert", "realcolon", good_raw, str(tmp_path / "rc"), "--no-progress"], capsys)
    assert rc == 0, err


def test_unknown_histology_is_kept_and_counted(tmp_path, capsys):
    root = tmp_path / "root"
    coco = make_root(str(root), coco_videos())
    for a in coco["annotations"]:
        if a["identity_id"] == "v2_a":
            a["histology"] = "Mystery lesion (site B code 7)"
    write_coco(str(root), "train", coco)
    rc, err = run_cli(["ingest", str(root), "--no-progress"], capsys)
    assert rc == 0, err
    polyps = {p["identity_id"]: p for p in pq.read_table(root / "catalog" / "polyps.parquet").to_pylist()}
    assert polyps["v2_a"]["histology"] == "Mystery lesion (site B code 7)"  # kept as given
    assert polyps["v1_a"]["histology"] == "AD"
    labels, left_out = count_histology([p["histology"] for p in polyps.values()])
    assert sorted(labels, key=str) == [1, None] and left_out == {"Mystery lesion (site B code 7)": 1}
    assert pq.read_table(root / "catalog" / "frames.parquet").num_rows == len(coco["annotations"])


@pytest.mark.parametrize(
    "name, reason",
    [("bbox_nan", "nan_box"), ("size_negative", "bad_value"), ("bbox_huge_numbers", "box_outside_frame")],
)
def test_skip_mode_records_the_bad_annotation_and_keeps_the_rest(corpus, capsys, tmp_path, name, reason):
    case = corpus[f"coco/{name}"]
    root = case.argv[1]
    rc, err = run_cli(["ingest", root, "--no-progress", "--out", str(tmp_path), "--on-error", "skip"], capsys)
    assert rc == 0, err
    errors = pq.read_table(tmp_path / "catalog" / "errors.parquet").to_pylist()
    assert [(e["reason"], e["action"]) for e in errors] == [(reason, "skipped")]
    n_in = len(json.loads(Path(root, "annotations", "instances_train.json").read_text())["annotations"])
    assert pq.read_table(tmp_path / "catalog" / "frames.parquet").num_rows == n_in - 1  # nothing else lost
