"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, sampling through grid_sample."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn_sample(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Weighted bilinear samples of every level; the reference that any fused kernel must match.

    value (N, S, heads, D) with S = sum(H_l*W_l), levels in ``shapes`` order;
    locations (N, Lq, heads, levels, points, 2) as (x, y) in [0, 1];
    weights (N, Lq, heads, levels, points), already softmax-normalised.
    Returns (N, Lq, heads*D). Out-of-range samples read zeros (grid_sample padding "zeros").
    """
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1
    sizes = [h * w for h, w in shapes]
    per_level = value.split(sizes, dim=1)
    # weight and sum each level as it is sampled: no (N*heads, D, Lq, levels*points) stack is built
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(n * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*heads, Lq, points, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        wl = weights[:, :, :, lvl].transpose(1, 2).reshape(n * heads, 1, lq, points)
        term = (sampled * wl).sum(-1)  # (N*heads, D, Lq)
        out = term if out is None else out + term
    return out.view(n, heads * d, lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention over ``num_levels`` feature maps with ``num_points`` samples per head and level."""

    def __init__(self, dim: int, num_levels: int = 3, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"deformable attention width {dim} is not divisible by {num_heads} heads")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        # swappable for export (e.g. a form that maps to TensorRT's deformable-attention plugin)
        self.sample_fn = ms_deform_attn_sample
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's start: offsets point outward in 8 compass directions, uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query (N, Lq, C), reference_points (N, Lq, 2) as (x, y) in [0, 1], value (N, S, C)."""
        n, lq, c = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(n, value.shape[1], heads, c // heads)
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, lq, heads, levels * points).softmax(-1)
        weights = weights.view(n, lq, heads, levels, points)
        # offsets are in pixels of each level: normalise by that level's (W, H); dividing by the sizes
        # themselves (not a tensor built from them) keeps them symbolic when traced for export
        scaled = [
            torch.stack((offsets[:, :, :, lvl, :, 0] / w, offsets[:, :, :, lvl, :, 1] / h), dim=-1)
            for lvl, (h, w) in enumerate(shapes)
        ]
        locations = reference_points[:, :, None, None, None, :] + torch.stack(scaled, dim=3)
        return self.output_proj(self.sample_fn(v, shapes, locations, weights))
