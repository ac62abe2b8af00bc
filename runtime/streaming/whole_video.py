"""A whole-video VideoResult from a stream's clips: ``runtime.segment(video, mode="clips")``."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from ..results import Instance, VideoResult
from .clip_result import ClipResult


class TrackCollector:
    """Gathers each track's finalised masks over the clips; a track's score is its clip scores' mean
    weighted by the frames each clip finalised, its label the last vote."""

    def __init__(self) -> None:
        self.masks: dict[int, dict[int, Optional[dict]]] = {}
        self.boxes: dict[int, dict[int, Optional[list[float]]]] = {}
        self.weighted: dict[int, float] = {}
        self.frames: dict[int, int] = {}
        self.label: dict[int, tuple[int, str]] = {}
        self.last: Optional[ClipResult] = None

    def add(self, clip: ClipResult) -> None:
        """Take one clip's instances."""
        for inst in clip.instances:
            tid = inst.track_id
            masks, boxes = self.masks.setdefault(tid, {}), self.boxes.setdefault(tid, {})
            for offset, (rle, box) in enumerate(zip(inst.masks, inst.boxes)):
                masks[clip.first_frame + offset], boxes[clip.first_frame + offset] = rle, box
            self.weighted[tid] = self.weighted.get(tid, 0.0) + inst.score * clip.num_frames
            self.frames[tid] = self.frames.get(tid, 0) + clip.num_frames
            self.label[tid] = (inst.label, inst.label_name)
        self.last = clip

    def result(self, truncated: bool = False) -> VideoResult:
        """Every track as an Instance over all frames (None where the track was absent), best score first."""
        if self.last is None:
            raise ValueError("no clip was segmented: the video has no frames")
        num_frames = self.last.end
        instances = []
        for tid in sorted(self.masks):
            label, name = self.label[tid]
            instances.append(
                Instance(
                    label=label,
                    label_name=name,
                    score=self.weighted[tid] / self.frames[tid],
                    masks=[self.masks[tid].get(t) for t in range(num_frames)],
                    boxes=[self.boxes[tid].get(t) for t in range(num_frames)],
                )
            )
        instances.sort(key=lambda inst: -inst.score)
        last = self.last
        return VideoResult(
            instances, last.height, last.width, num_frames, last.fps, last.class_names, last.source, truncated
        )


def collect(clips: Iterable[ClipResult]) -> VideoResult:
    """The VideoResult of a finite stream of clips."""
    collector = TrackCollector()
    for clip in clips:
        collector.add(clip)
    return collector.result()


def segment_clips(segmenter: Any, video: Any, **options: Any) -> VideoResult:
    """Segment ``video`` clip-wise (``clip_len``, ``overlap``, ``association``, ... as ``runtime.stream``)."""
    from .engine import stream

    return collect(stream(video, segmenter, **options))
