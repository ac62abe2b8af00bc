"""Fused attention kernels for VITA: windowed self-attention over frames and multi-scale deformable attention.

One switch picks the implementation (``mode``):

- ``"reference"``: the plain PyTorch references in ``kernels.reference``;
- ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
- ``"auto"``: Triton on CUDA when it imports, else the fastest exact CPU form (``kernels.cpu``).

This package imports only torch (and triton where installed).
"""

from __future__ import annotations

import functools
import os
import torch
from torch import Tensor

from . import cpu, native, reference

MODES = ("auto", "reference", "triton")


class KernelUnavailableError(RuntimeError):
    """The asked-for kernel cannot run here; the message says why and what to use instead."""


@functools.lru_cache(maxsize=1)
def _triton_module():
    try:
        from . import triton_kernels
    except ImportError:  # triton absent or unusable on this platform
        return None
    return triton_kernels


def triton_importable() -> bool:
    """True when the Triton kernels import (triton installed and usable)."""
    return _triton_module() is not None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def check_mode(mode: str) -> str:
    """``mode`` itself, or a ValueError naming the allowed ones."""
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    return mode


def resolve(mode: str, device_type: str) -> str:
    """The implementation ``mode`` runs on ``device_type``: "reference", "cpu" or "triton"."""
    check_mode(mode)
    if mode == "reference":
        return "reference"
    # triton is imported only where it can run: on a plain CPU "auto" never pays for the import
    runs_triton = (device_type == "cuda" or _interpreted()) and triton_importable()
    if mode == "triton":
        if not runs_triton:
            why = f"tensors are on {device_type}" if device_type != "cuda" else "triton is not importable"
            raise KernelUnavailableError(
                f'kernels="triton" needs CUDA tensors and triton ({why}); use kernels="auto" or "reference" '
                "(CPU tensors run the Triton kernels only under TRITON_INTERPRET=1, for tests)"
            )
        return "triton"
    return "triton" if device_type == "cuda" and runs_triton else "cpu"


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tokens_per_frame: int,
    window: int,
    shifted: bool,
    frame_offset: int = 0,
    mode: str = "auto",
) -> Tensor:
    """Attention of each token to the tokens of the frames in its (shifted) window; (B, heads, T*N, d) in and out.

    Tokens are frame-major, T is any length (no padding). ``window`` 0 is full attention; ``shifted``
    uses the official shifted layout (windows offset by ceil(W/2), the wrapped tail its own window);
    ``frame_offset`` is the absolute index of the first frame when a chunk of a longer clip is given
    (chunks must start and end on window boundaries). Softmax scale 1/sqrt(d).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must all be (B, heads, T*N, d) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if q.shape[-2] % tokens_per_frame:
        raise ValueError(f"{q.shape[-2]} tokens are not a whole number of frames of {tokens_per_frame} tokens")
    impl = resolve(mode, q.device.type)
    if impl == "triton":
        return _triton_module().window_attention(q, k, v, tokens_per_frame, window, shifted, frame_offset)
    fn = reference.window_attention if impl == "reference" else cpu.window_attention
    return fn(q, k, v, tokens_per_frame, window, shifted, frame_offset)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mode: str = "auto") -> tuple[Tensor, Tensor]:
    """Unmasked attention and each query's log-sum-exp, the signature of ``kernels.reference.attention_with_lse``.

    What the decoder's cross-attention needs to read the tokens in chunks. The CPU form is the fused flash
    kernel; elsewhere the reference (100 queries: the scores are small).
    """
    if resolve(mode, q.device.type) == "cpu" and q.dtype == torch.float32:
        return cpu.attention_with_lse(q, k, v)
    return reference.attention_with_lse(q, k, v)


def ms_deform_attn(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor, mode: str = "auto"
) -> Tensor:
    """Multi-scale deformable attention sampling, the signature of ``kernels.reference.ms_deform_attn``."""
    _check_deform_inputs(value, shapes, locations, weights)
    impl = resolve(mode, value.device.type)
    if impl == "triton":
        return _triton_module().ms_deform_attn(value, shapes, locations, weights)
    needs_grad = any(t.requires_grad for t in (value, locations, weights))
    # the CPU form is the faster forward; for training grid_sample's backward measured faster
    if impl == "reference" or (needs_grad and torch.is_grad_enabled()):
        return reference.ms_deform_attn(value, shapes, locations, weights)
    return cpu.ms_deform_attn(value, shapes, locations, weights)


def _check_deform_inputs(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> None:
    """Name what does not fit together (every form failed deep inside, in a split or a reshape, otherwise)."""
    if value.dim() != 4 or locations.dim() != 6 or weights.dim() != 5:
        raise ValueError(f"value must be (N, S, heads, D), locations (N, Lq, heads, levels, points, 2) and weights "
                         f"(N, Lq, heads, levels, points); got {tuple(value.shape)}, {tuple(locations.shape)} and "
                         f"{tuple(weights.shape)}")
    n, s, heads, _ = value.shape
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"the levels' sizes {list(shapes)} hold {sum(h * w for h, w in shapes)} positions, value {s}")
    expected = (n, locations.shape[1], heads, len(shapes), locations.shape[4])
    if tuple(locations.shape) != (*expected, 2) or tuple(weights.shape) != expected:
        raise ValueError(f"locations must be {(*expected, 2)} and weights {expected} for this value and "
                         f"{len(shapes)} levels; got {tuple(locations.shape)} and {tuple(weights.shape)}")


def native_ms_deform_attn_usable(*tensors: Tensor) -> bool:
    """True when ``kernels.native.ms_deform_attn_from_projections`` can run on these inputs: the compiled CPU
    kernels built here, CPU tensors of one dtype (float32 or bfloat16), and no gradient asked for."""
    if not tensors or any(t.device.type != "cpu" or t.dtype != tensors[0].dtype for t in tensors):
        return False
    if tensors[0].dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return native.available()


__all__ = [
    "MODES", "KernelUnavailableError", "attention_with_lse", "check_mode", "cpu", "ms_deform_attn", "native",
    "native_ms_deform_attn_usable", "reference", "resolve",
    "triton_importable", "window_attention",
]
