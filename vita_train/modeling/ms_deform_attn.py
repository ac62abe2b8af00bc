"""Multi-scale deformable attention (Deformable DETR): projections here, sampling in the kernels package."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import kernels as kernels_lib
from kernels import reference

from .onednn import PackedLinear, exporting


# The plain reference lives in kernels.reference (held to the fused forms there); export traces it.
ms_deform_attn_sample = reference.ms_deform_attn


class MSDeformAttn(nn.Module):
    """Deformable attention over ``num_levels`` feature maps with ``num_points`` samples per head and level."""

    def __init__(
        self, dim: int, num_levels: int = 3, num_heads: int = 8, num_points: int = 4, kernels: str = "auto"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"deformable attention width {dim} is not divisible by {num_heads} heads")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        # packed in float32 only as oneDNN 1x1 convolutions (AVX2): 5040 rows to 192 and 96 took 2.59 and 1.37 ms
        # instead of addmm's 3.23 and 1.65 (AMD EPYC Zen 2, 2 threads); elsewhere the plain op
        self.sampling_offsets = PackedLinear(dim, num_heads * num_levels * num_points * 2, float32="conv")
        self.attention_weights = PackedLinear(dim, num_heads * num_levels * num_points, float32="conv")
        self.value_proj = PackedLinear(dim, dim)
        self.output_proj = PackedLinear(dim, dim)
        # swappable for export (e.g. a form that maps to TensorRT's deformable-attention plugin); the
        # default runs the ``kernels`` implementation, and the plain reference when traced for export
        self.sample_fn = ms_deform_attn_sample
        # swappable for export too: a form of kernels.reference.ms_deform_attn_from_projections (the same
        # arguments) that replaces everything from the two projections to the sampled values
        self.from_projections_fn: Optional[Callable[..., Tensor]] = None
        self.kernels = kernels_lib.check_mode(kernels)
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

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, shapes: list[tuple[int, int]],
                residual: Optional[Tensor] = None, into_residual: bool = False) -> Tensor:
        """query (N, Lq, C), reference_points (N or 1, Lq, 2) as (x, y) in [0, 1], value (N, S, C); plus
        ``residual`` (N, Lq, C) when given (added inside the output projection; ``into_residual``: the caller
        gives it up, and the fast path writes the result into it, see ``PackedLinear``)."""
        n, lq, c = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(n, value.shape[1], heads, c // heads)
        if self.from_projections_fn is not None:
            out = self.from_projections_fn(v, shapes, reference_points, self.sampling_offsets(query),
                                           self.attention_weights(query), levels, points)
            return self.output_proj(out, residual=residual, into_residual=into_residual)
        fast = self.sample_fn is ms_deform_attn_sample and self.kernels != "reference" and not exporting()
        if fast and kernels_lib.resolve(self.kernels, query.device.type) == "cpu":
            params = (self.sampling_offsets.weight, self.attention_weights.weight)
            if kernels_lib.native_ms_deform_attn_usable(query, v, *params):
                # one compiled pass from the raw projections: softmax, positions and bilinear taps fused
                out = kernels_lib.native.ms_deform_attn_from_projections(
                    v, shapes, reference_points, self.sampling_offsets(query), self.attention_weights(query),
                    levels, points)
                return self.output_proj(out, residual=residual, into_residual=into_residual)
            locations, weights = self._query_minor(query, reference_points, shapes)
            return self.output_proj(kernels_lib.ms_deform_attn(v, shapes, locations, weights, mode=self.kernels), residual=residual, into_residual=into_residual)
        # positions in the reference points' dtype (at least fp32): bf16 cannot tell pixels apart at 1/160
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2).to(reference_points.dtype)
        weights = self.attention_weights(query).view(n, lq, heads, levels * points).softmax(-1)
        weights = weights.view(n, lq, heads, levels, points)
        # offsets are in pixels of each level: normalise by that level's (W, H)
        if exporting():
            # dividing by the sizes themselves (not a tensor built from them) keeps them symbolic when traced
            scaled = torch.stack([
                torch.stack((offsets[:, :, :, lvl, :, 0] / w, offsets[:, :, :, lvl, :, 1] / h), dim=-1)
                for lvl, (h, w) in enumerate(shapes)
            ], dim=3)
        else:  # the same divisions, as one broadcast op
            scaled = offsets / self._sizes(shapes, offsets).view(1, 1, 1, levels, 1, 2)
        locations = reference_points[:, :, None, None, None, :] + scaled
        if fast:
            return self.output_proj(kernels_lib.ms_deform_attn(v, shapes, locations, weights, mode=self.kernels), residual=residual, into_residual=into_residual)
        # the plain path samples in the positions' dtype (grid_sample takes one dtype), then back to v's
        sampled = self.sample_fn(v.to(locations.dtype), shapes, locations, weights.to(locations.dtype))
        return self.output_proj(sampled.to(v.dtype), residual=residual, into_residual=into_residual)

    @staticmethod
    def _sizes(shapes: list[tuple[int, int]], like: Tensor) -> Tensor:
        return torch.tensor([[w, h] for h, w in shapes], dtype=like.dtype, device=like.device)

    def _query_minor(self, query: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]]):
        """The forward's locations and weights, the same values, computed one column per query.

        The CPU kernel's index math runs on (heads, levels, points, N*Lq) planes (``kernels.cpu._taps``):
        projecting with the weights on the left gives that layout directly, and the softmax then reduces
        over a non-innermost axis, which the CPU kernels vectorise over the queries (over 12 innermost
        items they do not). Returned as the forward's (N, Lq, ...) shapes, strided views of those planes.
        """
        n, lq, c = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        m = n * lq
        q_t = query.reshape(m, c).t()
        off, att = self.sampling_offsets, self.attention_weights
        offsets = torch.addmm(off.bias[:, None], off.weight, q_t).to(reference_points.dtype)
        weights = torch.addmm(att.bias[:, None], att.weight, q_t).view(heads, levels * points, m).softmax(1)
        refs = reference_points.expand(n, lq, 2).reshape(m, 2).t()
        sizes = self._sizes(shapes, offsets).view(1, levels, 1, 2, 1)
        locations = refs.view(1, 1, 1, 2, m) + offsets.view(heads, levels, points, 2, m) / sizes
        return (locations.view(heads, levels, points, 2, n, lq).permute(4, 5, 0, 1, 2, 3),
                weights.view(heads, levels, points, n, lq).permute(3, 4, 0, 1, 2))
