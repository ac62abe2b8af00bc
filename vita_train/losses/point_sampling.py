"""Point sampling on mask logits (PointRend style, as Mask2Former trains with it)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly read `input` (N,C,H,W) at `coords` (N,P,2) or (N,Ph,Pw,2) in [0,1]² given as (x, y)."""
    flat = coords.dim() == 3
    grid = 2.0 * coords - 1.0
    if flat:
        grid = grid.unsqueeze(2)
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(3) if flat else out


def uniform_points(
    counts: Sequence[int], num: int, device: torch.device, generators: Sequence[torch.Generator] | None = None
) -> Tensor:
    """(sum(counts), num, 2) uniform coords in [0,1]²; group i's rows come from generators[i] when given."""
    if generators is None:
        return torch.rand(sum(counts), num, 2, device=device)
    if len(generators) != len(counts):
        raise ValueError(f"{len(counts)} row groups but {len(generators)} generators")
    parts = [torch.rand(c, num, 2, device=device, generator=g) for c, g in zip(counts, generators)]
    return torch.cat(parts) if parts else torch.zeros(0, num, 2, device=device)


def uncertain_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    groups: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """(R, num_points, 2) coords: the most uncertain (smallest |logit|) of oversampled candidates plus uniform ones.

    `logits` is (R,1,H,W) or (R,H,W); with `generators`, the rows are split into consecutive `groups`
    and group i draws its points from generators[i] (the global torch RNG otherwise).
    """
    if oversample_ratio < 1 or not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], "
            f"got {oversample_ratio} and {importance_sample_ratio}"
        )
    if logits.dim() == 3:
        logits = logits[:, None]
    n = logits.shape[0]
    device = logits.device
    counts = [n] if groups is None else list(groups)
    if sum(counts) != n:
        raise ValueError(f"groups {counts} do not add up to the {n} masks")
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = uniform_points(counts, num_sampled, device, generators)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    keep = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    coords = torch.gather(candidates, 1, keep[..., None].expand(n, num_uncertain, 2))
    if num_random > 0:
        coords = torch.cat([coords, uniform_points(counts, num_random, device, generators)], dim=1)
    return coords


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on `device`, so losses and matching costs stay in fp32."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        # device types without autocast support have nothing to switch off
        return contextlib.nullcontext()
