"""The NT-SSL LightningModule: tracklet encoder + projector + contrastive loss, validation by
tracklet retrieval mAP (or a label-free alignment score when no identity is known)."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polyp_ssl.config import SETTING_PART, TrainConfig
from polyp_ssl.config_parts import LR_SCHEDULE_ALIASES, LR_SCHEDULES
from polyp_ssl.diversity import batch_same_video_pair_rate
from polyp_ssl.encoders import POOLINGS, TrackletEncoder, build_encoder, masked_mean
from polyp_ssl.losses import (
    LOSS_TYPES,
    TERM_NAMES,
    HierarchicalContrastive,
)
from polyp_ssl.shards.retrieval import score_map

log = logging.getLogger(__name__)

# Defaults of the keys this module reads: the training flags' defaults, defined once in TrainConfig.
DEFAULTS: dict[str, Any] = TrainConfig().to_dict()


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss term, or weights that cannot be checkpointed. Raised
    alike on every rank at the same step (the check is collective), so no rank waits for another;
    `polyp-ssl train` ends with it as one line and exit 1, and no checkpoint is written."""

    def __init__(self, message: str, step: int, term: str) -> None:
        super().__init__(message)
        self.step = step
        self.term = term


def first_non_finite(tree: Any, prefix: str = "", depth: int = 0) -> str | None:
    """The name of the first floating tensor in `tree` (nested dicts, lists of tensors, such as a
    checkpoint's state_dict or optimizer states) holding a NaN or an infinity, or None."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and tree.numel() and not bool(torch.isfinite(tree).all()):
            return prefix or "tensor"
        return None
    if depth > 8:  # checkpoints nest a few levels; nothing deeper is a model's state
        return None
    items = (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    )
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key), depth + 1)
        if found is not None:
            return found
    return None


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as plain JSON types (str/int/float/bool/None/list/dict), so that checkpoints load
    with ``torch.load(weights_only=True)``; paths and other objects become strings."""
    return json.loads(json.dumps(config, default=str))


def lr_factor(step: int, warmup_steps: int, total_steps: float, schedule: str) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup over `warmup_steps`,
    then constant or cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return 1.0


class LrLambda:
    """Picklable-free, state-free callable for LambdaLR (its state dict stays plain)."""

    def __init__(self, warmup_steps: int, total_steps: float, schedule: str) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = float(total_steps)
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.schedule)


def retrieval_map(emb: torch.Tensor, identity: torch.Tensor) -> tuple[float, int, int]:
    """Mean average precision of cosine-similarity retrieval over tracklets.

    Each tracklet with a known identity (>= 0) queries all other known ones; positives = same
    identity. Returns ``(mAP, n_queries, n_excluded)``, queries without a positive being excluded;
    mAP is nan when no query remains.
    """
    known = identity >= 0
    e = F.normalize(emb[known].double(), dim=1).numpy()
    return score_map(e @ e.T, identity[known].numpy())


def temporal_alignment(emb: torch.Tensor, video: torch.Tensor, order: torch.Tensor) -> float:
    """Label-free: mean cosine similarity of each tracklet to the next one of its video (by `order`)."""
    e = F.normalize(emb.double(), dim=1)
    sims = []
    for v in torch.unique(video):
        idx = (video == v).nonzero().flatten()
        idx = idx[torch.argsort(order[idx], stable=True)]
        if idx.numel() > 1:
            sims.append((e[idx[:-1]] * e[idx[1:]]).sum(dim=1))
    return float(torch.cat(sims).mean()) if sims else float("nan")


def settings_of(config: dict[str, Any]) -> TrainConfig:
    """The typed parts of a flat model config (a checkpoint's hyper-parameters: keys that are no
    setting are kept in the record, not used)."""
    return TrainConfig.from_dict({k: v for k, v in config.items() if k in SETTING_PART})


class NTSSLModule(L.LightningModule):
    """Takes the typed parts of a TrainConfig (or a flat config: a checkpoint's hyper-parameters, a
    script's dict) and saves them as plain flat hyper-parameters, so every checkpoint loads with
    ``weights_only=True`` and older checkpoints (fewer keys) load with today's defaults."""

    def __init__(self, config: TrainConfig | dict[str, Any]) -> None:
        super().__init__()
        flat = config.to_dict() if isinstance(config, TrainConfig) else config
        cfg = plain_config({**DEFAULTS, **flat})
        self.config = cfg
        self.save_hyperparameters({"config": cfg})
        self.settings = settings_of(cfg)
        enc, loss, opt = self.settings.encoder, self.settings.loss, self.settings.optimizer
        if loss.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss.loss_type!r} (choose from {', '.join(LOSS_TYPES)})")
        if enc.encoder_pooling not in POOLINGS:
            raise ValueError(f"unknown encoder_pooling {enc.encoder_pooling!r} (choose from {POOLINGS})")
        schedules = (*LR_SCHEDULE_ALIASES, *LR_SCHEDULES)
        if opt.lr_schedule not in schedules:
            raise ValueError(f"unknown lr_schedule {opt.lr_schedule!r} (choose from {schedules})")
        self.encoder: TrackletEncoder = build_encoder(enc.encoder_config())
        d = self.encoder.out_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, int(enc.d_proj)))
        # every loss type at the same three levels, weighted by loss_milnce_weights (--loss_weights)
        self.loss_fn = HierarchicalContrastive(
            loss.loss_milnce_weights,
            loss.loss_temperature,
            loss.hmve_mask_intra_fragment_frames,
            loss.loss_type,
            loss.loss_ta_lambda,
        )
        self._last_step_start: float | None = None
        self._val_outputs: list[dict[str, torch.Tensor]] = []

    # -- training ------------------------------------------------------------------------------

    def fragment_vectors(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fragment vector and frame tokens of a training batch; the fragment vector is the embedding
        `encoder_pooling` names (CLS, or the mean of frame tokens; the mean when there is no CLS), so
        training shapes the vector that evaluation uses."""
        cls, tokens = self.encoder(frames)
        use_cls = cls is not None and self.settings.encoder.encoder_pooling == "cls"
        return (cls if use_cls else tokens.mean(dim=1)), tokens

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        frag, tokens = self.fragment_vectors(batch["frames"])
        z = self.projector(frag)
        frame_z = self.projector(tokens) if self.loss_fn.needs_frames else None
        return self.loss_fn(
            z, batch["bag"], frame_z, position=batch.get("position"), video=batch.get("video")
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_step_start is not None:
            dt = now - self._last_step_start
            b, s = batch["frames"].shape[:2]
            world = self.trainer.world_size if self._trainer is not None else 1
            # all ranks run equal batches, so the global rate is the local one times world size
            self.log("train/fragments_per_s", b * world / dt, on_step=True, on_epoch=False)
            self.log("train/frames_per_s", b * s * world / dt, on_step=True, on_epoch=False)
        self._last_step_start = now

    def on_train_epoch_start(self) -> None:
        self._last_step_start = None  # do not count validation or loader start-up as step time

    def _non_finite_terms(self, out: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
        """The loss terms computed (TERM_NAMES order, then the weighted sum `loss`) and, per rank,
        which of them are not finite: ``[world, terms]`` bool (gathered: every rank decides alike)."""
        names = [n for n in (*TERM_NAMES, "loss") if n in out]
        flags = torch.stack([~torch.isfinite(out[n].detach()).all() for n in names]).to(torch.uint8)
        if self._trainer is not None and self.trainer.world_size > 1:
            return names, self.all_gather(flags).reshape(-1, len(names)).bool()
        return names, flags.reshape(1, -1).bool()

    def check_finite_loss(self, out: dict[str, torch.Tensor], batch_idx: int) -> None:
        """NonFiniteLossError at the first step whose loss (any term, any rank) is NaN or infinite,
        before its backward pass: nothing non-finite reaches the weights nor a checkpoint. Costs
        one device synchronisation a step (and, with several ranks, a gather of a few bytes)."""
        names, bad = self._non_finite_terms(out)
        if not bool(bad.any()):
            return
        rank, _ = (int(v) for v in bad.nonzero()[0])
        terms = [n for n, b in zip(names, bad[rank].tolist(), strict=True) if b]
        here = self.trainer.global_rank if self._trainer is not None else 0
        values = ", ".join(f"{n} = {float(out[n].detach()):g}" if rank == here else n for n in terms)
        weights = first_non_finite(dict(self.named_parameters()))
        cause = (
            f"the weights were already non-finite ({weights}): the previous optimizer step diverged"
            if weights
            else "from this batch's forward pass"
        )
        step = self.global_step
        lr = (
            self.trainer.optimizers[0].param_groups[0]["lr"]
            if self._trainer and self.trainer.optimizers
            else None
        )
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (epoch {self.current_epoch}, batch {batch_idx}) on rank "
            f"{rank}: {values}; {cause}"
            + (f" (lr {lr:g}: try a lower --lr)" if lr is not None else "")
            + "; training stopped, no checkpoint of this step was written",
            step,
            terms[0],
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write weights or optimizer states holding a NaN or an infinity (every rank
        runs this hook and holds the same weights, so all stop alike): the previous checkpoint,
        last.ckpt included, stays as it was."""
        for part in ("state_dict", "optimizer_states"):
            bad = first_non_finite(checkpoint.get(part, {}))
            if bad is not None:
                raise NonFiniteLossError(
                    f"non-finite {part.replace('_', ' ')} at step {self.global_step}: {bad} holds NaN or "
                    "infinite values (the last optimizer step diverged: try a lower --lr); training "
                    "stopped, the checkpoint was not written and the previous one is kept",
                    self.global_step,
                    bad,
                )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        self.check_finite_loss(out, batch_idx)
        b = batch["frames"].shape[0]
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=b)
        for name in TERM_NAMES:
            if name in out:
                self.log(f"train/{name}", out[name], on_step=True, on_epoch=True, batch_size=b)
        self.log(
            "train/videos_per_batch",
            float(torch.unique(batch["video"]).numel()),
            on_step=True,
            on_epoch=True,
            batch_size=b,
        )
        # bag pairs from one video: likely false negatives (polyp_ssl.diversity); stays on the device
        pairs = batch_same_video_pair_rate(batch["bag"], batch["video"])
        self.log("train/same_video_pairs", pairs, on_step=True, on_epoch=True, batch_size=b)
        if self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, on_epoch=False)
        return out["loss"]

    def configure_optimizers(self) -> Any:
        cfg = self.settings.optimizer
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
        schedule = "constant" if cfg.lr_schedule == "none" else cfg.lr_schedule
        warmup = int(cfg.warmup_steps or 0)
        if schedule == "constant" and warmup <= 0:
            return opt
        total = float(self.trainer.estimated_stepping_batches) if schedule == "cosine" else 0.0
        if schedule == "cosine" and not math.isfinite(total):
            raise ValueError(
                "lr_schedule=cosine needs a known number of training steps: set max_steps or use a "
                "training loader with a length"
            )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, LrLambda(warmup, total, schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_fit_start(self) -> None:
        if self.settings.trainer.compile:
            self.encoder.backbone.compile()  # in place: state dict keys stay unprefixed

    # -- validation ----------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if "valid" in batch:  # rows a loader added only to even out ranks
            keep = batch["valid"].to(torch.bool)
            batch = {
                k: v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape else v
                for k, v in batch.items()
            }
            if not keep.any():
                return
        emb = self.encoder.embed(
            batch["frames"], batch.get("mask"), pooling=self.settings.encoder.encoder_pooling
        )
        n = emb.shape[0]
        out = {
            "emb": emb.detach().float().cpu(),
            "identity": batch["identity"].detach().long().cpu(),
            "video": batch["video"].detach().long().cpu(),
        }
        key = next((k for k in ("index", "tracklet") if k in batch), None)
        out["key"] = batch[key].detach().long().cpu() if key else torch.full((n,), -1, dtype=torch.long)
        if "position" in batch:
            out["order"] = batch["position"].detach().double().cpu()
        else:  # batch order: a video's tracklets come in time order
            out["order"] = torch.arange(n, dtype=torch.double) + float(batch_idx) * 1e6
        self._val_outputs.append(out)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate `t` ([n, ...], n may differ per rank) over ranks, in rank order."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return t
        n = torch.tensor([t.shape[0]], device=self.device)
        sizes = self.all_gather(n).reshape(-1).tolist()
        if max(sizes) == 0:
            return t
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        gathered = self.all_gather(padded.to(self.device)).cpu()
        return torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))])

    def on_validation_epoch_end(self) -> None:
        outs = self._val_outputs
        self._val_outputs = []
        if outs:
            merged = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        else:  # this rank saw no batch; it must still join the gathers below
            merged = {
                "emb": torch.zeros(0, self.encoder.out_dim),
                "identity": torch.zeros(0, dtype=torch.long),
                "video": torch.zeros(0, dtype=torch.long),
                "key": torch.zeros(0, dtype=torch.long),
                "order": torch.zeros(0, dtype=torch.double),
            }
        merged = {k: self._gather(v) for k, v in merged.items()}
        if merged["emb"].shape[0] == 0:
            return
        keys = merged["key"]
        if (keys >= 0).all():  # drop duplicates a distributed sampler adds to even out ranks
            _, first = np.unique(keys.numpy(), return_index=True)
            first = torch.as_tensor(np.sort(first))
            merged = {k: v[first] for k, v in merged.items()}
        emb, identity = merged["emb"], merged["identity"]
        align = temporal_alignment(emb, merged["video"], merged["order"])
        if math.isfinite(align):
            self.log("val/alignment", align, sync_dist=True)
        mean_ap, n_queries, excluded = retrieval_map(emb, identity)
        self.log("val/n_tracklets", float(emb.shape[0]), sync_dist=True)
        if n_queries:
            self.log("val/map", mean_ap, sync_dist=True)
        log.info(
            "validation: %d tracklets, mAP %.4f over %d queries (%d without positive excluded), "
            "alignment %.4f",
            emb.shape[0],
            mean_ap,
            n_queries,
            excluded,
            align,
        )

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.encoder.embed(
            batch["frames"], batch.get("mask"), pooling=self.settings.encoder.encoder_pooling
        )


__all__ = [
    "DEFAULTS",
    "NTSSLModule",
    "NonFiniteLossError",
    "first_non_finite",
    "lr_factor",
    "masked_mean",
    "retrieval_map",
    "temporal_alignment",
]
