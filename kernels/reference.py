"""Plain PyTorch references: what every fused kernel in this package must compute.

They favour obviousness over speed (the window reference builds a dense token mask) and are what
tests/test_kernels.py holds the CPU forms and the Triton kernels to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def frame_groups(num_frames: int, window: int, shifted: bool, frame_offset: int = 0, device=None) -> Tensor:
    """Window id of each frame (num_frames,): frames attend to each other iff their ids are equal.

    Plain windows are [kW, (k+1)W). The official shifted layout rolls the padded clip by h = ceil(W/2)
    and masks the wrapped tail of the first window off its head; on real frames that is exactly
    windows [kW - h, (k+1)W - h), the tail beyond the last full window being a window of its own.
    ``window`` 0 is full attention (one group). ``frame_offset`` is the absolute index of frame 0.
    """
    frames = torch.arange(num_frames, device=device) + frame_offset
    if window == 0:
        return torch.zeros_like(frames)
    shift = math.ceil(window / 2) if shifted else 0
    return torch.div(frames + shift, window, rounding_mode="floor")


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int, window: int, shifted: bool, frame_offset: int = 0
) -> Tensor:
    """Softmax(q k^T / sqrt(d)) v restricted to each token's (shifted) window of frames.

    q, k, v (B, heads, T*N, d), tokens frame-major (N = ``tokens_per_frame``); returns (B, heads, T*N, d).
    """
    length = q.shape[-2]
    if length % tokens_per_frame:
        raise ValueError(f"{length} tokens are not a whole number of frames of {tokens_per_frame} tokens")
    groups = frame_groups(length // tokens_per_frame, window, shifted, frame_offset, q.device)
    groups = groups.repeat_interleave(tokens_per_frame)
    allowed = groups[:, None] == groups[None, :]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax(q k^T / sqrt(d)) v and the log-sum-exp of each query's scaled scores.

    q (B, heads, Lq, d), k and v (B, heads, Lk, d); returns (B, heads, Lq, d) and (B, heads, Lq). The
    log-sum-exp lets attention over keys given in chunks be combined exactly (online softmax).
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = scores.logsumexp(-1)
    return ((scores - lse.unsqueeze(-1)).exp() @ v.float()).to(q.dtype), lse


def ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Weighted bilinear samples of every level (Deformable DETR's multi-scale deformable attention).

    value (N, S, heads, D) with S = sum(H_l*W_l), levels in ``shapes`` order;
    locations (N, Lq, heads, levels, points, 2) as (x, y) in [0, 1] (outside reads zeros);
    weights (N, Lq, heads, levels, points). Returns (N, Lq, heads*D). Bilinear, align_corners False.
    """
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1
    per_level = value.split([h * w for h, w in shapes], dim=1)
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


def ms_deform_attn_from_projections(
    value: Tensor, shapes: list[tuple[int, int]], reference_points: Tensor, offsets: Tensor, logits: Tensor,
    levels: int, points: int,
) -> Tensor:
    """Deformable attention from the raw outputs of its two projections (what ``MSDeformAttn`` computes).

    value (N, S, heads, D); reference_points (1 or N, Lq, 2) as (x, y) in [0, 1]; offsets
    (N, Lq, heads*levels*points*2) in pixels of each level, (x, y) innermost; logits (N, Lq, heads*levels*points),
    softmaxed over each head's levels*points. Positions and weights in at least float32, then
    ``ms_deform_attn``. Returns (N, Lq, heads*D) in value's dtype.
    """
    n, lq = offsets.shape[:2]
    heads = value.shape[2]
    dt = torch.promote_types(reference_points.dtype, torch.float32)
    off = offsets.to(dt).view(n, lq, heads, levels, points, 2)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=dt, device=offsets.device).view(1, 1, 1, levels, 1, 2)
    locations = reference_points.to(dt)[:, :, None, None, None, :] + off / sizes
    weights = logits.to(dt).view(n, lq, heads, levels * points).softmax(-1).view(n, lq, heads, levels, points)
    return ms_deform_attn(value.to(dt), shapes, locations, weights).to(value.dtype)
