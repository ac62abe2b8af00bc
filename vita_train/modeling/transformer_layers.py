"""Post-norm attention and feed-forward layers shared by the frame decoder and VITA.

Parameter names follow ``nn.MultiheadAttention`` (packed ``in_proj_weight``) so official weights load
unchanged; tensors are batch-first (N, L, C) throughout.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels as kernels_lib

from .onednn import PackedLinear, PackedWeight, exporting, needs_plain_ops

KV_CONV_MIN_ROWS = 512
# keys from which CPU inference runs the compiled masked attention (kernels/csrc/masked_attention_cpu.cpp)
# instead of scaled_dot_product_attention: 100 queries, 8 heads of 32 channels, one thread, AMD EPYC Zen 4,
# ms SDPA / compiled: 3840 keys bf16 9.4 / 5.4, fp32 8.5 / 5.5; 960 keys 2.3 / 1.3, 2.0 / 1.4; at 240 keys
# and fewer about even (fp32 slower)
NATIVE_ATTENTION_MIN_KEYS = 512


class MultiheadAttention(nn.Module):
    """Multi-head attention with packed q/k/v projections, batch-first, additive or boolean mask."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = PackedLinear(dim, dim, float32=False)
        nn.init.xavier_uniform_(self.in_proj_weight)
        # the q, k and v slices of the packed projection, each in oneDNN's layout on the CPU fast path; float32
        # keys and values of a large feature map as 1x1 convolutions on AVX2 (the frame decoder's 3840 and 960
        # rows of 256 -> 256: 3.24 -> 2.62 and 0.83 -> 0.74 ms, AMD EPYC Zen 2; 240 rows and fewer ran faster
        # as the plain op)
        self.packs = (PackedWeight(float32=False),
                      *(PackedWeight(float32="conv", min_rows=KV_CONV_MIN_ROWS) for _ in range(2)))
        # "reference": scaled_dot_product_attention always (VitaModel.set_kernels)
        self.kernels = "auto"

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("kernels", "auto")  # pickled before the compiled path existed

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """query (N, Lq, C), key/value (N, Lk, C); mask broadcastable to (N, heads, Lq, Lk).

        A boolean mask is True where attention is NOT allowed (the nn.MultiheadAttention convention);
        a float mask is added to the logits.
        """
        n, lq, c = query.shape
        h = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        pq, pk, pv = self.packs
        q, k, v = pq.linear(query, w_q, b_q), pk.linear(key, w_k, b_k), pv.linear(value, w_v, b_v)
        native, shared_mask = self._native_attention(q, k, mask)
        if native:
            # the projections as they lie, heads side by side; the output is what out_proj reads
            return self.out_proj(kernels_lib.native.masked_attention(q, k, v, shared_mask, h))
        q = q.view(n, lq, h, c // h).transpose(1, 2)
        k = k.view(n, -1, h, c // h).transpose(1, 2)
        v = v.view(n, -1, h, c // h).transpose(1, 2)
        if exporting():
            out = _exported_attention(q, k, v, mask)
        else:
            if mask is not None and mask.dtype == torch.bool:
                mask = ~mask  # scaled_dot_product_attention takes True = allowed
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, c))

    def _native_attention(self, q: Tensor, k: Tensor, mask: Optional[Tensor]) -> tuple[bool, Optional[Tensor]]:
        """(whether the compiled masked attention runs, the (N or 1, Lq, Lk) boolean mask to hand it or None).
        It does not run, and scaled_dot_product_attention does, under gradients, export, compilers, on GPUs, with
        reference kernels, float masks or masks per head, and below ``NATIVE_ATTENTION_MIN_KEYS`` keys."""
        n, lq, c = q.shape
        if (self.kernels == "reference" or needs_plain_ops(q, k) or q.device.type != "cpu"
                or q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype
                or k.shape[1] < NATIVE_ATTENTION_MIN_KEYS or c // self.num_heads not in (16, 32, 64)
                or torch.is_autocast_enabled("cpu")):
            return False, None
        if mask is not None:
            if not (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                    and mask.shape[0] in (1, n) and tuple(mask.shape[2:]) == (lq, k.shape[1])
                    and mask.stride(-1) == 1):
                return False, None
            mask = mask[:, 0]
        return kernels_lib.native.available(), mask


def _exported_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """scaled_dot_product_attention written out for export; ``mask`` True = NOT allowed, or additive.

    torch exports SDPA with a NaN clean-up after the softmax (IsNaN + Where over every logit) for rows whose
    mask blocks everything; the decoder never sends such a row (it unmasks them first), and at the finest
    level that clean-up was 30 ms of a frame in ONNX Runtime. The mask becomes additive once, before its
    broadcast over the heads, and the scale goes on the queries (fewer than the keys).
    """
    scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        scores = scores + mask
    return scores.softmax(-1) @ v


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform every matrix of ``module``: how the official layers start training."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """x = LN(x + SelfAttn(q=k=x+pos, v=x))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        xavier_init(self)

    def forward(self, x: Tensor, pos: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """x (N, L, C); pos broadcastable to x."""
        qk = x if pos is None else x + pos
        return self.norm(x + self.self_attn(qk, qk, x, mask))


class CrossAttentionLayer(nn.Module):
    """x = LN(x + Attn(q=x+pos, k=memory+memory_pos, v=memory))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.multihead_attn = MultiheadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        xavier_init(self)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        pos: Optional[Tensor] = None,
        memory_pos: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        memory_key: Optional[Tensor] = None,
    ) -> Tensor:
        """x (N, Lq, C), memory (N, Lk, C); ``memory_key``: memory + memory_pos when the caller has it already
        (the frame decoder's layers that attend to one level share it)."""
        q = x if pos is None else x + pos
        if memory_key is not None:
            k = memory_key
        else:
            k = memory if memory_pos is None else memory + memory_pos
        return self.norm(x + self.multihead_attn(q, k, memory, mask))


class FFNLayer(nn.Module):
    """x = LN(x + W2 ReLU(W1 x)); ``float32``: how the linears pack float32 weights (``PackedWeight``)."""

    def __init__(self, dim: int, hidden: int, float32: Union[bool, str] = False) -> None:
        super().__init__()
        self.linear1 = PackedLinear(dim, hidden, float32=float32)
        self.linear2 = PackedLinear(hidden, dim, float32=float32)
        self.norm = nn.LayerNorm(dim)
        xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., C)."""
        # ReLU inside the first layer's call and the residual inside the second's (on the CPU fast path)
        return self.norm(self.linear2(self.linear1(x, relu=True), residual=x))


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(PackedLinear(a, b, float32=False) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., out_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, relu=i < last)
        return x
