"""VITA criterion: clip-level CE / mask / dice on video-query predictions and the frame/clip similarity loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vita_train.losses.frame_criterion import (
    MatchingCriterion,
    class_loss,
    mean_over_ranks,
    permutation_index,
    sampled_mask_losses,
)
from vita_train.losses.matcher import Indices
from vita_train.losses.point_sampling import fp32_region

ID_MULTIPLIER = 1000


def similarity_loss(
    fq_embed: Tensor,
    cq_embed: Tensor | None,
    frame_targets: Sequence[dict[str, Tensor]],
    clip_targets: Sequence[dict[str, Any]],
    frame_indices: Sequence[Indices],
    clip_indices: Indices,
    multiplier: int = ID_MULTIPLIER,
) -> Tensor:
    """BCE-with-logits on raw dot products of matched frame/clip embeddings; positives share a GT identity.

    `fq_embed` (L,B,T,Nf,C), `cq_embed` (L,B,cQ,C) or None, `frame_indices` L lists of B·T matchings
    (frame b·T+t), `clip_indices` L·B matchings (element l·B+b). Only pairs from the same (l, b) count,
    diagonal included; the sum is divided by their number (+1e-6).
    """
    num_l, num_b, num_t, num_fq, _ = fq_embed.shape
    device = fq_embed.device
    if len(frame_indices) != num_l:
        raise ValueError(f"similarity loss needs {num_l} frame matchings, got {len(frame_indices)}")
    flat_frames = [m for layer in frame_indices for m in layer]
    if len(flat_frames) != num_l * num_b * num_t:
        raise ValueError(f"expected {num_l}x{num_b * num_t} frame matchings, got {len(flat_frames)}")

    # element e = l·B·T + b·T + t in both flat_frames and the flattened (L, B, T) embedding axes
    elem, src = permutation_index(flat_frames, device)
    embeds = [fq_embed.reshape(-1, num_fq, fq_embed.shape[-1])[elem, src]]
    raw_ids = [
        torch.cat([frame_targets[e % (num_b * num_t)]["ids"][tgt.to(device)].to(device)
                   for e, (_, tgt) in enumerate(flat_frames)])
    ]
    groups = [elem // num_t]

    if cq_embed is not None:
        if len(clip_indices) != num_l * num_b:
            raise ValueError(f"expected {num_l * num_b} clip matchings, got {len(clip_indices)}")
        elem, src = permutation_index(clip_indices, device)
        embeds.append(cq_embed.reshape(num_l * num_b, -1, cq_embed.shape[-1])[elem, src])
        # a clip query's identity is its GT's id in the frames where it is visible (ids are -1 elsewhere)
        raw_ids.append(
            torch.cat([clip_targets[e % num_b]["ids"][tgt.to(device)].to(device).amax(dim=1)
                       for e, (_, tgt) in enumerate(clip_indices)])
        )
        groups.append(elem)

    raw = torch.cat(raw_ids)
    valid = raw != -1
    embed = torch.cat(embeds)[valid]
    group = torch.cat(groups)[valid]
    # the (l, b) offset keeps identities of different clips and layers apart
    ident = raw[valid] + group * multiplier
    with fp32_region(device):
        embed = embed.float()
        logits = embed @ embed.T
        target = (ident[:, None] == ident[None, :]).float()
        same = (group[:, None] == group[None, :]).float()
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (loss * same).sum() / (mean_over_ranks(float(same.sum()), loss.device, minimum=0.0) + 1e-6)


class VideoCriterion(MatchingCriterion):
    """VITA losses over L frame-query layers x B clips, each matched on its own, plus aux decoder layers."""

    def single_losses(
        self,
        logits: Tensor,
        masks: Tensor,
        targets: Sequence[dict[str, Any]],
        indices: Indices,
        num_masks: float,
        generators: Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted {ce, mask, dice} of one VITA prediction (L,B,cQ,K+1) / (L,B,cQ,T,h,w) under a matching."""
        cfg = self.cfg
        num_l, num_b, cq, k1 = logits.shape
        t, h, w = masks.shape[-3:]
        per_elem = [targets[e % num_b] for e in range(num_l * num_b)]
        ce = class_loss(
            logits.reshape(num_l * num_b, cq, k1), indices, [x["labels"] for x in per_elem], cfg.video_no_object_weight
        )
        elem, src = permutation_index(indices, masks.device)
        src_masks = masks.reshape(num_l * num_b, cq, t, h, w)[elem, src].flatten(0, 1)
        if len(elem):
            tgt_masks = torch.cat(
                [x["masks"][j.to(x["masks"].device)].to(masks.device) for x, (_, j) in zip(per_elem, indices)]
            ).flatten(0, 1)
        else:
            tgt_masks = masks.new_zeros((0, 1, 1), dtype=torch.float32)
        bce, dice = sampled_mask_losses(
            src_masks, tgt_masks, num_masks,
            cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio, frames=t,
            groups=[len(src) * t for src, _ in indices],
            generators=None if generators is None else [generators[e % num_b] for e in range(num_l * num_b)],
        )
        return {"ce": ce, "mask": bce, "dice": dice}

    def forward(
        self,
        outputs: dict,
        clip_targets: Sequence[dict[str, Any]],
        frame_targets: Sequence[dict[str, Tensor]],
        fg_indices: Sequence[Indices] | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted `loss_video_{ce,mask,dice}` (+ `_i` per earlier VITA decoder layer) and `loss_sim`.

        `generators`, one per clip, draw that clip's random points (the global torch RNG otherwise).
        """
        cfg = self.cfg
        num_l = outputs["pred_logits"].shape[0]
        device = outputs["pred_logits"].device
        if outputs["pred_logits"].shape[-1] != self.num_classes + 1:
            raise ValueError(f"expected {self.num_classes + 1} class logits, got {outputs['pred_logits'].shape[-1]}")
        num_masks = mean_over_ranks(sum(len(x["labels"]) for x in clip_targets) * num_l, device)
        weights = {
            "ce": cfg.class_weight * cfg.video_loss_weight,
            "mask": cfg.mask_weight * cfg.video_loss_weight,
            "dice": cfg.dice_weight * cfg.video_loss_weight,
        }
        losses: dict[str, Tensor] = {}
        indices = self.matcher.match_videos(outputs["pred_logits"], outputs["pred_masks"], clip_targets, generators)
        raw = self.single_losses(
            outputs["pred_logits"], outputs["pred_masks"], clip_targets, indices, num_masks, generators
        )
        for name, value in raw.items():
            losses[f"loss_video_{name}"] = value * weights[name]

        fq_embed = outputs.get("pred_fq_embed")
        if cfg.sim_weight > 0 and fq_embed is not None:
            if fg_indices is None:
                raise ValueError("the similarity loss needs the frame criterion's matchings (fg_indices)")
            sim = similarity_loss(
                fq_embed, outputs.get("pred_cq_embed"), frame_targets, clip_targets, fg_indices, indices
            )
            losses["loss_sim"] = sim * cfg.sim_weight

        if cfg.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_indices = self.matcher.match_videos(
                    aux["pred_logits"], aux["pred_masks"], clip_targets, generators
                )
                raw = self.single_losses(
                    aux["pred_logits"], aux["pred_masks"], clip_targets, aux_indices, num_masks, generators
                )
                for name, value in raw.items():
                    losses[f"loss_video_{name}_{i}"] = value * weights[name]
        return losses
