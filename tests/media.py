"""Real media files for tests, written with PyAV."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import av
import numpy as np
import pytest


def encode(
    path: Path,
    frames: np.ndarray,
    codec: str,
    pix_fmt: str,
    options: Optional[dict] = None,
    rate: int = 10,
    rotation: Optional[int] = None,
    hflip: bool = False,
    vflip: bool = False,
) -> Path:
    """Write frames with PyAV; skip the test when this FFmpeg build lacks the encoder."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = options or {}
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
