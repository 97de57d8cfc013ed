"""Damaged data at training time: the streaming loader names the shard and the sample, and
`--on_shard_error` chooses between stopping (`fail`) and skipping with counts (`warn`)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from polyp_ssl.stream import (
    BagStream,
    SampleDamage,
    ShardError,
    StreamParams,
    build_index,
    check_sample,
)
from polyp_ssl.train_cli import main
from tests.damage_helpers import (
    PARAMS,
    SHARD,
    catalog_agrees,
    first_key,
    make_stream,
    read_members,
    record_spans,
    write_members,
)
from tests.shard_factory import make_root
from tests.train_helpers import TINY


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("clean"), videos={"train": 4, "val": 2})


@pytest.fixture
def root(clean_root, tmp_path):
    out = tmp_path / "root"
    shutil.copytree(clean_root, out)
    return out


def edit_json(members, key, change):
    out = []
    for name, data in members:
        if name == f"{key}.json":
            obj = json.loads(data)
            change(obj)
            data = json.dumps(obj).encode()
        out.append((name, data))
    return out


def damage(root: Path, kind: str, shard: str = SHARD) -> str:
    """Damage one shard (the first by default); returns the sample key that the loader must name."""
    path = root / shard
    members = read_members(path)
    key = first_key(root, shard)
    if kind == "truncated_shard":
        data = path.read_bytes()
        # cut inside the JPEG members of the third sample: the first two samples survive
        cut = [i for i, (n, _) in enumerate(members) if n.endswith(".json")][2] + 3
        size = sum(512 + -(-len(d) // 512) * 512 for _, d in members[:cut]) + 700
        path.write_bytes(data[:size])
        return members[cut][0].split(".", 1)[0]
    if kind == "corrupt_jpeg":
        members = [(n, b"this is not a JPEG" if n == f"{key}.0002.jpg" else d) for n, d in members]
    elif kind == "jpeg_missing":
        members = [(n, d) for n, d in members if n != f"{key}.0005.jpg"]
    elif kind == "bad_json":
        members = [(n, b"{not json" if n == f"{key}.json" else d) for n, d in members]
    elif kind == "json_mismatch_frames":
        members = edit_json(members, key, lambda o: [o[f].pop() for f in ("frame_ids", "boxes_in_crop")])
    elif kind == "json_mismatch_key":
        members = edit_json(members, key, lambda o: o.update(key="someone-else"))
    elif kind == "sample_missing_from_shard":
        members = [(n, d) for n, d in members if not n.startswith(key + ".")]
    write_members(path, members)
    return key


def reason_of(kind: str) -> str:
    return "json_mismatch" if kind.startswith("json_mismatch") else kind


ACCESS = ["sequential", "random"]
# what each damage is under random access, which reads the catalog's spans: a member that is
# gone leaves other bytes at its span (shard_changed); JSON damage is found before training starts
RANDOM_REASON = {
    "truncated_shard": "truncated_shard",
    "corrupt_jpeg": "corrupt_jpeg",
    "jpeg_missing": None,  # frame 5 is between strides: never read, so never missed (verify finds it)
    "bad_json": "bad_json",
    "json_mismatch_frames": "json_mismatch",
    "json_mismatch_key": "json_mismatch",
    "sample_missing_from_shard": "shard_changed",
}


def damage_for(root: Path, kind: str, access: str) -> tuple[str, str]:
    """damage(), plus the spans re-recorded for random access; returns (key, expected reason)."""
    key = damage(root, kind)
    if access == "sequential":
        return key, reason_of(kind)
    if kind != "truncated_shard":
        record_spans(root)
    return key, RANDOM_REASON[kind]


KINDS = [
    "truncated_shard",
    "corrupt_jpeg",
    "jpeg_missing",
    "bad_json",
    "json_mismatch_frames",
    "json_mismatch_key",
    "sample_missing_from_shard",
]


@pytest.mark.parametrize("access", ACCESS)
@pytest.mark.parametrize("kind", KINDS)
def test_fail_names_the_shard_and_the_sample(root, kind, access):
    key, reason = damage_for(root, kind, access)
    if reason is None:
        ds = make_stream(root, "fail", access=access)
        assert len(list(ds)) == len(ds)
        return
    with pytest.raises(ShardError) as info:
        list(make_stream(root, "fail", access=access))
    msg = str(info.value)
    assert SHARD in msg and f"[{reason}]" in msg, msg
    assert info.value.reason == reason
    if not (access == "random" and kind == "truncated_shard"):  # random: any sample past the cut
        assert repr(key) in msg, msg


@pytest.mark.parametrize("access", ACCESS)
@pytest.mark.parametrize("kind", KINDS)
def test_warn_skips_counts_and_keeps_the_epoch_length(root, kind, access):
    key, reason = damage_for(root, kind, access)
    ds = make_stream(root, "warn", access=access)
    damaged_code = ds.index.samples[key][1] if key in ds.index.samples else None
    batches = list(ds)
    assert len(batches) == len(ds) > 0  # the stream keeps going over its other videos
    assert all(b["frames"].shape[0] == PARAMS["batch_size"] for b in batches)
    counts = ds.shared.skip_counts()
    assert (counts.get(reason, 0) >= 1 if reason else counts == {}) and sum(counts.values()) == sum(
        n for r, n in ds.stats.items() if r.startswith("skipped_")
    )
    if kind == "truncated_shard" and access == "sequential":  # the rest of the shard counts as missing
        assert counts["sample_missing_from_shard"] >= 1
    # no fragment of the damaged sample reached a batch (random access reads frames as batches
    # need them: there, damage inside a frame is found when a batch first reads that frame)
    checked = access == "sequential" or kind.startswith(("bad_json", "json_mismatch"))
    if damaged_code is not None and kind != "truncated_shard" and checked:
        for b in batches:
            assert damaged_code not in b["tracklet"].tolist()


def test_clean_shards_skip_nothing(root):
    ds = make_stream(root, "warn")
    assert len(list(ds)) == len(ds)
    assert ds.shared.skip_counts() == {}
    with pytest.raises(SampleDamage) as info:
        check_sample({"__key__": "k"}, None)
    assert info.value.reason == "bad_json"


def test_equal_steps_per_rank_with_skips(root):
    damage(root, "truncated_shard")
    lengths = [len(list(make_stream(root, "warn", r, 2))) for r in range(2)]
    assert lengths[0] == lengths[1] == len(make_stream(root, "warn", 0, 2))


def test_a_jpeg_that_passes_the_marker_check_but_does_not_decode_is_named(root):
    path = root / SHARD
    members = read_members(path)
    key = first_key(root)
    bad = []
    for n, d in members:
        if n.startswith(key + ".") and n.endswith(".jpg"):
            d = d[:40] + bytes(range(256)) * 2 + d[-20:]  # SOI ... EOI, garbage between
        bad.append((n, d))
    write_members(path, bad)
    ds = make_stream(root, "warn")
    with pytest.raises(ShardError) as info:
        list(ds)
    assert repr(key) in str(info.value) and "does not decode" in str(info.value)


class CreatesFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_members_are_never_unpickled_and_climbing_names_never_used(root, tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps(CreatesFile(str(target)))
    pickle.loads(payload).close()  # the payload does create its file when unpickled ...
    assert target.exists()
    target.unlink()
    path = root / SHARD
    members = read_members(path)
    key = first_key(root)
    at = next(i for i, (n, _) in enumerate(members) if n.startswith(key + ".")) + 1
    members[at:at] = [
        (f"{key}.pickle", payload),
        (f"{key}.pyd", payload),
        (f"{key}.0000.pth", payload),
        (f"../{key}.0001.jpg", b"\xff\xd8 climbing \xff\xd9"),
    ]
    write_members(path, members)
    catalog_agrees(root)
    for mode in ("fail", "warn"):
        ds = make_stream(root, mode)
        assert len(list(ds)) == len(ds)
        assert ds.stats["member_not_decoded"] >= 3 and ds.stats["member_unsafe_name"] >= 1
        assert ds.shared.skip_counts() == {}
    assert not target.exists()  # ... and the loader never unpickled it
    assert not (root / "shards" / f"{key}.0001.jpg").exists()


def cli_args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(runs),
        "--exp_name",
        "e",
        "--max_steps",
        "2",
        "--limit_val_batches",
        "0",
        *TINY,
        *extra,
    ]


def damage_every_train_shard(root: Path, kind: str) -> dict[str, str]:
    """Damaged samples in every shard, so that the first batch meets one whatever the shard order."""
    return {
        f"shards/train/{p.name}": damage(root, kind, f"shards/train/{p.name}")
        for p in sorted((root / "shards" / "train").glob("*.tar"))
    }


@pytest.mark.parametrize("access", ACCESS)
def test_cli_fail_stops_with_the_message_not_a_traceback(root, tmp_path, capsys, access):
    keys = damage_every_train_shard(root, "bad_json")
    args = cli_args(root, tmp_path / "runs", "--shard_access", access)
    if access == "random":  # the JSONs are read (and refused) before training starts
        record_spans(root)
    args[args.index("--num_workers") + 1] = "1"  # sequential: the error comes from a DataLoader worker
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("polyp-ssl train: error: damaged data:") and "Traceback" not in err
    assert any(shard in err and repr(key) in err for shard, key in keys.items()), err
    assert "[bad_json]" in err


def test_cli_warn_reports_skips_in_the_summary_and_a_json(root, tmp_path, capsys):
    damage_every_train_shard(root, "truncated_shard")
    runs = tmp_path / "runs"
    assert main(cli_args(root, runs, "--on_shard_error", "warn")) == 0
    out = capsys.readouterr().out
    assert "damaged data skipped (rank 0, --on_shard_error warn)" in out and "truncated_shard" in out
    summary = json.loads((runs / "e" / "checkpoints" / "data_skips.rank0.json").read_text())
    assert summary["on_shard_error"] == "warn" and summary["skipped"]["truncated_shard"] >= 1
    assert summary["total"] == sum(summary["skipped"].values())
    assert main(cli_args(root, tmp_path / "r2", "--on_shard_error", "maybe")) == 2
    assert "--on_shard_error 'maybe'" in capsys.readouterr().err


def test_cli_missing_catalog_table_and_old_catalog_version(root, tmp_path, capsys):
    (root / "catalog" / "tracklets.parquet").unlink()
    assert main(cli_args(root, tmp_path / "runs")) == 2
    assert "tracklets.parquet" in capsys.readouterr().err
    manifest = root / "catalog" / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["version"] = meta["catalog_version"] = meta["version"] - 1
    manifest.write_text(json.dumps(meta))
    assert main(cli_args(root, tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "version" in err
    manifest.unlink()
    assert main(cli_args(root, tmp_path / "runs")) == 2
    assert "polyp-ssl train: error:" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "e" / "checkpoints").exists()


@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_cli_names_a_frame_that_does_not_decode_in_either_decode_mode(root, tmp_path, capsys, decode_on):
    for shard in sorted((root / "shards" / "train").glob("*.tar")):
        members = read_members(shard)
        write_members(
            shard,
            [(n, d[:40] + bytes(range(256)) * 2 + d[-20:] if n.endswith(".jpg") else d) for n, d in members],
        )
    record_spans(root)
    assert main(cli_args(root, tmp_path / "runs", "--decode_on", decode_on)) == 1
    err = capsys.readouterr().err
    assert "polyp-ssl train: error: damaged data:" in err and "does not decode" in err
    assert "sample '" in err and "frame " in err and "[corrupt_jpeg]" in err


@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_a_jpeg_whose_size_disagrees_with_the_json_is_named(root, decode_on):
    """The anchor-crop windows come from the JSON's crop_sizes; a JPEG of another size is named in
    both decode modes (json_mismatch), never cropped with wrong windows."""
    for shard in sorted((root / "shards" / "train").glob("*.tar")):
        members = read_members(shard)
        keys = {n.split(".", 1)[0] for n, _ in members}
        for key in keys:
            members = edit_json(
                members, key, lambda o: o.update(crop_sizes=[[w + 1, h] for w, h in o["crop_sizes"]])
            )
        write_members(shard, members)
    record_spans(root)
    params = StreamParams(**PARAMS, decode_on=decode_on)
    ds = BagStream(build_index(root, "train", params), params)
    with pytest.raises(ShardError) as info:
        list(ds)
    msg = str(info.value)
    assert "[json_mismatch]" in msg and "crop_sizes" in msg and "sample '" in msg and "JPEG" in msg


def test_crop_sizes_of_the_wrong_length_are_a_json_mismatch(root):
    members = read_members(root / SHARD)
    key = first_key(root)
    sample = {"__key__": key}
    for n, d in edit_json(members, key, lambda o: o.update(crop_sizes=o["crop_sizes"][:-1])):
        if n.startswith(key + "."):
            sample[n.split(".", 1)[1]] = d
    with pytest.raises(SampleDamage, match="crop_sizes") as info:
        check_sample(sample, None)
    assert info.value.reason == "json_mismatch"
