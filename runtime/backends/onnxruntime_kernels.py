"""The compiled ONNX Runtime operators of domain ``vita.ops`` (kernels/csrc/ort_ops.cpp), built on first use.

- ``MSDeformAttn``: an exported detector carries each deformable-attention layer as one such node with a
  local function that defines it in standard ops (export/msda_onnx.py). Registered with a session, this
  library runs those nodes as one fused CPU kernel (kernels/csrc/ms_deform_attn_ort.h, the same computation
  as the torch backend's compiled kernel) instead of the function's GridSample formulation, about 6x faster.
- ``WinogradInput`` / ``WinogradOutput``: the transforms of a 3x3 convolution run as Winograd
  (kernels/csrc/winograd_ort.h), which the backend writes into its in-memory copy of the detector graph on
  AVX2-only CPUs (onnxruntime_winograd.py).

It needs a C++ compiler (``c++``, or ``CXX``) and no torch: the build takes about a second once per machine
and is cached under ``VITA_KERNELS_CACHE`` (default ``~/.cache/vita/kernels``). Without a compiler, on a
platform other than Linux, or with ``VITA_NATIVE_KERNELS=0``, nothing is registered, one warning says why,
and ONNX Runtime runs the function's body and its own Conv: the same results, slower.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path
from typing import Any, Optional

from ..native_build import build_library, enabled

log = logging.getLogger(__name__)

SOURCES = ("ort_ops.cpp", "ms_deform_attn_ort.h", "ms_deform_attn_core.h", "fast_math.h", "winograd_ort.h",
           "winograd_core.h", "bias_ort.h", "group_norm_ort.h", "ort_api_min.h")


def build(out_dir: Optional[Path] = None, compiler: Optional[str] = None) -> Path:
    """Compile the operators' library (or find it already built); returns its path. Raises RuntimeError saying why."""
    return build_library("libvita_ort_ops", SOURCES, out_dir=out_dir, compiler=compiler)


@functools.lru_cache(maxsize=1)
def _library() -> Optional[Path]:
    try:
        return build()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("the compiled ONNX Runtime operators (deformable attention, Winograd transforms) could not be "
                    "built (%s); ONNX Runtime runs the standard-op forms instead (same results, slower). Set "
                    "VITA_NATIVE_KERNELS=0 to skip the build.", e)
        return None


def library() -> Optional[Path]:
    """The built operators' library, or None where it cannot be built or ``VITA_NATIVE_KERNELS=0`` (read each call)."""
    return _library() if enabled() else None


def register(options: Any) -> bool:
    """Register the operators with an ``onnxruntime.SessionOptions``; False (and nothing changed) where unavailable."""
    path = library()
    if path is None:
        return False
    options.register_custom_ops_library(str(path))
    return True
