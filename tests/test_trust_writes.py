"""Names from data never choose where things are written, and faults while writing leave all or
nothing (issue 19, classes 2 and 7).

Class 2: `train`'s run folder is always inside `--runs_dir` (exp_name from a config file or the
command line: '..', '../../x', absolute, a link out, control characters); `convert merge`
refuses a source that is, contains or is inside its output (real paths), a source that is
itself a merge output (ids would nest as `sun/sun/...`), and with --keep-splits a split name
ingest would refuse.
Class 7: split and merge put their files in through a staging folder (all or none, also on a
real full disk, the message naming the file); a run killed while renaming is finished by the
next run and refused by ingest until then; temporaries of a killed merge are removed by the
next run; an ingest started right after a `kill -9` of the previous one waits for (or kills)
the old workers before it writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ingest_fixtures import make_root
from test_faults_ingest import assert_equals_reference, five_videos, ingest
from test_process_hygiene import alive, cli, descendants, finish, ingest_cmd, n_stats, wait_for

import polyp_ssl.ingest.convert.merge as merge_mod
import polyp_ssl.ingest.split as split_mod
from polyp_ssl.entry import main as entry_main
from polyp_ssl.ingest.faults import CRASH_ENV, PAUSE_ENV
from polyp_ssl.ingest.staged import MARKER, STAGING_DIR
from polyp_ssl.ingest.workers import WORKERS_DIR, start_time, stop_old_workers

REPO = Path(__file__).resolve().parents[1]
SYNTH = ["--frames-per-video", "40", "--width", "96", "--height", "80", "--workers", "1", "--quiet"]
CLI_TIMEOUT = 180


pytestmark = pytest.mark.usefixtures("debug_off")  # tests/conftest.py


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = entry_main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path` (hidden ones too): files with their bytes, folders as None."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, names in os.walk(path):
        for d in dirs:
            found[os.path.relpath(os.path.join(folder, d), path)] = None
        for n in names:
            p = os.path.join(folder, n)
            found[os.path.relpath(p, path)] = b"link" if os.path.islink(p) else Path(p).read_bytes()
    return found


def one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if not x.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def copy_root(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """A seed-layout dataset root (images/ + annotations/instances_all.json), 6 videos."""
    root = tmp_path_factory.mktemp("seed") / "rc"
    assert entry_main(["synth", str(root), "--videos", "6", "--dataset-id", "realcolon", *SYNTH]) == 0
    return root


# ================================================================ class 2: run folder of train


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    make_root(str(raw), five_videos())
    out = tmp_path_factory.mktemp("ingested")
    assert ingest(raw, out) == 0
    return out


def train_cmd(dataset_root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "polyp_ssl", "train", "--dataset_root", str(dataset_root),
        "--runs_dir", str(runs), "--aug_anchorcrop", "--eval_aug_anchorcrop", "--max_steps", "1",
        "--accelerator", "cpu", *extra,
    ]  # fmt: skip


def train_cases(base: Path) -> list[tuple[list[str], str, Path]]:
    """(extra args, the source the message must name, a path that must not appear)."""
    base.mkdir(parents=True)
    (base / "cfg").mkdir()
    dotdot = base / "cfg" / "dotdot.yaml"
    dotdot.write_text("exp_name: ../../escaped_by_config\n")
    absolute = base / "cfg" / "absolute.yaml"
    absolute.write_text(f"exp_name: {base / 'absolute_by_config'}\n")
    in_dotdot, in_absolute = f"--config {dotdot}: exp_name", f"--config {absolute}: exp_name"
    return [
        (["--config", str(dotdot)], in_dotdot, base.parent / "escaped_by_config"),  # the examples
        (["--exp_name", str(base / "absolute_by_flag")], "--exp_name", base / "absolute_by_flag"),
        (["--config", str(absolute)], in_absolute, base / "absolute_by_config"),
        (["--exp_name", ".."], "--exp_name", base / "logs"),
        (["--exp_name", "../escaped_by_flag"], "--exp_name", base / "escaped_by_flag"),
        # the flag wins over the config file: named as the flag
        (["--config", str(dotdot), "--exp_name", "/tmp"], "--exp_name", base.parent / "escaped_by_config"),
    ]


def assert_refused(rc: int, err: str, source: str, before: dict, base: Path, bad: Path) -> None:
    line = one_line(err)
    assert rc == 2, err
    assert source in line and "exp_name" in line and "plain" in line, line
    assert not (base / "runs").exists()  # no run folder, not even --runs_dir
    assert not bad.exists()
    assert tree(base.parent) == before  # nothing created anywhere (runs_dir/../.. is base.parent)


def test_exp_name_from_a_config_and_the_command_line_never_leaves_runs_dir_real_cli(ingested, tmp_path):
    """The real `polyp-ssl train`, one process per case, run side by side."""
    base = tmp_path / "work" / "deep"
    cases = train_cases(base)[:2]  # the examples: `..` in a config file, absolute on the command line
    before = tree(base.parent)
    procs = [
        subprocess.Popen(
            train_cmd(ingested, base / "runs", *extra), cwd=base, env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for extra, _, _ in cases
    ]  # fmt: skip
    for proc, (_, source, bad) in zip(procs, cases, strict=True):
        _, err = proc.communicate(timeout=CLI_TIMEOUT)
        assert_refused(proc.returncode, err, source, before, base, bad)


@pytest.mark.slow
def test_every_exp_name_case_through_the_real_cli(ingested, tmp_path):
    base = tmp_path / "work" / "deep"
    cases = train_cases(base)
    before = tree(base.parent)
    for extra, source, bad in cases:
        proc = subprocess.run(
            train_cmd(ingested, base / "runs", *extra), cwd=base, capture_output=True, text=True,
            timeout=CLI_TIMEOUT,
        )  # fmt: skip
        assert_refused(proc.returncode, proc.stderr, source, before, base, bad)


@pytest.mark.slow
def test_exp_name_cases_through_the_dispatcher(ingested, tmp_path, capsys, monkeypatch):
    """The same command in this process (`polyp-ssl` dispatcher): every case of the list."""
    base = tmp_path / "work" / "deep"
    cases = train_cases(base)
    monkeypatch.chdir(base)
    before = tree(base.parent)
    for extra, source, bad in cases:
        rc, _, err = run(capsys, *train_cmd(ingested, base / "runs", *extra)[3:])
        assert_refused(rc, err, source, before, base, bad)


def resolve(*argv: str):
    from polyp_ssl.train_cli import resolve_config

    return resolve_config(list(argv))


def test_exp_name_cases_are_refused_where_the_settings_are_resolved(ingested, tmp_path, monkeypatch):
    """Every case of the list, at `resolve_config` (what `train` runs first; no torch import)."""
    base = tmp_path / "work" / "deep"
    cases = train_cases(base)
    monkeypatch.chdir(base)
    before = tree(base.parent)
    for extra, source, _ in cases:
        with pytest.raises(ValueError) as info:
            resolve(*train_cmd(ingested, base / "runs", *extra)[4:])
        assert source in str(info.value) and "plain" in str(info.value)
    assert tree(base.parent) == before


@pytest.mark.parametrize("name", ["", ".", "a\x1b[31mb", "x" * 201, "a\\b", "run/sub"])
def test_exp_name_that_is_not_one_plain_name_is_refused(ingested, tmp_path, name):
    with pytest.raises(ValueError) as info:
        resolve(*train_cmd(ingested, tmp_path / "runs", "--exp_name", name)[4:])
    message = str(info.value)
    assert message.startswith("--exp_name") and "\x1b" not in message  # the control character escaped
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_that_is_a_link_out_of_runs_dir_is_refused(ingested, tmp_path):
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    (runs / "linked").symlink_to(outside)
    with pytest.raises(ValueError) as info:
        resolve(*train_cmd(ingested, runs, "--exp_name", "linked")[4:])
    message = str(info.value)
    assert "linked" in message and str(outside) in message and "outside --runs_dir" in message
    assert list(outside.iterdir()) == []
    (runs / "inside").mkdir()
    (runs / "alias").symlink_to(runs / "inside")  # a link that stays inside runs_dir is a run folder
    assert resolve(*train_cmd(ingested, runs, "--exp_name", "alias")[4:]).exp_name == "alias"


def test_a_plain_exp_name_passes_the_check(ingested, tmp_path):
    """Control: the same settings with a plain name resolve."""
    cfg = resolve(*train_cmd(ingested, tmp_path / "runs", "--exp_name", "fine.v2-1")[4:])
    assert cfg.exp_name == "fine.v2-1" and cfg.runs_dir == str(tmp_path / "runs")


@pytest.mark.parametrize("name", ["../../escaped", "/abs/escaped", ".."])
def test_eval_exp_name_never_leaves_the_eval_folder(tmp_path, capsys, name):
    """`polyp-ssl eval --exp_name` names the default output folder `{root}/eval/{exp_name}_...`."""
    from eval_factory import make_eval_root

    root = make_eval_root(tmp_path / "r", splits={"test": 3})
    before = tree(tmp_path)
    emb = root / "embeddings" / "test.parquet"
    rc, _, err = run(capsys, "eval", "--task", "retrieval", "--embeddings", emb, "--exp_name", name)
    assert rc == 2 and "--exp_name" in one_line(err) and "plain" in err
    assert tree(tmp_path) == before


# ================================================================ class 2: merge sources and output


def test_merge_of_a_root_into_itself_leaves_the_root_untouched(seed, tmp_path, capsys):
    root = copy_root(seed, tmp_path / "root")
    before, mtime = tree(root), root.stat().st_mtime_ns
    rc, _, err = run(capsys, "convert", "merge", root, root, "--no-progress")
    line = one_line(err)
    assert rc == 2 and "is the output root" in line and line.count(str(root)) >= 2
    assert tree(root) == before and root.stat().st_mtime_ns == mtime  # not even a lock file came and went


@pytest.mark.parametrize(
    "where", ["output inside the source", "source inside the output", "link to the source"]
)
def test_merge_refuses_overlapping_source_and_output(seed, tmp_path, capsys, where):
    root = copy_root(seed, tmp_path / "root")
    if where == "output inside the source":
        sources, out, expect = [root], root / "merged", "contains the output root"
    elif where == "source inside the output":
        sources, out, expect = [root], tmp_path, "is inside the output root"
    else:  # another name for the same folder: compared by real path
        (tmp_path / "alias").symlink_to(root)
        sources, out, expect = [tmp_path / "alias"], root, "is the output root"
    before = tree(tmp_path)
    rc, _, err = run(capsys, "convert", "merge", *sources, out, "--no-progress")
    line = one_line(err)
    assert rc == 2 and expect in line and str(sources[0]) in line and str(out) in line
    assert tree(tmp_path) == before  # the output inside the source was not even made


def test_merge_of_a_merged_root_is_refused_instead_of_nesting_ids(seed, tmp_path, capsys):
    root = copy_root(seed, tmp_path / "rc")
    rc, _, err = run(capsys, "convert", "merge", root, tmp_path / "m1", "--no-progress")
    assert rc == 0, err
    first = json.loads((tmp_path / "m1" / "annotations" / "instances_all.json").read_text())
    assert all(i["file_name"].startswith("realcolon/") for i in first["images"])
    for args in ([tmp_path / "m1"], [f"{tmp_path / 'm1'}::all"], [root, tmp_path / "m1"]):
        rc, _, err = run(capsys, "convert", "merge", *args, tmp_path / "m2", "--dataset-ids",
                         ",".join(f"d{i}" for i in range(len(args))), "--no-progress")  # fmt: skip
        line = one_line(err)
        assert rc == 2 and "output of `polyp-ssl convert merge`" in line and "merge its sources" in line
        assert str(root) in line  # the message names the sources to merge instead
        assert not (tmp_path / "m2").exists()


@pytest.mark.parametrize("bad", ["a\x1bb", "y" * 201, "has\\backslash", ".."])
def test_keep_splits_never_writes_a_split_name_ingest_refuses(seed, tmp_path, capsys, bad):
    root = copy_root(seed, tmp_path / "rc")
    ann = root / "annotations"
    (ann / "instances_train.json").rename(ann / f"instances_{bad}.json")
    rc, _, err = run(capsys, "convert", "merge", root, tmp_path / "out", "--keep-splits", "--no-progress")
    line = one_line(err)
    assert rc == 2 and "--keep-splits" in line and "instances_" in line, line
    assert not (tmp_path / "out").exists()
    # the same rule as ingest: ingest of the source refuses the name too
    rc, _, err = run(capsys, "ingest", root, "--out", tmp_path / "ing", "--no-progress")
    assert rc == 2 and "split name" in err


def test_keep_splits_with_plain_names_still_works(seed, tmp_path, capsys):
    root = copy_root(seed, tmp_path / "rc")
    ann = root / "annotations"
    (ann / "instances_train.json").rename(ann / "instances_train.2024.json")  # a dot is a plain name
    rc, _, err = run(capsys, "convert", "merge", root, tmp_path / "out", "--keep-splits", "--no-progress")
    assert rc == 0, err
    assert (tmp_path / "out" / "annotations" / "instances_train.2024.json").is_file()


# ================================================================ class 7: split writes all or none


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for m in made:
        subprocess.run(["umount", "-l", str(m)], check=False)


def fill_to(folder: Path, free_bytes: int) -> Path:
    """Write a filler file so that `free_bytes` (rounded to pages) are left on folder's file system."""
    st = os.statvfs(folder)
    have = st.f_bavail * st.f_frsize
    assert have > free_bytes, (have, free_bytes)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (have - free_bytes))
    return filler


def annotations_of(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "annotations").glob("*.json"))}


def test_split_on_a_real_full_disk_writes_all_files_or_none(seed, tmp_path, capsys, mounts):
    sources = {p.name: p.read_bytes() for p in (seed / "annotations").glob("*.json")}

    def dataset(root: Path) -> Path:  # split reads only annotations/
        (root / "annotations").mkdir(parents=True)
        for name, data in sources.items():
            (root / "annotations" / name).write_bytes(data)
        return root

    clean = dataset(tmp_path / "clean")
    rc, _, err = run(capsys, "split", clean, "--fractions", "0.6,0.4", "--names", "a,b")
    assert rc == 0, err
    want = annotations_of(clean)
    page = 4096
    pages = {n: -(-len(b) // page) for n, b in want.items()}
    assert pages["instances_b.json"] >= 4  # room to fail half-way through the second file
    mnt = tmp_path / "mnt"
    mount_tmpfs(mnt, "8m")
    mounts.append(mnt)
    root = dataset(mnt / "root")
    before = tree(root)
    # room for the first split's file and half of the second
    filler = fill_to(mnt, (pages["instances_a.json"] + pages["instances_b.json"] // 2) * page)
    rc, _, err = run(capsys, "split", root, "--fractions", "0.6,0.4", "--names", "a,b")
    line = one_line(err)
    assert rc == 1 and "No space left on device" in line
    assert str(root / "annotations" / "instances_b.json") in line  # names the file that failed
    assert annotations_of(root) == sources  # none of the new files, the old ones all there
    assert not (root / STAGING_DIR).exists()
    assert tree(root) == before  # the kept sources are staged with the split files: nothing is left
    filler.unlink()
    rc, _, err = run(capsys, "split", root, "--fractions", "0.6,0.4", "--names", "a,b")
    assert rc == 0, err
    assert annotations_of(root) == want  # then all of them, as an uninterrupted run


def enospc_on(module, name: str, match: str, monkeypatch) -> None:
    """`module.name` fails as a full disk does (no file name in the error) for paths with `match`."""
    real = getattr(module, name)

    def failing(path, *a, **k):
        if match in Path(path).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *a, **k)

    monkeypatch.setattr(module, name, failing)


def test_split_failing_on_its_last_file_leaves_the_old_files(seed, tmp_path, capsys, monkeypatch):
    root = copy_root(seed, tmp_path / "rc")
    before = annotations_of(root)
    enospc_on(split_mod, "write_coco_atomic", "instances_test", monkeypatch)
    rc, _, err = run(capsys, "split", root, "--fractions", "0.5,0.3,0.2")
    line = one_line(err)
    assert rc == 1 and str(root / "annotations" / "instances_test.json") in line and "left as it was" in line
    assert annotations_of(root) == before and not (root / STAGING_DIR).exists()


def test_split_killed_while_renaming_is_refused_by_ingest_and_finished_by_the_rerun(seed, tmp_path, capsys):
    clean = copy_root(seed, tmp_path / "clean")
    assert run(capsys, "split", clean)[0] == 0
    root = copy_root(seed, tmp_path / "rc")
    killed = subprocess.run(
        [sys.executable, "-m", "polyp_ssl", "split", str(root)], capture_output=True, text=True,
        env=dict(os.environ, **{CRASH_ENV: "staged_moved:1"}), timeout=CLI_TIMEOUT,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert (root / STAGING_DIR / MARKER).is_file()  # half of the new files are in: the marker says so
    rc, _, err = run(capsys, "ingest", root, "--out", tmp_path / "ing", "--no-progress")
    line = one_line(err)
    assert rc == 2 and str(root / STAGING_DIR / MARKER) in line and "run that command again" in line
    assert not (tmp_path / "ing").exists()
    rc, _, err = run(capsys, "split", root)
    assert rc == 0, err
    assert annotations_of(root) == annotations_of(clean) and not (root / STAGING_DIR).exists()


# ================================================================ class 7: merge


def merged_files(out: Path) -> dict[str, bytes | None]:
    """The merge output but the report (it names its own output root)."""
    return {k: v for k, v in tree(out).items() if k != "convert_report.json"}


def test_merge_failing_on_a_full_disk_writes_no_annotation_file_nor_report(
    seed, tmp_path, capsys, monkeypatch
):
    clean = tmp_path / "clean"
    assert run(capsys, "convert", "merge", seed, clean, "--no-progress")[0] == 0
    out = tmp_path / "out"
    enospc_on(merge_mod, "write_coco_atomic", "instances_all", monkeypatch)
    rc, _, err = run(capsys, "convert", "merge", seed, out, "--no-progress")
    line = one_line(err)
    assert rc == 1 and str(out / "annotations" / "instances_all.json") in line and "No space left" in line
    # the images are staged with the annotation files and the report: none of them reached OUT,
    # and OUT, made by this run only to hold them, is removed again
    assert not out.exists()
    monkeypatch.undo()
    assert run(capsys, "convert", "merge", seed, out, "--no-progress")[0] == 0
    assert merged_files(out) == merged_files(clean)


def merge_cli(src: Path, out: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({CRASH_ENV: crash_at} if crash_at else {}))
    cmd = [sys.executable, "-m", "polyp_ssl", "convert", "merge", str(src), str(out), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT)


def temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp-*"))


def test_merge_killed_then_rerun_removes_the_temporaries(seed, tmp_path):
    clean = tmp_path / "clean"
    assert merge_cli(seed, clean).returncode == 0
    out = tmp_path / "out"
    killed = merge_cli(seed, out, "convert_image_placed:30")
    assert killed.returncode == -signal.SIGKILL
    # what a kill leaves besides: a frame being linked (in the staging folder, where the killed
    # run placed its frames), the report and an annotation file being written in place by an
    # older run (a pid that is not ours: the killed process's)
    frame = next(p for p in out.rglob("*.jpg"))
    assert STAGING_DIR in frame.parts and not (out / "images").exists()
    (out / "annotations").mkdir()
    dead = 4_000_001
    planted = [
        frame.with_name(f".{frame.name}.tmp-{dead}"),
        out / f".convert_report.json.tmp-{dead}",
        out / "annotations" / f".instances_all.json.tmp-{dead}",
    ]
    for p in planted:
        p.write_bytes(b"half")
    assert len(temporaries(out)) >= 3
    done = merge_cli(seed, out)
    assert done.returncode == 0, done.stderr
    assert temporaries(out) == []
    assert merged_files(out) == merged_files(clean)


def test_merge_killed_while_renaming_is_finished_by_the_rerun(seed, tmp_path, capsys):
    clean = tmp_path / "clean"
    assert merge_cli(seed, clean).returncode == 0
    out = tmp_path / "out"
    killed = merge_cli(seed, out, "staged_moved:1")
    assert killed.returncode == -signal.SIGKILL
    assert (out / STAGING_DIR / MARKER).is_file()
    rc, _, err = run(capsys, "ingest", out, "--no-progress")  # ingest in place: refused, nothing written
    assert rc == 2 and MARKER in err
    done = merge_cli(seed, out)
    assert done.returncode == 0, done.stderr
    assert merged_files(out) == merged_files(clean) and not (out / STAGING_DIR).exists()


# ================================================================ class 7: ingest after a kill -9


@pytest.fixture(scope="module")
def raw5(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("raw5")
    make_root(str(r), five_videos())
    return r


@pytest.fixture(scope="module")
def reference5(raw5, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference5")
    assert ingest(raw5, out) == 0
    return out


def worker_records(out: Path) -> dict[int, dict]:
    found = {}
    for p in (out / WORKERS_DIR).glob("*/*.json"):
        try:
            record = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        found[record["pid"]] = record
    return found


def shard_listing(out: Path) -> set[str]:
    folder = out / "shards"
    return {str(p.relative_to(out)) for p in folder.rglob("*")} if folder.is_dir() else set()


@pytest.mark.parametrize("old_workers", ["stopped", "running"])
def test_resume_right_after_kill_9_waits_for_the_old_workers(raw5, reference5, tmp_path, old_workers):
    """A real `kill -9` of the ingest parent; `--resume` started at once. With "stopped", the
    forkserver and the workers are SIGSTOPped first (a loaded machine, at the extreme): neither
    the parent-death signal nor the watchdog can end them, so only the resumed ingest can."""
    out = tmp_path / "out"
    proc = cli(*ingest_cmd(raw5, out, "--workers", "2"), env={PAUSE_ENV: "1"})
    below: set[int] = set()
    resumed = None
    try:
        wait_for(lambda: n_stats(out) >= 2 and len(worker_records(out)) >= 2, 60, "two shards", proc)
        below = descendants(proc.pid)
        workers = set(worker_records(out))
        assert workers <= below, (workers, below)
        if old_workers == "stopped":
            for pid in below:
                os.kill(pid, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        proc.wait(10)
        before = shard_listing(out)
        resumed = cli(*ingest_cmd(raw5, out, "--resume", "--workers", "2"))
        alive_at_first_write = None
        deadline = time.monotonic() + CLI_TIMEOUT
        while time.monotonic() < deadline:
            if shard_listing(out) - before:  # the resumed run's first file in shards/
                alive_at_first_write = sorted(p for p in workers if alive(p))
                break
            if resumed.poll() is not None:
                break
            time.sleep(0.005)
        _, err = resumed.communicate(timeout=CLI_TIMEOUT)
        assert resumed.returncode == 0, err
        assert alive_at_first_write == [], (alive_at_first_write, err)
        assert not any(alive(p) for p in workers)
        if old_workers == "stopped":
            assert "interrupted ingest" in err and "killed" in err
        assert not (out / WORKERS_DIR).exists()  # the records went with the workers
        assert_equals_reference(out, reference5)
    finally:
        for pid in below:  # kill what is left, and let the stopped ones run to be reaped
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        finish(proc)
        if resumed is not None:
            finish(resumed)


def forge_record(out: Path, pid: int, start: int, parent: int, parent_start: int, host: str) -> Path:
    folder = out / WORKERS_DIR / "all"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pid}.json"
    record = {"pid": pid, "start": start, "host": host, "parent": parent, "parent_start": parent_start}
    path.write_text(json.dumps(record))
    return path


def test_a_forged_worker_record_never_kills_another_process(tmp_path):
    """Records are files in the output: a process is killed only when it is a worker (right start
    time, our user, a multiprocessing child) of a dead ingest."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        wait_for(lambda: start_time(victim.pid) is not None, 10, "the victim to start")
        host = socket.gethostname()
        out = tmp_path / "out"
        # its parent pid is above Linux's pid_max: never alive
        forge_record(out, victim.pid, start_time(victim.pid), 2**22 + 7, 1, host)  # not a worker
        (out / WORKERS_DIR / "all" / "junk.json").write_text("[not a record")
        (out / WORKERS_DIR / "all" / "big.json").write_bytes(b"{" * 100_000)
        t0 = time.monotonic()
        assert stop_old_workers(str(out), grace_s=0.2) == []
        assert time.monotonic() - t0 < 2
        assert victim.poll() is None
        assert not (out / WORKERS_DIR).exists()
        # a pid reused by another process (other start time) is not waited for either
        forge_record(out, victim.pid, start_time(victim.pid) - 1, 2**22 + 7, 1, host)
        assert stop_old_workers(str(out), grace_s=0.2) == [] and victim.poll() is None
        # another machine's record is left alone
        kept = forge_record(out, victim.pid, start_time(victim.pid), 2**22 + 7, 1, host + "-other")
        assert stop_old_workers(str(out), grace_s=0.2) == [] and kept.exists() and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_records_of_a_live_ingest_are_left_alone(raw5, tmp_path):
    """Another part's ingest still runs: its workers are not orphans and are not touched."""
    out = tmp_path / "out"
    proc = cli(*ingest_cmd(raw5, out, "--workers", "2", "--part", "0/2"), env={PAUSE_ENV: "1"})
    try:
        wait_for(lambda: len(worker_records(out)) >= 1, 60, "a worker record", proc)
        workers = set(worker_records(out))
        assert stop_old_workers(str(out), grace_s=0.1) == []
        assert all(alive(p) for p in workers) and set(worker_records(out)) == workers
    finally:
        finish(proc)


# ================================================================ the staging folder is not trusted


def test_a_tampered_swap_marker_never_moves_or_removes_files_outside_the_root(seed, tmp_path, capsys):
    root = copy_root(seed, tmp_path / "rc")
    outside = tmp_path / "outside.json"
    outside.write_text("keep me")
    staging = root / STAGING_DIR
    (staging / "annotations").mkdir(parents=True)
    (staging / "annotations" / "x.json").write_text("{}")
    before = tree(root)
    for files, remove in (
        (["../outside.json"], []),
        (["annotations/x.json"], ["../outside.json"]),
        ([str(outside)], []),
        (["annotations/./x.json"], []),
    ):
        (staging / MARKER).write_text(json.dumps({"files": files, "remove": remove}))
        rc, _, err = run(capsys, "split", root)
        line = one_line(err)
        assert rc == 2 and str(staging / MARKER) in line and "inside the root" in line, line
        assert outside.read_text() == "keep me"
        assert tree(root) == {**before, f"{STAGING_DIR}/{MARKER}": (staging / MARKER).read_bytes()}


def test_a_staging_folder_that_is_a_link_is_refused_and_never_emptied(seed, tmp_path, capsys):
    root = copy_root(seed, tmp_path / "rc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    (root / STAGING_DIR).symlink_to(elsewhere)
    rc, _, err = run(capsys, "split", root)
    assert rc == 2 and "symbolic link" in one_line(err)
    assert [p.name for p in elsewhere.iterdir()] == ["precious.txt"]


def _in_thread(fn, timeout: float = 60):
    """fn() in a daemon thread; its result, or a test failure when it has not returned in time
    (a FIFO read would wait forever)."""
    import threading

    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("v", fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still waiting after {timeout} s"
    return box["v"]


def test_a_fifo_as_swap_marker_or_worker_record_is_refused_without_waiting(seed, tmp_path, capsys):
    root = copy_root(seed, tmp_path / "rc")
    staging = root / STAGING_DIR
    staging.mkdir()
    os.mkfifo(staging / MARKER)
    rc, _, err = _in_thread(lambda: run(capsys, "split", root))
    line = one_line(err)
    assert rc == 2 and str(staging / MARKER) in line and "FIFO" in line, line
    out = tmp_path / "out"
    (out / WORKERS_DIR / "all").mkdir(parents=True)
    os.mkfifo(out / WORKERS_DIR / "all" / "123.json")
    assert _in_thread(lambda: stop_old_workers(str(out), grace_s=0.2)) == []
