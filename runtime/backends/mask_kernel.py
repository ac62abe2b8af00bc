"""The compiled final-mask kernel (kernels/csrc/mask_head.cpp): logits -> masks and mask-quality sums in one pass.

``numpy_ops.masks_from_logits`` is its plain reference (the numpy twin of the official post-processing);
the kernel follows the reference's float32 arithmetic operation for operation, so its masks are
bit-identical, and its sums differ only in the summation order. Built on first use like the other compiled
kernels (runtime/native_build.py; no torch); where it cannot be built, one warning and the reference runs.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np

from ..native_build import build_library, enabled

log = logging.getLogger(__name__)

SOURCES = ("mask_head.cpp", "fast_math.h")
# the numpy reference rounds every product and sum to float32: no fused multiply-adds, or bits would differ
# (the sigmoid loop's select vectorises without trapping math, which every build has: native_build.BASE_FLAGS)
FLAGS = ("-ffp-contract=off", "-pthread")


def build(out_dir: Optional[Path] = None, compiler: Optional[str] = None) -> Path:
    """Compile the mask kernel library (or find it built); returns its path. Raises RuntimeError saying why."""
    return build_library("libvita_masks", SOURCES, FLAGS, out_dir=out_dir, compiler=compiler)


@functools.lru_cache(maxsize=1)
def _function() -> Optional[ctypes._CFuncPtr]:
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("the compiled mask kernel could not be built (%s); the numpy form runs instead (same masks, "
                    "slower). Set VITA_NATIVE_KERNELS=0 to skip the build.", e)
        return None
    fn = lib.vita_masks_from_logits
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 10, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return fn


def available() -> bool:
    """Whether the kernel runs here (built, and not switched off with ``VITA_NATIVE_KERNELS=0``)."""
    return enabled() and _function() is not None


def masks_from_logits(
    logits: np.ndarray,
    padded_size: tuple[int, int],
    crop: tuple[int, int],
    orig_size: tuple[int, int],
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(k, t, h, w) float32 logits -> ((k, t, H, W) bool masks, (k, t, 2) float64 [soft sum, pixel count]).

    As ``numpy_ops.masks_from_logits``: resize to ``padded_size`` keeping the top-left ``crop``, sums of the
    sigmoid over the hard mask there, resize to ``orig_size``, threshold at 0. Call only where ``available()``.
    """
    fn = _function()
    if fn is None:
        raise RuntimeError("the compiled mask kernel is not available here")
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    k, t, h, w = logits.shape
    masks = np.empty((k, t, *orig_size), dtype=bool)
    sums = np.empty((k, t, 2), dtype=np.float64)
    status = fn(logits.ctypes.data, k, t, h, w, padded_size[0], padded_size[1], crop[0], crop[1],
                orig_size[0], orig_size[1], masks.ctypes.data, sums.ctypes.data, max(1, int(threads)))
    if status != 0:
        raise ValueError(f"mask kernel: inconsistent sizes (logits {logits.shape}, padded {padded_size}, crop {crop}, "
                         f"original {orig_size})")
    return masks, sums
