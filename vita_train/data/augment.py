"""Clip-level geometric augmentation: one random draw per clip, one geometric transform per frame.

Mirrors the official VITA training augmentation (``vita/data/augmentation.py``):

* with probability ``crop_prob``: resize the shortest edge to one of ``crop_pre_sizes`` (longest edge
  at most ``crop_pre_max_size``), then crop a window whose size is drawn once per clip from
  ``crop_range`` ("absolute_range") and whose origin moves linearly between two random origins
  across the frames;
* resize the shortest edge to one of ``min_sizes`` (longest edge at most ``max_size``);
* horizontal flip of the whole clip with probability ``flip_prob``;
* for COCO pseudo-videos, a per-frame rotation: angles uniform in [-rotation_deg, rotation_deg],
  sorted (reversed with probability 0.5), about one centre drawn uniformly in ``rotation_center``^2
  (relative to the frame), without expanding the frame.

Every frame of a clip ends with the same size. Images are resampled bilinearly, masks with nearest
neighbour, both through Pillow with the same geometry so that masks stay aligned with the pixels.
All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image

__all__ = [
    "AugmentConfig",
    "ClipTransform",
    "Crop",
    "FrameTransform",
    "HFlip",
    "Resize",
    "Rotate",
    "sample_clip_transform",
    "shortest_edge_size",
]

_BILINEAR = Image.Resampling.BILINEAR
_NEAREST = Image.Resampling.NEAREST


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the clip augmentation; the defaults are the official YouTube-VIS / OVIS fine-tuning ones."""

    min_sizes: tuple[int, ...] = (288, 320, 352, 384, 416, 448, 480, 512)  # empty: no final resize
    max_size: int = 768
    crop_enabled: bool = True
    crop_prob: float = 0.5
    crop_pre_sizes: tuple[int, ...] = (400, 500, 600)  # empty: crop at the input size
    crop_pre_max_size: int = 1333
    crop_range: tuple[int, int] = (384, 600)
    flip_prob: float = 0.5
    rotation_deg: float = 15.0
    rotation_center: tuple[float, float] = (0.4, 0.6)
    pseudo_rotation: bool = True  # official INPUT.PSEUDO.AUGMENTATIONS = ["rotation"]
    video_rotation: bool = False  # official INPUT.AUGMENTATIONS = [] for real videos

    def __post_init__(self) -> None:
        if self.crop_range[0] > self.crop_range[1] or self.crop_range[0] < 1:
            raise ValueError(f"crop_range must be (min, max) with 1 <= min <= max, got {self.crop_range}")
        for p, what in ((self.crop_prob, "crop_prob"), (self.flip_prob, "flip_prob")):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{what} must be in [0, 1], got {p}")
        if any(s < 1 for s in self.min_sizes + self.crop_pre_sizes):
            raise ValueError("resize sizes must be positive")

    @classmethod
    def small(cls) -> "AugmentConfig":
        """The official recipe scaled to ~96x128 frames (tests, synthetic demos)."""
        return cls(
            min_sizes=(96, 112, 128),
            max_size=192,
            crop_pre_sizes=(96, 112, 128),
            crop_pre_max_size=256,
            crop_range=(64, 96),
        )

    @classmethod
    def identity(cls) -> "AugmentConfig":
        """No augmentation at all: frames keep their size and orientation."""
        return cls(min_sizes=(), crop_enabled=False, flip_prob=0.0, pseudo_rotation=False, video_rotation=False)


def shortest_edge_size(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter edge at ``size`` and the longer at most ``max_size`` (detectron2 rounding)."""
    scale = size / min(height, width)
    if height < width:
        new_h, new_w = float(size), scale * width
    else:
        new_h, new_w = scale * height, float(size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


# ------------------------------------------------------------------------------------------------
# Primitive operations
# ------------------------------------------------------------------------------------------------


def _pillow_masks(masks: np.ndarray, op: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Apply a nearest-neighbour Pillow op to (N, H, W) bool masks, 8 masks per 8-bit image."""
    if masks.shape[0] == 0:
        probe = op(Image.new("L", (masks.shape[2], masks.shape[1])))
        return np.zeros((0, probe.height, probe.width), dtype=bool)
    out = []
    for start in range(0, masks.shape[0], 8):
        chunk = masks[start:start + 8]
        # nearest-neighbour resampling copies whole byte values, so bit-packed masks survive exactly
        bits = (1 << np.arange(chunk.shape[0], dtype=np.uint8))[:, None, None]
        packed = (chunk.astype(np.uint8) * bits).sum(axis=0, dtype=np.uint8)
        moved = np.asarray(op(Image.fromarray(packed)))
        out.append((moved[None] & bits) != 0)
    return np.concatenate(out, axis=0)


@dataclass(frozen=True)
class Resize:
    """Resample to (new_h, new_w)."""

    new_h: int
    new_w: int

    def image(self, img: np.ndarray) -> np.ndarray:
        """Apply to an (H, W, 3) uint8 image."""
        if img.shape[:2] == (self.new_h, self.new_w):
            return img
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((self.new_w, self.new_h), _BILINEAR))

    def masks(self, masks: np.ndarray) -> np.ndarray:
        """Apply to (N, H, W) bool masks."""
        if masks.shape[1:] == (self.new_h, self.new_w):
            return masks
        return _pillow_masks(masks, lambda im: im.resize((self.new_w, self.new_h), _NEAREST))


@dataclass(frozen=True)
class Crop:
    """Keep the window [y0, y0 + h) x [x0, x0 + w)."""

    x0: int
    y0: int
    w: int
    h: int

    def image(self, img: np.ndarray) -> np.ndarray:
        """Apply to an (H, W, 3) uint8 image."""
        return img[self.y0:self.y0 + self.h, self.x0:self.x0 + self.w]

    def masks(self, masks: np.ndarray) -> np.ndarray:
        """Apply to (N, H, W) bool masks."""
        return masks[:, self.y0:self.y0 + self.h, self.x0:self.x0 + self.w]


@dataclass(frozen=True)
class HFlip:
    """Mirror left-right."""

    def image(self, img: np.ndarray) -> np.ndarray:
        """Apply to an (H, W, 3) uint8 image."""
        return img[:, ::-1]

    def masks(self, masks: np.ndarray) -> np.ndarray:
        """Apply to (N, H, W) bool masks."""
        return masks[:, :, ::-1]


@dataclass(frozen=True)
class Rotate:
    """Rotate counter-clockwise by ``angle`` degrees about (cx, cy) in pixels, keeping the frame size."""

    angle: float
    cx: float
    cy: float

    def image(self, img: np.ndarray) -> np.ndarray:
        """Apply to an (H, W, 3) uint8 image."""
        out = Image.fromarray(np.ascontiguousarray(img)).rotate(
            self.angle, resample=_BILINEAR, expand=False, center=(self.cx, self.cy), fillcolor=(0, 0, 0)
        )
        return np.asarray(out)

    def masks(self, masks: np.ndarray) -> np.ndarray:
        """Apply to (N, H, W) bool masks."""
        return _pillow_masks(
            np.ascontiguousarray(masks),
            lambda im: im.rotate(self.angle, resample=_NEAREST, expand=False, center=(self.cx, self.cy), fillcolor=0),
        )


Op = Union[Resize, Crop, HFlip, Rotate]


@dataclass(frozen=True)
class FrameTransform:
    """The geometric operations of one frame, applied in order to its image and its masks alike."""

    ops: tuple[Op, ...]
    out_size: tuple[int, int]  # (h, w) after all ops

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8, C-contiguous."""
        for op in self.ops:
            image = op.image(image)
        return np.ascontiguousarray(image)

    def apply_masks(self, masks: np.ndarray) -> np.ndarray:
        """(N, H, W) bool -> (N, h, w) bool, C-contiguous."""
        masks = masks.astype(bool, copy=False)
        for op in self.ops:
            masks = op.masks(masks)
        return np.ascontiguousarray(masks)


@dataclass(frozen=True)
class ClipTransform:
    """One :class:`FrameTransform` per frame of a clip; all end at the same size."""

    frames: tuple[FrameTransform, ...]
    in_size: tuple[int, int]
    flipped: bool

    @property
    def out_size(self) -> tuple[int, int]:
        """(h, w) of every augmented frame."""
        return self.frames[0].out_size


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def _moving_origins(lo: int, hi_excl: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # second origin is drawn at or after the first, as in the official RandomCropClip
    a = int(rng.integers(lo, hi_excl))
    b = int(rng.integers(a, hi_excl))
    return np.round(a * weights + b * (1.0 - weights)).astype(np.int64)


def sample_clip_transform(
    height: int,
    width: int,
    num_frames: int,
    config: AugmentConfig,
    rng: np.random.Generator,
    *,
    pseudo: bool = False,
) -> ClipTransform:
    """Draw the augmentation of one clip of ``num_frames`` frames of size (height, width)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    shared: list[Op] = []
    per_frame: list[list[Op]] = [[] for _ in range(num_frames)]
    h, w = height, width

    if config.crop_enabled and rng.random() < config.crop_prob:
        if config.crop_pre_sizes:
            size = int(rng.choice(config.crop_pre_sizes))
            h, w = shortest_edge_size(h, w, size, config.crop_pre_max_size)
            shared.append(Resize(h, w))
        lo, hi = config.crop_range
        ch = int(rng.integers(min(h, lo), min(h, hi) + 1))
        cw = int(rng.integers(min(w, lo), min(w, hi) + 1))
        weights = np.sort(rng.random(num_frames))
        ys = _moving_origins(0, h - ch + 1, weights, rng)
        xs = _moving_origins(0, w - cw + 1, weights, rng)
        if rng.random() < 0.5:
            ys, xs = ys[::-1], xs[::-1]
        for t in range(num_frames):
            per_frame[t].append(Crop(int(xs[t]), int(ys[t]), cw, ch))
        h, w = ch, cw

    tail: list[Op] = []
    if config.min_sizes:
        size = int(rng.choice(config.min_sizes))
        h, w = shortest_edge_size(h, w, size, config.max_size)
        tail.append(Resize(h, w))

    # drawn unconditionally so that changing flip_prob leaves every other draw of the clip unchanged
    flipped = bool(rng.random() < config.flip_prob)
    if flipped:
        tail.append(HFlip())

    rotations: Optional[list[Rotate]] = None
    if (config.pseudo_rotation if pseudo else config.video_rotation) and config.rotation_deg > 0:
        angles = np.sort(rng.uniform(-config.rotation_deg, config.rotation_deg, size=num_frames))
        c_lo, c_hi = config.rotation_center
        cx, cy = rng.uniform(c_lo, c_hi), rng.uniform(c_lo, c_hi)
        if rng.random() < 0.5:
            angles = angles[::-1]
        rotations = [Rotate(float(a), float(cx * w), float(cy * h)) for a in angles]

    frames = []
    for t in range(num_frames):
        ops = shared + per_frame[t] + tail + ([rotations[t]] if rotations is not None else [])
        frames.append(FrameTransform(tuple(ops), (h, w)))
    return ClipTransform(tuple(frames), (height, width), flipped)
