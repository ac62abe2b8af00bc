"""Renderer behind the synthetic VIS data: textured shapes that move, occlude, enter and leave the frame.

The class of an instance is its shape, and each class also has its own band of hues (``CLASS_HUES``), so a
small model trained for minutes on a CPU can classify; saturation, brightness and texture are drawn per
instance. Geometry lives in continuous pixel coordinates where pixel (row i, col j)
covers [j, j+1) x [i, i+1), the convention pycocotools uses for polygons, so both rasterisations agree.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass, field

import numpy as np
import pycocotools.mask as mask_util

SYNTHETIC_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "ring")
DISC, SQUARE, TRIANGLE, RING = range(len(SYNTHETIC_CLASSES))

# Shape sizes relative to the nominal radius r, chosen so the four classes cover similar areas.
_SQUARE_HALF_SIDE = 0.85
_TRIANGLE_CIRCUMRADIUS = 1.25
_RING_INNER = 0.55
_DISC_POLYGON_VERTICES = 32


@dataclass(frozen=True)
class SyntheticClip:
    """One rendered clip (a still image is a clip of one frame) and its ground truth."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, T, H, W) bool visible masks; pairwise disjoint in every frame
    labels: np.ndarray  # (N,) int64 index into SYNTHETIC_CLASSES
    # Per instance: None, or for a still (T == 1) an (K, 2) float xy polygon, clipped to the image, whose
    # pycocotools rasterisation is exactly that instance's mask (only offered for unoccluded, hole-free shapes).
    polygons: list[np.ndarray | None] = field(default_factory=list)


@dataclass
class _Instance:
    label: int
    depth: float
    center: np.ndarray  # (x, y) at frame 0
    velocity: np.ndarray  # (x, y) pixels per frame
    radius: float
    growth: float  # radius multiplier per frame
    angle: float
    spin: float  # radians per frame
    first: int
    last: int
    color: np.ndarray  # (3,) float
    color2: np.ndarray  # (3,) float
    texture: str
    period: float
    waves: np.ndarray  # (3, 3): per wave (fu, fv, phase) for the noise texture

    def pose(self, t: int) -> tuple[float, float, float, float]:
        """(cx, cy, radius, angle) at frame t."""
        cx, cy = self.center + t * self.velocity
        return float(cx), float(cy), self.radius * self.growth**t, self.angle + t * self.spin


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), built once per frame size and shared read-only."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + np.float32(0.5)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _local(grid: tuple[np.ndarray, np.ndarray], cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in the instance's frame, so textures and shapes rotate with it."""
    yy, xx = grid
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return c * dx + s * dy, -s * dx + c * dy


def _triangle_vertices(radius: float, angle: float) -> np.ndarray:
    """(3, 2) xy offsets of the equilateral triangle's vertices from its centre, one pointing up at angle 0."""
    a = angle - np.pi / 2 + np.arange(3) * (2 * np.pi / 3)
    return _TRIANGLE_CIRCUMRADIUS * radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def shape_mask(label: int, cx: float, cy: float, radius: float, angle: float, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of one whole shape (before occlusion), clipped to the image by construction."""
    u, v = _local(_grid(height, width), cx, cy, angle)
    if label in (DISC, RING):
        d2 = u * u + v * v
        inside = d2 < radius * radius
        return inside & (d2 >= (_RING_INNER * radius) ** 2) if label == RING else inside
    if label == SQUARE:
        half = _SQUARE_HALF_SIDE * radius
        return (np.abs(u) < half) & (np.abs(v) < half)
    if label == TRIANGLE:
        # Each edge's outward normal points away from the opposite vertex; the inradius is half the circumradius.
        a = -np.pi / 2 + np.arange(3) * (2 * np.pi / 3) + np.pi
        inradius = 0.5 * _TRIANGLE_CIRCUMRADIUS * radius
        inside = np.ones(u.shape, dtype=bool)
        for ak in a:
            inside &= u * np.float32(np.cos(ak)) + v * np.float32(np.sin(ak)) <= inradius
        return inside
    raise ValueError(f"unknown synthetic class index {label}")


def shape_polygon(label: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray | None:
    """(K, 2) xy outline of a shape in image coordinates, or None for shapes with a hole (ring)."""
    if label == DISC:
        a = angle + np.arange(_DISC_POLYGON_VERTICES) * (2 * np.pi / _DISC_POLYGON_VERTICES)
        offsets = radius * np.stack([np.cos(a), np.sin(a)], axis=1)
    elif label == SQUARE:
        h = _SQUARE_HALF_SIDE * radius
        offsets = _rotate(np.array([[-h, -h], [h, -h], [h, h], [-h, h]]), angle)
    elif label == TRIANGLE:
        offsets = _triangle_vertices(radius, angle)
    else:
        return None
    return offsets + np.array([cx, cy])


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    # Inverse of _local's rotation: local (u, v) back to image offsets.
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * points[:, 0] - s * points[:, 1], s * points[:, 0] + c * points[:, 1]], axis=1)


def clip_polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sutherland-Hodgman clip of an xy polygon to the image rectangle [0, width] x [0, height]."""
    out = [tuple(p) for p in points]
    for axis, bound, keep_below in (
        (0, 0.0, False),
        (0, float(width), True),
        (1, 0.0, False),
        (1, float(height), True),
    ):
        src, out = out, []
        if not src:
            break
        for i, cur in enumerate(src):
            prev = src[i - 1]
            cur_in = cur[axis] <= bound if keep_below else cur[axis] >= bound
            prev_in = prev[axis] <= bound if keep_below else prev[axis] >= bound
            if cur_in != prev_in:
                f = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1])))
            if cur_in:
                out.append(cur)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def rasterize_polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of an xy polygon, rasterised exactly as pycocotools does for COCO annotations."""
    rle = mask_util.merge(mask_util.frPyObjects([points.reshape(-1).tolist()], height, width))
    return mask_util.decode(rle).astype(bool)


# Centre hue of each class (disc red, square yellow, triangle green, ring blue); instances vary by +-HUE_JITTER.
CLASS_HUES = (0.0, 0.16, 0.36, 0.62)
HUE_JITTER = 0.05


def _random_color(
    rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float], hue: float | None = None
) -> np.ndarray:
    hue = rng.random() if hue is None else (hue + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value))
    return 255.0 * np.asarray(rgb, dtype=np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth, muted (H, W, 3) float32 pattern: a few random low-frequency plane waves per channel plus grain."""
    yy, xx = _grid(height, width)
    base = _random_color(rng, (0.0, 0.35), (0.3, 0.75))
    img = np.empty((height, width, 3), dtype=np.float32)
    for ch in range(3):
        acc = np.full((height, width), base[ch], dtype=np.float32)
        for _ in range(3):
            fx, fy = rng.uniform(-3.0, 3.0, 2)
            amp, phase = rng.uniform(6.0, 22.0), rng.uniform(0, 2 * np.pi)
            acc += np.float32(amp) * np.sin(np.float32(2 * np.pi) * (fx * xx / width + fy * yy / height) + phase)
        img[..., ch] = acc
    img += np.float32(4.0) * rng.standard_normal(img.shape, dtype=np.float32)
    return img


def _texture(inst: _Instance, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Blend weight in [0, 1] between the instance's two colours, in its own rotating frame."""
    k = np.float32(2 * np.pi / inst.period)
    if inst.texture == "stripes":
        return (np.sin(k * u) > 0).astype(np.float32)
    if inst.texture == "checker":
        return ((np.sin(k * u) > 0) ^ (np.sin(k * v) > 0)).astype(np.float32)
    acc = np.zeros(u.shape, dtype=np.float32)
    for fu, fv, phase in inst.waves:
        acc += np.sin(k * (np.float32(fu) * u + np.float32(fv) * v) + np.float32(phase))
    return 0.5 + 0.5 * np.tanh(acc)


def _sample_instance(rng: np.random.Generator, num_frames: int, height: int, width: int) -> _Instance:
    short = min(height, width)
    label = int(rng.integers(len(SYNTHETIC_CLASSES)))
    radius = rng.uniform(0.10, 0.26) * short
    # Centres reach 5% from the border, so some shapes start partly outside the image.
    center = rng.uniform((0.05 * width, 0.05 * height), (0.95 * width, 0.95 * height))
    direction = rng.uniform(0, 2 * np.pi)
    travel = rng.uniform(0.6, 1.2) * max(height, width) if rng.random() < 0.25 else rng.uniform(0.05, 0.5) * short
    steps = max(num_frames - 1, 1)
    velocity = travel / steps * np.array([np.cos(direction), np.sin(direction)])
    growth = rng.uniform(0.8, 1.25) ** (1.0 / steps)
    first, last = 0, num_frames - 1
    if num_frames >= 2 and rng.random() < 0.2:
        first = int(rng.integers(1, num_frames // 2 + 1))
    if num_frames >= 2 and rng.random() < 0.2 and max(first, (num_frames - 1) // 2) < num_frames - 1:
        last = int(rng.integers(max(first, (num_frames - 1) // 2), num_frames - 1))
    color = _random_color(rng, (0.55, 1.0), (0.6, 1.0), hue=CLASS_HUES[label])
    return _Instance(
        label=label,
        depth=float(rng.random()),
        center=center,
        velocity=velocity,
        radius=radius,
        growth=growth,
        angle=rng.uniform(0, 2 * np.pi),
        spin=rng.uniform(-0.08, 0.08),
        first=first,
        last=last,
        color=color,
        color2=color * np.float32(rng.uniform(0.35, 0.7)),
        texture=("stripes", "checker", "noise")[int(rng.integers(3))],
        period=rng.uniform(3.0, 8.0) * short / 96.0,
        waves=rng.uniform((-1.0, -1.0, 0.0), (1.0, 1.0, 2 * np.pi), (3, 3)),
    )


def _render(
    rng: np.random.Generator,
    num_frames: int,
    height: int,
    width: int,
    max_instances: int,
    polygon_fraction: float,
) -> SyntheticClip:
    if num_frames < 1 or height < 1 or width < 1 or max_instances < 1:
        raise ValueError(f"need >= 1 frame, pixel and instance, got T={num_frames}, {height}x{width}, {max_instances}")
    background = _background(rng, height, width)
    instances = [
        _sample_instance(rng, num_frames, height, width) for _ in range(int(rng.integers(1, max_instances + 1)))
    ]
    order = sorted(range(len(instances)), key=lambda i: instances[i].depth)  # back to front
    use_polygon = [num_frames == 1 and rng.random() < polygon_fraction for _ in instances]
    grid = _grid(height, width)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    masks = np.zeros((len(instances), num_frames, height, width), dtype=bool)
    polygons: list[np.ndarray | None] = [None] * len(instances)
    for t in range(num_frames):
        full: dict[int, np.ndarray] = {}
        for i, inst in enumerate(instances):
            if inst.first <= t <= inst.last:
                cx, cy, r, a = inst.pose(t)
                full[i] = shape_mask(inst.label, cx, cy, r, a, height, width)
                if use_polygon[i]:
                    polygons[i] = _polygon_for(inst, t, height, width)
                    if polygons[i] is not None:
                        # The polygon's own rasterisation is drawn, so its annotation matches the pixels exactly.
                        full[i] = rasterize_polygon(polygons[i], height, width)
        covered = np.zeros((height, width), dtype=bool)
        for i in reversed(order):  # front to back: each instance keeps only what nothing in front hides
            if i in full:
                masks[i, t] = full[i] & ~covered
                covered |= full[i]
                if polygons[i] is not None and masks[i, t].sum() != full[i].sum():
                    polygons[i] = None  # occluded: a polygon of the whole shape would overstate the mask
        img = background + np.float32(2.0) * rng.standard_normal(background.shape, dtype=np.float32)
        for i in order:
            if i in full and full[i].any():
                inst = instances[i]
                cx, cy, _, a = inst.pose(t)
                u, v = _local(grid, cx, cy, a)
                w = _texture(inst, u[full[i]], v[full[i]])[:, None]
                img[full[i]] = (1 - w) * inst.color + w * inst.color2
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    keep = [i for i in range(len(instances)) if masks[i].any()]  # never visible: nothing to annotate
    return SyntheticClip(
        frames=frames,
        masks=masks[keep],
        labels=np.array([instances[i].label for i in keep], dtype=np.int64),
        polygons=[polygons[i] for i in keep],
    )


def _polygon_for(inst: _Instance, t: int, height: int, width: int) -> np.ndarray | None:
    cx, cy, r, a = inst.pose(t)
    outline = shape_polygon(inst.label, cx, cy, r, a)
    if outline is None:
        return None
    # Rounded before rasterising, so the short decimals written to JSON rasterise to exactly this mask.
    clipped = np.round(clip_polygon(outline, width, height), 2)
    # pycocotools reads a flat list of exactly 4 numbers as a box, and fewer than 3 vertices is no area.
    if len(clipped) < 3 or not rasterize_polygon(clipped, height, width).any():
        return None
    return clipped


def render_clip(
    num_frames: int, height: int, width: int, rng: np.random.Generator, max_instances: int = 4
) -> SyntheticClip:
    """Render one video of 1..max_instances moving, occluding shapes over a fresh random background."""
    return _render(rng, num_frames, height, width, max_instances, polygon_fraction=0.0)


def render_still(height: int, width: int, rng: np.random.Generator, max_instances: int = 4) -> SyntheticClip:
    """Render one independent still image (T == 1); about half its unoccluded non-ring shapes carry polygons."""
    return _render(rng, 1, height, width, max_instances, polygon_fraction=0.8)
