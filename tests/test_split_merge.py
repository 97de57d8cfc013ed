"""`polyp-ssl convert merge`, `polyp-ssl split`, REAL-Colon's paper split, and the whole way from
four synthetic raw downloads to a probe on an RSPP-like root (four dataset ids, four histology
vocabularies)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import polyp_ssl.ingest.split as split_mod
from polyp_ssl.entry import main as entry_main
from polyp_ssl.ingest.convert.realcolon import Lesion, paper_split
from polyp_ssl.ingest.split import assign, split_root

SYNTH = ["--frames-per-video", "40", "--width", "96", "--height", "80", "--workers", "1", "--quiet"]


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = entry_main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_assign_is_by_polyp_stratified_and_deterministic():
    polyps = {f"p{i}": ("0" if i % 3 else "1") for i in range(100)}
    a = assign(polyps, [0.7, 0.3], ["train", "val"], seed=42)
    assert a == assign(dict(reversed(list(polyps.items()))), [0.7, 0.3], ["train", "val"], seed=42)
    assert a != assign(polyps, [0.7, 0.3], ["train", "val"], seed=1)
    assert set(a) == set(polyps)
    for stratum in ("0", "1"):
        members = [p for p, s in polyps.items() if s == stratum]
        n_val = sum(a[p] == "val" for p in members)
        assert n_val == round(0.3 * len(members))
    three = assign(polyps, [0.5, 0.25, 0.25], ["a", "b", "c"], seed=0)
    got = Counter(three.values())  # rounded per stratum (67 and 33 polyps): within one of the total's share
    assert sum(got.values()) == 100 and all(
        abs(got[k] - n) <= 1 for k, n in {"a": 50, "b": 25, "c": 25}.items()
    )


def test_paper_split_preset():
    videos = [f"{s:03d}-{v:03d}" for s in range(1, 5) for v in range(1, 16)]
    no_lesion = {"001-002", "002-009", "003-015", "004-004"}
    lesions = {f"{v}_1": Lesion(f"{v}_1", v, 5.0, "AD", None, None) for v in videos if v not in no_lesion}
    got = paper_split(videos, lesions)
    assert Counter(got.values()) == {"train": 30, "val": 7, "test": 19}
    assert not set(got) & no_lesion
    assert got["001-008"] == "train" and got["002-010"] == "val" and got["003-011"] == "test"


@pytest.fixture(scope="module")
def seed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed") / "rc"
    assert entry_main(["synth", str(root), "--videos", "6", "--dataset-id", "realcolon", *SYNTH]) == 0
    return root


def test_split_no_polyp_in_two_splits_atomic_and_rerunnable(seed_root, tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    os.system(f"cp -al {seed_root} {root}")  # hard-linked copy: the module's root stays untouched
    before = {p.stem: json.loads(p.read_text()) for p in (root / "annotations").glob("*.json")}
    n_ann = sum(len(c["annotations"]) for c in before.values())
    polyps = {a["identity_id"] for c in before.values() for a in c["annotations"]}
    rc, out, err = run(capsys, "split", root, "--fractions", "0.7,0.3", "--seed", "42", "--stratify", "size")
    assert rc == 0, err
    assert "train:" in out and "val:" in out
    files = sorted(p.name for p in (root / "annotations").glob("*.json"))
    assert files == ["instances_train.json", "instances_val.json"]
    assert sorted(p.name for p in (root / "annotations" / "source").iterdir()) == sorted(
        f"{s}.json" for s in before
    )
    train, val = coco(root, "train"), coco(root, "val")
    ids = {s: {a["identity_id"] for a in c["annotations"]} for s, c in (("train", train), ("val", val))}
    assert not ids["train"] & ids["val"] and ids["train"] | ids["val"] == polyps
    assert len(train["annotations"]) + len(val["annotations"]) == n_ann  # every box kept
    assert abs(len(ids["val"]) - 0.3 * len(polyps)) <= 2
    for c in (train, val):
        image_ids = {i["id"] for i in c["images"]}
        assert all(a["image_id"] in image_ids for a in c["annotations"])
    first = {p.name: p.read_bytes() for p in (root / "annotations").glob("*.json")}
    # a crash after the first split file: the rerun gives the uninterrupted result
    real = split_mod.write_coco_atomic
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(split_mod, "write_coco_atomic", dying)
    with pytest.raises(OSError):
        split_root(root, [0.7, 0.3], ["train", "val"], 42, "size")
    monkeypatch.setattr(split_mod, "write_coco_atomic", real)
    rc, _, err = run(capsys, "split", root, "--fractions", "0.7,0.3", "--seed", "42", "--stratify", "size")
    assert rc == 0, err
    assert {p.name: p.read_bytes() for p in (root / "annotations").glob("*.json")} == first
    # other fractions re-split from the kept sources
    rc, _, err = run(capsys, "split", root, "--fractions", "0.5,0.25,0.25")
    assert rc == 0, err
    assert sorted(p.name for p in (root / "annotations").glob("*.json")) == [
        "instances_test.json",
        "instances_train.json",
        "instances_val.json",
    ]
    rc, _, err = run(capsys, "split", root, "--fractions", "0.7,0.2")
    assert rc == 2 and "sum to 1" in err


def _convert(capsys, *args):
    rc, out, err = run(capsys, "convert", *args, "--no-progress")
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def rspp(tmp_path_factory, seed_root):
    """Four sources converted from synthetic raw layouts, merged, split 70/30 by polyp, ingested."""
    base = tmp_path_factory.mktemp("rspp")
    for layout, n in (("sun", 5), ("polypsset", 8), ("table", 4)):
        assert (
            entry_main(["synth", str(base / f"raw_{layout}"), "--layout", layout, "--videos", str(n), *SYNTH])
            == 0
        )
    assert entry_main(["convert", "sun", str(base / "raw_sun"), str(base / "sun"), "--no-progress"]) == 0
    assert (
        entry_main(["convert", "polypsset", str(base / "raw_polypsset"), str(base / "pp"), "--no-progress"])
        == 0
    )
    assert (
        entry_main(
            [
                "convert",
                "table",
                str(base / "raw_table" / "boxes.csv"),
                str(base / "psize"),
                "--dataset-id",
                "polypsize",
                "--no-progress",
            ]
        )
        == 0
    )
    return base


def test_merge_split_ingest_probe_end_to_end(rspp, seed_root, tmp_path, capsys):
    base = rspp
    merged = tmp_path / "rspp"
    rc, out, err = run(
        capsys,
        "convert",
        "merge",
        f"{seed_root}::val,test",
        base / "sun",
        base / "psize",
        base / "pp",
        merged,
        "--no-progress",
    )
    assert rc == 0, err
    report = json.loads((merged / "convert_report.json").read_text())
    assert set(report["datasets"]) == {"realcolon", "sun", "polypsize", "polypsset"}
    all_ = coco(merged, "all")
    assert {i["dataset_id"] for i in all_["images"]} == {"realcolon", "sun", "polypsize", "polypsset"}
    # ids cannot collide; histology as each source wrote it; images hard-linked
    assert len({i["id"] for i in all_["images"]}) == len(all_["images"])
    assert len({a["id"] for a in all_["annotations"]}) == len(all_["annotations"])
    by_ds = {}
    images = {i["id"]: i for i in all_["images"]}
    for a in all_["annotations"]:
        ds = images[a["image_id"]]["dataset_id"]
        assert a["identity_id"].startswith(f"{ds}:")
        by_ds.setdefault(ds, set()).add(a["histology"])
    assert by_ds["polypsset"] <= {"adenomatous", "hyperplastic"}
    assert by_ds["realcolon"] <= {"AD", "HP", "SSL", "TSA"}
    assert all(h.endswith(("adenoma", "polyp", "lesion")) for h in by_ds["sun"])
    assert "Tubular Adenoma" in by_ds["polypsize"] or "Hyperplastic Polyp" in by_ds["polypsize"]
    one = all_["images"][0]
    src_ds, name = one["file_name"].split("/", 1)
    assert (merged / "images" / one["file_name"]).stat().st_nlink >= 2
    assert src_ds == one["dataset_id"]
    rc_val = {i["sequence_id"] for s in ("val", "test") for i in coco(seed_root, s)["images"]}
    assert {i["sequence_id"] for i in all_["images"] if i["dataset_id"] == "realcolon"} == rc_val

    rc, out, err = run(capsys, "split", merged, "--fractions", "0.7,0.3", "--stratify", "histology")
    assert rc == 0, err
    out_root = tmp_path / "ingested"
    rc, out, err = run(capsys, "ingest", merged, "--out", out_root, "--no-progress")
    assert rc == 0, err
    errors = pq.read_table(out_root / "catalog" / "errors.parquet").to_pylist()
    actions = Counter(e["action"] for e in errors)
    assert actions["converted"] >= 3 and actions["clamped"] >= 2 and actions["dropped"] >= 2
    sources = {e["source"] for e in errors if e["action"] in ("converted", "clamped", "dropped")}
    assert any(str(base / "sun") in s for s in sources) and any(str(base / "pp") in s for s in sources)
    polyps = pq.read_table(out_root / "catalog" / "polyps.parquet").to_pylist()
    assert {p["dataset_id"] for p in polyps} == {"realcolon", "sun", "polypsize", "polypsset"}

    from polyp_ssl.eval.embed import embeddings_file
    from tests.embed_factory import make_ckpt

    ckpt = make_ckpt(tmp_path / "tiny.ckpt")
    paths = {
        s: embeddings_file(out_root, ckpt, split=s, progress=False, min_tracklet_frames=1, batch_size=16)
        for s in ("train", "val")
    }
    rc, out, err = run(
        capsys,
        "probe",
        "--task",
        "histology",
        "--train_embeddings",
        paths["train"],
        "--val_embeddings",
        paths["val"],
        "--max_epochs",
        "2",
        "--out",
        tmp_path / "probe",
    )
    assert rc == 0, err
    for vocab in ("realcolon", "sun", "polypsize", "polypsset"):
        assert f"polyps, {vocab} vocabulary" in out, out
    got = json.loads((tmp_path / "probe" / "probe_histology.json").read_text())
    counts = got["polyps_by_vocabulary"]
    assert set(counts) == {"realcolon", "sun", "polypsize", "polypsset"}
    embedded = set()
    for p in paths.values():
        embedded |= set(pq.read_table(p, columns=["identity_id"]).column("identity_id").to_pylist())
    ds_of = {p["identity_id"]: p["dataset_id"] for p in polyps}
    want = Counter(ds_of[i] for i in embedded)
    assert {v: sum(c.values()) for v, c in counts.items()} == dict(want)
    assert np.all([c.get("adenoma", 0) + c.get("non-adenoma", 0) > 0 for c in counts.values()])


def test_merge_refuses_colliding_dataset_ids_and_bad_sources(rspp, tmp_path, capsys):
    rc, _, err = run(capsys, "convert", "merge", rspp / "sun", rspp / "sun", tmp_path / "m", "--no-progress")
    assert rc == 2 and "dataset id 'sun'" in err
    rc, _, err = run(capsys, "convert", "merge", f"{rspp / 'sun'}::val", tmp_path / "m", "--no-progress")
    assert rc == 1 and "instances_val.json" in err and "not found" in err
    assert not (tmp_path / "m").exists()
    rc, _, err = run(
        capsys,
        "convert",
        "merge",
        rspp / "sun",
        rspp / "pp",
        tmp_path / "m2",
        "--dataset-ids",
        "a,b",
        "--keep-splits",
        "--no-progress",
    )
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "m2" / "annotations").iterdir()) == [
        "instances_all.json",
        "instances_test.json",
        "instances_val.json",
    ]


def test_realcolon_paper_split_preset_from_the_cli(tmp_path, capsys):
    from tests.convert_factory import LESIONS, build_raw

    raw = build_raw(tmp_path / "raw", lesions=LESIONS[:2] + LESIONS[3:])  # 001-002 has no lesion row
    rc, out, err = run(
        capsys, "convert", "realcolon", raw, tmp_path / "rc", "--split-file", "paper", "--no-progress"
    )
    assert rc == 0, err
    train = coco(tmp_path / "rc", "train")
    assert {i["sequence_id"] for i in train["images"]} == {"001-001", "002-001"}  # videos 001 with a lesion
    assert sorted(p.name for p in (tmp_path / "rc" / "annotations").iterdir()) == ["instances_train.json"]
