"""Per-stage latency of ``runtime.segment`` without touching the pipeline: a timing proxy around the backend.

The pipeline decodes and resizes in a background thread while the detector runs, so the decode stage
reported here is the time the main loop spent *waiting* for frames (what the overlap did not hide).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

STAGES = ("decode+resize", "detector", "token engine", "mask head+RLE")


class StageTimer:
    """Wraps a runtime backend; after ``run(fn)`` the ``stages`` dict holds seconds per stage."""

    def __init__(self, backend: Any, sync: Callable[[], None]) -> None:
        self._backend, self._sync = backend, sync
        self.stages: dict[str, float] = {}
        self._detector = 0.0
        self._track_start = self._track_end = 0.0
        self._lock = threading.Lock()
        self._running = 0
        self._busy_since = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        # wall time while any detector call runs: a backend may run several at once (detector_streams)
        with self._lock:
            if self._running == 0:
                self._busy_since = time.perf_counter()
            self._running += 1
        try:
            out = fn(*args)
            self._sync()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._detector += time.perf_counter() - self._busy_since
        return out

    def detect(self, frames: Any, prune_ratio: float) -> Any:
        return self._timed(self._backend.detect, frames, prune_ratio)

    def mask_features(self, frames: Any) -> Any:
        return self._timed(self._backend.mask_features, frames)

    def track(self, tokens: Any, query_index: Any, window: Any, owned: bool = False) -> Any:
        self._track_start = time.perf_counter()
        out = self._backend.track(tokens, query_index, window, owned=owned)
        self._sync()
        self._track_end = time.perf_counter()
        return out

    def run(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Call ``fn`` (which segments through this backend); returns its result and wall seconds."""
        self._detector = 0.0
        start = time.perf_counter()
        out = fn()
        self._sync()
        end = time.perf_counter()
        # second-pass recompute runs the detector after the token engine; count it as detector time
        before_track = self._track_start - start
        detector_before = min(self._detector, before_track)
        self.stages = {
            "decode+resize": max(before_track - detector_before, 0.0),
            "detector": self._detector,
            "token engine": self._track_end - self._track_start,
            "mask head+RLE": max(end - self._track_end - (self._detector - detector_before), 0.0),
        }
        return out, end - start
