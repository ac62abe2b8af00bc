"""Where a stream's clips go as they finish: a JSON-lines file and an overlay video, both written as they come."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import av

from ..render import CONTAINERS, PALETTE, _frame_rate, _pad_even, default_font, overlay_frame, pick_codec
from ..results import Instance, VideoResult
from .clip_result import ClipResult

log = logging.getLogger(__name__)


class JsonlWriter:
    """Appends one JSON line per clip and flushes it to disk at once: a crash loses at most the clip in progress."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        self.lines = 0

    def write(self, clip: ClipResult) -> None:
        """Append ``clip`` as one line."""
        self.file.write(json.dumps(clip.to_dict(), allow_nan=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.lines += 1

    def close(self) -> None:
        """Close the file (everything is already on disk)."""
        self.file.close()


class OverlayWriter:
    """Draws each clip's finalised frames (one colour per track id) into a video as the clips come.

    Unlike ``VideoResult.render`` the file is not atomic (a stream has no end to wait for): close() it,
    which Ctrl-C in the CLI does; a Matroska (.mkv) file stays playable even when the process is killed.
    """

    def __init__(self, path: Union[str, Path], fps: Optional[float] = None, min_score: float = 0.3) -> None:
        self.path = Path(path)
        self.format = CONTAINERS.get(self.path.suffix.lower())
        if self.format is None:
            raise ValueError(f"cannot tell the container from {self.path.name!r}: use one of {', '.join(CONTAINERS)}")
        self.fps, self.min_score = fps, min_score
        self.container: Optional[av.container.OutputContainer] = None
        self.stream = None
        self.font = None

    def _open(self, clip: ClipResult) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), "w", format=self.format)
        self.stream = self.container.add_stream(pick_codec(), rate=_frame_rate(self.fps or clip.fps or 30.0))
        self.stream.width, self.stream.height = clip.width + clip.width % 2, clip.height + clip.height % 2
        self.stream.pix_fmt = "yuv420p"
        self.font = default_font(clip.height)

    def write(self, clip: ClipResult) -> None:
        """Overlay and encode the clip's finalised frames (the clip must carry them: keep_frames=True)."""
        if clip.frames is None:
            raise ValueError("the clip carries no frames: stream with keep_frames=True to render overlays")
        if self.container is None:
            self._open(clip)
        result = _by_track_colour(clip, self.min_score)
        for t, frame in enumerate(clip.frames):
            rgb = _pad_even(overlay_frame(frame, result, t, font=self.font))
            self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        if self.container is None:
            return
        self.container.mux(self.stream.encode())
        self.container.close()
        self.container = None


def _by_track_colour(clip: ClipResult, min_score: float) -> VideoResult:
    """The clip's frames as a VideoResult whose instance i is drawn in palette colour i: each track sits at
    the slot of its id (the next free one on a clash), so a track keeps its colour from clip to clip."""
    empty = [None] * clip.num_frames
    slots = [Instance(-1, "", 0.0, list(empty), list(empty)) for _ in PALETTE]
    taken: set[int] = set()
    for inst in sorted(clip.instances, key=lambda i: -i.score):
        if inst.score < min_score:
            continue
        slot = inst.track_id % len(PALETTE)
        while slot in taken and len(taken) < len(PALETTE):
            slot = (slot + 1) % len(PALETTE)
        if slot in taken:
            break
        taken.add(slot)
        slots[slot] = Instance(inst.label, f"#{inst.track_id} {inst.label_name}", inst.score, inst.masks, inst.boxes)
    return VideoResult(slots, clip.height, clip.width, clip.num_frames, clip.fps, clip.class_names)
