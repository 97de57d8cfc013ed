"""Training callbacks that are not about data."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)

INIT_CKPT = "init.ckpt"


class InitialCheckpoint(L.Callback):
    """Saves the model as training starts (step 0), so that evaluation can compare a run with its
    own initialisation (the same weights, not merely the same architecture); kept on --resume."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and not self.path.exists():
            trainer.save_checkpoint(str(self.path), weights_only=True)


def collect_rng_state(cuda_device: torch.device | None = None) -> dict[str, Any]:
    """Every global random state of this process as plain tensors and numbers (so a checkpoint that
    holds it loads with ``torch.load(weights_only=True)``): torch CPU, the CUDA device in use,
    numpy's legacy global generator and python's `random`."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_has_gauss": int(np_state["has_gauss"]),
        "numpy_gauss": float(np_state["gauss"]),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": None if py_gauss is None else float(py_gauss),
    }
    if cuda_device is not None and cuda_device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(cuda_device)
    return state


def restore_rng_state(state: dict[str, Any], cuda_device: torch.device | None = None) -> None:
    """Set the global random states saved by `collect_rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": int(state["numpy_pos"])},
            "has_gauss": int(state["numpy_has_gauss"]),
            "gauss": float(state["numpy_gauss"]),
        }
    )
    gauss = state["python_gauss"]
    random.setstate(
        (int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()), gauss)
    )
    if "cuda" in state and cuda_device is not None and cuda_device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu(), cuda_device)


class RngStateCallback(L.Callback):
    """Puts the process's random states in every checkpoint and, on --resume, restores them just
    before the first resumed training step, so dropout (and anything else drawing from the global
    generators) continues as in an uninterrupted run.

    The state is taken when the checkpoint is written (at a step's or an epoch's end), and nothing
    between that point and the next step draws from these generators (the training loader draws
    its worker seeds from a generator of its own), so restoring before the next step is exact.

    DDP: Lightning writes rank 0's checkpoint, so the file holds rank 0's states; every rank
    restores them. Ranks are seeded alike (`seed_everything(seed)` on each) and draw alike (same
    model, same batch shapes), so their states are equal at every step and the restore is exact
    for each rank too; a rank whose draws differed would resume with rank 0's states."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self.device: torch.device | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.device = trainer.strategy.root_device

    def state_dict(self) -> dict[str, Any]:
        return {"format": 1, "rank": int(os.environ.get("RANK", "0") or 0), **collect_rng_state(self.device)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            restore_rng_state(state, self.device)
            log.info("random states restored from the checkpoint (step %d)", trainer.global_step)


class TrainingStarted(L.Callback):
    """Records whether the training loop started (a run that fails before it leaves nothing)."""

    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True


class FlushLogs(L.Callback):
    """Writes the loggers' buffered metrics whenever a checkpoint is written, so the metrics of every
    step a checkpoint holds are on disk with it: a segment cut short (SIGKILL, a node lost) keeps
    its metrics up to the checkpoint the next segment continues from."""

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            try:
                logger.save()
            except OSError as exc:  # a full disk shows at the checkpoint write itself
                log.warning("could not write the metrics of %s: %s", type(logger).__name__, exc)
