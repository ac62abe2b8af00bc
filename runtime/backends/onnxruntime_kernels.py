"""The compiled ONNX Runtime operator for deformable attention (``vita.ops::MSDeformAttn``), built on first use.

An exported detector carries each deformable-attention layer as one ``vita.ops::MSDeformAttn`` node with a
local function that defines it in standard ops (export/msda_onnx.py). Registered with a session, this library
runs those nodes as one fused CPU kernel (kernels/csrc/ms_deform_attn_ort.cpp, the same computation as the
torch backend's compiled kernel) instead of the function's GridSample formulation, about 6x faster.

It needs a C++ compiler (``c++``, or ``CXX``) and no torch: the build takes about a second once per machine
and is cached under ``VITA_KERNELS_CACHE`` (default ``~/.cache/vita/kernels``). Without a compiler, on a
platform other than Linux, or with ``VITA_NATIVE_KERNELS=0``, nothing is registered, one warning says why,
and ONNX Runtime runs the function's body: the same results, slower.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SOURCES = ("ms_deform_attn_ort.cpp", "ms_deform_attn_core.h", "ort_api_min.h")
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fvisibility=hidden"]
# by the CPU's own flags, never -march=native: a cache shared by machines must not hold instructions one lacks
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}


def source_dir() -> Path:
    """kernels/csrc, found without importing the (torch-dependent) kernels package."""
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the kernels package (kernels/csrc) is not installed beside runtime")
    return Path(list(spec.submodule_search_locations)[0]) / "csrc"


def cpu_isa() -> str:
    """'avx512', 'avx2' or 'generic', from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "generic"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        return "avx512"
    if all(f in flags for f in ("avx2", "fma", "f16c")):
        return "avx2"
    return "generic"


def cache_dir() -> Path:
    """Where built libraries are kept: ``VITA_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/vita/kernels``."""
    if os.environ.get("VITA_KERNELS_CACHE"):
        return Path(os.environ["VITA_KERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vita" / "kernels"


def build(out_dir: Optional[Path] = None, compiler: Optional[str] = None) -> Path:
    """Compile the operator library (or find it already built); returns its path. Raises RuntimeError saying why."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the compiled operator is built on Linux only (this is {sys.platform})")
    cxx = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++ or clang++, or set CXX)")
    src = source_dir()
    isa = cpu_isa()
    flags = _BASE_FLAGS + _ISA_FLAGS[isa]
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((src / name).read_bytes())
    digest.update(" ".join([Path(cxx).name, *flags]).encode())
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    target = out_dir / f"libvita_ort_msda_{isa}_{digest.hexdigest()[:12]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(src / SOURCES[0]), "-o", tmp], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(f"{Path(cxx).name} failed: {lines[-1] if lines else done.returncode}")
        os.replace(tmp, target)  # atomic: another process building the same library sees one or the other
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the ONNX Runtime deformable-attention operator: %s", target)
    return target


@functools.lru_cache(maxsize=1)
def _library() -> Optional[Path]:
    try:
        return build()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("the compiled ONNX Runtime operator for deformable attention could not be built (%s); "
                    "ONNX Runtime runs its standard-op form instead (same results, slower). Set "
                    "VITA_NATIVE_KERNELS=0 to skip the build.", e)
        return None


def library() -> Optional[Path]:
    """The built operator library, or None where it cannot be built or ``VITA_NATIVE_KERNELS=0`` (read each call)."""
    if os.environ.get("VITA_NATIVE_KERNELS", "1") == "0":
        return None
    return _library()


def register(options: Any) -> bool:
    """Register the operator with an ``onnxruntime.SessionOptions``; False (and nothing changed) where unavailable."""
    path = library()
    if path is None:
        return False
    options.register_custom_ops_library(str(path))
    return True
