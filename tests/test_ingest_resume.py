"""Determinism across runs and worker counts, resume after kill -9, --part, --overwrite."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Track, make_root, moving
from shard_factory import SPAN_COLUMNS

from polyp_ssl.ingest.cli import main as ingest_main
from polyp_ssl.ingest.faults import PAUSE_ENV
from polyp_ssl.shards.reader import iter_samples
from polyp_ssl.shards.schema import TABLES
from polyp_ssl.shards.writer import file_sha256

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def many_videos(n: int = 6):
    out = {}
    for i in range(n):
        frames = list(range(i, i + 8 + i))
        out[(f"vid{i:02d}", None)] = (
            len(frames) + i + 2,
            [Track(f"vid{i:02d}_p", frames, moving(10 + 5 * i, 20, 20, 16, frames), float(i), "AD")],
        )
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("root")
    make_root(str(r), many_videos())
    return r


def run(root, out, *args) -> int:
    return ingest_main(
        [str(root), "--no-progress", "--out", str(out), "--shard-max-bytes", "20k", *map(str, args)]
    )


def shard_bytes(out) -> dict[str, bytes]:
    return {
        os.path.relpath(p, out): open(p, "rb").read()
        for p in sorted(glob.glob(os.path.join(out, "shards", "*", "*.tar")))
    }


def catalog(out, sub="catalog"):
    return {n: pq.read_table(os.path.join(out, sub, f"{n}.parquet")) for n in TABLES}


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert run(root, out) == 0
    return out


def test_same_input_gives_identical_shards_whatever_the_workers(root, reference, tmp_path):
    assert run(root, tmp_path, "--workers", "2") == 0
    a, b = shard_bytes(reference), shard_bytes(tmp_path)
    assert len(a) >= 3 and a == b
    ca, cb = catalog(reference), catalog(tmp_path)
    for name in TABLES:
        assert ca[name].equals(cb[name]), name


def test_existing_output_needs_resume_or_overwrite(root, reference, tmp_path, capsys):
    assert run(root, reference) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(root, tmp_path) == 0
    before = shard_bytes(tmp_path)
    assert run(root, tmp_path, "--overwrite", "--jpeg-quality", "50") == 0
    after = shard_bytes(tmp_path)
    assert after.keys() == before.keys() and after != before
    # resume refuses to mix shards made with other parameters
    assert run(root, tmp_path, "--resume") == 2
    assert "other input or parameters" in capsys.readouterr().err


def test_resume_after_kill_equals_uninterrupted_run(root, reference, tmp_path, capsys):
    out = tmp_path / "out"
    env = dict(os.environ, **{PAUSE_ENV: "2"})
    cmd = [sys.executable, "-m", "polyp_ssl", "ingest", str(root), "--out", str(out), "--no-progress",
           "--shard-max-bytes", "20k", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT_DIR, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 60
        while len(glob.glob(str(out / "shards" / "train" / "*.stats.json"))) < 2:
            assert proc.poll() is None, "ingest ended before it paused"
            assert time.time() < deadline, "ingest did not get to its second shard"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "catalog" / "manifest.json").exists()
    n_total = len(shard_bytes(reference))
    assert 2 <= len(glob.glob(str(out / "shards" / "train" / "*.stats.json"))) < n_total
    # a half-written shard of the killed run: resume must not trust it
    (out / "shards" / "train" / "train-000002.tar.tmp").write_bytes(b"partial")
    assert run(root, out) == 2
    assert "partial ingest run" in capsys.readouterr().err
    assert run(root, out, "--resume") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_written"] == n_total - 2
    assert shard_bytes(out) == shard_bytes(reference)
    assert not glob.glob(str(out / "shards" / "train" / "*.tmp"))
    ca, cb = catalog(reference), catalog(out)
    for name in TABLES:
        assert ca[name].equals(cb[name]), name
    # a tar that no longer matches its stats is written again
    victim = out / "shards" / "train" / "train-000000.tar"
    victim.write_bytes(b"corrupt")
    assert run(root, out, "--resume") == 0
    assert shard_bytes(out) == shard_bytes(reference)


def test_parts_are_disjoint_and_cover_every_video(root, reference, tmp_path):
    for i in range(2):
        assert run(root, tmp_path, "--part", f"{i}/2") == 0
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "shards" / "train" / "*.tar")))
    assert names and all(n.startswith(("train-p000-", "train-p001-")) for n in names)
    parts = [catalog(tmp_path, f"catalog/parts/{i:03d}-of-002") for i in range(2)]
    vids = [set(p["videos"].column("video_id").to_pylist()) for p in parts]
    all_vids = set(catalog(reference)["videos"].column("video_id").to_pylist())
    assert vids[0] and vids[1] and not vids[0] & vids[1] and vids[0] | vids[1] == all_vids
    assert sorted(vids[0] | vids[1])[::2] == sorted(vids[0])  # every 2nd video of the sorted list
    ref_frames = catalog(reference)["frames"].num_rows
    assert sum(p["frames"].num_rows for p in parts) == ref_frames
    keys = [s["__key__"] for p in sorted(glob.glob(str(tmp_path / "shards" / "train" / "*.tar")))
            for s in iter_samples([p])]  # fmt: skip
    assert len(keys) == len(set(keys)) == catalog(reference)["tracklets"].num_rows
    for i, p in enumerate(parts):
        m = json.loads((tmp_path / "catalog" / "parts" / f"{i:03d}-of-002" / "manifest.json").read_text())
        assert m["part"] == [i, 2] and m["version"] == 3  # catalog version 3: member byte spans
        for row in p["shards"].to_pylist():
            assert f"-p{i:03d}-" in row["path"] and file_sha256(tmp_path / row["path"]) == row["sha256"]
    assert not (tmp_path / "catalog" / "manifest.json").exists()
    # the parts merge into the catalog of an uninterrupted run (same rows, up to order)
    from polyp_ssl.shards.catalog_merge import merge_parts
    from polyp_ssl.shards.verify import verify_root

    merge_parts(tmp_path)
    merged, ref = catalog(tmp_path), catalog(reference)
    for name in ("videos", "polyps", "tracklets", "frames", "errors"):
        key = [c for c in ("split", "video_id", "tracklet_id", "frame_index") if c in ref[name].column_names]
        rows = [
            sorted(t.to_pylist(), key=lambda r, k=key: [str(r[c]) for c in k])
            for t in (merged[name], ref[name])
        ]
        if name in ("tracklets", "frames"):  # other shards: members lie elsewhere
            where = {"shard", *SPAN_COLUMNS}
            rows = [[{k: v for k, v in r.items() if k not in where} for r in rs] for rs in rows]
        assert rows[0] == rows[1], name
    assert verify_root(tmp_path).ok  # the merged catalog's spans are those of the parts' shards
    # a part's existing output is its own: part 1 can be redone alone
    assert run(root, tmp_path, "--part", "1/2", "--overwrite") == 0
    assert len(glob.glob(str(tmp_path / "shards" / "train" / "*.tar"))) == len(names)
