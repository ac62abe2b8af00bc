"""Mask2Former set criterion on per-frame predictions: class CE + point-sampled mask BCE and dice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vita_train.losses.config import LossConfig
from vita_train.losses.matcher import HungarianMatcher, Indices
from vita_train.losses.point_sampling import fp32_region, point_sample, uncertain_point_coords


def mean_over_ranks(count: float, device: torch.device, minimum: float = 1.0) -> float:
    """`count` averaged over DDP ranks when torch.distributed is initialised, clamped to at least ``minimum``.

    Dividing a rank's sum by this mean makes DDP's gradient average equal to one process's loss over the
    whole batch, however the batch is split."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([float(count)], dtype=torch.float32, device=device)
        dist.all_reduce(t)
        count = t.item() / dist.get_world_size()
    return max(float(count), minimum)


def permutation_index(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(element index, query index) of every matched query, flattened over the batch."""
    if not indices:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch.to(device), src.to(device)


def class_loss(logits: Tensor, indices: Indices, labels: Sequence[Tensor], no_object_weight: float) -> Tensor:
    """Weighted-mean CE over all (N, Q) queries; unmatched ones target the no-object class K."""
    n, q, k1 = logits.shape
    device = logits.device
    batch, src = permutation_index(indices, device)
    target = torch.full((n, q), k1 - 1, dtype=torch.int64, device=device)
    if len(batch):
        target[batch, src] = torch.cat([lab.to(device)[tgt.to(device)] for lab, (_, tgt) in zip(labels, indices)])
    weight = torch.ones(k1, dtype=torch.float32, device=device)
    weight[-1] = no_object_weight
    with fp32_region(device):
        # PyTorch's weighted mean, with the weight total taken over all ranks (see mean_over_ranks)
        per_query = F.cross_entropy(logits.float().reshape(n * q, k1), target.reshape(-1), reduction="none")
        w = weight[target.reshape(-1)]
        return (per_query * w).sum() / mean_over_ranks(float(w.sum()), device, minimum=1e-12)


def sampled_mask_losses(
    src: Tensor,
    tgt: Tensor,
    num_masks: float,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    frames: int = 1,
    groups: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """(BCE, dice) sums over masks / num_masks, on importance-sampled points per (mask, frame).

    `src` (M·frames, h, w) logits and `tgt` (M·frames, H, W) binary masks; the points of the `frames`
    consecutive rows of one mask are concatenated before the per-mask mean (BCE) and sums (dice).
    With `generators`, the rows split into consecutive `groups` and group i samples with generators[i].
    """
    with fp32_region(src.device):
        src = src.float()[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords(
                src, num_points, oversample_ratio, importance_sample_ratio, groups=groups, generators=generators
            )
            labels = point_sample(tgt.float()[:, None], coords).squeeze(1)
        logits = point_sample(src, coords).squeeze(1)
        logits = logits.reshape(-1, frames * num_points)
        labels = labels.reshape(-1, frames * num_points)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
        prob = logits.sigmoid()
        dice = 1.0 - (2.0 * (prob * labels).sum(-1) + 1.0) / (prob.sum(-1) + labels.sum(-1) + 1.0)
        return bce, dice.sum() / num_masks


class MatchingCriterion(nn.Module):
    """Shared start of the frame and video criteria: the loss config and a matcher with the same cost weights."""

    def __init__(self, num_classes: int, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cfg = cfg if cfg is not None else LossConfig()
        self.matcher = HungarianMatcher(
            self.cfg.class_weight, self.cfg.mask_weight, self.cfg.dice_weight, self.cfg.num_points
        )


class FrameCriterion(MatchingCriterion):
    """Mask2Former losses with deep supervision; also yields the matchings of the last L predictions for VITA."""

    def single_losses(
        self,
        logits: Tensor,
        masks: Tensor,
        targets: Sequence[dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
        generators: Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted {ce, mask, dice} of one prediction (N,Q,K+1) / (N,Q,h,w) under a given matching."""
        cfg = self.cfg
        ce = class_loss(logits, indices, [t["labels"] for t in targets], cfg.no_object_weight)
        batch, src = permutation_index(indices, masks.device)
        src_masks = masks[batch, src]
        if len(batch):
            tgt_masks = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)])
        else:
            tgt_masks = masks.new_zeros((0, 1, 1), dtype=torch.float32)
        bce, dice = sampled_mask_losses(
            src_masks, tgt_masks.to(masks.device), num_masks,
            cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
            groups=[len(src) for src, _ in indices], generators=generators,
        )
        return {"ce": ce, "mask": bce, "dice": dice}

    def forward(
        self,
        outputs: dict,
        targets: Sequence[dict[str, Tensor]],
        generators: Sequence[torch.Generator] | None = None,
    ) -> tuple[dict[str, Tensor], list[Indices]]:
        """Weighted losses (`loss_ce`, ..., `loss_ce_0`, ...) and the matchings of the last L predictions, oldest first.

        The last L predictions come from the decoder layers whose frame queries VITA consumes, so
        matching l is the one VITA's similarity loss needs for frame-query layer l. `generators`, one
        per image, draw that image's random points (the global torch RNG otherwise).
        """
        cfg = self.cfg
        preds = [*outputs.get("aux_outputs", []), outputs]
        n_pred = len(preds)
        num_l = cfg.num_frame_query_layers
        if num_l > n_pred:
            raise ValueError(f"{num_l} frame-query layers need as many predictions, got {n_pred}")
        device = outputs["pred_logits"].device
        if outputs["pred_logits"].shape[-1] != self.num_classes + 1:
            raise ValueError(f"expected {self.num_classes + 1} class logits, got {outputs['pred_logits'].shape[-1]}")
        num_masks = mean_over_ranks(sum(len(t["labels"]) for t in targets), device)
        weights = {
            "ce": cfg.class_weight * cfg.frame_loss_weight,
            "mask": cfg.mask_weight * cfg.frame_loss_weight,
            "dice": cfg.dice_weight * cfg.frame_loss_weight,
        }
        losses: dict[str, Tensor] = {}
        fg_indices: list[Indices] = []
        for i, pred in enumerate(preds):
            last = i == n_pred - 1
            wants_loss = last or cfg.deep_supervision
            wants_indices = i >= n_pred - num_l
            if not (wants_loss or wants_indices):
                continue
            indices = self.matcher.match_frames(pred["pred_logits"], pred["pred_masks"], targets, generators)
            if wants_indices:
                fg_indices.append(indices)
            if wants_loss:
                suffix = "" if last else f"_{i}"
                raw = self.single_losses(
                    pred["pred_logits"], pred["pred_masks"], targets, indices, num_masks, generators
                )
                for name, value in raw.items():
                    losses[f"loss_{name}{suffix}"] = value * weights[name]
        return losses, fg_indices
