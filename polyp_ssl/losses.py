"""Contrastive losses: noise-aware MIL-NCE (plain and hierarchical), multi-positive SupCon and the
temporally-aware SupCon.

Every loss L2-normalises its inputs and computes the similarity logits in (at least) float32 with
autocast disabled, so bf16 training never forms low-precision logits; sums of exponentials are
always log-sum-exp over -inf-masked logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from polyp_ssl.config_parts import LOSS_TYPES  # the loss part of the training config owns the list

TERM_NAMES = ("loss_frag", "loss_cross_frame", "loss_intra_frame")


def _logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine-similarity logits ``[N, N]`` / temperature, in float32 or float64."""
    if temperature <= 0:
        raise ValueError(f"loss_temperature must be > 0, got {temperature}")
    if z.ndim != 2:
        raise ValueError(f"embeddings must be [N, d], got {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        if z.dtype not in (torch.float32, torch.float64):
            z = z.float()
        z = F.normalize(z, dim=1)
        return z @ z.T / temperature


def _not_self(n: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _check_rows(has: torch.Tensor, what: str) -> None:
    bad = (~has).nonzero().flatten()
    if bad.numel():
        rows = bad[:10].tolist()
        raise ValueError(
            f"{bad.numel()} of {has.numel()} items have no {what} (rows {rows}"
            f"{' ...' if bad.numel() > 10 else ''}): every item needs at least one other member "
            f"of its group in the batch"
        )


def same_group(ids: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` bool: items i and j share an id, i != j."""
    ids = ids.reshape(-1)
    return (ids[:, None] == ids[None, :]) & _not_self(ids.numel(), ids.device)


def mil_nce(
    z: torch.Tensor, positives: torch.Tensor, temperature: float, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Noise-aware MIL-NCE, mean over items:
    ``logsumexp_{j != i}(s_ij / tau) - logsumexp_{j in P(i)}(s_ij / tau)`` with s = cosine similarity.

    ``positives [N, N]`` bool; the diagonal is ignored, and so are the pairs where ``ignore [N, N]``
    is True (left out of both sums). A row without a positive is a ValueError.
    """
    logits = _logits(z, temperature)
    n = logits.shape[0]
    valid = _not_self(n, logits.device)
    if ignore is not None:
        valid = valid & ~ignore.to(device=logits.device, dtype=torch.bool)
    pos = positives.to(device=logits.device, dtype=torch.bool) & valid
    _check_rows(pos.any(dim=1), "candidate positive")
    neg_inf = float("-inf")
    denom = torch.logsumexp(logits.masked_fill(~valid, neg_inf), dim=1)
    numer = torch.logsumexp(logits.masked_fill(~pos, neg_inf), dim=1)
    return (denom - numer).mean()


def soft_target_contrastive(
    z: torch.Tensor, targets: torch.Tensor, temperature: float, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy between the softmax over j != i of ``s_ij / tau`` and the per-row normalised
    non-negative ``targets [N, N]`` (diagonal ignored); mean over items.

    Pairs where ``ignore [N, N]`` is True are left out of both the softmax and the targets, as in
    :func:`mil_nce`."""
    logits = _logits(z, temperature)
    n = logits.shape[0]
    valid = _not_self(n, logits.device)
    if ignore is not None:
        valid = valid & ~ignore.to(device=logits.device, dtype=torch.bool)
    t = targets.to(device=logits.device, dtype=logits.dtype).masked_fill(~valid, 0.0)
    if (t < 0).any():
        raise ValueError("contrastive target weights must be non-negative")
    row = t.sum(dim=1, keepdim=True)
    _check_rows(row.squeeze(1) > 0, "positive target weight")
    t = t / row
    log_prob = logits - torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~valid, 0.0)
    return -(t * log_prob).sum(dim=1).mean()


def supcon(
    z: torch.Tensor, positives: torch.Tensor, temperature: float, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-positive SupCon: the target is uniform over the positives ``P(i)`` (diagonal and
    ``ignore`` pairs left out)."""
    return soft_target_contrastive(z, positives.to(torch.bool).float(), temperature, ignore)


def temporal_targets(position: torch.Tensor, video: torch.Tensor, lam: float) -> torch.Tensor:
    """Unnormalised weights ``exp(-lam |t_i - t_j|)`` within a video, 0 across videos and on the diagonal."""
    t = position.reshape(-1).double()
    w = torch.exp(-lam * (t[:, None] - t[None, :]).abs())
    return w * same_group(video).to(w.dtype)


def temporally_aware(
    z: torch.Tensor,
    position: torch.Tensor,
    video: torch.Tensor,
    temperature: float,
    lam: float,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """SupCon with targets decaying as ``exp(-lam |t_i - t_j|)`` within the same video."""
    return soft_target_contrastive(z, temporal_targets(position, video, lam), temperature, ignore)


def parse_milnce_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """1 to 3 non-negative weights (fragment, cross-fragment frame, intra-fragment frame); missing = 0.

    The same weights apply to every loss type (``--loss_weights``, alias of ``--loss_milnce_weights``)."""
    w = [float(x) for x in weights]
    if not 1 <= len(w) <= 3:
        raise ValueError(f"loss_milnce_weights takes 1 to 3 values, got {len(w)}: {w}")
    if any(x < 0 for x in w) or not any(x > 0 for x in w):
        raise ValueError(f"loss_milnce_weights must be >= 0 with at least one > 0, got {w}")
    w += [0.0] * (3 - len(w))
    return w[0], w[1], w[2]


class HierarchicalContrastive(nn.Module):
    """Weighted sum of the same three terms for every loss type (``loss_type``):

    1. ``loss_frag``: fragment projections;
    2. ``loss_cross_frame``: frame projections of all fragments of the batch;
    3. ``loss_intra_frame``: frame projections, positives = the other frames of the same fragment.

    What counts as a positive at levels 1 and 2:

    - ``mil-nce`` (noise-aware): the other fragments (frames) of the same bag, as a bag — one
      log-sum-exp over them, so one good positive suffices;
    - ``supervised`` (multi-positive SupCon, trusting the positives): the same positives, each one a
      target of equal weight;
    - ``temporally-aware``: every other fragment (frame) of the same video, with target weight
      ``exp(-loss_ta_lambda |t_i - t_j|)``; frames take the position ``t`` of their fragment.

    Level 3 is MIL-NCE over the fragment's frames for ``mil-nce`` and SupCon over them for the other
    two (a fragment's frames share one position, so temporal weights would be uniform there).
    Negatives are every other item of the same level in the batch; terms with weight 0 are skipped.
    With ``mask_intra_fragment_frames`` (the reference's `--hmve_mask_intra_fragment_frames`), term 2
    leaves out every pair of frames of the same fragment, from its positives and its denominator.
    With weights ``(w, 0, 0)`` each loss type is its fragment-level loss times ``w``.
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0),
        temperature: float = 0.07,
        mask_intra_fragment_frames: bool = False,
        loss_type: str = "mil-nce",
        ta_lambda: float = 10.0,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r} (choose from {', '.join(LOSS_TYPES)})")
        self.loss_type = loss_type
        self.weights = parse_milnce_weights(weights)
        self.temperature = float(temperature)
        self.mask_intra_fragment_frames = bool(mask_intra_fragment_frames)
        self.ta_lambda = float(ta_lambda)

    @property
    def needs_frames(self) -> bool:
        return self.weights[1] > 0 or self.weights[2] > 0

    def _grouped(
        self,
        z: torch.Tensor,
        groups: torch.Tensor,
        position: torch.Tensor | None,
        video: torch.Tensor | None,
        ignore: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The level-1/2 term of this loss type: positives = same `groups` (or temporal weights)."""
        if self.loss_type == "mil-nce":
            return mil_nce(z, same_group(groups), self.temperature, ignore)
        if self.loss_type == "supervised":
            return supcon(z, same_group(groups), self.temperature, ignore)
        if position is None or video is None:
            raise ValueError("the temporally-aware loss needs fragment positions and videos")
        return temporally_aware(z, position, video, self.temperature, self.ta_lambda, ignore)

    def forward(
        self,
        frag_z: torch.Tensor,
        bag: torch.Tensor,
        frame_z: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        position: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``frag_z [B, d]``, ``bag [B]``, ``frame_z [B, S, d]`` (needed by terms 2 and 3), optional
        ``frame_mask [B, S]`` (True = real frame), ``position [B]`` and ``video [B]`` (needed by the
        temporally-aware loss). Returns ``loss`` and every computed term."""
        w_frag, w_cross, w_intra = self.weights
        out: dict[str, torch.Tensor] = {}
        if w_frag > 0:
            out["loss_frag"] = self._grouped(frag_z, bag, position, video)
        if self.needs_frames:
            if frame_z is None:
                raise ValueError("frame-level loss terms need frame projections")
            b, s = frame_z.shape[:2]
            frag_ids = torch.arange(b, device=frame_z.device)[:, None].expand(b, s)
            bag_ids = bag.to(frame_z.device).reshape(b, 1).expand(b, s)
            zf = frame_z.reshape(b * s, -1)
            frag_ids, bag_ids = frag_ids.reshape(-1), bag_ids.reshape(-1)
            if frame_mask is not None:
                keep = frame_mask.reshape(-1).to(torch.bool)
                zf, frag_ids, bag_ids = zf[keep], frag_ids[keep], bag_ids[keep]
            if w_cross > 0:
                ignore = None
                if self.mask_intra_fragment_frames:
                    ignore = frag_ids[:, None] == frag_ids[None, :]
                frame_pos = frame_video = None
                if self.loss_type == "temporally-aware":
                    if position is None or video is None:
                        raise ValueError("the temporally-aware loss needs fragment positions and videos")
                    frame_pos = position.to(frame_z.device)[frag_ids]
                    frame_video = video.to(frame_z.device)[frag_ids]
                out["loss_cross_frame"] = self._grouped(zf, bag_ids, frame_pos, frame_video, ignore)
            if w_intra > 0:
                intra = mil_nce if self.loss_type == "mil-nce" else supcon
                out["loss_intra_frame"] = intra(zf, same_group(frag_ids), self.temperature)
        weight = dict(zip(TERM_NAMES, self.weights, strict=True))
        out["loss"] = sum(weight[k] * v for k, v in out.items())
        return out


class HierarchicalMILNCE(HierarchicalContrastive):
    """The hierarchical noise-aware MIL-NCE (``HierarchicalContrastive`` with ``loss_type="mil-nce"``)."""

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0),
        temperature: float = 0.07,
        mask_intra_fragment_frames: bool = False,
    ) -> None:
        super().__init__(weights, temperature, mask_intra_fragment_frames, "mil-nce")
