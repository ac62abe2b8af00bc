"""What a benchmark run was asked to do, as one typed dataclass (recorded in every JSON)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

QUICK_PRESET = "vita_tiny"
DEFAULT_PRESET = "vita_r50_ytvis19"


@dataclass
class Settings:
    """Options shared by all benchmarks; each benchmark reads the ones it uses."""

    out: Path = Path("bench_results")
    preset: str = DEFAULT_PRESET
    model: Optional[Path] = None
    device: str = "cpu"
    backends: tuple[str, ...] = ()  # empty: each benchmark's default
    precisions: tuple[str, ...] = ()  # empty: fp32 (backends: every precision available)
    threads: int = 1
    repeats: int = 3
    warmup: int = 1
    quick: bool = False
    progress: bool = False
    compare: Optional[Path] = None
    compile: bool = False  # torch rows also with the detector through torch.compile
    official_s_per_frame: Optional[float] = None  # the official code's time on this machine, if measured
    # e2e: the CPU torch and onnxruntime rows at each count of detector calls at once (empty: the backend's choice)
    detector_streams: tuple[int, ...] = ()
    # the clip (e2e, prune, backends)
    video: Optional[Path] = None
    frames: int = 36
    size: tuple[int, int] = (360, 640)
    # detector
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    resolutions: tuple[int, ...] = (360, 480, 720)
    # tokens
    min_frames: int = 36
    max_frames: int = 10000
    points: int = 7
    prune_frames: int = 360
    kernel_scale: bool = True  # also run benchmarks.kernels.token_scale at the same T (when it exists)
    # maxframes
    budget_gb: float = 12.0
    windows: tuple[int, ...] = (3, 6, 12)
    ratios: tuple[float, ...] = (1.0, 0.75, 0.5)
    scope: str = "both"  # tokens | runtime | both
    policies: tuple[str, ...] = ("device", "host", "disk", "recompute")
    probe_timeout: float = 600.0
    frame_cap: int = 100000
    runtime_frame_cap: Optional[int] = None  # None: frame_cap
    tolerance: float = 0.02
    # prune
    prune_ratios: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5, 0.25)
    # memory: clip lengths, each segmented by a fresh process
    lengths: tuple[int, ...] = (36, 360)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
        return out


# What --quick changes: a tiny model and small sizes, so `all --quick` takes about a minute on 2 cores.
QUICK = dict(
    preset=QUICK_PRESET,
    frames=4,
    repeats=2,
    warmup=1,
    batches=(1, 2),
    resolutions=(),  # the clip's resized size only
    min_frames=12,
    max_frames=192,
    points=4,
    prune_frames=48,
    budget_gb=1.0,
    windows=(6,),
    ratios=(1.0, 0.5),
    policies=("device",),
    probe_timeout=60.0,
    frame_cap=256,
    runtime_frame_cap=8,
    tolerance=0.1,
    prune_ratios=(1.0, 0.5),
    lengths=(4, 8),
)
