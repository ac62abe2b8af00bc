"""Overlay videos and pictures of a VideoResult: masks blended in one colour per instance, labelled.

Torch-free (numpy, pycocotools, PyAV, PIL). Frames stream through one at a time, so a long video is
never held in memory. Files are written atomically: a temporary file beside the target, renamed
over it only once complete, so an existing output survives any failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional, Union

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vita_train.utils.atomic import atomic_write

from .results import Instance, VideoResult
from .video_io import open_video

logger = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
# PyAV muxer name per output suffix
CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".avi": "avi", ".mov": "mov"}
# H.264 when this FFmpeg build has an encoder for it, else MPEG-4 part 2, which every build has
CODEC_PREFERENCE = ("libx264", "mpeg4")

# Tableau-20 without its greys (a grey blends invisibly into grey scenes); indexed by instance
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232),
    (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
    (247, 182, 210), (219, 219, 141), (158, 218, 229),
)  # fmt: skip

Frames = Union[str, Path, np.ndarray, Iterable[np.ndarray]]
Font = Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]


def instance_color(i: int) -> tuple[int, int, int]:
    """The fixed RGB colour of instance ``i`` (the same in every frame and every render)."""
    return PALETTE[i % len(PALETTE)]


def default_font(height: int) -> Font:
    """PIL's default font, sized to about 1/40 of the frame height (bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=max(10, round(height / 40)))
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def overlay_frame(
    frame: np.ndarray,
    result: VideoResult,
    t: int,
    alpha: float = 0.5,
    *,
    labels: bool = True,
    boxes: bool = False,
    contours: bool = True,
    font: Optional[Font] = None,
) -> np.ndarray:
    """Frame ``t`` (H, W, 3) uint8 RGB with every instance's mask blended in, outlined and labelled."""
    _check_frame(frame, result, t)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    out = np.array(frame, dtype=np.uint8, copy=True)
    present = [(i, inst) for i, inst in enumerate(result.instances) if inst.masks[t] is not None]
    for i, inst in present:
        _blend(out, inst.mask(t), inst.box(t), instance_color(i), alpha, contours)
    if not present or not (labels or boxes):
        return out
    image = Image.fromarray(out)
    draw = ImageDraw.Draw(image)
    font = font or default_font(result.height)
    for i, inst in present:
        box = inst.box(t)
        if boxes:
            x, y, w, h = box
            draw.rectangle([x, y, x + max(w - 1, 0), y + max(h - 1, 0)], outline=instance_color(i))
        if labels:
            _draw_label(draw, font, _label_text(inst, result), box, instance_color(i), image.size)
    return np.asarray(image)


def save_overlay_png(
    result: VideoResult, frame: np.ndarray, t: int, path: Union[str, Path], alpha: float = 0.5, **opts
) -> None:
    """Write frame ``t`` with its overlay as a PNG picture (atomically)."""
    image = Image.fromarray(overlay_frame(frame, result, t, alpha, **opts))
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    logger.info("wrote overlay of frame %d to %s", t, path)


def render_overlay(
    result: VideoResult,
    frames: Frames,
    path: Union[str, Path],
    fps: Optional[float] = None,
    alpha: float = 0.5,
    *,
    labels: bool = True,
    boxes: bool = False,
    contours: bool = True,
    codec: Optional[str] = None,
    min_score: float = 0.3,
) -> None:
    """Write an overlay video of ``result`` on ``frames`` to ``path`` (.mp4, .mkv, .avi or .mov).

    Only instances scoring at least ``min_score`` are drawn (the top-k always includes weak guesses; the
    results JSON keeps them all, as the YouTube-VIS metric wants).

    ``frames``: RGB uint8 (H, W, 3) frames as an iterable or a (T, H, W, 3) array, or a path to a
    video file or a folder of frame images. Frame rate: ``fps`` when given, else ``result.fps``,
    else 30. Codec: H.264 (libx264, yuv420p) when available, else MPEG-4 part 2; ``codec`` overrides.
    Odd frame sizes are padded by one row/column (edge pixels) since yuv420p needs even sizes.
    ValueError when the frames do not match the result in count or size; no file is left then.
    A truncated result is rendered on its first ``num_frames`` frames only.
    """
    path = Path(path)
    container_format = CONTAINERS.get(path.suffix.lower())
    if container_format is None:
        raise ValueError(f"cannot tell the container from {path.name!r}: use one of {', '.join(CONTAINERS)}")
    if result.num_frames == 0:
        raise ValueError("the result covers no frames: there is nothing to render")
    rate = _frame_rate(_pick_fps(fps, result))
    codec = codec or pick_codec()
    style = dict(alpha=alpha, labels=labels, boxes=boxes, contours=contours, font=default_font(result.height))
    shown = dataclasses.replace(result, instances=[i for i in result.instances if i.score >= min_score])
    with contextlib.closing(_frames_from(frames)) as source:
        atomic_write(path, lambda f: _encode(f, container_format, codec, rate, shown, source, style))
    logger.info("wrote %d-frame overlay (%s, %s fps) to %s", result.num_frames, codec, rate, path)


def pick_codec() -> str:
    """The first encoder of CODEC_PREFERENCE that this PyAV/FFmpeg build has."""
    for name in CODEC_PREFERENCE:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises UnknownCodecError (or ValueError in older versions)
            logger.debug("encoder %s is not in this FFmpeg build", name)
    raise RuntimeError(f"this FFmpeg build has none of the encoders {CODEC_PREFERENCE}")


def _encode(
    file: IO, container_format: str, codec: str, rate: Fraction, result: VideoResult, frames: Iterator, style: dict
) -> None:
    """Blend and encode every frame into ``file``; raises before the file is kept on any mismatch."""
    height, width = result.height + result.height % 2, result.width + result.width % 2
    container = av.open(file, "w", format=container_format)
    try:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            # its default 200 kb/s smears masks; ~0.2 bit per pixel keeps edges readable
            stream.bit_rate = int(max(1_000_000, 0.2 * width * height * float(rate)))
        count = 0
        for t, frame in enumerate(_limit(frames, result)):
            rgb = _pad_even(overlay_frame(frame, result, t, **style))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            count = t + 1
        if count != result.num_frames:
            raise ValueError(f"the video has {count} frames but the result covers {result.num_frames}")
        container.mux(stream.encode())  # flush the encoder's delayed frames
    except BaseException:
        with contextlib.suppress(Exception):  # the temporary file is deleted anyway: keep the first error
            container.close()
        raise
    container.close()


def _limit(frames: Iterator[np.ndarray], result: VideoResult) -> Iterator[np.ndarray]:
    """The frames the result covers; ValueError (with the true count) when the video is longer."""
    if result.truncated:
        # the source failed after num_frames frames last time: do not read into the failure again
        yield from itertools.islice(frames, result.num_frames)
        return
    for t, frame in enumerate(frames):
        if t == result.num_frames:
            total = t + 1 + sum(1 for _ in frames)
            raise ValueError(f"the video has {total} frames but the result covers {result.num_frames}")
        yield frame


def _frames_from(frames: Frames) -> Iterator[np.ndarray]:
    """RGB uint8 frames from any form of video the runtime accepts (the same reader as segmenting)."""
    source = open_video(frames)
    try:
        yield from source
    finally:
        source.close()


def _pick_fps(fps: Optional[float], result: VideoResult) -> float:
    """The given fps, else the result's, else DEFAULT_FPS."""
    if fps is not None:
        return fps
    return result.fps if result.fps is not None else DEFAULT_FPS


def _frame_rate(fps: float) -> Fraction:
    """``fps`` as the exact-enough fraction that muxers want (29.97 -> 2997/100)."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def _check_frame(frame: np.ndarray, result: VideoResult, t: int) -> None:
    """ValueError unless ``frame`` is an (H, W, 3) uint8 frame of the result's size and ``t`` in range."""
    if not 0 <= t < result.num_frames:
        raise ValueError(f"frame {t} is outside the result, which covers {result.num_frames} frames")
    shape = getattr(frame, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"frame {t} must be (H, W, 3) RGB; got shape {shape}")
    if tuple(shape[:2]) != (result.height, result.width):
        raise ValueError(
            f"frame {t} is {shape[0]}x{shape[1]} (HxW) but the result is {result.height}x{result.width}"
        )
    if frame.dtype != np.uint8:
        raise ValueError(f"frame {t} must be uint8 RGB; got dtype {frame.dtype}")


def _pad_even(rgb: np.ndarray) -> np.ndarray:
    """Repeat the last row/column where the height/width is odd (yuv420p subsamples by 2)."""
    pad_h, pad_w = rgb.shape[0] % 2, rgb.shape[1] % 2
    if not (pad_h or pad_w):
        return rgb
    return np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _blend(
    out: np.ndarray, mask: np.ndarray, box: list[float], color: tuple[int, int, int], alpha: float, contour: bool
) -> None:
    """Blend ``color`` into ``out`` where ``mask``, in place; the mask's inner edge in full colour."""
    # work inside the box only: whole-frame arithmetic per instance dominates the time at 1080p
    x, y, w, h = box
    region = (slice(int(y), int(math.ceil(y + h))), slice(int(x), int(math.ceil(x + w))))
    crop, inside = out[region], mask[region]
    # fixed point in 1/256 steps: the weights sum to 256, so 255 * 256 + 128 bounds it within uint16
    weight = int(round(alpha * 256))
    blended = crop.astype(np.uint16)
    blended *= 256 - weight
    blended += np.asarray(color, dtype=np.uint16) * weight + 128
    blended >>= 8
    np.copyto(crop, blended.astype(np.uint8), where=np.repeat(inside[..., None], 3, axis=2))
    if contour:
        np.copyto(crop, np.asarray(color, dtype=np.uint8), where=_inner_edge(inside)[..., None])


def _inner_edge(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (so the outline never leaves the mask)."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _label_text(inst: Instance, result: VideoResult) -> str:
    """'name 0.87', falling back to the result's class names, then to the index."""
    name = inst.label_name
    if not name and 0 <= inst.label < len(result.class_names):
        name = result.class_names[inst.label]
    return f"{name or inst.label} {inst.score:.2f}"


def _draw_label(
    draw: ImageDraw.ImageDraw, font: Font, text: str, box: list[float], color: tuple, size: tuple[int, int]
) -> None:
    """Text on a filled tag at the box's top-left: above the box when there is room, else inside."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 2, bottom - top + 2
    x = int(min(max(box[0], 0), max(size[0] - tw, 0)))
    y = int(box[1]) - th if box[1] >= th else int(box[1])
    y = min(max(y, 0), max(size[1] - th, 0))
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=color)
    # dark text on light colours, light text on dark ones
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text((x + 1 - left, y + 1 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
