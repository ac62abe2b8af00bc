"""detectron2's test-time ResizeShortestEdge on uint8 RGB frames, bit-exact (Pillow bilinear)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w): shortest edge to ``min_size``, longest capped at ``max_size``, rounded half up."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    scale = min_size * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = float(min_size), scale * width
    else:
        new_h, new_w = scale * height, float(min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def padded_size(size: tuple[int, int], divisibility: int) -> tuple[int, int]:
    """Size after zero-padding bottom/right to a multiple of ``divisibility`` (detectron2 ImageList)."""
    if divisibility <= 1:
        return size
    return tuple(-(-s // divisibility) * divisibility for s in size)  # type: ignore[return-value]


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 RGB frame to ``size`` = (h, w) with Pillow's bilinear filter.

    Only Pillow reproduces detectron2 bit-exactly: it antialiases when downsampling.
    """
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.dtype} array of shape {frame.shape}")
    h, w = size
    if frame.shape[:2] == (h, w):
        return frame
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))
