"""`polyp-ssl ingest --executor dask`: a real scheduler and two worker processes on 127.0.0.1
(`LocalCluster(processes=True)`, shared by the tests of this module).

The output of a Dask ingest equals a local ingest byte for byte (sha256 of every shard) and row
for row (catalog tables), also when a worker is SIGKILLed mid-run (the task runs again, the
retry is counted) and when the client is killed and the run `--resume`d; bad input follows
`--on-error` as locally; a worker that cannot see ROOT, a URL as OUT, a missing Dask and an
unreachable or lost scheduler are refused in one line.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Track, make_root, moving

from polyp_ssl.ingest import faults
from polyp_ssl.ingest.cli import main as ingest_main
from polyp_ssl.ingest.executor import ExecutorError
from polyp_ssl.ingest.executor_dask import DaskExecutor
from polyp_ssl.ingest.run import IngestConfig, run_ingest
from polyp_ssl.shards.schema import TABLES

distributed = pytest.importorskip("distributed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_MAX = "12k"


def videos(n: int = 5):
    out = {}
    for i in range(n):
        frames = list(range(i, i + 6 + i))
        out[(f"vid{i:02d}", None)] = (
            len(frames) + i + 2,
            [Track(f"vid{i:02d}_p", frames, moving(10 + 5 * i, 20, 20, 16, frames), float(i + 1), "AD")],
        )
    return out


@pytest.fixture(scope="module")
def cluster():
    """One scheduler and two single-threaded worker processes on 127.0.0.1 for the module."""
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as lc,
        distributed.Client(lc, set_as_default=False) as client,
    ):
        yield SimpleNamespace(address=lc.scheduler_address, client=client)


@pytest.fixture(autouse=True)
def two_workers_no_faults(cluster):
    """Each test starts (and leaves) the cluster with two workers and no fault installed."""
    cluster.client.wait_for_workers(2, timeout=60)
    yield
    cluster.client.wait_for_workers(2, timeout=60)
    cluster.client.run(faults.install, None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("root")
    make_root(str(r), videos())
    return r


def run(root, out, *args) -> int:
    return ingest_main([str(root), "--no-progress", "--out", str(out), "--shard-max-bytes", SHARD_MAX, *args])


def run_dask(cluster, root, out, *args) -> int:
    return run(root, out, "--executor", "dask", "--scheduler", cluster.address, *args)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert run(root, out) == 0
    return out


def shard_sha256(out) -> dict[str, str]:
    return {
        os.path.relpath(p, out): hashlib.sha256(open(p, "rb").read()).hexdigest()
        for p in sorted(glob.glob(os.path.join(out, "shards", "*", "*.tar")))
    }


def assert_same_output(out, ref) -> None:
    a, b = shard_sha256(ref), shard_sha256(out)
    assert len(a) >= 4 and a == b
    for name in TABLES:
        ta = pq.read_table(os.path.join(ref, "catalog", f"{name}.parquet"))
        tb = pq.read_table(os.path.join(out, "catalog", f"{name}.parquet"))
        assert ta.equals(tb), name
    assert not glob.glob(os.path.join(out, "shards", "*", "*.tmp"))


def summary_of(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_dask_ingest_equals_local_ingest(cluster, root, reference, tmp_path, capsys):
    assert run_dask(cluster, root, tmp_path) == 0
    summary = summary_of(capsys)
    assert_same_output(tmp_path, reference)
    ex = summary["executor"]
    assert ex["executor"] == "dask" and ex["scheduler"] == cluster.address and ex["workers"] == 2
    assert ex["tasks"] == summary["shards_written"] == len(shard_sha256(reference))
    assert ex["retried"] == 0 and ex["lost_workers"] == {}
    assert sum(ex["ran_on"].values()) == ex["tasks"]
    assert not glob.glob(os.path.join(tmp_path, ".ingest-probe-*"))  # the view check's probe is gone


def test_a_worker_killed_mid_run_gives_the_same_output_and_counts_the_retry(
    cluster, root, reference, tmp_path, capsys
):
    client = cluster.client
    victim = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    # the victim sleeps after its first shard (stats file written, result not returned): killed there
    client.run(faults.install, faults.Faults(pause_after_shards=1), workers=[victim])
    killed, stop = threading.Event(), threading.Event()

    def killer() -> None:
        while not stop.is_set():
            done = client.run(lambda: getattr(faults._active, "shards_done", 0), workers=[victim])
            if done.get(victim, 0) >= 1:
                os.kill(pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        assert run_dask(cluster, root, tmp_path) == 0
    finally:
        stop.set()
        thread.join(10)
    assert killed.is_set()
    summary = summary_of(capsys)
    assert_same_output(tmp_path, reference)
    ex = summary["executor"]
    assert ex["retried"] >= 1 and list(ex["lost_workers"]) == [victim]
    assert set(ex["retried_tasks"]) <= set(shard_sha256(reference))


@pytest.fixture(scope="module")
def bad_root(root, tmp_path_factory):
    """The root with one frame of the third video missing: a worker finds it (missing_frame)."""
    r = tmp_path_factory.mktemp("bad") / "root"
    shutil.copytree(root, r)
    os.remove(r / "images" / "vid02_0004.jpg")
    return r


def test_bad_input_fail_is_as_local(cluster, bad_root, tmp_path, capsys):
    assert run(bad_root, tmp_path / "local") == 1
    local_err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "missing_frame" in local_err
    assert run_dask(cluster, bad_root, tmp_path / "dask") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == local_err
    assert not glob.glob(str(tmp_path / "dask" / "shards" / "*" / "*"))  # nothing of the run is left
    assert not (tmp_path / "dask" / "catalog").exists()


def test_bad_input_skip_is_as_local(cluster, bad_root, tmp_path, capsys):
    assert run(bad_root, tmp_path / "local", "--on-error", "skip") == 0
    local = summary_of(capsys)
    assert run_dask(cluster, bad_root, tmp_path / "dask", "--on-error", "skip") == 0
    dask = summary_of(capsys)
    assert dask["errors"] == local["errors"] and local["errors"]
    assert_same_output(tmp_path / "dask", tmp_path / "local")


def test_the_client_killed_then_resumed_gives_the_same_output(
    cluster, root, reference, tmp_path, capsys, caplog
):
    out = tmp_path / "out"
    client = cluster.client
    # every worker sleeps 4 s after each shard: the client is killed in such a pause
    client.run(faults.install, faults.Faults(pause_after_shards=1, pause_seconds=4.0))
    cmd = [sys.executable, "-m", "polyp_ssl", "ingest", str(root), "--out", str(out), "--no-progress",
           "--shard-max-bytes", SHARD_MAX, "--executor", "dask", "--scheduler", cluster.address]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 60
        while len(glob.glob(str(out / "shards" / "train" / "*.stats.json"))) < 2:
            assert proc.poll() is None, "the client ended before it was killed"
            assert time.time() < deadline, "the client did not get to its second shard"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    client.run(faults.install, None)
    assert not (out / "catalog" / "manifest.json").exists()
    done = sorted(glob.glob(str(out / "shards" / "train" / "*.stats.json")))
    assert run_dask(cluster, root, out) == 2  # a partial run: --resume or --overwrite
    assert "partial ingest run" in capsys.readouterr().err
    # a task of the killed client that still runs (here: in its pause) writes a shard the resumed
    # run writes again (its stats file removed): the resumed run waits for it first
    os.remove(done[0])
    caplog.set_level(logging.INFO, logger="ingest")
    assert run_dask(cluster, root, out, "--resume") == 0
    assert "tasks of an earlier run into this output, still running" in caplog.text
    summary = summary_of(capsys)
    assert summary["shards_written"] == len(shard_sha256(reference)) - len(done) + 1
    assert_same_output(out, reference)


def test_a_worker_that_cannot_see_the_root_is_refused_in_one_line(cluster, tmp_path, monkeypatch, capsys):
    # /proc/self/cwd/NAME is this process's folder NAME: a worker with another working directory
    # does not see it (as a folder mounted on this machine only)
    monkeypatch.chdir(tmp_path)
    make_root(str(tmp_path / "only-here"), videos(2))
    root = "/proc/self/cwd/only-here"
    client = cluster.client
    victim, other = sorted(client.scheduler_info()["workers"])
    cwd = client.run(os.getcwd)
    client.run(os.chdir, str(tmp_path), workers=[other])
    client.run(os.chdir, "/", workers=[victim])
    try:
        assert run_dask(cluster, root, tmp_path / "out") == 2
    finally:
        for worker, folder in cwd.items():
            client.run(os.chdir, folder, workers=[worker])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert victim in err[0] and f"cannot see {root}" in err[0] and "shared file system" in err[0]
    assert not glob.glob(str(tmp_path / "out" / "shards" / "*" / "*"))
    assert not glob.glob(str(tmp_path / "out" / ".ingest-probe-*"))


def test_flags_that_do_not_go_with_dask_are_refused_in_one_line(root, tmp_path, capsys, monkeypatch):
    assert run(root, "s3://bucket/out", "--executor", "dask") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3://bucket/out" in err[0] and "URL" in err[0]
    assert run(root, tmp_path, "--scheduler", "tcp://127.0.0.1:1") == 2
    assert "--executor dask" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    assert run(root, tmp_path, "--executor", "dask") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'polyp-ssl[dask]'" in err[0]
    assert not os.listdir(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_error_and_nothing_looks_complete(root, tmp_path):
    ex = DaskExecutor(f"tcp://127.0.0.1:{free_port()}", read_paths=(str(root),), out=str(tmp_path))
    ex.connect_timeout_s = 2.0
    with pytest.raises(ExecutorError, match="cannot reach the Dask scheduler") as info:
        run_ingest(IngestConfig(str(root), str(tmp_path), progress=False), ex)
    assert info.value.before_work  # the command line says no "finished shards are kept"
    assert not glob.glob(str(tmp_path / "**" / "*.tar"), recursive=True)
    assert not (tmp_path / "catalog").exists()


@pytest.mark.slow
def test_the_scheduler_lost_mid_run_is_one_line_and_nothing_looks_complete(root, tmp_path):
    """`dask scheduler` and `dask worker` by hand; the scheduler is killed while a worker pauses."""
    port = free_port()
    dask_cli = os.path.join(os.path.dirname(sys.executable), "dask")
    env = dict(os.environ, **{faults.PAUSE_ENV: "1", faults.PAUSE_SECONDS_ENV: "3"})
    address = f"tcp://127.0.0.1:{port}"
    sched_cmd = [dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    worker_cmd = [dask_cli, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"]
    sched = subprocess.Popen(sched_cmd, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen(worker_cmd, env=env, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    try:
        cmd = [sys.executable, "-m", "polyp_ssl", "ingest", str(root), "--out", str(out), "--no-progress",
               "--shard-max-bytes", SHARD_MAX, "--executor", "dask", "--scheduler", address]  # fmt: skip
        client = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not glob.glob(str(out / "shards" / "train" / "*.stats.json")):
            assert client.poll() is None and time.time() < deadline
            time.sleep(0.05)
        sched.kill()
        _, err = client.communicate(timeout=120)
    finally:
        for p in (sched, worker):
            p.kill()
            p.wait()
    assert client.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "lost the Dask scheduler" in lines[0], lines
    assert not (out / "catalog" / "manifest.json").exists()
    assert not glob.glob(str(out / "shards" / "*" / "*.tmp"))
