"""Faults during ingest: SIGKILL at named points (real processes, real signals) and a full disk
(a size-limited tmpfs when this machine lets us mount one, else ENOSPC injected in process).

After every fault: nothing that looks complete is half written (no `.tmp` left by a finished
step, no tar without its stats file, no manifest), a run without --resume says a partial run
exists, and `--resume` gives exactly the shards and catalog of an uninterrupted run, which
`polyp-ssl verify` accepts. Data lost: none.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Track, make_root, moving

from polyp_ssl.ingest import faults
from polyp_ssl.ingest.cli import main as ingest_main
from polyp_ssl.ingest.faults import CRASH_ENV
from polyp_ssl.ingest.plan import IngestParams
from polyp_ssl.ingest.run import IngestConfig
from polyp_ssl.ingest.run import run_ingest as run_ingest_api
from polyp_ssl.ingest.write import write_shard
from polyp_ssl.shards.cli import verify_main
from polyp_ssl.shards.schema import TABLES
from polyp_ssl.shards.writer import file_sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_MAX = "20k"


def five_videos():
    out = {}
    for i in range(5):
        frames = list(range(i, i + 8 + i))
        out[(f"vid{i:02d}", None)] = (
            len(frames) + i + 2,
            [Track(f"vid{i:02d}_p", frames, moving(10 + 5 * i, 20, 20, 16, frames), float(i + 1), "AD")],
        )
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("root")
    make_root(str(r), five_videos())
    return r


@pytest.fixture
def ingest_faults():
    """Install fault injection (ingest.faults) in this test's process: `ingest_faults(Faults(...))`,
    or `ingest_faults(None)` for none; the process's own is put back after the test."""
    previous = faults.install(None)
    yield faults.install
    faults.install(previous)


def ingest(root, out, *args) -> int:
    argv = [str(root), "--no-progress", "--out", str(out), "--shard-max-bytes", SHARD_MAX, *map(str, args)]
    return ingest_main(argv)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert ingest(root, out) == 0
    assert len(shard_bytes(out)) >= 3  # several shards, so faults can land between them
    return out


def shard_bytes(out) -> dict[str, bytes]:
    paths = sorted(glob.glob(os.path.join(out, "shards", "*", "*.tar")))
    return {os.path.relpath(p, out): Path(p).read_bytes() for p in paths}


def catalog_tables(out) -> dict:
    return {n: pq.read_table(os.path.join(out, "catalog", f"{n}.parquet")) for n in TABLES}


def all_files(out) -> list[str]:
    return sorted(
        os.path.relpath(p, out)
        for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
        if os.path.isfile(p)
    )


def assert_nothing_half_visible(out) -> None:
    """Every tar has its stats file and matches it; no catalog manifest; no temporaries."""
    tars = glob.glob(os.path.join(out, "shards", "*", "*.tar"))
    for tar in tars:
        stats_file = tar[: -len(".tar")] + ".stats.json"
        assert os.path.exists(stats_file), f"{tar} has no stats file"
        stats = json.loads(Path(stats_file).read_text())
        assert os.path.getsize(tar) == stats["n_bytes"] and file_sha256(tar) == stats["sha256"], tar
    assert not os.path.exists(os.path.join(out, "catalog", "manifest.json"))


def assert_equals_reference(out, reference) -> None:
    assert shard_bytes(out) == shard_bytes(reference)
    got, ref = catalog_tables(out), catalog_tables(reference)
    for name in TABLES:
        assert got[name].equals(ref[name]), name
    assert not [f for f in all_files(out) if f.endswith(".tmp")]
    assert verify_main([str(out), "--no-progress"]) == 0
    # data lost: none (every annotation of the input is a frame row, as in the reference)
    assert got["frames"].num_rows == ref["frames"].num_rows > 0
    assert got["errors"].num_rows == 0


def resume_equals_reference(root, out, reference, capsys, partial: bool = True) -> None:
    capsys.readouterr()
    if partial:
        assert ingest(root, out) == 2
        assert "partial ingest run" in capsys.readouterr().err
    assert ingest(root, out, "--resume") == 0
    assert_equals_reference(out, reference)


def killed_run(root, out, crash_at: str, workers: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "polyp_ssl", "ingest", str(root), "--out", str(out), "--no-progress",
           "--shard-max-bytes", SHARD_MAX, "--workers", str(workers)]  # fmt: skip
    env = dict(os.environ, **{CRASH_ENV: crash_at})
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- SIGKILL at named points

KILL_POINTS = {
    # point -> check of what the killed run left
    "sample_written:3": lambda out: glob.glob(os.path.join(out, "shards", "train", "*.tar.tmp")),
    "shard_done:2": lambda out: len(glob.glob(os.path.join(out, "shards", "train", "*.stats.json"))) == 2,
    "catalog_table:3": lambda out: len(glob.glob(os.path.join(out, "catalog", "*.parquet"))) == 3,
    "before_manifest": lambda out: len(glob.glob(os.path.join(out, "catalog", "*.parquet"))) == len(TABLES),
}


@pytest.mark.parametrize("crash_at", sorted(KILL_POINTS))
def test_sigkill_then_resume_equals_uninterrupted_run(root, reference, tmp_path, capsys, crash_at):
    out = tmp_path / "out"
    proc = killed_run(root, out, crash_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert KILL_POINTS[crash_at](out), all_files(out)
    assert not (out / "catalog" / "manifest.json").exists()
    resume_equals_reference(root, out, reference, capsys)


def test_sigkill_of_a_worker_is_named_and_resumable(root, reference, tmp_path, capsys):
    out = tmp_path / "out"
    proc = killed_run(root, out, "sample_written:2", workers=2)  # kills a worker, not the main process
    assert proc.returncode == 1, proc.stderr
    assert "worker process died" in proc.stderr and "--resume" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_half_visible(out)
    assert not glob.glob(str(out / "shards" / "train" / "*.tmp"))
    # shards finished by the other worker are kept (there may be none: both can die first)
    resume_equals_reference(root, out, reference, capsys, partial=bool(all_files(out)))


def test_crash_hook_is_inert_without_its_variable(root, reference, tmp_path, ingest_faults):
    ingest_faults(None)
    assert ingest(root, tmp_path / "out") == 0
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference)
    ingest_faults(faults.Faults(crash_at="no_such_point"))  # an unknown point never fires
    assert ingest(root, tmp_path / "out2") == 0


def test_fault_variables_are_read_once_into_an_installed_hook():
    assert faults.from_env({}) is None and faults.from_env({CRASH_ENV: ""}) is None
    got = faults.from_env({CRASH_ENV: "shard_done:3"})
    assert (got.crash_at, got.crash_nth, got.pause_after_shards) == ("shard_done", 3, 0)
    got = faults.from_env({faults.PAUSE_ENV: "2", faults.PAUSE_SECONDS_ENV: "0.5"})
    assert (got.crash_at, got.pause_after_shards, got.pause_seconds) == (None, 2, 0.5)


def test_an_installed_crash_point_kills_at_its_nth_pass():
    pid = os.fork()
    if pid == 0:  # the child: reaches the point twice, dies at the second
        try:
            faults.install(faults.Faults(crash_at="shard_done", crash_nth=2))
            faults.crash_point("sample_written")
            faults.crash_point("shard_done")
            faults.crash_point("shard_done")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# ---------------------------------------------------------------- the executor seam


def test_another_executor_runs_the_same_tasks_to_the_same_output(root, reference, tmp_path):
    seen = []

    def backwards(tasks):  # another order, in this process: the phases see only the results
        for task in reversed(list(tasks)):
            seen.append(task.rel_path)
            yield write_shard(task)

    params = IngestParams(shard_max_bytes=20_000)
    cfg = IngestConfig(str(root), out=str(tmp_path / "out"), params=params, progress=False)
    summary = run_ingest_api(cfg, executor=backwards)
    assert summary["shards_written"] == len(seen) == len(shard_bytes(reference))
    assert_equals_reference(tmp_path / "out", reference)


def test_an_executor_that_fails_leaves_a_resumable_run(root, reference, tmp_path, capsys):
    def fails_after_one(tasks):
        yield write_shard(tasks[0])
        raise OSError(errno.EIO, "the cluster went away")

    out = tmp_path / "out"
    cfg = IngestConfig(str(root), out=str(out), params=IngestParams(shard_max_bytes=20_000), progress=False)
    with pytest.raises(OSError, match="cluster"):
        run_ingest_api(cfg, executor=fails_after_one)
    assert len(glob.glob(str(out / "shards" / "*" / "*.stats.json"))) == 1
    assert_nothing_half_visible(out)
    resume_equals_reference(root, out, reference, capsys)


# ---------------------------------------------------------------- disk full, simulated


def fail_after(n_ok: int, real, match=lambda *a, **k: True):
    """A stand-in for `real` that works `n_ok` times (among matching calls), then raises ENOSPC."""
    calls = {"n": 0}

    def fake(*args, **kwargs):
        if match(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > n_ok:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fake


def _tar_bytes_fail(monkeypatch, reference):
    import polyp_ssl.shards.writer as w

    first = len(next(iter(shard_bytes(reference).values())))

    real = w._HashingFile.write
    state = {"bytes": 0}

    def write(self, data):
        state["bytes"] += memoryview(data).nbytes
        if state["bytes"] > first + 2000:  # inside the second shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(w._HashingFile, "write", write)


def _stats_fail(monkeypatch, reference):
    import polyp_ssl.ingest.write as iw

    monkeypatch.setattr(
        iw, "write_atomic", fail_after(1, iw.write_atomic, lambda path, data: path.endswith(".stats.json"))
    )


def _table_fail(monkeypatch, reference):
    import polyp_ssl.ingest.catalog_build as cb

    def half_a_table_then_enospc(table, where, *args, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a table")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cb.pq, "write_table", _nth(2, cb.pq.write_table, half_a_table_then_enospc))


def _nth(n_ok: int, real, failing):
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) if calls["n"] <= n_ok else failing(*args, **kwargs)

    return fake


def _manifest_fail(monkeypatch, reference):
    import polyp_ssl.ingest.catalog_build as cb

    monkeypatch.setattr(cb, "write_atomic", fail_after(0, cb.write_atomic))


ENOSPC_AT = {
    "tar": _tar_bytes_fail,
    "stats_file": _stats_fail,
    "catalog_table": _table_fail,
    "manifest": _manifest_fail,
}


@pytest.mark.parametrize("where", sorted(ENOSPC_AT))
def test_disk_full_simulated(root, reference, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "out"
    ENOSPC_AT[where](monkeypatch, reference)
    assert ingest(root, out) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(out) in err and "--resume" in err, err
    assert "Traceback" not in err
    assert_nothing_half_visible(out)
    assert not [f for f in all_files(out) if f.endswith(".tmp")], all_files(out)
    monkeypatch.undo()
    resume_equals_reference(root, out, reference, capsys)


# ---------------------------------------------------------------- disk full, a real small file system


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt, leave: int) -> str:
    """Fill the file system so that about `leave` bytes stay free; returns the filler's path."""
    filler = os.path.join(mnt, "filler")
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("where, fraction", [("mid_shards", 0.4), ("catalog", 1.3)])
def test_disk_full_on_a_real_small_file_system(root, reference, small_fs, capsys, where, fraction):
    """ENOSPC from the kernel: free space for 40% of the shard bytes (the run stops among the
    shards), or for 130% (every shard and stats file fits, the catalog does not)."""
    ref_shards = shard_bytes(reference)
    filler = fill(small_fs, int(sum(len(b) for b in ref_shards.values()) * fraction))
    out = small_fs / "out"
    assert ingest(root, out) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err, err
    assert_nothing_half_visible(out)
    assert not [f for f in all_files(out) if f.endswith(".tmp")], all_files(out)
    n_tars = len(shard_bytes(out))
    assert n_tars < len(ref_shards) if where == "mid_shards" else n_tars == len(ref_shards)
    os.remove(filler)
    resume_equals_reference(root, out, reference, capsys)


# ---------------------------------------------------------------- disk full in convert and catalog merge


def test_disk_full_in_catalog_merge_leaves_no_catalog_and_a_rerun_completes(
    root, reference, tmp_path, capsys, monkeypatch
):
    import polyp_ssl.shards.catalog_merge as cm
    from polyp_ssl.shards.cli import main as catalog_main

    out = tmp_path / "out"
    for i in range(2):
        assert ingest(root, out, "--part", f"{i}/2") == 0
    monkeypatch.setattr(cm.pq, "write_table", fail_after(3, cm.pq.write_table))
    capsys.readouterr()
    assert catalog_main(["merge", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert not (out / "catalog" / "manifest.json").exists()
    assert not [f for f in all_files(out) if ".tmp" in f], all_files(out)
    monkeypatch.undo()
    assert catalog_main(["merge", str(out)]) == 0
    assert verify_main([str(out), "--no-progress"]) == 0
    merged, ref = catalog_tables(out), catalog_tables(reference)
    for name in ("videos", "polyps", "tracklets", "frames", "errors"):
        assert merged[name].num_rows == ref[name].num_rows, name


def test_disk_full_in_convert_writes_no_annotation_file(tmp_path, capsys, monkeypatch):
    from bad_corpus import build_realcolon

    from polyp_ssl.entry import main as entry_main

    raw = build_realcolon(tmp_path / "raw")
    out = tmp_path / "rc"
    monkeypatch.setattr(os, "fsync", fail_after(1, os.fsync))  # the report is written, then the disk is full
    capsys.readouterr()
    assert entry_main(["convert", "realcolon", str(raw), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err, err
    assert not list((out / "annotations").glob("*")), list((out / "annotations").glob("*"))  # nor temporaries
    monkeypatch.undo()
    assert entry_main(["convert", "realcolon", str(raw), str(out), "--no-progress"]) == 0
    assert (out / "annotations" / "instances_train.json").exists()
