"""What a result was measured on: CPU (model, cores, bf16/AMX), GPU and driver, library versions, git commit."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
# distribution names to try for each library (TensorRT ships under several)
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu13"),
    "triton": ("triton",),
    "onnx": ("onnx",),
    "numpy": ("numpy",),
}


def _version(names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpuinfo() -> tuple[str, set[str], str]:
    """(model name, flags, "family F model M") from /proc/cpuinfo; empty on systems without it."""
    model, flags, fields = "", set(), {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), flags, ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key in ("cpu family", "model") and key not in fields:
            fields[key] = value.strip()
    family = f"family {fields['cpu family']} model {fields['model']}" if len(fields) == 2 else ""
    return model or platform.processor() or platform.machine(), flags, family


def _physical_cores() -> Optional[int]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys, core = set(), None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core is not None:
            cores.add((phys, core))
            phys = core = None
    if core is not None:
        cores.add((phys, core))
    return len(cores) or None


def cpu_info() -> dict[str, Any]:
    """CPU model, core counts and the bf16 / AMX instructions the kernels and autocast can use."""
    model, flags, family = _cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    amx = sorted(f for f in flags if f.startswith("amx"))
    bf16 = sorted(f for f in flags if "bf16" in f)
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cpus": usable,
        "family": family,  # the model name alone does not tell CPU generations apart in a VM ("AMD EPYC")
        "vector": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "older",
        "bf16": ", ".join(bf16) if bf16 else "no",
        "amx": ", ".join(amx) if amx else "no",
        "memory_gb": _memory_gb(),
    }


def _memory_gb() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpu_info() -> Optional[dict[str, Any]]:
    """Name, driver and memory of the first GPU nvidia-smi lists; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return None
    name, driver, memory = (part.strip() for part in lines[0].split(",")[:3])
    return {"name": name, "driver": driver, "memory_gb": round(float(memory) / 1024, 1), "count": len(lines)}


def git_info() -> dict[str, Any]:
    """The project's commit and whether tracked files differ from it."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def matmul_rate(device: str = "cpu", dtype: str = "float32", size: int = 2048, repeats: int = 3) -> float:
    """The best of ``repeats`` size^3 matmuls on ``device`` in FLOP/s: what the machine gives right now."""
    import time

    import torch

    a = torch.randn(size, size, device=device).to(getattr(torch, dtype))
    b = torch.randn(size, size, device=device).to(getattr(torch, dtype))
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    a @ b  # first call: library initialisation and weight layouts, not the rate
    best = 0.0
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def machine_rates(device: str = "cpu") -> dict[str, float]:
    """2048^3 matmul GFLOP/s in fp32 and in the reduced precision the device runs natively (bf16 on a CPU with
    AVX-512-BF16 or AMX, fp16 on CUDA). Machines of one kind, and one machine from hour to hour, differ: a run
    that records these beside its rows says whether it ran in a slow spell."""
    from vita_train.modeling.onednn import bf16_supported

    rates = {"fp32": matmul_rate(device) / 1e9}
    if str(device).startswith("cuda"):
        rates["fp16"] = matmul_rate(device, "float16") / 1e9
    elif bf16_supported():
        rates["bf16"] = matmul_rate(device, "bfloat16") / 1e9
    return rates


def capture(threads: int) -> dict[str, Any]:
    """Everything a reader needs to know about where the numbers come from."""
    return {
        "cpu": cpu_info(),
        "threads": threads,
        "gpu": gpu_info(),
        "versions": {name: _version(dists) for name, dists in _DISTRIBUTIONS.items()},
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "git": git_info(),
    }
