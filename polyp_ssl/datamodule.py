"""The Lightning data module: the streaming bag loader for training, whole tracklets for validation."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from polyp_ssl.config import TrainConfig
from polyp_ssl.stream import (
    BagStream,
    DataConfigError,
    StreamIndex,
    StreamLoader,
    StreamParams,
    ValTracklets,
    build_index,
)

log = logging.getLogger(__name__)


class StreamDataModule(L.LightningDataModule):
    """Reads the catalog once, in the main process, at construction (so a configuration that cannot
    work fails before any model is built); loaders are made in `setup` with the trainer's rank and
    world size passed in explicitly."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.params = StreamParams.from_config(cfg)
        self.train_index: StreamIndex = build_index(cfg.dataset_root, cfg.split, self.params, cfg.shard_base)
        self.val_index: StreamIndex | None = None
        try:
            self.val_index = build_index(
                cfg.dataset_root,
                cfg.val_split,
                self.params,
                cfg.shard_base,
                min_tracklet_length=0,
                require_bags=False,
            )
        except DataConfigError as exc:
            log.warning("no validation: %s", exc)
        self.train_loader: StreamLoader | None = None
        self.rank, self.world_size = 0, 1

    @property
    def has_val_identities(self) -> bool:
        """True when some val identity has two or more tracklets (retrieval mAP is defined)."""
        if self.val_index is None:
            return False
        ids = [i for _, _, i in self.val_index.samples.values() if i >= 0]
        return len(ids) > len(set(ids))

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if stage in (None, "fit") and self.train_loader is None:
            ds = BagStream(self.train_index, self.params, self.rank, self.world_size, self.cfg.num_workers)
            self.train_loader = StreamLoader(ds, pin_memory=self.cfg.accelerator not in ("cpu",))
            log.info(
                "rank %d/%d: %d training videos, %d fragments, %d batches per epoch per rank (%d per stream)",
                self.rank,
                self.world_size,
                len(self.train_index.video_ids),
                self.train_index.total_fragments,
                ds.length,
                ds.per_worker,
            )

    def train_dataloader(self) -> StreamLoader:
        if self.train_loader is None:
            self.setup("fit")
        assert self.train_loader is not None
        return self.train_loader

    def val_dataloader(self) -> Any:
        if self.val_index is None:
            return []
        ds = ValTracklets(
            self.val_index,
            self.params,
            self.cfg.eval_batch_size,
            self.cfg.val_max_frames,
            self.rank,
            self.world_size,
            self.cfg.eval_aug_anchorcrop,
        )
        return DataLoader(ds, batch_size=None, num_workers=0)

    def set_epoch(self, epoch: int) -> None:
        if self.train_loader is not None:
            self.train_loader.set_epoch(epoch)


class StreamEpochCallback(L.Callback):
    """Sets the shared epoch of the streaming loader (bag temperature, video partition) at each
    epoch start and logs the streams' skip counts (visible here when num_workers is 0)."""

    def __init__(self, datamodule: StreamDataModule) -> None:
        self.datamodule = datamodule

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.datamodule.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = self.datamodule.train_loader
        if loader is not None and loader.dataset.stats:
            log.info(
                "epoch %d stream counts (main-process streams): %s",
                trainer.current_epoch,
                dict(loader.dataset.stats),
            )
