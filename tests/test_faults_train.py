"""Fault injection for training, with real processes: SIGKILL mid-epoch then --resume, a DDP rank
that raises, and checkpoints that carry pickled payloads."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyp_ssl.checkpoint import CheckpointError, load_encoder
from polyp_ssl.datamodule import TEST_RAISE_ENV, raise_hook_from_env, read_failure_notes, write_failure_note
from polyp_ssl.train_cli import main
from tests.shard_factory import make_root
from tests.train_helpers import TINY, losses

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("root"), videos={"train": 4, "val": 2})


def command(root: Path, runs: Path, exp: str, *extra: str) -> list[str]:
    return [
        "--dataset_root",
        str(root),
        "--runs_dir",
        str(runs),
        "--exp_name",
        exp,
        "--limit_val_batches",
        "0",
        *TINY,
        *extra,
    ]


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO)}
    out.pop(TEST_RAISE_ENV, None)
    return out


class CreatesFile:
    """Unpickling this creates `target` (what a hostile checkpoint would do)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def hostile_checkpoint(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "x": CreatesFile(str(target))}, path)


def test_the_hostile_payload_does_create_its_file(tmp_path):
    target = tmp_path / "pwned"
    pickle.loads(pickle.dumps(CreatesFile(str(target)))).close()
    assert target.exists()


def test_a_pickled_checkpoint_is_refused_by_load_encoder(tmp_path):
    target = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    hostile_checkpoint(ckpt, target)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_encoder(ckpt)
    assert not target.exists()


def test_a_pickled_last_ckpt_is_refused_by_train_resume(root, tmp_path, capsys):
    target = tmp_path / "pwned"
    runs = tmp_path / "runs"
    hostile_checkpoint(runs / "e" / "checkpoints" / "last.ckpt", target)
    assert main(command(root, runs, "e", "--max_steps", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume refused" in err and "last.ckpt" in err and "weights_only=True" in err
    assert not target.exists()


def test_the_raise_hook_is_inert_unless_set_and_checked(tmp_path):
    assert raise_hook_from_env({}) is None and raise_hook_from_env({TEST_RAISE_ENV: ""}) is None
    assert raise_hook_from_env({TEST_RAISE_ENV: "1:3"}) == (1, 3)
    with pytest.raises(ValueError, match=TEST_RAISE_ENV):
        raise_hook_from_env({TEST_RAISE_ENV: "one"})
    start = time.time()
    write_failure_note(tmp_path, 1, RuntimeError("Caught in worker\nTraceback ...\nRuntimeError: boom"))
    assert read_failure_notes(tmp_path, start, except_rank=0) == {1: "RuntimeError: RuntimeError: boom"}
    assert read_failure_notes(tmp_path, start, except_rank=1) == {}
    assert read_failure_notes(tmp_path, start + 3600, except_rank=0) == {}  # old notes are ignored


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(root, tmp_path):
    """Kill -9 a training process once it has written a step checkpoint (mid-epoch: an epoch is 12
    steps), then --resume: it continues at the checkpoint's global step and the losses of the
    following steps equal those of a run never interrupted (CPU, deterministic, same seed)."""
    runs = tmp_path / "runs"
    flags = ["--deterministic", "--ckpt_every_n_steps", "2", "--max_steps", "8"]
    assert main(command(root, runs, "straight", *flags)) == 0
    straight = losses(runs / "straight")
    assert sorted(straight) == list(range(8))

    last = runs / "cut" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "polyp_ssl", "train", *command(root, runs, "cut", *flags)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert last.exists(), "no step checkpoint before the process ended"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL  # it really was killed, not finished
    kept = torch.load(last, map_location="cpu", weights_only=True)
    step = int(kept["global_step"])
    assert step in (2, 4, 6)

    rc = subprocess.run([*cmd, "--resume"], env=env(), capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-3000:]
    resumed = {s: v for s, v in losses(runs / "cut").items() if s >= step}
    assert sorted(resumed) == list(range(step, 8))
    for s, value in resumed.items():
        assert value == pytest.approx(straight[s], rel=1e-5, abs=1e-6), s
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 8


@pytest.mark.slow
@pytest.mark.ddp
def test_a_ddp_rank_that_raises_is_named_by_the_other_rank(root, tmp_path):
    """Rank 1 of a 2-process gloo run raises at step 1; rank 0 (the launching process) must end,
    within a bounded time, with an error naming rank 1's failure instead of hanging."""
    cmd = [
        sys.executable,
        "-m",
        "polyp_ssl",
        "train",
        *command(root, tmp_path / "runs", "ddp", "--max_steps", "6", "--strategy", "ddp"),
    ]
    cmd[cmd.index("--devices") + 1] = "2"
    proc = subprocess.run(
        cmd, env={**env(), TEST_RAISE_ENV: "1:1"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "rank 1 failed" in last and "raises at step 1" in last, proc.stderr[-3000:]
