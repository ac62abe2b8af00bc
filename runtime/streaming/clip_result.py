"""What one clip of a stream yields: the frames it finalises and each instance with its persistent track id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..results import Instance, VideoResult, _rle_for_json


@dataclass
class TrackedInstance:
    """One instance of a clip, linked to a track that keeps its id across clips."""

    track_id: int
    label: int  # voted over the track's clips so far, weighted by score
    label_name: str
    score: float  # this clip's score (class probability x mask quality)
    clip_label: int  # the class this clip alone chose
    masks: list[Optional[dict]]  # COCO RLE (JSON form) per finalised frame, None where empty
    boxes: list[Optional[list[float]]]  # [x, y, w, h] per finalised frame, None where empty
    new: bool  # the track starts in this clip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "track_id": int(self.track_id),
            "label": int(self.label),
            "label_name": self.label_name,
            "score": float(self.score),
            "clip_label": int(self.clip_label),
            "new": bool(self.new),
            "masks": [_rle_for_json(rle) for rle in self.masks],
            "boxes": [None if b is None else [float(v) for v in b] for b in self.boxes],
        }


@dataclass
class ClipResult:
    """The result of one clip: frames ``first_frame .. end - 1`` of the stream are final with it."""

    index: int  # clip number, from 0
    start: int  # first frame the clip saw (overlap included)
    first_frame: int  # first frame it finalises (the overlap frames were finalised by the clip before)
    end: int  # one past its last frame
    height: int
    width: int
    instances: list[TrackedInstance]
    ended_tracks: list[int]  # tracks that missed too many clips and will not come back
    latency_s: float  # from the arrival (decoding) of frame first_frame to this result
    compute_s: float  # from the arrival (decoding) of the clip's last frame to this result
    fps: Optional[float] = None
    class_names: tuple[str, ...] = ()
    source: Optional[str] = None
    frames: Optional[list[np.ndarray]] = field(default=None, repr=False)  # the finalised RGB frames, if kept

    @property
    def num_frames(self) -> int:
        """How many frames this clip finalises."""
        return self.end - self.first_frame

    def to_dict(self) -> dict[str, Any]:
        """One JSON line of ``python -m runtime stream`` (frames left out)."""
        return {
            "clip": int(self.index),
            "start": int(self.start),
            "first_frame": int(self.first_frame),
            "end": int(self.end),
            "height": int(self.height),
            "width": int(self.width),
            "fps": self.fps,
            "source": self.source,
            "latency_s": round(float(self.latency_s), 4),
            "compute_s": round(float(self.compute_s), 4),
            "ended_tracks": [int(t) for t in self.ended_tracks],
            "instances": [inst.to_dict() for inst in self.instances],
        }

    def to_video_result(self) -> VideoResult:
        """The finalised frames as an ordinary VideoResult (frame 0 = ``first_frame``), instances by track id."""
        instances = [
            Instance(label=i.label, label_name=i.label_name, score=i.score, masks=list(i.masks), boxes=list(i.boxes))
            for i in sorted(self.instances, key=lambda i: i.track_id)
        ]
        return VideoResult(instances, self.height, self.width, self.num_frames, self.fps, self.class_names, self.source)
