"""Crash safety of `polyp-ssl train` with its default checkpoint settings: `last.ckpt` at every epoch
end (and every --ckpt_every_n_steps), written atomically beside itself with the previous one kept
as `last.prev.ckpt`; --resume restores every random state (dropout on) and falls back to the
previous checkpoint when `last.ckpt` cannot be loaded; interrupts, a full disk and a read-only runs
folder end with one line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from polyp_ssl import ckpt_io
from polyp_ssl.callbacks import RngStateCallback, collect_rng_state, restore_rng_state
from polyp_ssl.ckpt_io import CRASH_ENV, LAST, PREVIOUS, atomic_write_bytes, crash_point_from_env
from polyp_ssl.datamodule import TEST_RAISE_ENV
from polyp_ssl.train_cli import main
from tests.shard_factory import make_root
from tests.train_helpers import TINY, losses

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 12  # 4 train videos, TINY settings


def _without_dropout_flag(flags: list[str]) -> list[str]:
    out = list(flags)
    if "--hmve_dropout" in out:
        i = out.index("--hmve_dropout")
        del out[i : i + 2]
    return out


# TINY with the default dropout (0.1) instead of TINY's 0.0
FLAGS = [*_without_dropout_flag(TINY), "--aug_anchorcrop", "--eval_aug_anchorcrop"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("root"), videos={"train": 4, "val": 2})


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Short epochs, for the tests that run whole epochs."""
    return make_root(tmp_path_factory.mktemp("small"), videos={"train": 2, "val": 2}, tracklets_per_polyp=1)


def command(root: Path, runs: Path, exp: str, *extra: str) -> list[str]:
    return ["--dataset_root", str(root), "--runs_dir", str(runs), "--exp_name", exp, *FLAGS, *extra]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    for name in (TEST_RAISE_ENV, CRASH_ENV):
        if name not in extra:
            out.pop(name, None)
    return out


def run(cmd: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=300)


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def loader_state(checkpoint: dict) -> dict:
    """The training loader's {epoch, batches_seen, seed} as Lightning stored it."""
    (state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state


@pytest.fixture
def mount(tmp_path):
    """mount(size, ro=False): a tmpfs of its own (another filesystem than the temp folder); skipped
    where mounting is not permitted."""
    mounted: list[Path] = []

    def _mount(size: str, read_only: bool = False) -> Path:
        mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        mnt.mkdir()
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        opts = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
        mounted.append(mnt)
        return mnt

    yield _mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def assert_one_line_error(err: str, *parts: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    for part in parts:
        assert part in last, (part, last)
    return last


# ------------------------------------------------------------------ unit: atomic writes, hooks, RNG


def test_atomic_write_keeps_the_previous_last_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "ck" / LAST
    atomic_write_bytes(target, b"one", keep_previous=True)
    assert target.read_bytes() == b"one" and not (tmp_path / "ck" / PREVIOUS).exists()
    atomic_write_bytes(target, b"two", keep_previous=True)
    assert target.read_bytes() == b"two" and (tmp_path / "ck" / PREVIOUS).read_bytes() == b"one"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [LAST, PREVIOUS]


def test_a_failed_write_keeps_the_old_file_names_the_path_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / LAST
    atomic_write_bytes(target, b"good", keep_previous=True)

    def full(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io, "_write_all", full)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 1000, keep_previous=True)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"good" and sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_the_crash_hook_is_inert_unless_set(tmp_path, monkeypatch):
    assert crash_point_from_env({}) is None and crash_point_from_env({CRASH_ENV: ""}) is None
    assert crash_point_from_env({CRASH_ENV: "ckpt_write"}) == ("ckpt_write", 1)
    assert crash_point_from_env({CRASH_ENV: "ckpt_write:3"}) == ("ckpt_write", 3)
    with pytest.raises(ValueError, match=CRASH_ENV):
        crash_point_from_env({CRASH_ENV: "ckpt_write:x"})
    monkeypatch.setenv(CRASH_ENV, "no_such_point")
    atomic_write_bytes(tmp_path / LAST, b"abc", keep_previous=True)  # still alive
    assert (tmp_path / LAST).read_bytes() == b"abc"


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = collect_rng_state()
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_round_trip(tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.manual_seed_all(7)
    torch.rand(1, device=device)
    state = collect_rng_state(device)
    assert "cuda" in state
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = torch.rand(8, device=device)
    torch.cuda.manual_seed_all(0)
    restore_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"], device)
    assert torch.equal(torch.rand(8, device=device), expected)


# ------------------------------------------------------------------ default flags: epoch-end last.ckpt


def test_default_flags_write_last_at_the_first_epoch_end_and_resume_equals_uninterrupted(
    small_root, tmp_path, monkeypatch, capsys
):
    """Default checkpoint flags, default dropout (0.1), validation on: a 2-epoch run stopped at the
    first step of epoch 1 has a last.ckpt of epoch 0's final step; --resume then logs the losses of
    an uninterrupted run for every step of epoch 1."""
    runs = tmp_path / "runs"
    flags = ["--deterministic", "--max_epochs", "2", "--limit_val_batches", "1"]
    assert main(command(small_root, runs, "straight", *flags)) == 0
    straight = losses(runs / "straight")
    per_epoch = len(straight) // 2
    assert per_epoch >= 2 and sorted(straight) == list(range(2 * per_epoch))

    monkeypatch.setenv(TEST_RAISE_ENV, f"0:{per_epoch}")
    assert main(command(small_root, runs, "cut", *flags)) == 1
    assert_one_line_error(capsys.readouterr().err, f"raises at step {per_epoch}")
    last = runs / "cut" / "checkpoints" / LAST
    kept = ckpt(last)
    assert kept["global_step"] == per_epoch and kept["epoch"] == 0
    assert loader_state(kept) == {"epoch": 0, "batches_seen": per_epoch, "seed": 42}
    assert "RngStateCallback" in kept["callbacks"]

    monkeypatch.delenv(TEST_RAISE_ENV)
    assert main(command(small_root, runs, "cut", *flags, "--resume")) == 0
    resumed = {s: v for s, v in losses(runs / "cut").items() if s >= per_epoch}
    assert sorted(resumed) == list(range(per_epoch, 2 * per_epoch))
    for s, value in resumed.items():
        assert value == pytest.approx(straight[s], rel=1e-5, abs=1e-6), s
    assert ckpt(last)["global_step"] == 2 * per_epoch
    assert ckpt(last.with_name(PREVIOUS))["global_step"] == per_epoch  # the good one before it


# ------------------------------------------------------------------ RNG restored: dropout on


@pytest.mark.slow
@pytest.mark.parametrize("dropout", ["0.1"])
def test_resume_mid_epoch_with_dropout_equals_uninterrupted(root, tmp_path, monkeypatch, dropout):
    """4 steps straight vs 2 steps + --resume to 4 (mid-epoch), dropout on: the same losses; without
    restoring the random states the resumed steps differ (so the comparison can fail)."""
    runs = tmp_path / "runs"
    flags = ["--deterministic", "--limit_val_batches", "0", "--hmve_dropout", dropout]
    assert main(command(root, runs, "straight", *flags, "--max_steps", "4")) == 0
    assert main(command(root, runs, "cut", *flags, "--max_steps", "2")) == 0
    assert main(command(root, runs, "cut", *flags, "--max_steps", "4", "--resume")) == 0
    a, b = losses(runs / "straight"), losses(runs / "cut")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step

    monkeypatch.setattr(RngStateCallback, "load_state_dict", lambda self, state: None)
    assert main(command(root, runs, "norng", *flags, "--max_steps", "2")) == 0
    assert main(command(root, runs, "norng", *flags, "--max_steps", "3", "--resume")) == 0
    assert losses(runs / "norng")[2] != pytest.approx(a[2], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ unloadable last.ckpt


def test_an_empty_last_ckpt_falls_back_to_the_previous_one(root, tmp_path, capsys):
    runs = tmp_path / "runs"
    flags = ["--limit_val_batches", "0", "--ckpt_every_n_steps", "2"]
    assert main(command(root, runs, "e", *flags, "--max_steps", "3")) == 0
    folder = runs / "e" / "checkpoints"
    assert ckpt(folder / LAST)["global_step"] == 3 and ckpt(folder / PREVIOUS)["global_step"] == 2
    (folder / LAST).write_bytes(b"")  # what a write cut short by a full disk on some filesystems leaves
    capsys.readouterr()
    assert main(command(root, runs, "e", *flags, "--max_steps", "4", "--resume")) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "previous checkpoint" in ln]
    assert str(folder / LAST) in line and "empty" in line and str(folder / PREVIOUS) in line
    assert sorted(s for s in losses(runs / "e") if s >= 2) == [2, 3]  # continued at step 2
    assert ckpt(folder / LAST)["global_step"] == 4
    assert (folder / (LAST + ".unloadable")).stat().st_size == 0  # set aside, not kept as "previous"


@pytest.mark.parametrize("kind", ["folder", "garbage", "truncated"])
def test_an_unloadable_last_ckpt_without_a_good_previous_is_refused_naming_it(root, tmp_path, capsys, kind):
    runs = tmp_path / "runs"
    folder = runs / "e" / "checkpoints"
    folder.mkdir(parents=True)
    last = folder / LAST
    if kind == "folder":
        last.mkdir()
        cause = "is a folder"
    elif kind == "garbage":
        last.write_bytes(b"not a checkpoint at all" * 10)
        cause = "is text, not a checkpoint"
    else:
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, last)
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        cause = "failed finding central directory); truncated or damaged?"
    if kind == "garbage":
        (folder / PREVIOUS).write_bytes(b"")
    before = sorted(p.name for p in folder.iterdir())
    assert main(command(root, runs, "e", "--max_steps", "1", "--resume")) == 2
    line = assert_one_line_error(capsys.readouterr().err, "--resume refused", str(last), cause)
    if kind == "garbage":
        assert str(folder / PREVIOUS) in line and "empty" in line
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, nothing moved


def test_a_lightning_file_without_training_state_is_refused(root, tmp_path, capsys):
    last = tmp_path / "runs" / "e" / "checkpoints" / LAST
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, last)
    assert main(command(root, tmp_path / "runs", "e", "--max_steps", "1", "--resume")) == 2
    assert_one_line_error(capsys.readouterr().err, str(last), "not a training checkpoint", "global_step")


# ------------------------------------------------------------------ interrupts


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_during_training_exits_130_with_one_line_and_a_good_checkpoint(
    root, tmp_path, capsys, signum
):
    runs = tmp_path / "runs"
    last = runs / "e" / "checkpoints" / LAST

    def send_when_checkpointed() -> None:
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    sender = threading.Thread(target=send_when_checkpointed, daemon=True)
    sender.start()
    flags = ["--limit_val_batches", "0", "--ckpt_every_n_steps", "1", "--max_steps", "200"]
    rc = main(command(root, runs, "e", *flags))
    sender.join(timeout=5)
    assert rc == 130
    assert_one_line_error(capsys.readouterr().err, "polyp-ssl train: interrupted; rerun with --resume")
    kept = ckpt(last)
    assert 1 <= kept["global_step"] < 200
    assert not list(last.parent.glob("*.tmp*"))
    assert signal.getsignal(signal.SIGINT) is not None  # handlers restored
    assert main(command(root, runs, "e", *flags[:-1], str(kept["global_step"] + 1), "--resume")) == 0
    assert ckpt(last)["global_step"] == kept["global_step"] + 1


# ------------------------------------------------------------------ I/O failures


def test_a_read_only_runs_folder_is_named_exit_1_and_nothing_left(root, mount, capsys):
    runs = mount("1m", read_only=True)
    assert main(command(root, runs, "e", "--max_steps", "1", "--limit_val_batches", "0")) == 1
    assert_one_line_error(capsys.readouterr().err, str(runs / "e"), "Read-only file system", "--runs_dir")


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_write_keeps_the_old_last_ckpt(root, tmp_path, mount, capsys):
    """A real ENOSPC from a small tmpfs: room for init.ckpt and two full checkpoints, not for the
    third write; the run ends with exit 1 naming last.ckpt, and last/prev are the two good ones."""
    probe = tmp_path / "probe"
    flags = ["--limit_val_batches", "0", "--ckpt_every_n_steps", "1"]
    assert main(command(root, probe, "p", *flags, "--max_steps", "1")) == 0
    sizes = {p.name: p.stat().st_size for p in (probe / "p" / "checkpoints").glob("*.ckpt")}
    room = sizes["init.ckpt"] + int(2.5 * sizes[LAST]) + (1 << 20)
    runs = mount(str(room))
    capsys.readouterr()
    assert main(command(root, runs, "e", *flags, "--max_steps", "6")) == 1
    folder = runs / "e" / "checkpoints"
    assert_one_line_error(capsys.readouterr().err, str(folder / LAST), "No space left on device", "--resume")
    assert ckpt(folder / LAST)["global_step"] == 2 and ckpt(folder / PREVIOUS)["global_step"] == 1
    assert not list(folder.glob("*.tmp*"))


# ------------------------------------------------------------------ refused runs leave nothing


def test_a_run_refused_before_training_leaves_no_run_folder(root, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(command(root, runs, "bad", "--strategy", "no_such_strategy", "--max_steps", "1")) != 0
    assert_one_line_error(capsys.readouterr().err, "no_such_strategy")
    assert not runs.exists()
    assert main(command(tmp_path / "not_ingested", runs, "bad", "--max_steps", "1")) == 2
    assert_one_line_error(capsys.readouterr().err, "not_ingested")
    assert not runs.exists()
    (runs / "kept").mkdir(parents=True)
    # --resume of a run without a checkpoint starts it (a requeue before the first checkpoint), so
    # the refusal here is a setting: the run folder it made for its lock is removed again
    resume = command(root, runs, "bad", "--strategy", "no_such_strategy", "--max_steps", "1", "--resume")
    assert main(resume) != 0
    assert sorted(p.name for p in runs.iterdir()) == ["kept"]


def test_debug_shows_the_traceback_after_the_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match="not_ingested"):
        main(command(tmp_path / "not_ingested", runs, "e", "--max_steps", "1", "--debug"))
    assert "not_ingested" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not runs.exists()


# ------------------------------------------------------------------ real processes (slow)


@pytest.mark.slow
def test_kill_9_during_the_checkpoint_write_on_another_filesystem_then_resume(root, tmp_path, mount):
    """The runs folder on a tmpfs (not the temp folder's filesystem); the process SIGKILLs itself
    with half of its second last.ckpt written. last.ckpt is the step-2 checkpoint, intact; --resume
    continues from it and logs the losses of an uninterrupted run."""
    flags = ["--deterministic", "--limit_val_batches", "0", "--ckpt_every_n_steps", "2", "--max_steps", "8"]
    assert main(command(root, tmp_path / "ref", "straight", *flags)) == 0
    straight = losses(tmp_path / "ref" / "straight")
    runs = mount("2g")
    cmd = [sys.executable, "-m", "polyp_ssl", "train", *command(root, runs, "cut", *flags)]
    proc = run(cmd, **{CRASH_ENV: "ckpt_write:2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    folder = runs / "cut" / "checkpoints"
    (tmp,) = folder.glob(f"{LAST}.tmp*")  # the half-written temporary, never under the final name
    assert 0 < tmp.stat().st_size < (folder / LAST).stat().st_size
    assert ckpt(folder / LAST)["global_step"] == 2

    proc = run([*cmd, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {s: v for s, v in losses(runs / "cut").items() if s >= 2}
    assert sorted(resumed) == list(range(2, 8))
    for s, value in resumed.items():
        assert value == pytest.approx(straight[s], rel=1e-5, abs=1e-6), s
    assert ckpt(folder / LAST)["global_step"] == 8 and ckpt(folder / PREVIOUS)["global_step"] in (6, 8)
    assert not list(folder.glob("*.tmp*"))


@pytest.mark.slow
def test_kill_9_after_the_first_epoch_with_default_flags_then_resume(small_root, tmp_path):
    """A real process with the default checkpoint flags, SIGKILLed right after its first epoch-end
    last.ckpt is in place; --resume finishes the second epoch."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "polyp_ssl", "train", *command(small_root, runs, "e", "--max_epochs", "2")]
    proc = run(cmd, **{CRASH_ENV: "ckpt_saved:1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = runs / "e" / "checkpoints" / LAST
    kept = ckpt(last)
    per_epoch = kept["global_step"]
    assert per_epoch >= 2 and loader_state(kept) == {"epoch": 0, "batches_seen": per_epoch, "seed": 42}
    proc = run([*cmd, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt(last)["global_step"] == 2 * per_epoch
    assert sorted(losses(runs / "e")) == list(range(2 * per_epoch))


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, workers, group",
    [(signal.SIGINT, "0", False), (signal.SIGTERM, "0", False), (signal.SIGINT, "2", True)],
    ids=["sigint", "sigterm", "ctrl-c-to-the-group-with-2-workers"],
)
def test_a_real_process_interrupted_exits_130_without_a_traceback(root, tmp_path, signum, workers, group):
    """A real `polyp-ssl train`; the last case is what Ctrl-C in a terminal does: SIGINT to the
    whole process group, DataLoader workers included."""
    runs = tmp_path / "runs"
    last = runs / "e" / "checkpoints" / LAST
    flags = ["--limit_val_batches", "0", "--ckpt_every_n_steps", "1", "--max_steps", "500"]
    train_args = command(root, runs, "e", *flags, "--num_workers", workers)
    cmd = [sys.executable, "-m", "polyp_ssl", "train", *train_args]
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert_one_line_error(err, "polyp-ssl train: interrupted; rerun with --resume")
    assert ckpt(last)["global_step"] >= 1
