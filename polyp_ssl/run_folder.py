"""The run folder of `polyp-ssl train`, `{runs_dir}/{exp_name}`, and its lifecycle.

    run = RunFolder(cfg.runs_dir, cfg.exp_name)       # path checks (inside runs_dir)
    saved = run.saved_settings()                      # its config.yaml, read strictly (or None)
    run.check_resume_settings(saved_cfg, cfg)         # --resume: only run-length settings may change
    with run.segment(cfg.resume, rank_zero, started) as plan:  # the lifecycle of one invocation:
        # lock (one writer, refused naming pid and host); what --resume continues (last.ckpt,
        # last.prev.ckpt or a fresh start); unfinished checkpoint writes removed
        run.write_config(cfg, monitor)
        ...                                           # training
    # failed before training started: the folders it created are removed; succeeded: the
    # failure notes of earlier segments are removed

Everything that can refuse a run (a bad name, a busy folder, settings that differ from the run's,
a checkpoint that cannot be loaded) does so before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from polyp_ssl.config import SETTING_PART, TrainConfig, apply_reference_settings, check_config_file

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
CHECKPOINTS = "checkpoints"
# settings that may differ on --resume: how long the run goes on, and how often it checkpoints,
# logs and validates. Nothing else may: every other setting changes the model, the data, the
# batches, the loss or the optimisation the checkpoint was trained with.
RESUME_MAY_CHANGE = (
    "max_epochs",
    "max_steps",
    "ckpt_every_n_steps",
    "log_every_n_steps",
    "val_every_n_epochs",
)
# not settings of the run but of this command: where the run folder is found, the resume request
# itself, and per-invocation switches (debug log, memory check)
NOT_COMPARED = ("runs_dir", "exp_name", "resume", "data_log", "skip_memory_check")
# how this invocation reaches the data (object-store options, the node's block cache), not what it reads
NOT_COMPARED += ("storage_options", "cache_dir", "cache_size")
# keys of config.yaml that are the invocation's that wrote it, not the run's: not read back on --resume
NOT_SAVED = ("resume",)


class RunFolderBusy(ValueError):
    """Another live `polyp-ssl train` writes into the same run folder (exit 2, nothing touched)."""


def check_run_folder(runs_dir: str | Path, exp_name: object, source: str = "--exp_name") -> Path:
    """The run folder `{runs_dir}/{exp_name}`, always inside `runs_dir`: `exp_name` must be one
    plain folder name (shards.ids: no '/', not '..', no control characters), and an existing run
    folder that is a link must not lead outside `runs_dir`. ValueError naming the setting and
    where it came from (`source`: the flag or the config file) otherwise; checked before
    anything is written."""
    from polyp_ssl.shards.ids import UnsafeIdError, path_component

    try:
        path_component(exp_name, source)
    except UnsafeIdError as exc:
        raise ValueError(f"{exc} (the run folder is {{runs_dir}}/{{exp_name}}, inside --runs_dir)") from None
    run_dir = Path(runs_dir) / str(exp_name)
    if run_dir.is_symlink():
        real, base = Path(os.path.realpath(run_dir)), Path(os.path.realpath(runs_dir))
        if not real.is_relative_to(base) or real == base:
            raise ValueError(
                f"{source} {exp_name!r}: the run folder {run_dir} is a link to {real}, outside --runs_dir "
                f"{runs_dir}; remove the link or choose another --exp_name"
            )
    return run_dir


def settings_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """`name: old -> new` for every setting that differs and may not change on --resume."""
    out = []
    old_values, new_values = saved.to_dict(), new.to_dict()
    for name in SETTING_PART:
        if name in RESUME_MAY_CHANGE or name in NOT_COMPARED:
            continue
        old, value = old_values[name], new_values[name]
        if name == "dataset_root" and _same_folder(old, value):
            continue
        if old != value:
            out.append(f"{name}: {_text(old)} -> {_text(value)}")
    return out


def _same_folder(a: str, b: str) -> bool:
    """Two spellings of one folder (relative and absolute, a link): the same data."""
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _text(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class ResumePlan:
    """What this invocation continues: `checkpoint` (None: a fresh start) and the line to print."""

    checkpoint: Path | None
    line: str | None = None


class RunFolder:
    """One run folder: its path (checked inside runs_dir), its lock, its config.yaml and the
    decision of what `--resume` continues."""

    def __init__(self, runs_dir: str | Path, exp_name: object, source: str = "--exp_name") -> None:
        self.path = check_run_folder(runs_dir, exp_name, source)
        self.ckpt_dir = self.path / CHECKPOINTS
        self.config_path = self.path / CONFIG_NAME
        self.created: list[Path] = []  # folders this invocation made (removed if it fails early)

    # ------------------------------------------------------------------ settings

    def saved_settings(self) -> dict[str, Any] | None:
        """The settings of the run's config.yaml, checked as a --config file is (strict YAML,
        known keys, types), the reference flags it holds applied; None when the run has none yet."""
        from polyp_ssl.shards.textio import TextInputError, load_yaml

        if not self.config_path.exists():
            return None
        try:
            loaded = load_yaml(self.config_path, "run config") or {}
        except TextInputError as exc:
            raise ValueError(f"--resume: {exc}") from None
        except OSError as exc:
            raise ValueError(f"--resume: {self.config_path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"--resume: {self.config_path}: expected a mapping of settings")
        settings = check_config_file(loaded, str(self.config_path))  # the one check of a settings file
        for key in NOT_SAVED:
            settings.pop(key, None)
        return apply_reference_settings(settings, keep_own=True)

    def check_resume_settings(self, saved: TrainConfig, new: TrainConfig) -> None:
        """ValueError naming each setting `old -> new` that differs from the run's config.yaml
        and may not change on --resume (RESUME_MAY_CHANGE may)."""
        diffs = settings_differences(saved, new)
        if diffs:
            raise ValueError(
                f"--resume refused: {'; '.join(diffs)} (differs from {self.config_path}; on --resume only "
                f"{', '.join(RESUME_MAY_CHANGE)} may change: drop the other flags to continue with the "
                "run's settings, or start a new run with another --exp_name)"
            )

    def write_config(self, cfg: TrainConfig, monitor: str | None) -> None:
        """config.yaml: the resolved settings (and the monitor they resolved to), written atomically."""
        write_yaml(self.config_path, {**cfg.to_dict(), "resolved_monitor": monitor})

    # ------------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder's lock (`RUN/.polyp-ssl.lock`, the flock of polyp_ssl.shards.lock)
        for the block, creating the folder first. A live holder: RunFolderBusy naming its pid and
        host, nothing created or changed. A lock file left by a holder that died (its flock is gone
        with it) is taken over with a line naming that holder."""
        from polyp_ssl.shards.lock import LockHeld, lock_path, output_lock, read_holder

        path = lock_path(self.path)
        self.created = new_dirs(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        left = read_holder(path)
        try:
            with output_lock(self.path, "polyp-ssl train"):
                if left is not None and left.get("pid") != os.getpid():
                    print(f"polyp-ssl train: {stale_line(path, left)}", file=sys.stderr)
                yield
        except LockHeld:
            # the folder is another run's now (it made it too, or before us): nothing of ours to undo
            self.created = []
            raise RunFolderBusy(busy_line(self.path, path, read_holder(path))) from None

    def remove_new_dirs(self) -> None:
        """Undo a run that failed before training started: remove the run folder it created (and its
        parents, only when they are still empty), so a refused run leaves nothing behind."""
        remove_new_dirs(self.created)
        self.created = []

    # ------------------------------------------------------------------ resume

    def resume_plan(self, resume: bool, rank_zero: bool = True) -> ResumePlan:
        """What this run continues. Without --resume an existing last.ckpt is refused (it would be
        overwritten). With --resume: last.ckpt, or last.prev.ckpt when last.ckpt cannot be loaded,
        or a fresh start (with a line) when the run has no checkpoint yet: a requeued job that
        was stopped before its first checkpoint. Only rank 0 (`rank_zero`) moves a file."""
        from polyp_ssl.ckpt_io import LAST, previous_path

        last = self.ckpt_dir / LAST
        if not resume:
            if last.exists() and rank_zero:
                raise ValueError(f"{last} exists: continue it with --resume, or choose another --exp_name")
            return ResumePlan(None)
        if not last.exists() and not previous_path(last).exists():
            return ResumePlan(
                None,
                f"--resume: {self.ckpt_dir} holds no checkpoint yet: starting the run from the beginning",
            )
        checkpoint, warning = resume_checkpoint(self.ckpt_dir)
        if rank_zero and checkpoint != last and last.exists():
            # set the unloadable file aside (kept for inspection), so that the next save does not
            # keep it as the previous checkpoint in place of the good one
            last.replace(last.with_name(LAST + ".unloadable"))
        return ResumePlan(checkpoint, warning)

    @contextlib.contextmanager
    def segment(self, resume: bool, rank_zero: bool, started: Callable[[], bool]) -> Iterator[ResumePlan]:
        """One invocation's training in the run folder, from the lock to the notes it leaves.

        Rank 0 holds the lock throughout (the other ranks of a DDP run train under it). Yields what
        `--resume` continues (its line printed first). Rank 0 removes checkpoint writes that never
        finished; a failure before `started()` (the first training step) removes the folders this
        invocation created, so a refused run leaves nothing behind; after a successful segment
        (every rank finished: a failed rank breaks rank 0's fit) the failure notes are stale and go."""
        with self.lock() if rank_zero else contextlib.nullcontext():
            plan = self.resume_plan(resume, rank_zero=rank_zero)
            if plan.line:
                print(f"polyp-ssl train: {plan.line}", file=sys.stderr)
            try:
                if rank_zero:
                    self.remove_temporaries()
                yield plan
            except BaseException:
                if not started() and rank_zero:
                    self.remove_new_dirs()
                raise
            if rank_zero:
                self.remove_failure_notes()

    def remove_temporaries(self) -> None:
        """Remove the checkpoint writes that never finished (polyp_ssl.ckpt_io temporaries)."""
        from polyp_ssl.ckpt_io import temporaries

        for tmp in temporaries(self.ckpt_dir):
            log.info("removing %s (a checkpoint write that never finished)", tmp)
            tmp.unlink()

    def remove_failure_notes(self) -> None:
        """After a successful segment: the failure notes a failed segment left (failed.rankR.txt)
        describe nothing any more."""
        for note in self.path.glob("failed.rank*.txt"):
            with contextlib.suppress(OSError):
                note.unlink()


def skip_summary_path(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"data_skips.rank{rank}.json"


def write_skip_summary(ckpt_dir: Path, rank: int, mode: str, counts: dict[str, int]) -> Path:
    """checkpoints/data_skips.rankR.json: what this rank's loader skipped (--on_shard_error warn).
    Counts are skip events: a damaged sample is counted each time a stream reads it (every epoch)."""
    import json

    path = skip_summary_path(ckpt_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    data = {"on_shard_error": mode, "skipped": counts, "total": sum(counts.values())}
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    if counts:
        log.warning("rank %d: the loader skipped damaged data: %s (see %s)", rank, counts, path)
    return path


def busy_line(run_dir: Path, lock_file: str, holder: dict | None) -> str:
    who = "another process" if holder is None else f"pid {holder['pid']} on host {_host(holder)}"
    return (
        f"{run_dir} is in use by {who} (polyp-ssl train): one train per run folder; wait for it to end, "
        f"or choose another --exp_name (lock {lock_file})"
    )


def _host(holder: dict) -> str:
    """The holder's host as written in its note (untrusted: one printable line, bounded)."""
    text = str(holder.get("host", "?"))[:100]
    return "".join(c if c.isprintable() else "?" for c in text)


def stale_line(lock_file: str, holder: dict) -> str:
    host = _host(holder)
    here = "" if host == socket.gethostname() else " (another host: its lock was released)"
    return (
        f"taking over the stale lock {lock_file} of pid {holder['pid']} on host {host}, which no longer "
        f"runs{here}"
    )


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def new_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    out = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        out.append(p)
    return out


def remove_new_dirs(created: list[Path]) -> None:
    import shutil

    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            break


def resume_checkpoint(ckpt_dir: Path) -> tuple[Path, str | None]:
    """The checkpoint `--resume` continues: ``last.ckpt``, or ``last.prev.ckpt`` when ``last.ckpt``
    is missing or cannot be loaded (empty, truncated, a folder, not a checkpoint). Returns the path
    and, for a fallback, the one-line warning naming both files. Raises ValueError (exit 2) naming
    the file and the cause when neither can be loaded."""
    from polyp_ssl.checkpoint import CheckpointError, check_loadable
    from polyp_ssl.ckpt_io import LAST, previous_path

    last = ckpt_dir / LAST
    prev = previous_path(last)
    if not last.exists() and not prev.exists():
        raise ValueError(f"--resume: {last} does not exist")
    cause = f"{last}: does not exist"
    if last.exists():
        try:
            check_loadable(last, training_state=True)
            return last, None
        except CheckpointError as exc:
            cause = str(exc)
    if not prev.exists():
        raise ValueError(f"--resume refused: {cause}")
    try:
        check_loadable(prev, training_state=True)
    except CheckpointError as exc:
        raise ValueError(f"--resume refused: {cause}; the previous checkpoint too: {exc}") from exc
    return prev, f"--resume: {cause}; continuing from the previous checkpoint {prev}"


def check_checkpoint_fits(path: Path, model: Any) -> None:
    """ValueError (one line) when the weights of the checkpoint `path` do not fit `model`: the
    first key missing from either side, or of another shape, and how many keys differ; never
    torch's multi-line `size mismatch` traceback from deep inside Lightning."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError):
        obj = torch.load(path, map_location="cpu", weights_only=True)  # not a zip file: no mmap
    saved = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume refused: {path}: no state_dict")
    wanted = model.state_dict()
    problems: list[str] = []
    for key in sorted(set(saved) | set(wanted)):
        if key not in saved:
            problems.append(f"{key!r} is missing from the checkpoint")
        elif key not in wanted:
            problems.append(f"{key!r} is not in the model")
        elif tuple(getattr(saved[key], "shape", ())) != tuple(wanted[key].shape):
            problems.append(
                f"{key!r} has shape {list(saved[key].shape)} in the checkpoint, {list(wanted[key].shape)} "
                "in the model"
            )
    if problems:
        raise ValueError(
            f"--resume refused: {path} does not fit the model of these settings: {problems[0]} "
            f"({len(problems)} key(s) differ; was it written by another run?)"
        )
