"""Where mask features live between detection and mask making: the policy that bounds memory.

auto: on the device while they fit its budget, then in host memory as float16, then dropped for a
second (recompute) pass. device / host / recompute force one place.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from .backends.base import Backend

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

    @property
    def needs_recompute(self) -> bool:
        """True when features were not kept and a second pass must recompute them."""
        return self.mode == "recompute"

    def add(self, features: Any) -> None:
        """Keep one batch of features (B, D, h, w), moving or dropping all of them when a budget is exceeded."""
        if self.mode == "recompute":
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
            log.info("mask features exceed the device budget (%.0f MB): keeping them on the host in float16",
                     self.device_budget / 2**20)
            self.parts = [self.backend.to_host(p) for p in self.parts]
            self.bytes = sum(p.nbytes for p in self.parts)
            self.mode = "host"
        if self.mode == "host" and self.bytes > self.host_budget:
            log.info("mask features exceed the host budget (%.0f MB): recomputing them in a second pass",
                     self.host_budget / 2**20)
            self.parts, self.bytes, self.mode = [], 0, "recompute"

    def chunks(self, size: int) -> Iterator[Any]:
        """Stored features in consecutive chunks of ``size`` frames (compute type, on the device)."""
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
