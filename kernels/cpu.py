"""The fastest exact CPU forms measured here (see benchmarks/kernels.py): no mask tensors, no padding.

``window_attention``: the frames fall into at most three runs (a short head window, full windows,
a short tail window); the full windows fold into the batch and each run is one
``scaled_dot_product_attention`` call without a mask (its fused CPU kernel, never a (L, L) bias).

``ms_deform_attn``: each output row (sample, query, head) is a weighted sum of 4 * levels * points
rows of the value table, which is exactly ``embedding_bag(mode="sum", per_sample_weights=...)``: one
fused gather-multiply-add over contiguous D-vectors (grid_sample gathers channel planes one by one).
The bilinear corner weights carry the sampling position, so autograd gives every gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def window_runs(num_frames: int, window: int, shifted: bool, frame_offset: int = 0) -> list[tuple[int, int, int]]:
    """(start_frame, frames_per_window, num_windows) runs covering [0, num_frames) window by window."""
    if window == 0 or num_frames == 0:
        return [(0, num_frames, 1)] if num_frames else []
    shift = math.ceil(window / 2) if shifted else 0
    # frames before the first window boundary at or after frame 0 form a short head window
    head = (-(frame_offset + shift)) % window
    head = min(head, num_frames)
    runs = [(0, head, 1)] if head else []
    full = (num_frames - head) // window
    if full:
        runs.append((head, window, full))
    tail = num_frames - head - full * window
    if tail:
        runs.append((head + full * window, tail, 1))
    return runs


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int, window: int, shifted: bool, frame_offset: int = 0
) -> Tensor:
    """``kernels.reference.window_attention`` through one mask-free SDPA call per run of equal windows."""
    b, heads, length, d = q.shape
    n = tokens_per_frame
    runs = window_runs(length // n, window, shifted, frame_offset)
    if len(runs) == 1 and runs[0][2] == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # (B, T*N, heads, d) storage: the caller's usual next step, transpose(1, 2).reshape(B, T*N, C), is free
    out = q.new_empty(b, length, heads, d) if len(runs) > 1 else None
    for start, frames, count in runs:
        lo, hi = start * n, (start + frames * count) * n
        # windows folded into the batch: 4-D inputs reach the fused SDPA kernel (5-D ones fall back to
        # the unfused math path, measured 7x slower here); for B = 1 the folds are views of q, k, v
        parts = [
            t[:, :, lo:hi].reshape(b, heads, count, frames * n, d).transpose(1, 2).reshape(b * count, heads, frames * n, d)
            for t in (q, k, v)
        ]
        res = F.scaled_dot_product_attention(*parts)  # (B*count, heads, frames*N, d), (.., frames*N, heads, d) storage
        res = res.view(b, count, heads, frames * n, d).transpose(2, 3)
        if out is None:  # one run: its result already is the whole output, no copy
            return res.reshape(b, length, heads, d).transpose(1, 2)
        out[:, lo:hi].view(b, count, frames * n, heads, d).copy_(res)
    return out.transpose(1, 2)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``kernels.reference.attention_with_lse`` through the fused CPU flash-attention kernel (strided inputs as they are)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse


class PackedLinear:
    """``F.linear`` through MKL's packed GEMM: each weight is packed once per row count and reused.

    Blocks of a few hundred rows make the weights' repacking (what a plain GEMM call does every time) a
    large part of the cost; measured here, packed blocks of 512-1024 rows ran at the 2048^3 matmul rate
    and plain ``F.linear`` at about 80% of it. The packs belong to the weights as they are now: make a
    new instance when they change. Where MKL is absent, or for inputs it does not take (not 2-D fp32,
    needing grad), it is ``F.linear`` itself.
    """

    def __init__(self) -> None:
        self._packs: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.enabled = torch.backends.mkl.is_available()

    def __call__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``F.linear(x, weight, bias)``."""
        if not (self.enabled and x.dim() == 2 and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight, bias)
        rows = x.shape[0]
        if rows < 128 or min(weight.shape) < 128:  # a pack costs megabytes and its set-up: not for small GEMMs
            return F.linear(x, weight, bias)
        key = (id(weight), rows)
        entry = self._packs.get(key)
        if entry is None:  # the weight is kept with its pack: its id cannot be reused while the pack lives
            entry = self._packs[key] = (weight, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows))
        return torch.ops.mkl._mkl_linear(x, entry[1], weight.detach(), None if bias is None else bias.detach(), rows)


def _taps(locations: Tensor, weights: Tensor, shapes: list[tuple[int, int]], heads: int, rows_per_sample: int):
    """Value-table rows and weights (N*Lq*heads, 4*levels*points) of every bilinear tap.

    A tap outside its level gets weight 0 and a clamped (valid) row: zero padding without a branch
    or a mask tensor. Rows index ``value.reshape(N*S*heads, D)``. Every intermediate is a contiguous
    (N, Lq, heads, levels, points) tensor: strided or broadcast element-wise ops cost several times more.
    """
    n, lq, _, levels, points, _ = locations.shape
    dev, dt = locations.device, locations.dtype
    shape = (1, 1, 1, levels, 1)
    widths = torch.tensor([w for _, w in shapes], device=dev, dtype=torch.int32).view(shape)
    heights = torch.tensor([h for h, _ in shapes], device=dev, dtype=torch.int32).view(shape)
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += h * w
    # per (sample, head, level): the row of pixel (0, 0) of that level for that head
    base = (torch.arange(n, device=dev, dtype=torch.int32).view(n, 1, 1, 1, 1) * rows_per_sample
            + torch.arange(heads, device=dev, dtype=torch.int32).view(1, 1, heads, 1, 1)
            + torch.tensor(starts, device=dev, dtype=torch.int32).view(shape) * heads)

    def axis(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # align_corners False: pixel centres sit at (i + 0.5) / size
        pix = coord * size.to(dt) - 0.5
        low = pix.floor()
        frac = pix - low
        low = low.to(torch.int32)
        lim = size - 1
        w0 = (1 - frac) * ((low >= 0) & (low <= lim))
        w1 = frac * ((low >= -1) & (low < lim))
        return low.clamp(min=0).minimum(lim), (low + 1).clamp(min=0).minimum(lim), w0, w1

    x0, x1, wx0, wx1 = axis(locations[..., 0].contiguous(), widths)
    y0, y1, wy0, wy1 = axis(locations[..., 1].contiguous(), heights)
    stride_y = widths * heads
    row_y0, row_y1 = base + y0 * stride_y, base + y1 * stride_y
    x0, x1 = x0 * heads, x1 * heads
    wy0, wy1 = wy0 * weights, wy1 * weights
    bags = n * lq * heads
    # bag entries ordered (tap, level, point): each tap writes contiguous runs
    rows = torch.stack([row_y0 + x0, row_y0 + x1, row_y1 + x0, row_y1 + x1], dim=3)
    taps = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=3)
    return rows.view(bags, 4 * levels * points), taps.view(bags, 4 * levels * points)


def ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """``kernels.reference.ms_deform_attn`` as one weighted ``embedding_bag`` over the value rows."""
    n, s, heads, d = value.shape
    lq = locations.shape[1]
    rows, taps = _taps(locations, weights, shapes, heads, s * heads)
    out = F.embedding_bag(rows, value.reshape(n * s * heads, d), mode="sum", per_sample_weights=taps.to(value.dtype))
    return out.view(n, lq, heads * d)
