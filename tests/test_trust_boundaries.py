"""Data never chooses code or location: catalog shard values, ids used in paths, symbolic links in
raw input, substituted shards and embeddings view names, each against a hostile corpus."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polyp_ssl.entry import main as entry_main
from polyp_ssl.ingest.coco import video_id_of
from polyp_ssl.ingest.sources import link_problem
from polyp_ssl.shards.catalog import connect, query, view_names
from polyp_ssl.shards.ids import UnsafeIdError, id_problem, path_component
from polyp_ssl.shards.locations import ShardIdentity, UnsafeLocation, location_problem, shard_location
from polyp_ssl.shards.schema import embeddings_schema
from polyp_ssl.shards.verify import verify_root
from polyp_ssl.stream import (
    BagStream,
    DataConfigError,
    ShardError,
    StreamParams,
    ValTracklets,
    build_index,
    iter_tar_samples,
)
from tests import ingest_fixtures
from tests.damage_helpers import PARAMS, SHARD
from tests.shard_factory import make_root
from tests.train_helpers import TINY

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = entry_main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    root = make_root(tmp_path_factory.mktemp("trust"), videos={"train": 4, "val": 2})
    record_sha256(root)
    return root


@pytest.fixture
def root(clean_root, tmp_path):
    out = tmp_path / "root"
    shutil.copytree(clean_root, out)
    return out


def record_sha256(root: Path) -> None:
    """Fill the shards table's sha256 (the factory leaves it empty) as ingest does."""
    path = root / "catalog" / "shards.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    for r in rows:
        data = (root / r["path"]).read_bytes()
        r["n_bytes"], r["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def set_shard_column(root: Path, value: str, only: str | None = SHARD) -> None:
    """Point tracklets (those of shard `only`, or all) and the shards table row at `value`."""
    for name, column in (("tracklets", "shard"), ("shards", "path")):
        path = root / "catalog" / f"{name}.parquet"
        table = pq.read_table(path)
        rows = table.to_pylist()
        for r in rows:
            if only is None or r[column] == only:
                r[column] = value
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def params(mode: str = "fail") -> StreamParams:
    return StreamParams(**PARAMS, on_shard_error=mode)


# ---------------------------------------------------------------- 1. shard locations


HOSTILE_LOCATIONS = [
    "PIPE:touch {m}; cat {real}",
    "pipe:touch {m}",
    "Pipe:touch {m}",
    "file:///etc/passwd",
    "file:shards/train/train-000000.tar",
    "http://127.0.0.1:9/x.tar",
    "s3://bucket/x.tar",
    "shards/../../x.tar",
    "shards/train/../../../etc/passwd",
    "/etc/passwd",
    "~/x.tar",
    "shards//train/train-000000.tar",
    "./shards/train/train-000000.tar",
    "shards\\..\\..\\x.tar",
    "C:\\shards\\x.tar",
    "shards/train/x\x00.tar",
    "shards/train/x\n.tar",
    "",
]


@pytest.mark.parametrize("value", HOSTILE_LOCATIONS)
def test_a_catalog_shard_value_that_is_not_a_relative_path_is_refused(value, tmp_path):
    value = value.format(m=tmp_path / "marker", real=SHARD)
    assert location_problem(value) is not None
    with pytest.raises(UnsafeLocation):
        shard_location(value, tmp_path)
    assert not (tmp_path / "marker").exists()


def test_plain_relative_values_are_kept_as_given(tmp_path):
    for value in (SHARD, "shards/val/val-p001-000002.tar", "shards/a:b/x.tar", "shards/é/x y.tar"):
        assert location_problem(value) is None
        assert shard_location(value, tmp_path) == str(tmp_path / value)


def test_a_command_in_the_shard_column_never_runs_python_api(root, tmp_path):
    marker = tmp_path / "executed"
    set_shard_column(root, f"pipe:touch {marker}; cat {root / SHARD}")
    with pytest.raises(DataConfigError) as info:
        build_index(root, "train", params())
    msg = str(info.value)
    assert "shards.parquet" in msg and "field 'path'" in msg and "URL scheme" in msg, msg
    assert not marker.exists()
    # the tracklets' column alone (shards table left intact) is named the same way
    set_shard_column(root, SHARD, only=None)
    path = root / "catalog" / "tracklets.parquet"
    table = pq.read_table(path)
    rows = [{**r, "shard": f"PIPE:touch {marker}"} if r["split"] == "train" else r for r in table.to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    with pytest.raises(DataConfigError, match=r"tracklets\.parquet: tracklet '.*#\d+': field 'shard'"):
        build_index(root, "train", params())
    assert not marker.exists()


def test_a_command_in_the_shard_column_never_runs_train_cli(root, tmp_path):
    marker = tmp_path / "executed"
    set_shard_column(root, f"pipe:touch {marker}; cat {root / SHARD}")
    cmd = [
        sys.executable,
        "-m",
        "polyp_ssl",
        "train",
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--exp_name",
        "e",
        "--max_steps",
        "1",
        "--limit_val_batches",
        "0",
        *TINY,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("polyp-ssl train: error: "), proc.stderr
    assert "shards.parquet" in errors[0] and "field 'path'" in errors[0] and "pipe:touch" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_a_shard_linked_outside_the_root_is_refused_and_one_inside_is_read(root, tmp_path):
    outside = tmp_path / "elsewhere.tar"
    shutil.move(root / SHARD, outside)
    (root / SHARD).symlink_to(outside)
    with pytest.raises(DataConfigError, match="leaves the root .* through a symbolic link"):
        build_index(root, "train", params())
    # verify names it too, without reading it
    problems = [p for p in verify_root(root).problems if p.kind == "bad_path"]
    assert problems and "symbolic link" in problems[0].detail
    # a link that stays inside the root is fine
    (root / SHARD).unlink()
    inside = root / "shards" / "moved.tar"
    shutil.move(outside, inside)
    (root / SHARD).symlink_to(inside)
    assert len(list(BagStream(build_index(root, "train", params()), params()))) > 0


def test_eval_readers_refuse_hostile_shard_values(root, tmp_path, capsys):
    from polyp_ssl.eval.embed import EmbedError, split_shards
    from polyp_ssl.eval.gallery import read_middle_crops
    from polyp_ssl.eval.report import ReportError, _shard_of

    marker = tmp_path / "executed"
    set_shard_column(root, "shards/../../outside.tar")
    with pytest.raises(EmbedError, match=r"shards\.parquet: shard '.*': field 'path': .*climbs out"):
        split_shards(root, "train")
    with pytest.raises(ReportError, match=r"tracklets\.parquet: tracklet .*field 'shard'"):
        _shard_of(root)
    with pytest.raises(UnsafeLocation):
        read_middle_crops(root, [(f"pipe:touch {marker}", "k")], 2.0)
    problems = verify_root(root).problems
    assert any(p.kind == "bad_path" and "climbs" in p.detail for p in problems)
    rc, err = run_cli(
        ["embed", "--encoder", "descriptor", "--dataset_root", str(root), "--split", "train"], capsys
    )
    assert rc == 2 and err.count("\n") == 1 and "climbs out" in err, err
    assert not marker.exists()


def test_a_pipe_shard_base_quotes_the_catalog_value(root, tmp_path):
    """The user's `pipe:` base runs; a catalog value appended to it is one shell word."""
    marker = tmp_path / "executed"
    weird = f"shards/train/x;touch {marker.name};.tar"
    shutil.copy(root / SHARD, root / weird)
    url = shard_location(weird, root, f"pipe:cat {root}")
    assert url == f"pipe:cat {root}/'{weird}'"
    samples = list(iter_tar_samples(url))
    assert len(samples) > 0
    assert not marker.exists() and not (root / marker.name).exists() and not Path(marker.name).exists()
    assert shard_location(SHARD, root, f"pipe:cat {root}") == f"pipe:cat {root}/{SHARD}"  # unchanged
    assert shard_location("shards/a b#?.tar", root, "https://h/x/") == "https://h/x/shards/a%20b%23%3F.tar"


# ---------------------------------------------------------------- 2. substituted shards


def substitute_same_size(root: Path) -> None:
    """A valid shard of the same size with other content: one sample's histology "AD" -> "HP"
    (what a swapped label file would look like); every sample still passes its own checks."""
    old = (root / SHARD).read_bytes()
    at = old.index(b'"AD"')
    new = old[:at] + b'"HP"' + old[at + 4 :]
    assert len(new) == len(old) and new != old
    (root / SHARD).write_bytes(new)


# the sequential reader hashes every byte it streams; random access checks each member's CRC-32
CHANGED_TEXT = {"sequential": "sha256", "random": "CRC-32"}
OTHER_SIZE = {
    "sequential": r"\d+ bytes, the catalog says \d+.*\[shard_changed\]",
    "random": r"the file is \d+ bytes, the catalog's shards table says \d+.*\[shard_changed\]",
}


@pytest.mark.parametrize("access", ["sequential", "random"])
def test_a_substituted_shard_of_the_same_size_is_named_fail(root, access):
    substitute_same_size(root)
    p = replace(params(), shard_access=access)
    with pytest.raises(ShardError) as info:
        list(BagStream(build_index(root, "train", p), p))
    assert info.value.reason == "shard_changed" and SHARD in str(info.value)
    assert CHANGED_TEXT[access] in str(info.value)


@pytest.mark.parametrize("access", ["sequential", "random"])
def test_a_substituted_shard_is_counted_in_warn_and_the_epoch_keeps_its_length(root, access):
    substitute_same_size(root)
    p = replace(params("warn"), shard_access=access)
    ds = BagStream(build_index(root, "train", p), p)
    assert len(list(ds)) == len(ds) > 0
    assert ds.shared.skip_counts().get("shard_changed", 0) >= 1


@pytest.mark.parametrize("access", ["sequential", "random"])
def test_a_shard_of_another_size_is_named_after_its_own_damage(root, access):
    p = replace(params(), shard_access=access)
    data = (root / SHARD).read_bytes()
    (root / SHARD).write_bytes(data + bytes(10240))  # valid tar, more end padding
    with pytest.raises(ShardError, match=OTHER_SIZE[access]):
        list(BagStream(build_index(root, "train", p), p))
    (root / SHARD).write_bytes(data[: len(data) // 2])  # truncated: its own reason comes first
    with pytest.raises(ShardError) as info:
        list(BagStream(build_index(root, "train", p), p))
    assert info.value.reason == "truncated_shard"


def test_a_substituted_shard_behind_a_url_base_is_found_by_its_hash(root):
    import fsspec

    substitute_same_size(root)
    fs = fsspec.filesystem("memory")
    for path in (root / "shards").rglob("*.tar"):
        fs.pipe(f"/trust/root/{path.relative_to(root).as_posix()}", path.read_bytes())
    index = build_index(root, "train", params(), shard_base="memory://trust/root")
    with pytest.raises(ShardError) as info:
        list(BagStream(index, params()))
    assert info.value.reason == "shard_changed" and "memory://trust/root/" + SHARD in str(info.value)


def test_clean_shards_with_recorded_hashes_skip_nothing_and_val_checks_too(root):
    ds = BagStream(build_index(root, "train", params("warn")), params("warn"))
    assert len(list(ds)) == len(ds) and ds.shared.skip_counts() == {}
    index = build_index(root, "val", params(), min_tracklet_length=0, require_bags=False)
    assert len(list(ValTracklets(index, params(), batch_size=4))) > 0
    rel = next(iter(index.shard_identity))
    assert index.shard_identity[rel] == ShardIdentity(
        (root / rel).stat().st_size, index.shard_identity[rel].sha256
    )
    data = bytearray((root / rel).read_bytes())
    data[-1] ^= 1  # in the end-of-archive padding: every sample still reads the same
    (root / rel).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard_changed"):
        list(ValTracklets(index, params(), batch_size=4))


def test_embed_refuses_a_changed_shard(root):
    from polyp_ssl.eval.embed import EmbedError, _checked_samples, split_shards

    substitute_same_size(root)
    paths = split_shards(root, "train")
    with pytest.raises(EmbedError, match=r"train-000000\.tar: sha256 .* says"):
        list(_checked_samples(root, paths))
    (root / SHARD).write_bytes((root / SHARD).read_bytes()[:-512])
    with pytest.raises(EmbedError, match=r"train-000000\.tar: \d+ bytes, .* says \d+"):
        split_shards(root, "train")


# ---------------------------------------------------------------- 3. ids in paths


@pytest.mark.parametrize(
    "value",
    ["", ".", "..", "a/b", "a\\b", "../x", "a\x00b", "a\nb", "tab\there", "\x7f", "x" * 201, "\udcff"],
)
def test_ids_that_are_not_one_plain_name_are_refused(value):
    assert id_problem(value) is not None
    with pytest.raises(UnsafeIdError, match="split"):
        path_component(value, "split")


def test_ordinary_ids_are_kept_exactly():
    for value in ("train", "val-2", "001-001", "ds1", "case M 7", "100%", "%2F", "é", "a.b", "x" * 200):
        assert path_component(value, "id") == value
    assert video_id_of("seqB", "ds1") == "ds1/seqB" and video_id_of("seqA", None) == "seqA"
    with pytest.raises(UnsafeIdError):
        video_id_of("c", "a/b")
    with pytest.raises(UnsafeIdError):
        video_id_of("b/c", "a")


def ingest_case(tmp_path: Path, change) -> tuple[Path, dict]:
    root = tmp_path / "raw"
    coco = ingest_fixtures.make_root(str(root))
    change(coco)
    ingest_fixtures.write_coco(str(root), "train", coco)
    return root, coco


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("dataset_id", "a/b", "path separator"),  # a/b + c would be the video of a + b/c
        ("sequence_id", "b/c", "path separator"),
        ("sequence_id", "", "is empty"),
        ("sequence_id", "..", "relative folder"),
        ("sequence_id", "seq\x00A", "NUL"),
        ("dataset_id", "..", "relative folder"),
        ("sequence_id", "s\x1b[31m", "control character"),
    ],
)
def test_ingest_refuses_ids_that_would_collide_or_leave_a_folder(tmp_path, capsys, field, value, words):
    def change(coco):
        coco["images"][0][field] = value

    root, coco = ingest_case(tmp_path, change)
    out = tmp_path / "out"
    rc, err = run_cli(["ingest", str(root), "--out", str(out), "--no-progress"], capsys)
    img = coco["images"][0]["id"]
    assert rc == 1, err
    assert "instances_train.json" in err and f"image {img}" in err and f"field {field!r}" in err, err
    assert words in err and "[unsafe_id]" in err and "Traceback" not in err
    assert not (out / "shards").exists() or not any((out / "shards").rglob("*.tar"))


@pytest.mark.parametrize("split", ["..", ".", "a/b", "../../escape", "x\ny"])
def test_ingest_refuses_unsafe_split_names(tmp_path, capsys, split):
    root = tmp_path / "raw"
    ingest_fixtures.make_root(str(root))
    out = tmp_path / "deep" / "out"
    rc, err = run_cli(["ingest", str(root), "--out", str(out), "--no-progress", "--splits", split], capsys)
    assert rc == 2, err
    assert f"instances_{split}.json" in err and "split name" in err and "Traceback" not in err, err
    assert not any(p.suffix == ".tar" for p in tmp_path.rglob("*"))


def test_ingest_refuses_a_split_named_dot_dot_found_on_disk(tmp_path, capsys):
    root = tmp_path / "raw"
    ingest_fixtures.make_root(str(root))
    os.rename(root / "annotations" / "instances_train.json", root / "annotations" / "instances_...json")
    rc, err = run_cli(["ingest", str(root), "--no-progress"], capsys)
    assert rc == 2 and "instances_...json" in err and "'..'" in err, err
    assert not any(p.suffix == ".tar" for p in tmp_path.rglob("*"))


def test_embed_refuses_an_unsafe_name(tmp_path, capsys):
    root = make_root(tmp_path / "r", videos={"test": 2})
    for name in ("../outside", "a/b", "..", "x\x00"):
        rc, err = run_cli(
            ["embed", "--encoder", "descriptor", "--dataset_root", str(root), "--name", name], capsys
        )
        assert rc == 2 and "--name" in err and err.count("\n") == 1, err
    assert not (tmp_path / "outside.parquet").exists() and not (root / "embeddings").exists()


# ---------------------------------------------------------------- 4. symbolic links in raw input


def test_link_problem_walks_every_component(tmp_path):
    (tmp_path / "root" / "images").mkdir(parents=True)
    (tmp_path / "root" / "images" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    root = str(tmp_path / "root")
    assert link_problem(root, "images/a.jpg") is None
    os.symlink(tmp_path / "secret", tmp_path / "root" / "images" / "out.jpg")
    os.symlink("a.jpg", tmp_path / "root" / "images" / "in.jpg")
    assert "symbolic link" in link_problem(root, "images/out.jpg")
    assert "outside" in link_problem(root, "images/out.jpg", follow_symlinks=True)
    assert "symbolic link" in link_problem(root, "images/in.jpg")
    assert link_problem(root, "images/in.jpg", follow_symlinks=True) is None
    # a link inside the root that leads to a link outside: resolved all the way, refused
    os.symlink("out.jpg", tmp_path / "root" / "images" / "chain.jpg")
    assert "outside" in link_problem(root, "images/chain.jpg", follow_symlinks=True)
    assert link_problem(root, "images/missing.jpg") is None  # reported as missing by the caller


def frame_names(coco: dict) -> list[str]:
    return [img["file_name"] for img in coco["images"]]


def test_ingest_refuses_a_frame_linked_to_a_host_file(tmp_path, capsys):
    root = tmp_path / "raw"
    coco = ingest_fixtures.make_root(str(root))
    secret = tmp_path / "host_secret.jpg"
    victim = frame_names(coco)[3]
    shutil.move(root / "images" / victim, secret)
    (root / "images" / victim).symlink_to(secret)
    for extra in ([], ["--follow-symlinks"]):
        out = tmp_path / f"out{len(extra)}"
        rc, err = run_cli(["ingest", str(root), "--out", str(out), "--no-progress", *extra], capsys)
        assert rc == 1, err
        assert str(root / "images" / victim) in err and "field 'file_name'" in err and "[symlink]" in err, err
        assert ("outside" in err) == bool(extra)


def test_ingest_skip_mode_leaves_the_linked_frame_out(tmp_path, capsys):
    root = tmp_path / "raw"
    coco = ingest_fixtures.make_root(str(root))
    victim = frame_names(coco)[3]
    shutil.move(root / "images" / victim, tmp_path / "host.jpg")
    (root / "images" / victim).symlink_to(tmp_path / "host.jpg")
    rc, err = run_cli(["ingest", str(root), "--no-progress", "--on-error", "skip"], capsys)
    assert rc == 0, err
    errors = pq.read_table(root / "catalog" / "errors.parquet").to_pylist()
    linked = [e for e in errors if e["reason"] == "symlink"]
    n_boxes = sum(1 for a in coco["annotations"] if a["image_id"] == coco["images"][3]["id"])
    assert len(linked) == n_boxes and all(e["source"] == str(root / "images" / victim) for e in linked)
    frames = pq.read_table(root / "catalog" / "frames.parquet").to_pylist()
    assert victim not in {f["file_name"] for f in frames}


def test_links_inside_the_root_need_the_flag(tmp_path, capsys):
    root = tmp_path / "raw"
    coco = ingest_fixtures.make_root(str(root))
    victim = frame_names(coco)[3]
    (root / "store").mkdir()
    shutil.move(root / "images" / victim, root / "store" / victim)
    (root / "images" / victim).symlink_to(Path("..") / "store" / victim)
    rc, err = run_cli(["ingest", str(root), "--out", str(tmp_path / "a"), "--no-progress"], capsys)
    assert rc == 1 and "[symlink]" in err and "--follow-symlinks" in err, err
    rc, err = run_cli(
        ["ingest", str(root), "--out", str(tmp_path / "b"), "--no-progress", "--follow-symlinks"], capsys
    )
    assert rc == 0, err
    frames = pq.read_table(tmp_path / "b" / "catalog" / "frames.parquet").num_rows
    assert frames == len(coco["annotations"])


def test_a_linked_images_folder_is_refused_unless_it_stays_inside(tmp_path, capsys):
    root = tmp_path / "raw"
    coco = ingest_fixtures.make_root(str(root))
    shutil.move(root / "images", tmp_path / "images_elsewhere")
    (root / "images").symlink_to(tmp_path / "images_elsewhere")
    rc, err = run_cli(
        ["ingest", str(root), "--out", str(tmp_path / "a"), "--no-progress", "--follow-symlinks"], capsys
    )
    assert rc == 1 and "outside" in err and "[symlink]" in err, err
    (root / "images").unlink()
    shutil.move(tmp_path / "images_elsewhere", root / "frames_store")
    (root / "images").symlink_to("frames_store")
    rc, err = run_cli(["ingest", str(root), "--out", str(tmp_path / "b"), "--no-progress"], capsys)
    assert rc == 1 and "symbolic link" in err, err
    rc, err = run_cli(
        ["ingest", str(root), "--out", str(tmp_path / "c"), "--no-progress", "--follow-symlinks"], capsys
    )
    assert rc == 0, err
    assert pq.read_table(tmp_path / "c" / "catalog" / "frames.parquet").num_rows == len(coco["annotations"])


def rc_raw(tmp_path: Path) -> Path:
    from tests.convert_factory import build_raw

    return build_raw(tmp_path / "rc_raw")


def test_convert_refuses_linked_raw_frames_and_xmls(tmp_path, capsys):
    raw = rc_raw(tmp_path)
    frame = raw / "001-001_frames" / "001-001_1.jpg"
    shutil.move(frame, tmp_path / "host.jpg")
    frame.symlink_to(tmp_path / "host.jpg")
    for extra in ([], ["--follow-symlinks"]):
        out = tmp_path / f"rc{len(extra)}"
        rc, err = run_cli(["convert", "realcolon", str(raw), str(out), "--no-progress", *extra], capsys)
        assert rc == 1 and str(frame) in err and "field 'filename'" in err, err
        assert ("outside" in err) == bool(extra)
        assert not (out / "images" / frame.name).exists()
    frame.unlink()
    shutil.move(tmp_path / "host.jpg", frame)
    xml = raw / "002-001_annotations" / "002-001_0.xml"
    shutil.move(xml, tmp_path / "host.xml")
    xml.symlink_to(tmp_path / "host.xml")
    rc, err = run_cli(["convert", "realcolon", str(raw), str(tmp_path / "rcx"), "--no-progress"], capsys)
    assert rc == 1 and str(xml) in err and "symbolic link" in err, err
    rc, err = run_cli(
        ["convert", "realcolon", str(raw), str(tmp_path / "rcs"), "--no-progress", "--on-error", "skip"],
        capsys,
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "rcs" / "convert_report.json").read_text())
    assert report["skipped"] == {"symlink": 1}


def test_convert_follows_links_inside_raw_only_with_the_flag(tmp_path, capsys):
    raw = rc_raw(tmp_path)
    frames = raw / "001-002_frames"
    shutil.move(frames, raw / "store")
    frames.symlink_to("store")  # a linked video folder, inside RAW_DIR
    rc, err = run_cli(["convert", "realcolon", str(raw), str(tmp_path / "a"), "--no-progress"], capsys)
    assert rc == 1 and "symbolic link" in err and "001-002_frames" in err, err
    rc, err = run_cli(
        [
            "convert",
            "realcolon",
            str(raw),
            str(tmp_path / "b"),
            "--no-progress",
            "--follow-symlinks",
            "--link",
            "copy",
        ],
        capsys,
    )
    assert rc == 0, err
    assert (tmp_path / "b" / "images" / "001-002_0.jpg").read_bytes() == (
        raw / "store" / "001-002_0.jpg"
    ).read_bytes()
    (raw / "lesion_info.csv").rename(tmp_path / "lesions.csv")
    (raw / "lesion_info.csv").symlink_to(tmp_path / "lesions.csv")
    rc, err = run_cli(
        ["convert", "realcolon", str(raw), str(tmp_path / "c"), "--no-progress", "--follow-symlinks"], capsys
    )
    assert rc == 1 and "lesion_info.csv" in err and "outside" in err, err


def test_a_symlinked_conversion_ingests_only_when_its_raw_folder_is_named(tmp_path, capsys):
    """`convert --link symlink` makes images/ links into RAW, outside the converted root: ingest
    refuses them by default and with a bare --follow-symlinks, and reads them when the user names
    RAW (`--follow-symlinks RAW`); a folder named there is the user's word, never the data's."""
    raw = rc_raw(tmp_path)
    out = tmp_path / "root"
    convert = ["convert", "realcolon", str(raw), str(out), "--no-progress", "--link", "symlink"]
    rc, err = run_cli(convert, capsys)
    assert rc == 0, err
    assert all(p.is_symlink() for p in (out / "images").iterdir())
    ingest = ["ingest", str(out), "--no-progress"]
    rc, err = run_cli(ingest, capsys)
    assert rc == 1 and "symbolic link" in err, err
    rc, err = run_cli([*ingest, "--follow-symlinks"], capsys)
    assert rc == 1 and "outside" in err, err
    rc, err = run_cli([*ingest, "--follow-symlinks", str(tmp_path / "elsewhere")], capsys)
    assert rc == 1 and "outside" in err, err
    rc, err = run_cli([*ingest, "--follow-symlinks", str(raw)], capsys)
    assert rc == 0, err
    assert verify_root(out).ok


def test_link_policy_of_the_flag():
    from polyp_ssl.ingest.sources import link_targets

    assert link_targets(None) is False and link_targets([]) is True
    assert link_targets(["a", "/b"]) == (os.path.abspath("a"), "/b")


# ---------------------------------------------------------------- 5. embeddings view names


def write_embeddings_file(path: Path, n: int = 3) -> None:
    path.parent.mkdir(exist_ok=True)
    rows = [
        {
            "tracklet_id": f"t{i}",
            "sample_key": f"k{i}",
            "split": "train",
            "video_id": "v",
            "identity_id": "p",
            "fragment_index": -1,
            "start_frame": i,
            "vector": [float(i)] * 4,
        }
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=embeddings_schema(4)), path)


@pytest.mark.parametrize(
    "names",
    [("a-b", "a_b"), ("a.b", "a b", "a-b"), ("x%y", "x_y"), ("hmve v1", "hmve-v1")],
)
def test_colliding_embeddings_files_are_left_out_and_the_rest_works(clean_root, tmp_path, caplog, names):
    root = tmp_path / "root"
    shutil.copytree(clean_root, root)
    for name in names:
        write_embeddings_file(root / "embeddings" / f"{name}.parquet")
    write_embeddings_file(root / "embeddings" / "other.parquet", n=5)
    view = "embeddings_" + names[1].replace("-", "_").replace(" ", "_").replace(".", "_").replace("%", "_")
    with caplog.at_level(logging.WARNING, logger="polyp_ssl.shards.catalog"):
        con = connect(root)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"{n}.parquet" in warned for n in names) and view in warned, warned
    try:
        assert view not in view_names(con) and "embeddings_other" in view_names(con)
        assert con.execute("SELECT count(*) FROM embeddings_other").fetchone()[0] == 5
        assert con.execute("SELECT count(*) FROM tracklets").fetchone()[0] > 0
        with pytest.raises(Exception) as info:
            con.execute(f"SELECT count(*) FROM {view}").fetchall()
        assert "left out" in str(info.value) and all(f"{n}.parquet" in str(info.value) for n in names)
    finally:
        con.close()
    assert query(root, "SELECT count(*) AS n FROM shards").to_pylist()[0]["n"] > 0


def test_the_catalog_cli_still_lists_and_queries_with_a_collision(clean_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(clean_root, root)
    write_embeddings_file(root / "embeddings" / "it's-odd.parquet")
    write_embeddings_file(root / "embeddings" / "it_s_odd.parquet")
    rc, err = run_cli(["catalog", str(root), "--tables"], capsys)
    assert rc == 0, err
    rc, err = run_cli(["catalog", str(root), "SELECT count(*) FROM tracklets"], capsys)
    assert rc == 0, err
    rc, err = run_cli(["catalog", str(root), "SELECT * FROM embeddings_it_s_odd"], capsys)
    assert rc != 0 and "left out" in err and "it's-odd.parquet" in err and "Traceback" not in err, err
