"""The frames of the clip being filled: per-frame detector outputs, kept until no later clip needs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


@dataclass
class FrameDetection:
    """One frame's detector outputs (backend arrays with a leading axis of 1) and when it arrived."""

    tokens: Any
    query_index: Optional[np.ndarray]
    mask_features: Any
    arrived: float  # time.monotonic() when the frame was decoded
    frame: Optional[np.ndarray] = None  # the original RGB frame, only when results keep frames


class ClipBuffer:
    """At most ``clip_len`` frames; after a clip runs, only its last ``overlap`` frames are carried over."""

    def __init__(self, clip_len: int, overlap: int) -> None:
        self.clip_len, self.overlap = clip_len, overlap
        self.frames: list[FrameDetection] = []
        self.start = 0  # stream index of frames[0]
        self.clips = 0  # clips run so far

    @property
    def full(self) -> bool:
        """The clip has all its frames."""
        return len(self.frames) >= self.clip_len

    @property
    def new_frames(self) -> int:
        """Frames no earlier clip has finalised."""
        return len(self.frames) - (self.overlap if self.clips else 0)

    def room(self) -> int:
        """Frames still missing from the clip."""
        return self.clip_len - len(self.frames)

    def add(self, detections: list[FrameDetection]) -> None:
        """Append detected frames."""
        if len(detections) > self.room():
            raise ValueError(f"{len(detections)} frames do not fit in a clip with room for {self.room()}")
        self.frames.extend(detections)

    def advance(self) -> None:
        """After a clip ran: keep its overlap frames (their detections are reused), drop the rest."""
        drop = len(self.frames) - self.overlap
        self.frames = self.frames[drop:] if self.overlap else []
        self.start += drop
        self.clips += 1
