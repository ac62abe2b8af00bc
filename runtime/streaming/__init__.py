"""Clip-wise VITA on live and endless videos: ``runtime.stream(source, model)`` yields ClipResults."""

from .clip_result import ClipResult, TrackedInstance
from .engine import stream
from .options import StreamOptions

__all__ = ["ClipResult", "StreamOptions", "TrackedInstance", "stream"]
