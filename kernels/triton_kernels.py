"""Triton kernels (CUDA; on the CPU under TRITON_INTERPRET=1 for tests): windowed attention and MSDA.

``window_attention``: flash-style online softmax; each query block walks only the keys of the
windows its queries fall in, the window of a frame computed from indices (no mask tensor, no roll,
no padding). Dots run in fp32 (``input_precision="ieee"``) so results stay within 1e-5 of the
reference; the backward recomputes through the folded-SDPA form.

``ms_deform_attn``: forward and backward. One program per (sample, head, block of queries) visits
each level and point, reads the four bilinear taps as contiguous D-vectors and accumulates; the
backward scatters value gradients with atomic adds and writes location and weight gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cpu


@triton.jit
def _window_attn_fwd(
    Q, K, V, O,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
    heads, length, tokens_per_frame, window, offset, num_frames, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < length
    d_ok = offs_d < D
    q_ptr = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_l + offs_d[None, :]
    q = tl.load(q_ptr, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    # window id of a frame f: (f + offset) // window, offset = frame offset + shift
    g_q = (offs_m // tokens_per_frame + offset) // window
    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, length) - 1
    g_first = (first // tokens_per_frame + offset) // window
    g_last = (last // tokens_per_frame + offset) // window
    k_lo = tl.maximum(g_first * window - offset, 0) * tokens_per_frame
    k_hi = tl.minimum((g_last + 1) * window - offset, num_frames) * tokens_per_frame
    # finite start: a row with no allowed key in a block keeps exp(-inf - m) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_hi
        k_ptr = K + b.to(tl.int64) * sk_b + h * sk_h + offs_n[None, :].to(tl.int64) * sk_l + offs_d[:, None]
        k = tl.load(k_ptr, mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, k, input_precision="ieee") * scale
        g_k = (offs_n // tokens_per_frame + offset) // window
        s = tl.where((g_q[:, None] == g_k[None, :]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = V + b.to(tl.int64) * sv_b + h * sv_h + offs_n[:, None].to(tl.int64) * sv_l + offs_d[None, :]
        v = tl.load(v_ptr, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptr = O + b.to(tl.int64) * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_l + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _window_forward(q: Tensor, k: Tensor, v: Tensor, n: int, window: int, shifted: bool, frame_offset: int) -> Tensor:
    b, heads, length, d = q.shape
    num_frames = length // n
    if window == 0:  # full attention: one window holding every frame
        window, offset = num_frames + 1, 0
    else:
        offset = frame_offset + (math.ceil(window / 2) if shifted else 0)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, heads, length, d, device=q.device, dtype=q.dtype)
    block_m, block_n = 64, 64
    grid = (triton.cdiv(length, block_m), b * heads)
    _window_attn_fwd[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, length, n, window, offset, num_frames, d ** -0.5,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, n, window, shifted, frame_offset):
        ctx.save_for_backward(q, k, v)
        ctx.args = (n, window, shifted, frame_offset)
        return _window_forward(q, k, v, n, window, shifted, frame_offset)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = cpu.window_attention(*inputs, *ctx.args)
            grads = torch.autograd.grad(out, inputs, grad)
        return (*grads, None, None, None, None)


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int, window: int, shifted: bool, frame_offset: int = 0
) -> Tensor:
    """``kernels.reference.window_attention`` as one Triton kernel (backward through the folded SDPA form)."""
    return _WindowAttention.apply(q, k, v, tokens_per_frame, window, shifted, frame_offset)


@triton.jit
def _point(LOC, AW, SHAPES, STARTS, idx, q_ok, lvl: tl.constexpr):
    """One sampling point of a block of queries: level size and start, weight, top-left tap and fractions."""
    hl = tl.load(SHAPES + 2 * lvl)
    wl = tl.load(SHAPES + 2 * lvl + 1)
    start = tl.load(STARTS + lvl)
    lx = tl.load(LOC + 2 * idx, mask=q_ok, other=0.0).to(tl.float32)
    ly = tl.load(LOC + 2 * idx + 1, mask=q_ok, other=0.0).to(tl.float32)
    a = tl.load(AW + idx, mask=q_ok, other=0.0).to(tl.float32)
    # align_corners False: pixel centres sit at (i + 0.5) / size
    px = lx * wl - 0.5
    py = ly * hl - 0.5
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return hl, wl, start, a, x0f.to(tl.int32), y0f.to(tl.int32), px - x0f, py - y0f


@triton.jit
def _tap(x0, y0, fx, fy, hl, wl, start, q_ok, c: tl.constexpr):
    """Corner c (0..3, row-major) of the bilinear footprint: in-bounds mask, x and y weights, value row."""
    dx = c % 2
    dy = c // 2
    xi = x0 + dx
    yi = y0 + dy
    ok = q_ok & (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl)
    wx = fx if dx == 1 else 1.0 - fx
    wy = fy if dy == 1 else 1.0 - fy
    return ok, wx, wy, (start + yi * wl + xi).to(tl.int64)


@triton.jit
def _query_block(
    num_values, num_queries, heads,
    D: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's block of queries of one (sample, head): channel offsets, query and channel masks, each
    query's first sampling-point row, its output row in (N, Lq, heads) and the offset of its value table."""
    n = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    out_row = (n * num_queries + offs_q).to(tl.int64) * heads + h
    v_off = n.to(tl.int64) * num_values * heads * D + h * D
    return offs_d, offs_q < num_queries, offs_d < D, out_row * (LEVELS * POINTS), out_row, v_off


@triton.jit
def _msda_fwd(
    V, LOC, AW, OUT, SHAPES, STARTS,
    num_values, num_queries, heads,
    D: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_d, q_ok, d_ok, row_q, out_row, v_off = _query_block(num_values, num_queries, heads, D, LEVELS, POINTS, BLOCK_Q, BLOCK_D)
    v_base = V + v_off
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for lvl in tl.static_range(LEVELS):
        for p in tl.static_range(POINTS):
            idx = row_q + lvl * POINTS + p
            hl, wl, start, a, x0, y0, fx, fy = _point(LOC, AW, SHAPES, STARTS, idx, q_ok, lvl)
            for c in tl.static_range(4):
                ok, wx, wy, row = _tap(x0, y0, fx, fy, hl, wl, start, q_ok, c)
                vals = tl.load(v_base + row[:, None] * (heads * D) + offs_d[None, :],
                               mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += (a * wx * wy)[:, None] * vals
    out_ptr = OUT + out_row[:, None] * D + offs_d[None, :]
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _msda_bwd(
    V, LOC, AW, GRAD, SHAPES, STARTS, GV, GLOC, GAW,
    num_values, num_queries, heads,
    D: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_d, q_ok, d_ok, row_q, out_row, v_off = _query_block(num_values, num_queries, heads, D, LEVELS, POINTS, BLOCK_Q, BLOCK_D)
    g_ptr = GRAD + out_row[:, None] * D + offs_d[None, :]
    g = tl.load(g_ptr, mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    for lvl in tl.static_range(LEVELS):
        for p in tl.static_range(POINTS):
            idx = row_q + lvl * POINTS + p
            hl, wl, start, a, x0, y0, fx, fy = _point(LOC, AW, SHAPES, STARTS, idx, q_ok, lvl)
            grad_a = tl.zeros([BLOCK_Q], tl.float32)
            grad_fx = tl.zeros([BLOCK_Q], tl.float32)
            grad_fy = tl.zeros([BLOCK_Q], tl.float32)
            for c in tl.static_range(4):
                ok, wx, wy, row = _tap(x0, y0, fx, fy, hl, wl, start, q_ok, c)
                dx = c % 2
                dy = c // 2
                ptr = row[:, None] * (heads * D) + offs_d[None, :] + v_off
                mask = ok[:, None] & d_ok[None, :]
                vals = tl.load(V + ptr, mask=mask, other=0.0).to(tl.float32)
                gv = tl.sum(g * vals, 1)  # <grad_out, v_corner>
                grad_a += wx * wy * gv
                # d(wx)/d(fx) is +1 for the right column, -1 for the left; likewise for rows
                grad_fx += (1.0 if dx == 1 else -1.0) * wy * gv
                grad_fy += (1.0 if dy == 1 else -1.0) * wx * gv
                tl.atomic_add(GV + ptr, (a * wx * wy)[:, None] * g, mask=mask)
            tl.store(GAW + idx, grad_a, mask=q_ok)
            tl.store(GLOC + 2 * idx, a * grad_fx * wl, mask=q_ok)
            tl.store(GLOC + 2 * idx + 1, a * grad_fy * hl, mask=q_ok)


def _level_tables(shapes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += h * w
    table = torch.tensor([v for hw in shapes for v in hw], dtype=torch.int32, device=device)
    return table, torch.tensor(starts, dtype=torch.int32, device=device)


_BLOCK_Q = 64


class _MSDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, locations, weights):
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        n, s, heads, d = value.shape
        _, lq, _, levels, points, _ = locations.shape
        table, starts = _level_tables(shapes, value.device)
        out = torch.empty(n, lq, heads * d, device=value.device, dtype=value.dtype)
        grid = (triton.cdiv(lq, _BLOCK_Q), n * heads)
        _msda_fwd[grid](
            value, locations, weights, out, table, starts, s, lq, heads,
            D=d, LEVELS=levels, POINTS=points, BLOCK_Q=_BLOCK_Q, BLOCK_D=triton.next_power_of_2(d),
        )
        ctx.save_for_backward(value, locations, weights, table, starts)
        return out

    @staticmethod
    def backward(ctx, grad):
        value, locations, weights, table, starts = ctx.saved_tensors
        n, s, heads, d = value.shape
        _, lq, _, levels, points, _ = locations.shape
        grad = grad.contiguous()
        # fp32 accumulators: atomic adds of many taps into one value row
        g_value = torch.zeros(value.shape, device=value.device, dtype=torch.float32)
        g_loc = torch.empty(locations.shape, device=value.device, dtype=torch.float32)
        g_w = torch.empty(weights.shape, device=value.device, dtype=torch.float32)
        grid = (triton.cdiv(lq, _BLOCK_Q), n * heads)
        _msda_bwd[grid](
            value, locations, weights, grad, table, starts, g_value, g_loc, g_w, s, lq, heads,
            D=d, LEVELS=levels, POINTS=points, BLOCK_Q=_BLOCK_Q, BLOCK_D=triton.next_power_of_2(d),
        )
        return g_value.to(value.dtype), None, g_loc.to(locations.dtype), g_w.to(weights.dtype)


def ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """``kernels.reference.ms_deform_attn`` as Triton forward and backward kernels."""
    return _MSDeformAttn.apply(value, [tuple(map(int, s)) for s in shapes], locations, weights)
