"""The video a benchmark segments: ``--video PATH``, or the synthetic clip (``--frames`` x ``--size``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import Settings
from .workspace import Workspace


@dataclass
class Clip:
    """What to pass to ``segment`` and what it is."""

    video: Any  # a path
    frames: int
    height: int
    width: int
    description: str


def benchmark_clip(s: Settings, ws: Workspace) -> Clip:
    """The clip named by the settings (encoded to a file, so decoding is part of the measurement)."""
    if s.video is not None:
        from runtime.video_io import open_video

        source = open_video(s.video)
        try:
            info = source.info
            frames = info.num_frames or sum(1 for _ in source)
        finally:
            source.close()
        return Clip(s.video, frames, info.height, info.width, f"{s.video} ({frames} frames, {info.height}x{info.width})")
    h, w = s.size
    path = ws.clip_file(s.frames, h, w)
    return Clip(path, s.frames, h, w, f"generated clip of moving shapes, {s.frames} frames {h}x{w} (MP4)")
