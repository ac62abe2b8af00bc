"""Denormal floats flushed to zero on the calling thread for the span of a CPU inference call.

The frame decoder's masked attention adds -inf to the keys a mask hides; ONNX Runtime's CPU softmax then
computes exp of very negative numbers, whose results pass through the denormal range, and every
arithmetic operation on a denormal takes a microcode assist. On the 2-core Xeon that made the softmax over
the finest level's keys 4-6x slower than over unmasked scores (7 ms instead of 1.2-1.6 for
(1, 8, 100, 3840)), and the full-size detector ~0.015 s/frame slower (0.570 -> 0.556 s with denormals
flushed; outputs bit-identical on the benchmark clip). Flushing changes only results below 1.2e-38.

ONNX Runtime sets FTZ/DAZ on its own pool threads when asked (session option
``session.set_denormal_as_zero``); the calling thread, which runs its share of every parallel loop, is set
here through glibc's ``fegetenv``/``fesetenv`` (the SSE control word, MXCSR, is part of the x86-64
environment) and restored afterwards, so the caller's own float arithmetic is left as it was. Threads that
already run keep their own settings; a thread started inside the block inherits them (POSIX), so blocks
hold graph calls only. Elsewhere (other C libraries or CPUs) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import sys
from typing import Iterator, Optional

# MXCSR bits: flush-to-zero (results) and denormals-are-zero (inputs)
FTZ_DAZ = 0x8040
# ONNX Runtime's session option that sets FTZ/DAZ on its intra-op pool threads
ORT_DENORMAL_AS_ZERO = "session.set_denormal_as_zero"


class _FEnv(ctypes.Structure):
    """glibc's x86-64 ``fenv_t``: the x87 environment (28 bytes), then MXCSR."""

    _fields_ = [("x87", ctypes.c_ubyte * 28), ("mxcsr", ctypes.c_uint)]


@functools.lru_cache(maxsize=1)
def _libm() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        lib = ctypes.CDLL("libm.so.6")
        lib.fegetenv.argtypes = lib.fesetenv.argtypes = [ctypes.POINTER(_FEnv)]
        lib.fegetenv.restype = lib.fesetenv.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return lib


@contextlib.contextmanager
def denormals_flushed() -> Iterator[bool]:
    """Within the block, this thread flushes denormal inputs and results to zero; yields whether it could."""
    lib = _libm()
    saved = _FEnv()
    if lib is None or lib.fegetenv(ctypes.byref(saved)) != 0:
        yield False
        return
    flushed = _FEnv.from_buffer_copy(saved)
    flushed.mxcsr |= FTZ_DAZ
    if lib.fesetenv(ctypes.byref(flushed)) != 0:
        yield False
        return
    try:
        yield True
    finally:
        lib.fesetenv(ctypes.byref(saved))
