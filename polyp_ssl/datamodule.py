"""The Lightning data module: the streaming bag loader for training, whole tracklets for validation."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from polyp_ssl.config import TrainConfig
from polyp_ssl.device_decode import decode_batch_on, is_encoded
from polyp_ssl.stream import (
    BagStream,
    DataConfigError,
    StreamIndex,
    StreamLoader,
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
        self.params = cfg.stream
        # a root or --shard_base in an object store: read with these options (--storage_options, cache)
        reading = cfg.data.read_options()
        self.train_index: StreamIndex = build_index(
            cfg.dataset_root, cfg.split, self.params, cfg.shard_base, read_options=reading
        )
        self.val_index: StreamIndex | None = None
        try:
            self.val_index = build_index(
                cfg.dataset_root,
                cfg.val_split,
                self.params,
                cfg.shard_base,
                min_tracklet_length=0,
                require_bags=False,
                read_options=reading,
            )
        except DataConfigError as exc:
            log.warning("no validation: %s", exc)
        self.train_loader: StreamLoader | None = None
        self.rank, self.world_size = 0, 1
        self._resume_state: tuple[int, int] | None = None

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
            ds = BagStream(
                self.train_index,
                self.params,
                self.rank,
                self.world_size,
                self.cfg.num_workers,
                max_steps=self.cfg.max_steps,
            )
            self.train_loader = StreamLoader(ds, pin_memory=self._pin_memory())
            # the loader draws its worker seeds from a generator of its own, not from torch's global
            # one, so that the global state saved in a checkpoint is the one the next step uses
            self.train_loader.generator = torch.Generator()
            self.set_epoch(0)
            log.info(
                "rank %d/%d: %d training videos, %d fragments, %d batches per epoch per rank (%d per stream)",
                self.rank,
                self.world_size,
                len(self.train_index.video_ids),
                self.train_index.total_fragments,
                ds.length,
                ds.per_worker,
            )
            if self.params.sampler == "temporaltemperaturebag":
                sch = ds.schedule
                log.info(
                    "bag temperature %.3g -> %.3g over %d epochs (--sampler_ttb_schedule %s)",
                    sch.t_min,
                    sch.t_max,
                    sch.span,
                    self.params.sampler_ttb_schedule,
                )

    def _pin_memory(self) -> bool:
        """Pinned batches only for a CUDA device (pinning without one is refused with a warning by torch)."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return self.cfg.accelerator not in ("cpu",) and torch.cuda.is_available()

    def train_dataloader(self) -> StreamLoader:
        if self.train_loader is None:
            self.setup("fit")
        assert self.train_loader is not None
        if self.trainer is not None:
            self.train_loader.decode_device = self.trainer.strategy.root_device
        if self._resume_state is not None:
            epoch, seen = self._resume_state
            self._resume_state = None
            # Lightning makes the first iterator of a resumed run here, before on_train_epoch_start,
            # and does not restore the loader state of a checkpoint written at an epoch end: the
            # epoch the run continues with is set now (a partial epoch: Lightning then restores
            # {epoch, batches_seen} itself and the stream skips the consumed batches)
            self.set_epoch(epoch + 1 if seen >= self.train_loader.dataset.length else epoch)
        return self.train_loader

    def resume_from(self, loader_state: dict[str, Any]) -> None:
        """Continue after a checkpoint whose training loader state is `loader_state`
        ({epoch, batches_seen, seed})."""
        self._resume_state = (int(loader_state["epoch"]), int(loader_state["batches_seen"]))

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

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """--decode_on device: the training loader decodes ahead in a thread (DevicePrefetcher); a
        batch still encoded here (a loader without a device) is decoded now, before the transfer
        (the JPEG bytes must be on the CPU for torchvision's decoder, whatever the device)."""
        if is_encoded(batch):
            device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            return decode_batch_on(batch, device, self.params.im_size)
        return batch

    def set_epoch(self, epoch: int) -> None:
        if self.train_loader is not None:
            self.train_loader.set_epoch(epoch)
            if self.train_loader.generator is not None:
                self.train_loader.generator.manual_seed(loader_seed(self.cfg.seed, epoch))

    def skip_counts(self) -> dict[str, int]:
        """Samples (or shard remainders) this rank's streams skipped, by reason (--on_shard_error warn)."""
        if self.train_loader is None:
            return {}
        return self.train_loader.dataset.shared.skip_counts()


def loader_seed(seed: int, epoch: int) -> int:
    """Seed of the training loader's own generator for an epoch (it draws the workers' base seed)."""
    return (int(seed) * 1_000_003 + int(epoch)) % (1 << 63)


# Failure injection for the tests (tests/test_faults_train.py, tests/test_train_crash.py): a rank that
# raises at a given step. An environment variable is the one channel into the ranks of a multi-device
# run (Lightning starts them as new processes running the same command line); it is read once, when
# the train command builds its callbacks (`failure_hooks_from_env`), and nothing is installed unless set.
TEST_RAISE_ENV = "POLYP_SSL_TEST_RAISE_AT_STEP"


def raise_hook_from_env(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, step) of the failure-injection hook `POLYP_SSL_TEST_RAISE_AT_STEP=rank:step`; None
    (inert) when the variable is unset or empty."""
    value = (os.environ if env is None else env).get(TEST_RAISE_ENV, "")
    if not value:
        return None
    rank, _, step = value.partition(":")
    try:
        return int(rank), int(step)
    except ValueError as exc:
        raise ValueError(f"{TEST_RAISE_ENV}={value!r}: expected RANK:STEP") from exc


class RaiseAtStep(L.Callback):
    """The test hook: rank `rank` raises RuntimeError when its training step `step` starts."""

    def __init__(self, rank: int, step: int) -> None:
        self.at = (rank, step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.at == (trainer.global_rank, trainer.global_step):
            raise RuntimeError(
                f"{TEST_RAISE_ENV}: rank {trainer.global_rank} raises at step {trainer.global_step} "
                "(test hook)"
            )


def failure_hooks_from_env() -> list[L.Callback]:
    """The failure-injection callbacks the environment asks for (TEST_RAISE_ENV); none when unset."""
    at = raise_hook_from_env()
    return [RaiseAtStep(*at)] if at is not None else []


def failure_note_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"failed.rank{rank}.txt"


def write_failure_note(run_dir: Path, rank: int, exc: BaseException) -> None:
    """One line naming a rank's failure, so the other ranks (which see only a broken collective)
    can name it in their own error."""
    text = str(exc).strip().splitlines()
    path = failure_note_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{type(exc).__name__}: {text[-1] if text else ''}\n")
    tmp.replace(path)


def read_failure_notes(run_dir: Path, since: float, except_rank: int) -> dict[int, str]:
    """Failure notes of the other ranks written after `since` (a time.time())."""
    notes = {}
    for path in sorted(Path(run_dir).glob("failed.rank*.txt")):
        try:
            rank = int(path.stem.removeprefix("failed.rank"))
            if rank != except_rank and path.stat().st_mtime >= since - 1:
                notes[rank] = path.read_text().strip()
        except (ValueError, OSError):
            continue
    return notes


class StreamEpochCallback(L.Callback):
    """Sets the shared epoch of the streaming loader (bag temperature, video partition) at each
    epoch start and logs the streams' skip counts (visible here when num_workers is 0)."""

    def __init__(self, datamodule: StreamDataModule, run_dir: Path | None = None) -> None:
        self.datamodule = datamodule
        self.run_dir = run_dir

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.run_dir is not None:
            try:
                write_failure_note(self.run_dir, trainer.global_rank, exception)
            except OSError as exc:
                log.warning("could not write the failure note: %s", exc)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.datamodule.set_epoch(trainer.current_epoch)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        try:
            state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
            self.datamodule.resume_from(state)
        except (KeyError, IndexError, TypeError, ValueError):
            log.warning("the checkpoint holds no training loader state: the data order restarts")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = self.datamodule.train_loader
        if loader is not None and loader.dataset.stats:
            log.info(
                "epoch %d stream counts (main-process streams): %s",
                trainer.current_epoch,
                dict(loader.dataset.stats),
            )
