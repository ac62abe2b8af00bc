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
from typing import Collection, Optional

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


class MklPackedLinear:
    """``F.linear`` through MKL's packed GEMM: each weight is packed once per row count and reused.

    For the token engine, which runs its layers' weights as plain parameters over row blocks; the detector's
    layers are ``vita_train.modeling.onednn.PackedLinear`` modules (one oneDNN pack each, fp32 and bf16).

    Blocks of a few hundred rows make the weights' repacking (what a plain GEMM call does every time) a
    large part of the cost; measured here, packed blocks of 512-1024 rows ran at the 2048^3 matmul rate
    and plain ``F.linear`` at about 80% of it. The packs belong to the weights as they are now: make a
    new instance when they change. Where MKL is absent, or for inputs it does not take (not 2-D fp32,
    needing grad), it is ``F.linear`` itself.
    """

    def __init__(self, rows: Optional[Collection[int]] = None) -> None:
        # row counts worth a pack (each is megabytes): the ones nearly every call has; others run F.linear
        self.rows = None if rows is None else frozenset(rows)
        self._packs: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.enabled = torch.backends.mkl.is_available()

    def __call__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``F.linear(x, weight, bias)``."""
        if not (self.enabled and x.dim() == 2 and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight, bias)
        rows = x.shape[0]
        if rows < 128 or min(weight.shape) < 128 or (self.rows is not None and rows not in self.rows):
            return F.linear(x, weight, bias)
        key = (id(weight), rows)
        entry = self._packs.get(key)
        if entry is None:  # the weight is kept with its pack: its id cannot be reused while the pack lives
            entry = self._packs[key] = (weight, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows))
        return torch.ops.mkl._mkl_linear(x, entry[1], weight.detach(), None if bias is None else bias.detach(), rows)


def _bordered_values(value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """``value`` (N, S, heads, D) with every level framed by zero pixels: 1 before and 2 after, on both axes.

    A bilinear tap outside its level then reads a zero instead of being masked, and a clamped position
    keeps both of its taps inside the frame.
    """
    n, _, heads, d = value.shape
    levels = [
        F.pad(part.view(n, h, w, heads * d), (0, 0, 1, 2, 1, 2)).view(n, (h + 3) * (w + 3), heads, d)
        for part, (h, w) in zip(value.split([h * w for h, w in shapes], dim=1), shapes)
    ]
    return torch.cat(levels, 1) if len(levels) > 1 else levels[0]


def _column_major(locations: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``locations`` as (heads, levels, points, 2, N*Lq) and ``weights`` as (heads, levels, points, N*Lq).

    Views when the caller computed them query-minor (``MSDeformAttn`` does on the CPU), copies otherwise.
    """
    n, lq, heads, levels, points, _ = locations.shape
    loc = locations.permute(2, 3, 4, 5, 0, 1).reshape(heads, levels, points, 2, n * lq)
    return loc, weights.permute(2, 3, 4, 0, 1).reshape(heads, levels, points, n * lq)


def _taps(loc: Tensor, a: Tensor, shapes: list[tuple[int, int]], rows_per_sample: int, lq: int, start: int):
    """Rows of the bordered value table and weights (M*heads, 4*levels*points) of every bilinear tap of M queries.

    ``loc`` (heads, levels, points, 2, M) and ``a`` (heads, levels, points, M) are queries ``start`` ..
    ``start + M`` of the N*Lq, query-minor (``_column_major``).

    Positions are in bordered pixels (pixel i of a level sits at i + 1), clamped into [0, size + 1]: a tap
    outside the level lands on the zero border, so no mask, comparison or branch is needed, and a
    position off the level on either axis gets zeros from both of that axis' taps (grid_sample's zeros
    padding). Rows index ``bordered.reshape(N*S'*heads, D)``.

    The arithmetic runs query-minor: every per-level or per-head constant broadcasts over one long
    contiguous run of queries (an op that broadcasts over a short inner axis is an order of magnitude
    slower). Three (heads*levels*points, M) planes are then transposed to query-major, and the 4-fold tap
    expansion is written in the bag-major layout (M, heads, 4, levels*points) that ``embedding_bag``
    reads; a bag's tap order does not matter.
    """
    heads, levels, points, _, m = loc.shape
    dev, dt = loc.device, loc.dtype
    i32 = dict(device=dev, dtype=torch.int32)
    sizes = torch.tensor([[w, h] for h, w in shapes], device=dev, dtype=dt).view(1, levels, 1, 2, 1)
    pix = loc * sizes
    for lvl, (h, w) in enumerate(shapes):  # scalar bounds: clamp_ is vectorised, a broadcast minimum is not
        for axis, size in enumerate((w, h)):
            pix[:, lvl, :, axis].add_(0.5).clamp_(0, size + 1)  # align_corners False, +1 border
    low = pix.floor()
    frac = pix.sub_(low)
    low = low.to(torch.int32)
    widths = torch.tensor([w + 3 for _, w in shapes], **i32).view(1, levels, 1, 1)
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += (h + 3) * (w + 3)
    # per (head, level): the row of bordered pixel (0, 0) of that level; per query: its sample's rows
    base = (torch.tensor(starts, **i32).view(1, levels, 1, 1) * heads + torch.arange(heads, **i32).view(heads, 1, 1, 1))
    sample = torch.div(torch.arange(start, start + m, **i32), lq, rounding_mode="floor") * rows_per_sample
    first = torch.addcmul(low[:, :, :, 0], low[:, :, :, 1], widths).mul_(heads).add_(base).add_(sample)
    a = a.to(dt)
    ay1 = a * frac[:, :, :, 1]
    ay0 = a - ay1  # weight * (1 - fy)
    k = levels * points
    planes = torch.stack((ay0, ay1, frac[:, :, :, 0])).view(3 * heads * k, m).t().contiguous().view(m, 3, heads, k)
    ay0, ay1, fx = planes.unbind(1)
    first = first.view(heads * k, m).t().contiguous().view(m, heads, 1, k)
    # the 4 taps' row offsets per level: (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    step = (widths.view(1, levels, 1) * torch.tensor([0, 0, 1, 1], **i32).view(4, 1, 1)
            + torch.tensor([0, 1, 0, 1], **i32).view(4, 1, 1)) * heads  # (4, levels, 1)
    rows = first + step.expand(4, levels, points).reshape(4, k)  # (M, heads, 4, levels*points)
    ay0x1, ay1x1 = ay0 * fx, ay1 * fx
    taps = torch.stack((ay0 - ay0x1, ay0x1, ay1 - ay1x1, ay1x1), dim=2)  # the same layout as rows
    return rows.view(m * heads, 4 * k), taps.view(m * heads, 4 * k)


# queries per block of the index math: bounds its dozen planes (~2 KB per query at once otherwise, 40 MB
# for a 2-frame 360x640 batch); measured here as fast as one block or slightly faster, 512 was slower
MSDA_BLOCK = 2048


def ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """``kernels.reference.ms_deform_attn`` as weighted ``embedding_bag`` calls over the value rows."""
    n, lq, heads, d = locations.shape[0], locations.shape[1], value.shape[2], value.shape[3]
    table = _bordered_values(value, shapes)
    rows_per_sample = table.shape[1] * heads
    table = table.view(-1, d)
    loc, a = _column_major(locations, weights)
    blocks = []
    for start in range(0, n * lq, MSDA_BLOCK):
        stop = min(start + MSDA_BLOCK, n * lq)
        rows, taps = _taps(loc[..., start:stop], a[..., start:stop], shapes, rows_per_sample, lq, start)
        blocks.append(F.embedding_bag(rows, table, mode="sum", per_sample_weights=taps.to(value.dtype)))
    out = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    return out.view(n, lq, heads * d)
