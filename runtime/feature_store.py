"""Where mask features live between detection and mask making: the policy that bounds memory.

auto: on the device while they fit its budget, then in host memory while they fit the host budget, then
in a temporary file (memory stays flat in video length), and only if that file cannot be written, dropped
for a second (recompute) pass. Host and file hold what ``backend.to_host`` gives: float16 for features
leaving a GPU, the features exactly in a CPU run (float32, or a bf16 run's bits).
device / host / disk / recompute force one place.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

from .backends.base import Backend
from .spool import ArraySpool, check_disk_reserve

log = logging.getLogger(__name__)


class FeatureStore:
    """Collects per-batch mask features under a policy and hands them back in frame chunks."""

    def __init__(self, backend: Backend, policy: str, device_budget: int, host_budget: int) -> None:
        self.backend = backend
        self.mode = "device" if policy == "auto" else policy
        self.auto = policy == "auto"
        self.device_budget, self.host_budget = device_budget, host_budget
        self.parts: list[Any] = []
        self.bytes = 0
        self.spool: Optional[ArraySpool] = None

    @property
    def needs_recompute(self) -> bool:
        """True when features were not kept and a second pass must recompute them."""
        return self.mode == "recompute"

    def add(self, features: Any) -> None:
        """Keep one batch of features (B, D, h, w), moving or dropping all of them when a budget is exceeded."""
        if self.mode == "recompute":
            return
        if self.mode == "disk":
            self._spill([self.backend.to_host(features)])
            return
        if self.mode == "host":
            features = self.backend.to_host(features)
            self.bytes += features.nbytes
        else:
            self.bytes += self.backend.nbytes(features)
        self.parts.append(features)
        if not self.auto:
            return
        if self.mode == "device" and self.bytes > self.device_budget:
            log.debug("mask features exceed the device budget (%.0f MB): keeping them on the host in float16",
                     self.device_budget / 2**20)
            self.parts = [self.backend.to_host(p) for p in self.parts]
            self.bytes = sum(p.nbytes for p in self.parts)
            self.mode = "host"
        if self.mode == "host" and self.bytes > self.host_budget:
            log.info("mask features exceed the host budget (%.0f MB): spooling them to a temporary file",
                     self.host_budget / 2**20)
            parts, self.parts, self.bytes, self.mode = self.parts, [], 0, "disk"
            self._spill(parts)

    def _spill(self, parts: list[Any]) -> None:
        """Append host parts to the spool file; when the disk is (nearly) full, fall back to recompute."""
        try:
            if self.spool is None:
                self.spool = ArraySpool(prefix="vita-features-")
            for part in parts:
                check_disk_reserve(self.spool.directory, part.nbytes)
                self.spool.append(part)
        except OSError as e:
            self._spool_failed(e)

    def finish(self) -> None:
        """Call after the last ``add``: waits for the spool's background writes (falling back as ``add`` does)."""
        if self.spool is not None:
            try:
                self.spool.flush()
            except OSError as e:
                self._spool_failed(e)

    def _spool_failed(self, e: OSError) -> None:
        if not self.auto:
            raise OSError(f"cannot spool mask features to a temporary file ({e}); "
                          "free disk space in the temporary folder or use feature_policy='recompute'") from e
        log.warning("cannot spool mask features to a temporary file (%s): recomputing them in a second pass", e)
        self.close()
        self.mode = "recompute"

    def chunks(self, size: int) -> Iterator[Any]:
        """Stored features in consecutive chunks of ``size`` frames (compute type, on the device)."""
        if self.mode == "disk":
            if self.spool is not None:
                for part in self.spool.chunks(size):
                    yield self.backend.from_host(part)
            return
        pending: list[Any] = []
        count = 0
        while self.parts:
            part = self.parts.pop(0)  # released as we go
            if self.mode == "host":
                part = self.backend.from_host(part)
            pending.append(part)
            count += part.shape[0]
            while count >= size:
                merged = self.backend.concat(pending) if len(pending) > 1 else pending[0]
                yield merged[:size]
                rest = merged[size:]
                pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
        if count:
            yield self.backend.concat(pending) if len(pending) > 1 else pending[0]

    def close(self) -> None:
        """Delete the spool file, if any."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None
