"""Opening what ``runtime.stream`` reads: live URLs and capture devices, or anything ``open_video`` takes."""

from __future__ import annotations

from typing import Any

from ..video_io import FrameSource, is_live_source, open_live, open_video
from .options import StreamOptions


def open_source(source: Any, options: StreamOptions) -> FrameSource:
    """A FrameSource for ``source``: a live URL / device (timeout, reconnect, FFmpeg format and options) or a
    file, folder, array or frame iterable played as a stream."""
    if isinstance(source, FrameSource):
        return source
    if is_live_source(source) or (options.format is not None and isinstance(source, str)):
        return open_live(
            str(source), options.format, options.options, options.timeout_s, options.reconnect, options.reconnect_delay_s
        )
    return open_video(source)
