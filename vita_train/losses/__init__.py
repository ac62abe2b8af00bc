"""Training losses: Mask2Former frame criterion, VITA video criterion and similarity loss, and their sum.

`VitaLoss` is what the trainer calls: it builds the targets, runs both criteria and returns weighted
losses to be summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vita_train.losses.config import LossConfig
from vita_train.losses.frame_criterion import FrameCriterion, class_loss, mean_over_ranks, sampled_mask_losses
from vita_train.losses.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost
from vita_train.losses.point_sampling import point_sample, uncertain_point_coords, uniform_points
from vita_train.losses.targets import prepare_targets
from vita_train.losses.video_criterion import VideoCriterion, similarity_loss

__all__ = [
    "FrameCriterion",
    "HungarianMatcher",
    "LossConfig",
    "VideoCriterion",
    "VitaLoss",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "class_loss",
    "mean_over_ranks",
    "point_sample",
    "prepare_targets",
    "sampled_mask_losses",
    "similarity_loss",
    "uncertain_point_coords",
    "uniform_points",
]


class VitaLoss(nn.Module):
    """Frame (Mask2Former) + video (VITA) + similarity losses, each already weighted: total = sum(values)."""

    def __init__(self, num_classes: int, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        self.frame_criterion = FrameCriterion(num_classes, self.cfg)
        self.video_criterion = VideoCriterion(num_classes, self.cfg)

    def forward(
        self,
        frame_outputs: dict,
        vita_outputs: dict | None,
        clips: Sequence[dict],
        padded_hw: tuple[int, int],
        generators: Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted losses of one batch; `vita_outputs` None gives the frame losses only.

        Random points come from the global torch RNG, or with `generators` (one per clip, on the
        outputs' device) each clip's from its own generator, so they do not depend on the batch split.
        """
        device = frame_outputs["pred_logits"].device
        frame_targets, clip_targets = prepare_targets(clips, padded_hw, device=device)
        frame_gens = None
        if generators is not None:
            if len(generators) != len(clip_targets):
                raise ValueError(f"{len(clip_targets)} clips but {len(generators)} generators")
            per_clip = len(frame_targets) // max(len(clip_targets), 1)
            frame_gens = [g for g in generators for _ in range(per_clip)]
        losses, fg_indices = self.frame_criterion(frame_outputs, frame_targets, frame_gens)
        if vita_outputs is not None:
            losses.update(self.video_criterion(vita_outputs, clip_targets, frame_targets, fg_indices, generators))
        return losses
