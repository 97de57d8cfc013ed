"""Member byte spans (catalog version 3): ingest records where each member's data lies in its
shard, the writer's bytes are unchanged by it, verify checks the spans, and SpanReader reads them
back, refusing bytes that are not ingest's."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Track, default_videos, make_root, moving
from shard_factory import tar_spans

from polyp_ssl.ingest.cli import main as ingest_main
from polyp_ssl.ingest.write import STATS_VERSION
from polyp_ssl.shards.catalog import CatalogError, read_manifest, read_table
from polyp_ssl.shards.cli import verify_main
from polyp_ssl.shards.members import MemberError, MemberSpan, SpanReader, crc32
from polyp_ssl.shards.schema import CATALOG_VERSION
from polyp_ssl.shards.verify import verify_root
from polyp_ssl.shards.writer import TAR_MODE, TAR_MTIME, ShardWriter, sample_members

REINGEST = "polyp-ssl ingest RAW_ROOT --out ROOT --overwrite"
# a member name over tarfile's 100-byte name field: written with a GNU long-name header
LONG_IDENTITY = "case_" + "x" * 110


def videos():
    out = dict(default_videos())
    frames = list(range(0, 9))
    out[("seqL", None)] = (12, [Track(LONG_IDENTITY, frames, moving(30, 30, 22, 18, frames), 5.0, "AD")])
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_root(str(root), videos())
    return root


@pytest.fixture(scope="module")
def ingested(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingested")
    assert ingest_main([str(raw), "--no-progress", "--out", str(out), "--shard-max-bytes", "20k"]) == 0
    return out


@pytest.fixture
def root(ingested, tmp_path) -> Path:
    """A copy of the ingested root to damage."""
    out = tmp_path / "root"
    shutil.copytree(ingested, out)
    return out


def tar_member_bytes(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def catalog_members(root: Path) -> list[tuple[str, str, MemberSpan]]:
    """(shard, member name, span) of every member span in the catalog."""
    tracklets = read_table(root, "tracklets").to_pylist()
    by_id = {t["tracklet_id"]: t for t in tracklets}
    out = [
        (t["shard"], f"{t['sample_key']}.json", MemberSpan(t["json_offset"], t["json_size"], t["json_crc32"]))
        for t in tracklets
    ]
    for f in read_table(root, "frames").to_pylist():
        t = by_id[f["tracklet_id"]]
        name = f"{t['sample_key']}.{f['frame_index']:04d}.jpg"
        out.append((t["shard"], name, MemberSpan(f["jpeg_offset"], f["jpeg_size"], f["jpeg_crc32"])))
    return out


# ---------------------------------------------------------------- ingest writes the spans


def test_every_catalog_span_reads_the_bytes_tarfile_gives_for_its_member(ingested):
    assert read_manifest(ingested)["version"] == CATALOG_VERSION == 3
    shards = {s["path"]: s["n_bytes"] for s in read_table(ingested, "shards").to_pylist()}
    assert len(shards) > 1
    members = catalog_members(ingested)
    in_tars = {(rel, name): data for rel in shards for name, data in tar_member_bytes(ingested / rel).items()}
    assert {(rel, name) for rel, name, _ in members} == set(in_tars)  # every member, once
    assert any(len(name) > 100 for _, name, _ in members)  # the long-name case went through ingest
    reader = SpanReader(max_open=2)
    try:
        for rel, name, span in members:
            data = reader.read(str(ingested / rel), span, shards[rel])
            assert data == in_tars[(rel, name)], name
            assert crc32(data) == span.crc32 and len(data) == span.size
    finally:
        reader.close()
    assert reader.reads == len(members)


def test_spans_match_tarfiles_offsets(ingested):
    for rel, name, span in catalog_members(ingested):
        key, suffix = name.split(".", 1)
        assert tar_spans(ingested / rel)[(key, suffix)] == (span.offset, span.size, span.crc32), name


# ---------------------------------------------------------------- ShardWriter


def fixed_samples() -> list[dict]:
    """Three samples, the second with a key that makes member names over 100 bytes."""
    out = []
    for i, key in enumerate(["k0", "long-" + "x" * 150, "k2"]):
        sample = {"__key__": key, "json": b'{"i": %d}' % i}
        for j in range(i + 1):
            sample[f"{j:04d}.jpg"] = bytes([(i * 7 + j) % 256]) * (300 + 517 * j + i)
        out.append(sample)
    return out


def old_way(samples: list[dict]) -> bytes:
    """The shard bytes as ShardWriter wrote them before it returned spans: tarfile, GNU format,
    fixed mtime, owner and mode."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            for name, data in sample_members(sample):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_writer_returns_the_span_of_every_member_long_names_too(tmp_path):
    path = tmp_path / "s.tar"
    with ShardWriter(path) as w:
        spans = [w.write(s) for s in fixed_samples()]
    data = path.read_bytes()
    by_tarfile = tar_spans(path)
    for sample, got in zip(fixed_samples(), spans, strict=True):
        key = sample.pop("__key__")
        assert set(got) == set(sample)  # keyed by member suffix: json, 0000.jpg, ...
        for suffix, span in got.items():
            assert data[span.offset : span.offset + span.size] == sample[suffix]
            assert span.offset % 512 == 0 and span.crc32 == crc32(sample[suffix])
            assert by_tarfile[(key, suffix)] == (span.offset, span.size, span.crc32)
    long_json = spans[1]["json"]
    with tarfile.open(path) as tar:
        info = tar.getmember("long-" + "x" * 150 + ".json")
    # the GNU long-name header and its name block come before the member's own header
    assert long_json.offset == info.offset_data == info.offset + 3 * 512


def test_writer_bytes_are_unchanged(tmp_path):
    path = tmp_path / "s.tar"
    with ShardWriter(path) as w:
        w.write_all(fixed_samples())
    data = path.read_bytes()
    assert data == old_way(fixed_samples())
    # the bytes ShardWriter wrote before it recorded spans (pinned with Python 3.11's tarfile)
    assert len(data) == w.n_bytes == 20480
    assert hashlib.sha256(data).hexdigest() == w.sha256
    assert w.sha256 == "0e0ff35a9335540e5f1bad747318d54725f7ba9129fc351ae3f2a5632b40899c"


# ---------------------------------------------------------------- older catalogs and stats files


def test_a_version_2_catalog_is_refused_with_the_reingest_command(root, capsys):
    manifest = root / "catalog" / "manifest.json"
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(CatalogError, match=r"'version' is 2") as info:
        read_table(root, "frames")
    assert REINGEST in str(info.value)
    assert verify_main([str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "version" in err and REINGEST in err


def test_a_version_2_part_is_refused_by_merge_with_the_reingest_command(tmp_path):
    from polyp_ssl.shards.catalog_merge import merge_parts, part_dir_name

    for i in range(2):
        part = tmp_path / "catalog" / "parts" / part_dir_name(i, 2)
        part.mkdir(parents=True)
        version = 2 if i == 1 else CATALOG_VERSION
        (part / "manifest.json").write_text(
            json.dumps({"version": version, "part": [i, 2], "parameters": {}})
        )
    with pytest.raises(CatalogError, match=r"001-of-002.*'version' is 2") as info:
        merge_parts(tmp_path)
    assert "polyp-ssl ingest RAW_ROOT --out OUT --part 1/2 --overwrite" in str(info.value)


def test_resume_redoes_the_shards_of_an_older_ingest(raw, root, capsys):
    """An interrupted ingest of the version before spans (stats files of version 1, rows without
    spans, no catalog yet): --resume redoes those shards instead of reusing their rows."""
    stats_files = sorted(glob.glob(str(root / "shards" / "*" / "*.stats.json")))
    assert stats_files
    for path in stats_files:
        stats = json.loads(Path(path).read_text())
        assert stats["version"] == STATS_VERSION == 2
        stats["version"] = 1
        for row in stats["rows"]["tracklets"] + stats["rows"]["frames"]:
            for col in [c for c in row if c.startswith(("json_", "jpeg_"))]:
                del row[col]
        Path(path).write_text(json.dumps(stats))
    shutil.rmtree(root / "catalog")
    capsys.readouterr()
    args = [str(raw), "--no-progress", "--out", str(root), "--shard-max-bytes", "20k", "--resume"]
    assert ingest_main(args) == 0
    assert json.loads(capsys.readouterr().out)["shards_written"] == len(stats_files)
    assert all(json.loads(Path(p).read_text())["version"] == STATS_VERSION for p in stats_files)
    assert all(span.size is not None for _, _, span in catalog_members(root))
    assert verify_root(root).ok


def test_the_catalog_is_not_built_from_stats_of_another_version():
    from polyp_ssl.ingest.catalog_build import catalog_tables

    with pytest.raises(ValueError, match=r"shards/train/train-000000\.tar.*version 1.*--resume"):
        catalog_tables([{"version": 1, "shard": "shards/train/train-000000.tar", "rows": {}}], [], [])


# ---------------------------------------------------------------- verify


def test_verify_names_a_catalog_span_that_is_not_its_member(root, capsys):
    assert verify_root(root).ok
    path = root / "catalog" / "frames.parquet"
    table = pq.read_table(path)
    offsets = table["jpeg_offset"].to_pylist()
    offsets[3] += 512  # one frame's span now points at the next block
    i = table.schema.get_field_index("jpeg_offset")
    pq.write_table(table.set_column(i, "jpeg_offset", pa.array(offsets, pa.int64())), path)
    frame = table.slice(3, 1).to_pylist()[0]
    tracklet = next(
        t for t in read_table(root, "tracklets").to_pylist() if t["tracklet_id"] == frame["tracklet_id"]
    )
    member = f"{tracklet['sample_key']}.{frame['frame_index']:04d}.jpg"

    report = verify_root(root)
    assert report.counts() == {"span_mismatch": 1}
    (problem,) = report.problems
    assert problem.shard == tracklet["shard"]
    assert repr(tracklet["sample_key"]) in problem.detail and repr(member) in problem.detail
    assert f"offset {offsets[3]} in the catalog, {offsets[3] - 512} in the shard" in problem.detail
    assert "size" not in problem.detail.split(":", 1)[1]  # only what differs

    assert verify_main([str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"span_mismatch: {tracklet['shard']}: sample {tracklet['sample_key']!r} member {member!r}" in out


def test_verify_counts_the_span_mismatches_of_a_shard_past_the_first_ones(root):
    path = root / "catalog" / "frames.parquet"
    table = pq.read_table(path)
    i = table.schema.get_field_index("jpeg_crc32")
    crcs = [(c + 1) & 0xFFFFFFFF for c in table["jpeg_crc32"].to_pylist()]
    pq.write_table(table.set_column(i, "jpeg_crc32", pa.array(crcs, pa.int64())), path)
    from polyp_ssl.shards.verify import MAX_SPAN_PROBLEMS

    report = verify_root(root)
    per_shard: dict[str, list[str]] = {}
    for p in report.problems:
        assert p.kind == "span_mismatch"
        per_shard.setdefault(p.shard, []).append(p.detail)
    frames_per_shard = {}
    for f in catalog_members(root):
        if f[1].endswith(".jpg"):
            frames_per_shard[f[0]] = frames_per_shard.get(f[0], 0) + 1
    for shard, details in per_shard.items():
        n = frames_per_shard[shard]
        if n <= MAX_SPAN_PROBLEMS:
            assert len(details) == n and all("crc32" in d for d in details)
        else:
            assert len(details) == MAX_SPAN_PROBLEMS + 1
            assert details[-1].startswith(f"{n - MAX_SPAN_PROBLEMS} more members")
    assert set(per_shard) == set(frames_per_shard)


def test_verify_names_a_span_the_catalog_does_not_record(root):
    path = root / "catalog" / "tracklets.parquet"
    table = pq.read_table(path)
    i = table.schema.get_field_index("json_size")
    sizes = table["json_size"].to_pylist()
    sizes[0] = None
    pq.write_table(table.set_column(i, "json_size", pa.array(sizes, pa.int64())), path)
    (problem,) = verify_root(root).problems
    assert problem.kind == "span_mismatch" and "records no span" in problem.detail
    assert repr(f"{table['sample_key'][0].as_py()}.json") in problem.detail


def test_verify_says_a_compressed_shard_has_no_spans(root):
    import gzip

    rel = read_table(root, "shards")["path"][0].as_py()
    (root / rel).write_bytes(gzip.compress((root / rel).read_bytes(), mtime=0))
    spans = [p for p in verify_root(root).problems if p.kind == "span_mismatch"]
    assert len(spans) == 1 and spans[0].shard == rel and "compressed" in spans[0].detail


# ---------------------------------------------------------------- SpanReader on damaged files


@pytest.fixture
def one_shard(ingested) -> tuple[Path, int, list[MemberSpan]]:
    """The first shard, its size and its catalog spans in file order."""
    rel = read_table(ingested, "shards")["path"][0].as_py()
    spans = sorted((s for r, _, s in catalog_members(ingested) if r == rel), key=lambda s: s.offset)
    path = ingested / rel
    return path, path.stat().st_size, spans


def test_a_truncated_copy_fails_past_its_end_and_still_reads_before(one_shard, tmp_path):
    path, size, spans = one_shard
    last = spans[-1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: last.offset + last.size // 2])  # inside the last member
    reader = SpanReader()
    with pytest.raises(MemberError) as info:
        reader.read(str(cut), last, size)
    assert info.value.reason == "truncated_shard"
    assert (
        reader.read(str(cut), spans[0], size)
        == path.read_bytes()[spans[0].offset : spans[0].offset + spans[0].size]
    )
    reader.close()


def test_flipped_bytes_inside_a_member_are_shard_changed(one_shard, tmp_path):
    path, size, spans = one_shard
    span = spans[len(spans) // 2]
    data = bytearray(path.read_bytes())
    data[span.offset + span.size // 2] ^= 0x01
    changed = tmp_path / "changed.tar"
    changed.write_bytes(bytes(data))
    reader = SpanReader()
    with pytest.raises(MemberError) as info:
        reader.read(str(changed), span, size)
    assert info.value.reason == "shard_changed" and "CRC-32" in str(info.value)
    assert len(reader.read(str(changed), spans[0], size)) == spans[0].size  # the other members are fine
    reader.close()


def test_a_longer_file_is_shard_changed(one_shard, tmp_path):
    path, size, spans = one_shard
    longer = tmp_path / "longer.tar"
    longer.write_bytes(path.read_bytes() + bytes(512))
    reader = SpanReader()
    with pytest.raises(MemberError) as info:
        reader.read(str(longer), spans[0], size)
    assert info.value.reason == "shard_changed" and str(size) in str(info.value)
    reader.close()


def test_member_error_keeps_its_reason_through_pickle():
    import pickle

    err = pickle.loads(pickle.dumps(MemberError("truncated_shard", "bytes 0..9 lie past the end")))
    assert err.reason == "truncated_shard" and str(err) == "bytes 0..9 lie past the end"


def test_a_reader_keeping_no_file_open_still_reads(one_shard):
    path, size, spans = one_shard
    reader = SpanReader(max_open=0)
    for span in spans[:3]:
        assert len(reader.read(str(path), span, size)) == span.size
    reader.close()
    assert os.path.exists(path)
