"""Run VITA on videos: ``runtime.segment(video, model)``.

Importing this package does not import torch: the torch backend is loaded only for checkpoints.
"""

from .options import SegmentOptions
from .results import Instance, VideoResult
from .segmenter import ModelPathError, Segmenter, load, segment
from .streaming import ClipResult, StreamOptions, TrackedInstance, stream
from .video_io import StreamStalledError, VideoInputError

__all__ = [
    "ClipResult",
    "Instance",
    "ModelPathError",
    "SegmentOptions",
    "Segmenter",
    "StreamOptions",
    "StreamStalledError",
    "TrackedInstance",
    "VideoInputError",
    "VideoResult",
    "load",
    "segment",
    "stream",
]
