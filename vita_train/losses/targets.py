"""Clip annotations -> padded frame-level and clip-level targets, as VITA's `prepare_targets` builds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def prepare_targets(
    clips: Sequence[dict[str, Tensor]],
    padded_hw: tuple[int, int],
    device: torch.device | None = None,
) -> tuple[list[dict[str, Tensor]], list[dict[str, Any]]]:
    """Frame targets (B*T, frame index b*T+t) and clip targets (B) with masks padded top-left to `padded_hw`."""
    hp, wp = int(padded_hw[0]), int(padded_hw[1])
    frame_targets: list[dict[str, Tensor]] = []
    clip_targets: list[dict[str, Any]] = []
    for clip in clips:
        masks = torch.as_tensor(clip["masks"])
        dev = device if device is not None else masks.device
        masks = masks.to(dev).bool()
        labels = torch.as_tensor(clip["labels"]).to(dev).long()
        ids = torch.as_tensor(clip["ids"]).to(dev).long().clone()
        g, t, h, w = masks.shape
        if h > hp or w > wp:
            raise ValueError(f"clip masks {h}x{w} do not fit the padded size {hp}x{wp}")
        if ids.shape != (g, t) or labels.shape != (g,):
            raise ValueError(f"clip has masks {tuple(masks.shape)}, ids {tuple(ids.shape)}, labels {tuple(labels.shape)}")

        ids[~masks.flatten(2).any(-1)] = -1
        # a negative class marks an annotation the dataset filtered out (e.g. COCO classes with no mapping)
        ids[labels < 0] = -1
        valid_frame = ids != -1
        keep = valid_frame.any(dim=1)
        labels, ids, masks, valid_frame = labels[keep], ids[keep], masks[keep], valid_frame[keep]
        if valid_frame.any():
            min_id = ids[valid_frame].min().clamp(min=0)
            ids = torch.where(valid_frame, ids - min_id, ids)

        padded = masks.new_zeros((len(labels), t, hp, wp), dtype=torch.float32)
        padded[..., :h, :w] = masks.float()
        clip_targets.append({"labels": labels, "ids": ids, "masks": padded})
        for f in range(t):
            vis = valid_frame[:, f]
            frame_targets.append({"labels": labels[vis], "ids": ids[vis, f], "masks": padded[vis, f]})
    return frame_targets, clip_targets
