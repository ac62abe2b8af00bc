"""Options of a segmentation run, as a typed dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

FEATURE_POLICIES = ("auto", "device", "host", "disk", "recompute")


@dataclass
class SegmentOptions:
    """How ``segment`` runs; None means "the model's own setting"."""

    prune_ratio: float = 1.0  # top-r pruning of frame queries; 1.0 = off (bit-identical to no pruning)
    window: Optional[int] = None  # VITA encoder window W (0 = full attention)
    topk: Optional[int] = None  # instances per video
    min_size: Optional[int] = None  # test-time shortest edge
    max_size: Optional[int] = None  # test-time longest-edge cap
    batch_size: Optional[int] = None  # frames per detector call (default: 8 on CUDA; on the CPU 1 in fp32, 2 in bf16)
    feature_policy: str = "auto"  # where mask features live: auto | device | host | disk | recompute
    device_budget_mb: Optional[float] = None  # auto: device bytes for features before moving to host
    host_budget_mb: float = 64.0  # auto: host bytes (fp16) for features before spooling them to a temporary file
    token_memory_mb: float = 8.0  # frame tokens kept in host memory before the rest waits in a temporary file
    queue_size: int = 8  # decoded frames buffered by the background reader
    progress: bool = False  # tqdm progress bars
    # torch backend, applied when the model is loaded (runtime.load); None = the model config's
    kernels: Optional[str] = None  # fast kernels (attention, Winograd convolutions): auto | reference | triton
    token_dtype: Optional[str] = None  # tokens stored between stages: float32 | float16 | bfloat16
    compile: bool = False  # compile the detector with torch.compile (minutes once, cached on disk; then faster)

    def __post_init__(self) -> None:
        if not 0.0 < self.prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio must be in (0, 1] (1.0 = off), got {self.prune_ratio}")
        if self.feature_policy not in FEATURE_POLICIES:
            raise ValueError(f"feature_policy must be one of {FEATURE_POLICIES}, got {self.feature_policy!r}")
        if self.kernels not in (None, "auto", "reference", "triton"):
            raise ValueError(f"kernels must be auto, reference or triton, got {self.kernels!r}")
        if self.token_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"token_dtype must be float32, float16 or bfloat16, got {self.token_dtype!r}")
        if not self.token_memory_mb >= 0:
            raise ValueError(f"token_memory_mb must be >= 0 (megabytes), got {self.token_memory_mb!r}")
        for name in ("window", "topk", "min_size", "max_size", "batch_size"):
            value = getattr(self, name)
            low = 0 if name == "window" else 1
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def updated(self, **changes: Any) -> "SegmentOptions":
        """A copy with ``changes``; unknown names are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown segment option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)
