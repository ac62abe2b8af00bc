"""Hungarian matching of predicted masks to ground truth (Mask2Former per frame, VITA per clip)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from vita_train.losses.point_sampling import fp32_region, point_sample, uniform_points

Indices = list[tuple[Tensor, Tensor]]


def batch_sigmoid_ce_cost(pred: Tensor, tgt: Tensor) -> Tensor:
    """(N, M) mean point-wise BCE between every prediction row of logits (N,P) and target row (M,P)."""
    # BCE(x, y) = softplus(x) - x·y, so both label terms fold into one softplus and one product
    neg = F.softplus(pred)
    return (neg.sum(-1)[:, None] - pred @ tgt.T) / pred.shape[1]


def batch_dice_cost(pred: Tensor, tgt: Tensor) -> Tensor:
    """(N, M) dice loss 1 - (2·Σσt + 1)/(Σσ + Σt + 1) between every logit row (N,P) and target row (M,P)."""
    prob = pred.sigmoid()
    numerator = 2.0 * (prob @ tgt.T)
    denominator = prob.sum(-1)[:, None] + tgt.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher:
    """One-to-one assignment minimising class_w·(−p[gt]) + mask_w·BCE + dice_w·dice on uniform random points."""

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ) -> None:
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self, logits: Tensor, masks: Tensor, labels: Tensor, tgt_masks: Tensor, coords: Tensor
    ) -> Tensor:
        """(Q, G) cost of queries with logits (Q,K+1), mask logits (Q,T,h,w) against GTs (G,) / (G,T,H,W).

        `coords` (P, 2) are shared by all queries, GTs and frames, so each mask is read at T·P points.
        """
        q, t = masks.shape[:2]
        g = tgt_masks.shape[0]
        if tgt_masks.shape[1] != t:
            raise ValueError(f"predictions have {t} frames but the targets {tgt_masks.shape[1]}")
        with fp32_region(masks.device):
            prob = logits.float().softmax(-1)
            cost_class = -prob[:, labels]
            pts = coords.float()[None]
            n_pts = t * coords.shape[0]
            # all masks and frames as channels of one image: one read per point serves every channel
            pred_pts = point_sample(masks.float().reshape(1, q * t, *masks.shape[-2:]), pts).view(q, n_pts)
            tgt_pts = point_sample(tgt_masks.float().reshape(1, g * t, *tgt_masks.shape[-2:]), pts).view(g, n_pts)
            cost_mask = batch_sigmoid_ce_cost(pred_pts, tgt_pts)
            cost_dice = batch_dice_cost(pred_pts, tgt_pts)
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def frame_costs(
        self, pred_logits: Tensor, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]], coords: Tensor
    ) -> list[Tensor]:
        """Per image (Q, G_i) costs for (N,Q,K+1) logits and (N,Q,h,w) masks, `coords` (N,P,2) one set per image."""
        return [
            self.cost_matrix(pred_logits[i], pred_masks[i][:, None], tgt["labels"], tgt["masks"][:, None], coords[i])
            for i, tgt in enumerate(targets)
        ]

    @torch.no_grad()
    def video_costs(
        self, pred_logits: Tensor, pred_masks: Tensor, targets: Sequence[dict[str, Tensor]], coords: Tensor
    ) -> list[Tensor]:
        """Per (l,b), in order l·B+b, (cQ, G_b) costs for (L,B,cQ,K+1) / (L,B,cQ,T,h,w), coords (L,B,P,2)."""
        num_l, num_b = pred_logits.shape[:2]
        if len(targets) != num_b:
            raise ValueError(f"{num_b} clips predicted but {len(targets)} clip targets given")
        return [
            self.cost_matrix(
                pred_logits[li, b], pred_masks[li, b], targets[b]["labels"], targets[b]["masks"], coords[li, b]
            )
            for li in range(num_l)
            for b in range(num_b)
        ]

    @torch.no_grad()
    def match_frames(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[dict[str, Tensor]],
        generators: Sequence[torch.Generator] | None = None,
    ) -> Indices:
        """Per image (query indices, GT indices) for Mask2Former outputs (N,Q,K+1) / (N,Q,h,w).

        `generators`, one per image, draw that image's points (the global torch RNG otherwise).
        """
        n = pred_logits.shape[0]
        if len(targets) != n:
            raise ValueError(f"{n} images predicted but {len(targets)} frame targets given")
        coords = uniform_points([1] * n, self.num_points, pred_masks.device, generators)
        return solve(self.frame_costs(pred_logits, pred_masks, targets, coords))

    @torch.no_grad()
    def match_videos(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        targets: Sequence[dict[str, Tensor]],
        generators: Sequence[torch.Generator] | None = None,
    ) -> Indices:
        """Per (l,b), in order l·B+b, (query indices, GT indices) for VITA outputs (L,B,cQ,K+1) / (L,B,cQ,T,h,w).

        `generators`, one per clip b, draw the points of every (l, b) (the global torch RNG otherwise).
        """
        num_l, num_b = pred_logits.shape[:2]
        per_elem = None if generators is None else [generators[b] for _ in range(num_l) for b in range(num_b)]
        coords = uniform_points([1] * (num_l * num_b), self.num_points, pred_masks.device, per_elem)
        return solve(self.video_costs(pred_logits, pred_masks, targets, coords.view(num_l, num_b, -1, 2)))


def solve(costs: Sequence[Tensor], device: torch.device | None = None) -> Indices:
    """Minimum-cost assignments of (Q, G) cost matrices as int64 (rows, cols) pairs, rows ascending."""
    out: Indices = []
    # one device->host copy for all matrices instead of one sync each
    flat = torch.cat([c.reshape(-1) for c in costs]).cpu() if costs else torch.zeros(0)
    offset = 0
    for c in costs:
        q, g = c.shape
        mat = flat[offset:offset + q * g].view(q, g).numpy()
        offset += q * g
        if g == 0 or q == 0:
            rows = cols = torch.zeros(0, dtype=torch.int64)
        else:
            # diverged predictions give NaN costs: still match, so the loss (not scipy) reports the divergence
            r, k = linear_sum_assignment(np.nan_to_num(mat, nan=1e8, posinf=1e8, neginf=-1e8))
            rows, cols = torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(k, dtype=torch.int64)
        out.append((rows.to(device), cols.to(device)) if device is not None else (rows, cols))
    return out
