"""Building the runtime's torch-free C++ libraries on first use, cached per machine.

Each library is compiled from kernels/csrc with the system's C++ compiler (``c++``, or ``CXX``) in about a
second, named by a digest of its sources and flags, and kept under ``VITA_KERNELS_CACHE`` (default
``~/.cache/vita/kernels``). ``VITA_NATIVE_KERNELS=0`` turns every compiled path off. The instruction set
comes from the CPU's own flags, never -march=native: a cache shared by machines must not hold instructions
one of them lacks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

# no trapping math: values are unchanged (only floating-point exception flags may differ), and floor, selects and
# float-to-integer conversions in the kernels' loops then vectorise
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fvisibility=hidden", "-fno-trapping-math"]
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}


def enabled() -> bool:
    """False when ``VITA_NATIVE_KERNELS=0`` (read each call)."""
    return os.environ.get("VITA_NATIVE_KERNELS", "1") != "0"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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


def build_library(
    stem: str,
    sources: Sequence[str],
    extra_flags: Sequence[str] = (),
    out_dir: Optional[Path] = None,
    compiler: Optional[str] = None,
) -> Path:
    """Compile ``sources[0]`` (the others are headers it includes) into ``<stem>_<isa>_<digest>.so``, or find it
    built; returns its path. Raises RuntimeError saying why it cannot."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"compiled kernels are built on Linux only (this is {sys.platform})")
    cxx = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++ or clang++, or set CXX)")
    src = source_dir()
    isa = cpu_isa()
    flags = [*BASE_FLAGS, *ISA_FLAGS[isa], *extra_flags]
    digest = hashlib.sha256()
    for name in sources:
        digest.update((src / name).read_bytes())
    digest.update(" ".join([Path(cxx).name, *flags]).encode())
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    target = out_dir / f"{stem}_{isa}_{digest.hexdigest()[:12]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(src / sources[0]), "-o", tmp], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(f"{Path(cxx).name} failed: {lines[-1] if lines else done.returncode}")
        os.replace(tmp, target)  # atomic: another process building the same library sees one or the other
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s", target)
    return target
