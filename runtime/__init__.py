"""Run VITA on videos: ``runtime.segment(video, model)``.

Importing this package does not import torch: the torch backend is loaded only for checkpoints.
"""

from .options import SegmentOptions
from .results import Instance, VideoResult
from .segmenter import ModelPathError, Segmenter, load, segment
from .video_io import VideoInputError

__all__ = [
    "Instance",
    "ModelPathError",
    "SegmentOptions",
    "Segmenter",
    "VideoInputError",
    "VideoResult",
    "load",
    "segment",
]
