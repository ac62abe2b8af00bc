"""Compiled CPU kernels (``kernels/csrc``), built on first use with the C++ compiler torch finds.

The build takes about a minute once per machine and torch version and is cached by torch (under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Where it cannot be built (no compiler, no
ninja, an unusual platform) or ``VITA_NATIVE_KERNELS=0`` is set, ``available()`` is False, one warning says
why, and callers use the torch-op forms in ``kernels.cpu``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (_CSRC / "ms_deform_attn_cpu.cpp", _CSRC / "winograd_cpu.cpp", _CSRC / "masked_attention_cpu.cpp")
_HEADERS = (_CSRC / "ms_deform_attn_core.h", _CSRC / "fast_math.h", _CSRC / "winograd_core.h",
            _CSRC / "thread_count.h")
# instruction sets by torch's own CPU capability: never -march=native, which would tie a cached build to
# instructions (AMX, AVX-512-BF16) another CPU sharing the cache directory may lack
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _header_digest() -> str:
    return hashlib.sha256(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:10]


@functools.lru_cache(maxsize=1)
def _library() -> bool:
    if not hasattr(torch.ops.vita_kernels, "msda_fused"):
        capability = torch.backends.cpu.get_cpu_capability()
        # torch's extension module warns "No CUDA runtime is found" on a GPU-less host with a CUDA toolkit
        # installed; these sources are CPU-only, so that line would only mislead
        torch_log = logging.getLogger("torch.utils.cpp_extension")
        level = torch_log.level
        torch_log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension

            cpp_extension.load(
                # the header's hash in the name: torch rebuilds on a changed source file, not on a changed header
                name=f"vita_kernels_cpu_{capability.lower()}_{_header_digest()}",
                sources=[str(x) for x in _SOURCES],
                # no trapping math, as the torch-free builds (runtime/native_build.BASE_FLAGS): the tap positions'
                # floor and integer conversions vectorise; values are unchanged
                extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *_ISA_FLAGS.get(capability, [])],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:  # a missing compiler shows up as many exception types
            lines = str(e).strip().splitlines()
            log.warning("the native CPU kernels could not be built (%s: %s); using the slower torch-op forms. "
                        "Install a C++ compiler and ninja (pip install ninja) for them, or set VITA_NATIVE_KERNELS=0 "
                        "to skip the build.", type(e).__name__, lines[-1] if lines else "")
            return False
        finally:
            torch_log.setLevel(level)
    _register_shapes()
    return True


def _register_shapes() -> None:
    """The op's output shape for torch.compile: without it every deformable-attention call broke the graph,
    and the encoder's loop of them ran eagerly."""
    try:
        torch.library.register_fake("vita_kernels::msda_fused")(_msda_fused_shape)
    except RuntimeError as e:  # registered already (the library was loaded before, in this process)
        log.debug("msda_fused's fake kernel: %s", e)


def _msda_fused_shape(value: Tensor, shapes: list[int], refs: Tensor, offsets: Tensor, logits: Tensor,
                      levels: int, points: int) -> Tensor:
    """What ``msda_fused`` returns, without computing it: (N, Lq, heads * D) in the value's dtype."""
    return value.new_empty((value.shape[0], offsets.shape[1], value.shape[2] * value.shape[3]))


def available() -> bool:
    """True when the compiled CPU kernels are loaded (building them on the first call) and not turned off
    with ``VITA_NATIVE_KERNELS=0`` (read at every eager call; a compiled graph keeps what it saw)."""
    if os.environ.get("VITA_NATIVE_KERNELS", "1") == "0":
        return False
    return _library()


def mark_constant_for_compilers() -> None:
    """Let torch.compile take ``available()``'s answer as a constant of the graph it builds instead of tracing
    into the cached loader. The compiled paths call this just before compiling; as a decorator at import it
    imported torch._dynamo into every process: 150 MB of resident memory and 1.2 s that eager inference never
    uses (``torch.compiler.assume_constant_result`` marks the function itself and returns it)."""
    torch.compiler.assume_constant_result(available)


def ms_deform_attn_from_projections(
    value: Tensor, shapes: list[tuple[int, int]], reference_points: Tensor, offsets: Tensor, logits: Tensor,
    levels: int, points: int,
) -> Tensor:
    """``kernels.reference.ms_deform_attn_from_projections`` in one compiled pass (CPU, fp32 or bf16, no autograd)."""
    if not available():
        raise RuntimeError("the native CPU kernels are not available here (see the warning logged when they were "
                           "built); check kernels.native.available() first")
    flat = [int(s) for hw in shapes for s in hw]
    refs = reference_points.to(torch.float32).contiguous()
    return torch.ops.vita_kernels.msda_fused(value.contiguous(), flat, refs, offsets, logits, levels, points)


def winograd_input(x: Tensor, tile: int, rows: tuple[int, int]) -> Tensor:
    """Channels-last float32 or bfloat16 (N, C, H, W) -> float32 (tiles, (tile+2)^2, C): the 3x3-conv input
    window (padding 1) of every tile x tile block of output rows [rows[0], rows[1]), in the Winograd domain (B^T d B)."""
    if not available():
        raise RuntimeError("the native CPU kernels are not available here; check kernels.native.available() first")
    return torch.ops.vita_kernels.winograd_input(x, tile, rows[0], rows[1])


def winograd_output(products: Tensor, bias: Optional[Tensor], relu: bool, out: Tensor, rows: tuple[int, int],
                    tile: int) -> None:
    """Float32 Winograd-domain products (tiles, (tile+2)^2, C) -> output rows [rows[0], rows[1]) of the
    channels-last float32 or bfloat16 ``out`` (N, C, H, W), written in place: A^T m A per tile, plus ``bias``,
    then ReLU when ``relu`` (rounded once to bfloat16 at the end)."""
    if not available():
        raise RuntimeError("the native CPU kernels are not available here; check kernels.native.available() first")
    torch.ops.vita_kernels.winograd_output(products, bias, relu, out, rows[0], rows[1], tile)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head, keys where ``mask`` is True left out: q (N, Lq, C), k and v (N, Lk, C)
    (head h is channels [h*d, (h+1)*d)), mask None or boolean (N or 1, Lq, Lk) shared by the heads; (N, Lq, C)
    out, float32 or bfloat16 as the inputs (float32 inside); heads of 16, 32 or 64 channels. A query whose keys
    are all blocked gets zeros."""
    if not available():
        raise RuntimeError("the native CPU kernels are not available here; check kernels.native.available() first")
    return torch.ops.vita_kernels.masked_attention(q, k, v, mask, heads)
