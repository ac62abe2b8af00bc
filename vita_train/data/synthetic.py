"""Synthetic clips of moving textured shapes, for demos and tests."""

from __future__ import annotations

import numpy as np


def moving_shapes_clip(num_frames: int = 12, height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB: a few coloured discs and boxes moving over a textured background."""
    if num_frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need at least 1 frame of 8x8 pixels, got T={num_frames}, {height}x{width}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = (
        100 + 40 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 11.0)[..., None] + rng.normal(0, 8, (height, width, 3))
    )
    shapes = []
    for k in range(3):
        shapes.append(
            dict(
                color=rng.integers(30, 256, 3),
                radius=rng.uniform(0.08, 0.18) * min(height, width),
                start=rng.uniform((0.2 * height, 0.2 * width), (0.8 * height, 0.8 * width)),
                velocity=rng.uniform(-0.03, 0.03, 2) * (height, width),
                box=k % 2 == 1,
            )
        )
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        img = background.copy()
        for s in shapes:
            cy, cx = s["start"] + t * s["velocity"]
            if s["box"]:
                inside = (np.abs(yy - cy) < s["radius"]) & (np.abs(xx - cx) < s["radius"] * 1.4)
            else:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < s["radius"] ** 2
            img[inside] = s["color"]
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames
