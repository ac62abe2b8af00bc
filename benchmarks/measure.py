"""Timing after warm-up, peak host and device memory, and power-law fits."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> Optional[int]:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> Optional[int]:
    """Current resident set size of this process."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size since the last reset (or since the process started)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory() -> Optional[int]:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), None where unknown."""
    kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
    except OSError:
        pass
    return None if kb is None else kb * 1024


def device_sync(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (no-op on CPU)."""
    if not str(device).startswith("cuda"):
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize()


class DeviceMemory:
    """Peak torch-allocated device memory between ``reset()`` and ``peak()`` (None on CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")

    def reset(self) -> None:
        """Start a new peak."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> Optional[int]:
        """Bytes at the peak, or None without CUDA."""
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())


def repeat(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def power_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares fit of y = c * x**p in log-log space; returns (p, c)."""
    if len(x) < 2:
        raise ValueError("a power-law fit needs at least two points")
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    p, logc = np.polyfit(lx, ly, 1)
    return float(p), float(math.exp(logc))


def geometric_points(low: int, high: int, count: int) -> list[int]:
    """``count`` integers log-spaced from ``low`` to ``high`` inclusive, without repeats."""
    if high <= low:
        return [low]
    points = sorted({int(round(v)) for v in np.geomspace(low, high, count)})
    return points


GB = 2**30
MB = 2**20
