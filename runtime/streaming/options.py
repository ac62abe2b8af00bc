"""Options of clip-wise (streaming) segmentation, as a typed dataclass that round-trips through YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

ASSOCIATIONS = ("hungarian", "greedy")


@dataclass
class StreamOptions:
    """How ``runtime.stream`` cuts a video into clips and links their instances into tracks."""

    clip_len: int = 36  # frames per clip given to the token engine
    overlap: int = 6  # frames shared by consecutive clips (their detections are reused)
    association: str = "hungarian"  # hungarian | greedy, on mask IoU over the overlap frames
    min_iou: float = 0.3  # pairs below this IoU never continue a track
    max_missed: int = 1  # a track ends after this many consecutive clips without a match
    min_score: float = 0.0  # instances scoring below this neither start nor continue tracks
    timeout_s: float = 10.0  # live sources: a read blocked this long is a stall
    reconnect: int = 0  # live sources: reopen this many times after a stall or a failed open
    reconnect_delay_s: float = 1.0
    format: Optional[str] = None  # live sources: FFmpeg input format (e.g. "v4l2", "mpegts")
    options: dict[str, str] = field(default_factory=dict)  # live sources: FFmpeg options (video_size, ...)
    keep_frames: bool = False  # attach the finalised RGB frames to each ClipResult (for overlays)

    def __post_init__(self) -> None:
        if not isinstance(self.clip_len, int) or self.clip_len < 1:
            raise ValueError(f"clip_len must be an integer >= 1, got {self.clip_len!r}")
        if not isinstance(self.overlap, int) or self.overlap < 0:
            raise ValueError(f"overlap must be an integer >= 0, got {self.overlap!r}")
        if self.overlap >= self.clip_len:
            raise ValueError(
                f"overlap ({self.overlap}) must be smaller than clip_len ({self.clip_len}): each clip needs at "
                f"least one new frame; e.g. clip_len=36, overlap=6"
            )
        if self.association not in ASSOCIATIONS:
            raise ValueError(f"association must be one of {ASSOCIATIONS}, got {self.association!r}")
        if not 0.0 <= self.min_iou <= 1.0:
            raise ValueError(f"min_iou must be within [0, 1], got {self.min_iou}")
        if not 0.0 <= self.min_score <= 1.0:  # scores are probabilities: above 1 every instance would be dropped
            raise ValueError(f"min_score must be within [0, 1], got {self.min_score}")
        if not isinstance(self.max_missed, int) or self.max_missed < 0:
            raise ValueError(f"max_missed must be an integer >= 0, got {self.max_missed!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if not isinstance(self.reconnect, int) or self.reconnect < 0:
            raise ValueError(f"reconnect must be an integer >= 0, got {self.reconnect!r}")

    @property
    def stride(self) -> int:
        """New frames per clip: a clip's result is ready this many frames after its first new frame."""
        return self.clip_len - self.overlap

    def to_yaml(self) -> str:
        """The options as YAML."""
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "StreamOptions":
        """Inverse of ``to_yaml``; unknown keys are an error that lists the known ones."""
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"stream options YAML must be a mapping, got {type(data).__name__}")
        options, unknown = cls.split(data)
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"unknown stream option(s) {sorted(unknown)}; known: {known}")
        return options

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple["StreamOptions", dict[str, Any]]:
        """(StreamOptions from the keys it knows, the remaining keys) of a mixed keyword dict."""
        known = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in options.items() if k in known}
        return cls(**mine), {k: v for k, v in options.items() if k not in known}
