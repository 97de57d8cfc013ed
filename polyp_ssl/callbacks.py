"""Training callbacks that are not about data."""

from __future__ import annotations

from pathlib import Path

import lightning as L

INIT_CKPT = "init.ckpt"


class InitialCheckpoint(L.Callback):
    """Saves the model as training starts (step 0), so that evaluation can compare a run with its
    own initialisation (the same weights, not merely the same architecture); kept on --resume."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and not self.path.exists():
            trainer.save_checkpoint(str(self.path), weights_only=True)
