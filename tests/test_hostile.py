"""Hostile input on the data side: shards carrying pickles, tar member names that climb out of the
folder or are absolute, links, and SQL that tries to reach the file system. Reading shards and
`polyp-ssl verify` never unpickle and never write a member to disk; catalog SQL runs locked down."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import make_root
from shard_factory import respan_catalog

from polyp_ssl.ingest.cli import main as ingest_main
from polyp_ssl.shards.catalog import connect
from polyp_ssl.shards.cli import main as catalog_main
from polyp_ssl.shards.cli import verify_main
from polyp_ssl.shards.reader import iter_samples
from polyp_ssl.shards.sample import sample_meta
from polyp_ssl.shards.verify import tar_keys, verify_root
from polyp_ssl.shards.writer import ShardWriter, file_sha256


class _Touch:
    """Unpickling this creates the file `path` (what a malicious .pyd/.pickle member would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Touch(str(marker)))


def test_the_payload_does_create_its_file_when_unpickled(tmp_path):
    """The check below could fail: unpickling this payload really creates the marker file."""
    marker = tmp_path / "proof"
    code = f"import pickle, sys; pickle.loads(bytes.fromhex({payload(marker).hex()!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert marker.exists()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_root")
    make_root(str(root))
    assert ingest_main([str(root), "--no-progress"]) == 0
    return root


def replace_shard(root: Path, rel: str, data: bytes) -> None:
    """Put `data` in place of shard `rel` and make the catalog's shards table and member spans
    agree with it."""
    (root / rel).write_bytes(data)
    respan_catalog(root)
    path = root / "catalog" / "shards.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    for r in rows:
        if r["path"] == rel:
            r["n_bytes"], r["sha256"] = len(data), file_sha256(root / rel)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def with_extra_members(shard: Path, extra: dict[str, bytes]) -> bytes:
    """The shard's samples, each with the `extra` members (suffix -> bytes) added."""
    out = shard.parent / "rewritten.tar"
    with ShardWriter(out) as w:
        for s in iter_samples(shard):
            w.write({**s, **extra})
    data = out.read_bytes()
    out.unlink()
    return data


def test_pickle_members_are_never_unpickled(ingested, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(ingested, root)
    marker = tmp_path / "unpickled"
    evil = payload(marker)
    rel = pq.read_table(root / "catalog" / "shards.parquet").column("path")[0].as_py()
    replace_shard(root, rel, with_extra_members(root / rel, {"pyd": evil, "pickle": evil, "pth": evil}))
    monkeypatch.chdir(tmp_path)

    samples = list(iter_samples(root / rel))
    assert samples and all(s["pyd"] == s["pickle"] == s["pth"] == evil for s in samples)  # bytes, as stored
    for s in samples:
        meta = sample_meta(s)  # the JSON member only
        assert meta.key == s["__key__"]
    assert verify_main([str(root), "--no-progress"]) == 0
    assert verify_root(root).samples_checked > 0
    assert not marker.exists()


def hostile_tar(path: Path) -> Path:
    """A tar whose member names climb out (`../`), are absolute, or are links."""
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("good.json", b'{"x": 1}'),
            ("../escaped.json", b"climbed out"),
            ("sub/../../escaped2.json", b"climbed out"),
            ("/tmp/absolute_member.json", b"absolute"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("hard.json")
        hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
        tar.addfile(hard)
    return path


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_reader_refuses_climbing_member_names_and_writes_nothing(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    tar = hostile_tar(work / "hostile.tar")
    before = snapshot(tmp_path)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match=r"hostile\.tar: member '\.\./escaped\.json'"):
        list(iter_samples(tar))
    assert snapshot(tmp_path) == before
    assert not Path("/tmp/absolute_member.json").exists()


def test_reader_skips_links_and_never_follows_them(tmp_path):
    tar = tmp_path / "links.tar"
    with tarfile.open(tar, "w") as t:
        data = b'{"ok": true}'
        info = tarfile.TarInfo("k.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k.0000.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    samples = list(iter_samples(tar))
    assert samples == [{"__key__": "k", "json": data}]


def test_verify_reports_hostile_member_names_and_writes_nothing(ingested, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(ingested, root)
    keys, bad = tar_keys(hostile_tar(tmp_path / "h.tar"))
    assert keys == {"good"}
    assert sorted(bad) == sorted(["../escaped.json", "sub/../../escaped2.json", "/tmp/absolute_member.json"])
    rel = pq.read_table(root / "catalog" / "shards.parquet").column("path")[0].as_py()
    replace_shard(root, rel, (tmp_path / "h.tar").read_bytes())
    before = snapshot(tmp_path)
    monkeypatch.chdir(root / "shards")
    report = verify_root(root)
    assert not report.ok
    named = {p.detail for p in report.problems if p.kind == "bad_member"}
    assert any("'../escaped.json'" in d for d in named) and any(
        "'/tmp/absolute_member.json'" in d for d in named
    )
    assert verify_main([str(root), "--no-progress"]) == 1
    assert snapshot(tmp_path) == before
    assert not Path("/tmp/absolute_member.json").exists()


# ---------------------------------------------------------------- SQL: cases beyond test_catalog.py

REFUSED_SQL = [
    "SELECT * FROM read_parquet('/etc/hostname')",
    "SELECT * FROM read_parquet('{root}/catalog/tracklets.parquet')",  # bypassing the pinned views
    "SELECT * FROM '{root}/catalog/frames.parquet'",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM read_json_auto('/etc/os-release')",
    "SELECT * FROM read_csv('/proc/self/environ')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    "COPY tracklets TO '{out}/../leak.csv'",
    "COPY (SELECT * FROM frames) TO '{out}/sub/../leak.parquet' (FORMAT parquet)",
    "SET lock_configuration = false",
    "RESET enable_external_access",
    "SET GLOBAL enable_external_access = true",
    "SET allow_unsigned_extensions = true",
    "SET temp_directory = '{out}/spill'",
    "SET profiling_output = '{out}/profile.json'",
    "SET python_enable_replacements = true",
    "LOAD '{out}/evil.duckdb_extension'",
    "INSTALL httpfs FROM 'http://127.0.0.1:9/'",
    "FORCE INSTALL httpfs",
    "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')",
]


@pytest.mark.parametrize("sql", REFUSED_SQL)
def test_locked_down_connection_refuses(ingested, tmp_path, monkeypatch, sql):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = tmp_path / "out"
    out.mkdir()
    before_root = {p: p.stat().st_mtime_ns for p in Path(ingested).rglob("*")}
    con = connect(ingested)
    try:
        with pytest.raises(duckdb.Error):
            con.execute(sql.format(out=out, root=ingested))
        assert con.execute("SELECT count(*) FROM tracklets").fetchone()[0] > 0  # still usable
    finally:
        con.close()
    assert snapshot(tmp_path) == {"home", "out"}
    assert {p: p.stat().st_mtime_ns for p in Path(ingested).rglob("*")} == before_root


def test_tables_created_in_sql_live_in_memory_only(ingested, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in Path(ingested).rglob("*")}
    con = connect(ingested)
    try:
        con.execute("CREATE TABLE copied AS SELECT * FROM tracklets")
        con.execute("CHECKPOINT")
        assert con.execute("SELECT count(*) FROM copied").fetchone()[0] > 0
    finally:
        con.close()
    con = connect(ingested)
    try:
        with pytest.raises(duckdb.CatalogException):
            con.execute("SELECT * FROM copied")
    finally:
        con.close()
    assert {p: p.stat().st_mtime_ns for p in Path(ingested).rglob("*")} == before


def test_catalog_cli_refuses_writing_sql_without_a_traceback(ingested, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = catalog_main([str(ingested), "COPY tracklets TO '../leak.csv'"])
    err = capsys.readouterr().err
    assert rc == 1 and "polyp-ssl catalog: error" in err and "Permission" in err, err
    assert not (tmp_path.parent / "leak.csv").exists() and os.listdir(tmp_path) == []
