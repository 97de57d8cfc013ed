"""Process hygiene and crash safety of the writers, and one-line failures across the CLI.

- `kill -9` of an ingest process takes its worker processes with it; `--resume` right after
  gives the uninterrupted result.
- One writer per output root: a second ingest, `catalog merge` or `convert` is refused at once
  (exit 2, naming the holder's pid); a lock left by a dead process never blocks.
- `ingest --overwrite` replaces the earlier output only when the new one is complete: bad input,
  a full disk or a kill before the swap leave the old output as it was; a kill during the swap
  is rolled forward by the next ingest.
- Ctrl-C gives exit 130 and one line; `catalog` queries stop on Ctrl-C and on `--timeout`;
  every other failure is one line unless `--debug`.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from ingest_fixtures import make_root
from test_faults_ingest import (
    SHARD_MAX,
    all_files,
    assert_equals_reference,
    five_videos,
    ingest,
    shard_bytes,
)

from polyp_ssl.entry import main as entry_main
from polyp_ssl.ingest.faults import CRASH_ENV, PAUSE_ENV, PAUSE_SECONDS_ENV
from polyp_ssl.shards.cli import main as catalog_main
from polyp_ssl.shards.cli import verify_main
from polyp_ssl.shards.cli_errors import DEBUG_ENV
from polyp_ssl.shards.lock import LOCK_NAME, LockHeld, output_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGING = ".ingest-staging"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("root")
    make_root(str(r), five_videos())
    return r


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert ingest(root, out) == 0
    assert len(shard_bytes(out)) >= 3
    return out


@pytest.fixture(scope="module")
def reference_q50(root, tmp_path_factory):
    """The output of the same root with other options: what an `--overwrite` replaces it with."""
    out = tmp_path_factory.mktemp("reference_q50")
    assert ingest(root, out, "--jpeg-quality", "50") == 0
    return out


def file_bytes(out) -> dict[str, bytes]:
    """Every file under `out`, hidden ones too (staging folders, lock files)."""
    found = {}
    for folder, _, names in os.walk(out):
        for n in names:
            path = os.path.join(folder, n)
            found[os.path.relpath(path, out)] = Path(path).read_bytes()
    return found


def copy_output(src, dst) -> None:
    shutil.copytree(src, dst)


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "polyp_ssl", *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def ingest_cmd(root, out, *args) -> list[str]:
    return ["ingest", str(root), "--out", str(out), "--no-progress", "--shard-max-bytes", SHARD_MAX, *args]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (children of children too)."""
    parents: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if fields[0] not in ("Z", "X"):
            parents[int(stat.split("/")[2])] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2] not in "ZX"


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def n_stats(out) -> int:
    return len(glob.glob(os.path.join(out, "shards", "train", "*.stats.json")))


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


# ---------------------------------------------------------------- workers die with their parent


def test_kill_9_of_the_ingest_parent_leaves_no_worker_and_resume_completes(root, reference, tmp_path, capsys):
    out = tmp_path / "out"
    # each worker sleeps for an hour after its first shard: without hygiene they would outlive us
    proc = cli(*ingest_cmd(root, out, "--workers", "2"), env={PAUSE_ENV: "1"})
    try:
        wait_for(lambda: n_stats(out) >= 2, 60, "both workers to finish a shard", proc)
        below = descendants(proc.pid)
        assert len(below) >= 3, below  # the forkserver and two workers (and the resource tracker)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in below), 5, f"the children {below} to exit")
        gone_after = time.monotonic() - t0
    finally:
        finish(proc)
    assert gone_after < 3, gone_after
    n_before = n_stats(out)
    assert ingest(root, out, "--resume") == 0
    assert n_stats(out) > n_before
    assert_equals_reference(out, reference)


def test_ctrl_c_of_ingest_exits_130_with_one_line_and_resume_completes(root, reference, tmp_path, capsys):
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        proc = cli(*ingest_cmd(root, out, "--workers", workers), env={PAUSE_ENV: "1"})
        try:
            wait_for(lambda out=out: n_stats(out) >= 1, 60, "a finished shard", proc)
            time.sleep(0.3)
            below = descendants(proc.pid)
            t0 = time.monotonic()
            if workers == "1":
                os.kill(proc.pid, signal.SIGINT)
            else:  # as a terminal does: the whole process group (workers and forkserver too)
                os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=15)
            took = time.monotonic() - t0
        finally:
            finish(proc)
        assert proc.returncode == 130, err
        assert took < 8, took
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines == ["polyp-ssl ingest: interrupted; finished shards are kept: rerun with --resume"], err
        wait_for(lambda below=below: not any(alive(p) for p in below), 5, "the workers to exit")
        assert not glob.glob(str(out / "shards" / "train" / "*.tmp"))
        capsys.readouterr()
        assert ingest(root, out) == 2  # a partial run is there
        assert ingest(root, out, "--resume") == 0
        assert_equals_reference(out, reference)


# ---------------------------------------------------------------- one writer per root


def test_two_concurrent_ingests_one_succeeds_the_other_is_refused_at_once(root, reference, tmp_path, capsys):
    out = tmp_path / "out"
    # the first pauses 2 s after each shard from its second on: long enough to try a second writer
    first = cli(*ingest_cmd(root, out), env={PAUSE_ENV: "2", PAUSE_SECONDS_ENV: "2"})
    try:
        wait_for(lambda: n_stats(out) >= 2, 60, "the first ingest to be half way", first)
        capsys.readouterr()
        t0 = time.monotonic()
        assert ingest(root, out) == 2
        assert ingest(root, out, "--resume") == 2
        assert ingest(root, out, "--overwrite") == 2
        took = time.monotonic() - t0
        err = capsys.readouterr().err
        _, first_err = first.communicate(timeout=60)
    finally:
        finish(first)
    assert first.returncode == 0, first_err
    assert took < 3, took
    assert f"pid {first.pid}" in err and "polyp-ssl ingest" in err and "in use" in err, err
    assert len(err.strip().splitlines()) == 3 and "Traceback" not in err
    assert_equals_reference(out, reference)  # nothing damaged: same bytes, verify OK
    assert not (out / LOCK_NAME).exists()  # removed by its holder at the end


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from polyp_ssl.shards.lock import output_lock
    with output_lock(sys.argv[1], sys.argv[2], part=sys.argv[3] or None):
        print("held", flush=True)
        time.sleep(float(sys.argv[4]))
    """
)


def hold_lock(out, command: str, part: str = "", seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out), command, part, str(seconds)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_lock_held_by_catalog_merge_refuses_ingest_and_an_ingest_refuses_merge(root, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = hold_lock(out, "polyp-ssl catalog merge")
    try:
        capsys.readouterr()
        assert ingest(root, out) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} (polyp-ssl catalog merge)" in err, err
        assert all_files(out) == []  # refused before anything was written
    finally:
        finish(holder)
    for i in range(2):
        assert ingest(root, out, "--part", f"{i}/2") == 0
    holder = hold_lock(out, "polyp-ssl ingest")
    try:
        capsys.readouterr()
        assert catalog_main(["merge", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} (polyp-ssl ingest)" in err and "Traceback" not in err, err
        assert not (out / "catalog" / "manifest.json").exists()
    finally:
        finish(holder)
    assert catalog_main(["merge", str(out)]) == 0
    assert verify_main([str(out), "--no-progress"]) == 0


def test_parts_run_side_by_side_but_a_whole_root_writer_waits_for_them(root, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = hold_lock(out, "polyp-ssl ingest", part="000-of-002")
    try:
        capsys.readouterr()
        assert ingest(root, out, "--part", "1/2") == 0  # another part: allowed
        assert ingest(root, out, "--part", "0/2") == 2  # the same part: refused
        assert "part 000-of-002" in capsys.readouterr().err
        assert ingest(root, out) == 2  # the whole root
        assert catalog_main(["merge", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count(f"pid {holder.pid} (polyp-ssl ingest)") == 2, err
    finally:
        finish(holder)
    assert ingest(root, out, "--part", "0/2") == 0
    assert catalog_main(["merge", str(out)]) == 0


def test_convert_into_a_root_in_use_is_refused(tmp_path, capsys, debug_off):
    from bad_corpus import build_realcolon

    raw = build_realcolon(tmp_path / "raw")
    out = tmp_path / "rc"
    out.mkdir()
    holder = hold_lock(out, "polyp-ssl ingest")
    try:
        capsys.readouterr()
        assert entry_main(["convert", "realcolon", str(raw), str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "Traceback" not in err, err
        assert not (out / "annotations").exists()
    finally:
        finish(holder)
    assert entry_main(["convert", "realcolon", str(raw), str(out), "--no-progress"]) == 0
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_never_blocks(root, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a lock file naming a pid that does not run, and nobody holding it
    (out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 17, "command": "polyp-ssl ingest"}))
    assert ingest(root, out) == 0
    assert not (out / LOCK_NAME).exists()
    # a holder killed with SIGKILL while it held the lock (the kernel drops it)
    (tmp_path / "out2").mkdir()
    holder = hold_lock(tmp_path / "out2", "polyp-ssl ingest")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "out2" / LOCK_NAME).exists()
    assert ingest(root, tmp_path / "out2") == 0
    assert_equals_reference(tmp_path / "out2", reference)


def test_lock_api_refuses_a_second_holder_in_process(tmp_path):
    held = pytest.raises(LockHeld, match=f"pid {os.getpid()} \\(first\\)")
    with output_lock(tmp_path, "first"):
        with held, output_lock(tmp_path, "second"):
            pass
        note = json.loads((tmp_path / LOCK_NAME).read_text())
        assert note["pid"] == os.getpid() and note["command"] == "first"
    with output_lock(tmp_path, "third"):  # released: free again
        pass
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------ --overwrite: the old output stays until the new is complete


def write_bad_root(root, bad) -> None:
    """A copy of `root` whose annotation file has one NaN box (fatal with --on-error fail)."""
    shutil.copytree(root, bad)
    path = bad / "annotations" / "instances_train.json"
    text = path.read_text()
    coco = json.loads(text)
    coco["annotations"][3]["bbox"][0] = float("nan")
    path.write_text(json.dumps(coco))


def test_overwrite_with_bad_input_keeps_the_old_output_intact(root, reference, tmp_path, capsys):
    out = tmp_path / "out"
    copy_output(reference, out)
    before = file_bytes(out)
    bad = tmp_path / "bad"
    write_bad_root(root, bad)
    capsys.readouterr()
    assert ingest(bad, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "instances_train.json" in err and "bbox" in err and "Traceback" not in err, err
    assert file_bytes(out) == before  # not a byte changed, no staging folder, no lock file
    assert verify_main([str(out), "--no-progress"]) == 0


def test_overwrite_with_a_frame_missing_keeps_the_old_output_and_leaves_no_staging(
    root, reference, tmp_path, capsys
):
    """A problem found by a worker, after shards were written into the staging folder."""
    out = tmp_path / "out"
    copy_output(reference, out)
    before = file_bytes(out)
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    last = sorted((bad / "images").glob("vid04_*.jpg"))[-3]
    last.unlink()
    capsys.readouterr()
    assert ingest(bad, out, "--overwrite", "--workers", "2") == 1
    err = capsys.readouterr().err
    assert last.name in err and "Traceback" not in err, err
    assert file_bytes(out) == before
    assert verify_main([str(out), "--no-progress"]) == 0


def test_overwrite_with_an_unreadable_annotation_file_keeps_the_old_output(
    root, reference, tmp_path, capsys, debug_off
):
    out = tmp_path / "out"
    copy_output(reference, out)
    before = file_bytes(out)
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    ann = bad / "annotations" / "instances_train.json"
    ann.unlink()
    ann.mkdir()  # a folder where the file should be: unreadable, as root too
    capsys.readouterr()
    rc = entry_main(ingest_cmd(bad, out, "--overwrite"))
    err = capsys.readouterr().err
    assert rc == 1 and str(ann) in err and "is a folder, not a regular file" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert file_bytes(out) == before


def test_overwrite_of_a_partial_output_gives_the_new_output(root, reference_q50, tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "polyp_ssl", *ingest_cmd(root, out)],
        env=dict(os.environ, **{CRASH_ENV: "shard_done:2"}), cwd=REPO, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    assert n_stats(out) == 2
    assert ingest(root, out, "--overwrite", "--jpeg-quality", "50") == 0
    assert_equals_reference(out, reference_q50)
    assert not (out / STAGING).exists()


def killed_overwrite(root, out, crash_at: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyp_ssl", *ingest_cmd(root, out, "--overwrite", "--jpeg-quality", "50")],
        env=dict(os.environ, **{CRASH_ENV: crash_at}), cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("crash_at", ["shard_done:2", "catalog_table:3", "before_manifest"])
def test_kill_9_of_an_overwrite_before_its_swap_leaves_the_old_output(
    root, reference, reference_q50, tmp_path, capsys, crash_at
):
    out = tmp_path / "out"
    copy_output(reference, out)
    before = file_bytes(out)
    proc = killed_overwrite(root, out, crash_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    visible = {k: v for k, v in file_bytes(out).items() if not k.startswith((STAGING, LOCK_NAME))}
    assert visible == before  # the old output, untouched
    assert (out / STAGING).is_dir()
    assert verify_main([str(out), "--no-progress"]) == 0
    # the same --overwrite again keeps what the killed one had staged, then swaps
    capsys.readouterr()
    assert ingest(root, out, "--overwrite", "--jpeg-quality", "50") == 0
    summary = json.loads(capsys.readouterr().out)
    n_staged = {"shard_done:2": 2}.get(crash_at, summary["shards"])
    assert summary["shards_written"] == summary["shards"] - n_staged
    assert_equals_reference(out, reference_q50)
    assert not (out / STAGING).exists()


@pytest.mark.parametrize("crash_at, then", [("swap_moved:1", "--resume"), ("swap_moved:4", "plain"),
                                            ("swap_moved:7", "--overwrite")])  # fmt: skip
def test_kill_9_during_the_swap_is_finished_by_the_next_ingest(
    root, reference, reference_q50, tmp_path, capsys, crash_at, then
):
    out = tmp_path / "out"
    copy_output(reference, out)
    proc = killed_overwrite(root, out, crash_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / STAGING / "all" / ".swap.json").exists()  # the new output is complete, staged
    capsys.readouterr()
    assert verify_main([str(out), "--no-progress"]) == 1  # readers say what to do
    assert "stopped while it swapped" in capsys.readouterr().err
    if then == "plain":
        # finishes the swap, then finds a complete output and says so
        assert ingest(root, out, "--jpeg-quality", "50") == 2
        assert "complete ingest output" in capsys.readouterr().err
    elif then == "--resume":
        assert ingest(root, out, "--resume", "--jpeg-quality", "50") == 0
        assert json.loads(capsys.readouterr().out)["shards_written"] == 0
    else:
        assert ingest(root, out, "--overwrite", "--jpeg-quality", "50") == 0
    assert_equals_reference(out, reference_q50)
    assert not (out / STAGING).exists()


def test_overwrite_of_one_part_swaps_that_part_only(root, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(2):
        assert ingest(root, out, "--part", f"{i}/2") == 0
    before = file_bytes(out)
    assert ingest(root, out, "--part", "1/2", "--overwrite", "--jpeg-quality", "50") == 0
    after = file_bytes(out)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed and all("-p001-" in k or "parts/001-of-002" in k for k in changed), changed
    assert after.keys() == before.keys()  # same names, no staging folder, no lock file left
    assert catalog_main(["merge", str(out)]) == 1  # the parts now differ in jpeg_quality
    assert "jpeg_quality" in capsys.readouterr().err
    assert ingest(root, out, "--part", "0/2", "--overwrite", "--jpeg-quality", "50") == 0
    assert catalog_main(["merge", str(out)]) == 0
    assert verify_main([str(out), "--no-progress"]) == 0


def test_a_staging_folder_that_is_a_link_is_refused_and_never_emptied(root, reference, tmp_path, capsys):
    out = tmp_path / "out"
    copy_output(reference, out)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "all").mkdir(parents=True)
    (elsewhere / "all" / "precious.txt").write_text("keep me")
    (out / STAGING).symlink_to(elsewhere)
    capsys.readouterr()
    assert ingest(root, out, "--resume") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (elsewhere / "all" / "precious.txt").read_text() == "keep me"


def test_a_tampered_swap_marker_never_moves_files_outside_the_output(root, reference, tmp_path, capsys):
    out = tmp_path / "out"
    copy_output(reference, out)
    staging = out / STAGING / "all"
    staging.mkdir(parents=True)
    (staging / "catalog").mkdir()
    (staging / "catalog" / "manifest.json").write_text("{}")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    marker = {"files": ["../../victim.txt"], "splits": ["train"], "part": None}
    (staging / ".swap.json").write_text(json.dumps(marker))
    capsys.readouterr()
    assert ingest(root, out, "--resume") == 2
    err = capsys.readouterr().err
    assert ".swap.json" in err and "'files'" in err, err
    assert victim.read_text() == "keep me"
    assert verify_main([str(out), "--no-progress"]) == 0


# ---------------------------------------------------------------- real file systems: read-only, full


def mount_tmpfs(path: Path, options: str) -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield done
    for m in done:
        subprocess.run(["umount", "-l", str(m)], check=False)


def test_read_only_out_is_one_line_naming_the_path(root, tmp_path, capsys, mounts, debug_off):
    ro = tmp_path / f"ro-{uuid.uuid4().hex[:6]}"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
        cause = "Permission denied"
    else:
        mount_tmpfs(ro, "ro,size=64k")
        mounts.append(ro)
        cause = "Read-only file system"
    for out in (ro, ro / "sub"):
        capsys.readouterr()
        assert entry_main(ingest_cmd(root, out)) == 1
        err = capsys.readouterr().err
        assert cause in err and str(ro) in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_full_disk_during_an_overwrite_keeps_the_old_output(root, reference_q50, tmp_path, capsys, mounts):
    from test_faults_ingest import fill

    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mount_tmpfs(mnt, "size=1m")
    mounts.append(mnt)
    out = mnt / "out"
    assert ingest(root, out) == 0
    before = file_bytes(out)
    filler = fill(mnt, sum(len(b) for b in shard_bytes(out).values()) // 3)
    capsys.readouterr()
    assert ingest(root, out, "--overwrite", "--jpeg-quality", "50") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--overwrite" in err and "Traceback" not in err, err
    visible = {k: v for k, v in file_bytes(out).items() if not k.startswith(STAGING)}
    assert visible == before
    assert verify_main([str(out), "--no-progress"]) == 0
    os.remove(filler)
    assert ingest(root, out, "--overwrite", "--jpeg-quality", "50") == 0
    assert_equals_reference(out, reference_q50)
    assert not (out / STAGING).exists()


# ---------------------------------------------------------------- catalog: Ctrl-C and --timeout

FOREVER_SQL = "SELECT count(*) FROM range(1000000000000)"


def test_catalog_query_stops_on_ctrl_c(reference):
    proc = cli("catalog", str(reference), FOREVER_SQL)
    try:
        time.sleep(2.5)  # started, and running the query
        assert proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - t0
    finally:
        finish(proc)
    assert proc.returncode == 130, err
    assert took < 5, took
    assert err.strip() == "polyp-ssl catalog: interrupted", err


def test_catalog_query_stops_after_its_timeout(reference):
    t0 = time.monotonic()
    proc = cli("catalog", str(reference), FOREVER_SQL, "--timeout", "1")
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        finish(proc)
    took = time.monotonic() - t0
    assert proc.returncode == 1, err
    assert took < 10, took
    assert err.strip() == "polyp-ssl catalog: error: the query was stopped after --timeout 1 s", err


def test_catalog_timeout_does_not_stop_a_quick_query_and_refuses_bad_values(reference, capsys):
    sql = "SELECT count(*) AS n FROM tracklets"
    assert catalog_main([str(reference), sql, "--timeout", "30", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 5}]
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit) as e:
            catalog_main([str(reference), "SELECT 1", "--timeout", bad])
        assert e.value.code == 2
        assert "--timeout" in capsys.readouterr().err


def test_query_api_timeout(reference):
    from polyp_ssl.shards.catalog import QueryTimeout, query

    t0 = time.monotonic()
    with pytest.raises(QueryTimeout):
        query(reference, FOREVER_SQL, timeout=0.5)
    assert time.monotonic() - t0 < 6
    assert query(reference, "SELECT count(*) AS n FROM shards", timeout=30).column("n")[0].as_py() >= 3


# ------------------------------------------------ every failure is one line; --debug: the traceback


def test_debug_shows_the_traceback_where_the_default_shows_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out"  # under a file: cannot be created
    argv = ingest_cmd(tmp_path, out)
    make_root(str(tmp_path), five_videos())
    plain = subprocess.run([sys.executable, "-m", "polyp_ssl", *argv], cwd=REPO, capture_output=True,
                           text=True, env=dict(os.environ, **{DEBUG_ENV: "0"}))  # fmt: skip
    assert plain.returncode == 1
    assert len(plain.stderr.strip().splitlines()) == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert str(blocker) in plain.stderr and "Not a directory" in plain.stderr, plain.stderr
    for debug_argv, env in (
        (["--debug", *argv], {DEBUG_ENV: "0"}),
        ([*argv, "--debug"], {DEBUG_ENV: "0"}),
        (argv, {DEBUG_ENV: "1"}),
    ):
        debug = subprocess.run([sys.executable, "-m", "polyp_ssl", *debug_argv], cwd=REPO,
                               capture_output=True, text=True, env=dict(os.environ, **env))  # fmt: skip
        assert debug.returncode == 1
        assert "Traceback" in debug.stderr and "NotADirectoryError" in debug.stderr, debug.stderr


def _raiser(exc: BaseException):
    def main(argv):
        raise exc

    return main


OS_ERRORS = {
    "ENOSPC": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/catalog/frames.parquet"),
    "EROFS": OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/out"),
    "EACCES": PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out/shards"),
    "ENOENT": FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/data/ckpt/last.ckpt"),
}


@pytest.mark.parametrize("name", sorted(OS_ERRORS))
def test_an_os_error_is_one_line_naming_path_and_cause(monkeypatch, capsys, debug_off, name):
    import polyp_ssl.shards.cli

    exc = OS_ERRORS[name]
    monkeypatch.setattr(polyp_ssl.shards.cli, "verify_main", _raiser(exc))
    assert entry_main(["verify", "x"]) == 1
    err = capsys.readouterr().err
    assert err == f"polyp-ssl verify: {exc.filename}: {exc.strerror}\n", err
    with pytest.raises(type(exc)):
        entry_main(["--debug", "verify", "x"])


def test_an_unexpected_error_is_one_line_and_ctrl_c_is_130(monkeypatch, capsys, debug_off):
    import polyp_ssl.shards.cli

    monkeypatch.setattr(polyp_ssl.shards.cli, "verify_main", _raiser(ValueError("bad\nthing")))
    assert entry_main(["verify", "x"]) == 1
    err = capsys.readouterr().err
    assert err == "polyp-ssl verify: error: ValueError: bad thing (rerun with --debug for the traceback)\n"
    monkeypatch.setattr(polyp_ssl.shards.cli, "verify_main", _raiser(KeyboardInterrupt()))
    assert entry_main(["verify", "x"]) == 130
    assert capsys.readouterr().err == "polyp-ssl verify: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        entry_main(["--debug", "verify", "x"])
    monkeypatch.setattr(polyp_ssl.shards.cli, "verify_main", _raiser(SystemExit(2)))  # argparse: untouched
    with pytest.raises(SystemExit):
        entry_main(["verify", "x"])


def test_debug_flag_reaches_train_as_an_environment_variable(monkeypatch, debug_off):
    import polyp_ssl.entry as entry

    seen = {}

    def fake_train(argv):
        seen["argv"], seen["env"] = argv, os.environ.get(DEBUG_ENV)
        return 0

    monkeypatch.setitem(entry.COMMANDS, "train", ("test_process_hygiene:_fake_train", ""))
    monkeypatch.setattr(sys.modules[__name__], "_fake_train", fake_train, raising=False)
    assert entry_main(["--debug", "train", "--max_steps", "1"]) == 0
    assert seen == {"argv": ["--debug", "--max_steps", "1"], "env": "1"}  # train's own flag, and the variable
    assert entry_main(["train", "--max_steps", "1", "--debug"]) == 0  # train keeps its own --debug
    assert seen["argv"] == ["--max_steps", "1", "--debug"]
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert entry_main(["train", "--max_steps", "1"]) == 0
    assert seen == {"argv": ["--max_steps", "1"], "env": "0"}


def _fake_train(argv):  # replaced in the test above
    return 0


def test_catalog_still_never_imports_torch(reference):
    code = (
        "import sys\nfrom polyp_ssl.entry import main\n"
        f"rc = main(['catalog', {str(reference)!r}, 'SELECT 1', '--timeout', '5'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
