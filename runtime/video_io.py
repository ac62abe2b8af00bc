"""Video input: turn a file, a frame folder, an array or an iterable into a stream of RGB frames.

Everything a user may pass as a video goes through :func:`open_video`, which returns a
:class:`FrameSource` yielding ``(H, W, 3)`` uint8 RGB, C-contiguous numpy frames, lazily and in
bounded memory. Bad input raises :class:`VideoInputError` with a message that says what is wrong
and what to do, as early as possible (``open_video`` already reads the first frame).

This module imports without torch (numpy, PyAV, Pillow and the standard library only): the
onnxruntime / TensorRT runtime on edge devices uses it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import warnings
import weakref
from collections.abc import Iterable as IterableABC, Iterator as IteratorABC
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import av
import numpy as np
from PIL import Image, ImageOps

__all__ = ["FrameSource", "TruncatedVideoWarning", "VideoInfo", "VideoInputError", "open_video"]

# Named explicitly (not __name__) because the logger name is part of the module's contract.
_log = logging.getLogger("runtime.video_io")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

VideoLike = Union[str, os.PathLike, np.ndarray, Iterable[np.ndarray], Iterable[Image.Image]]

# A display orientation as (k, mirror): the upright frame is np.rot90(frame[:, ::-1] if mirror else
# frame, k). These 8 pairs cover every right-angle rotation and flip of a display matrix.
_Orientation = Tuple[int, bool]
_UPRIGHT: _Orientation = (0, False)


class VideoInputError(ValueError):
    """Bad video input; the message names what is wrong and what to do."""


class TruncatedVideoWarning(UserWarning):
    """A video file ended early or stopped decoding; the frames before the damage were kept."""


@dataclass(frozen=True)
class VideoInfo:
    """What is known about a video before decoding it all."""

    source: str  # path, or a short description such as "array (20, 120, 200, 3)" or "iterator"
    height: int  # of the upright, RGB-converted frames
    width: int
    fps: Optional[float]  # None when unknown (arrays, folders, iterators)
    num_frames: Optional[int]  # exact or container-estimated; None when unknown (iterators)


# --------------------------------------------------------------------------------------------
# Per-frame conversion and validation
# --------------------------------------------------------------------------------------------


def _dtype_hint(dtype: np.dtype) -> str:
    """How to turn frames of ``dtype`` into uint8."""
    if dtype.kind == "f":
        return "for floats in [0, 1] use (x * 255).astype(np.uint8); for floats in [0, 255] use x.astype(np.uint8)"
    if dtype == np.uint16:
        return "for 16-bit frames use (x >> 8).astype(np.uint8)"
    if dtype.kind == "b":
        return "a bool array is a mask, not a frame; for a black/white video use x.astype(np.uint8) * 255"
    if dtype.kind == "O":
        return "an object array usually means frames of different sizes; resize them to one size first"
    return "convert with x.clip(0, 255).astype(np.uint8) if the values are already in 0..255"


def _check_uint8(array: np.ndarray, what: str) -> None:
    """Raise unless ``array`` is uint8."""
    if array.dtype != np.uint8:
        raise VideoInputError(
            f"{what} has dtype {array.dtype}, but frames must be uint8 RGB (0..255): {_dtype_hint(array.dtype)}"
        )


def _array_frame_to_rgb(frame: np.ndarray, what: str) -> np.ndarray:
    """One H x W, H x W x 1, H x W x 3 or H x W x 4 uint8 array -> (H, W, 3) C-contiguous RGB."""
    _check_uint8(frame, what)
    shape = tuple(frame.shape)
    channels = shape[2] if frame.ndim == 3 else None
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and channels not in (1, 3, 4)):
        hint = ""
        if frame.ndim == 3 and shape[0] in (1, 3, 4):
            hint = " It looks channels-first: use x.transpose(1, 2, 0)."
        raise VideoInputError(
            f"{what} has shape {shape}, but a frame must be H x W x 3 (RGB), H x W x 4 (RGBA), "
            f"H x W x 1 or H x W (grayscale).{hint}"
        )
    if 0 in shape:
        raise VideoInputError(f"{what} is empty (shape {shape}); every frame needs at least one pixel")
    if frame.ndim == 2 or channels == 1:
        return np.repeat(frame.reshape(shape[0], shape[1], 1), 3, axis=2)
    if channels == 4:
        frame = frame[:, :, :3]  # RGBA: the alpha channel is dropped, not composited
    return np.ascontiguousarray(frame)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8 RGB (alpha dropped, grayscale replicated)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale PNGs: PIL's convert("RGB") would clip at 255 instead of rescaling
        gray = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # np.array, not asarray: a writable copy


def _frame_to_rgb(frame: object, what: str) -> np.ndarray:
    """One frame from an iterable (numpy array or PIL image) -> (H, W, 3) uint8 RGB."""
    if isinstance(frame, np.ndarray):
        return _array_frame_to_rgb(frame, what)
    if isinstance(frame, Image.Image):
        return _pil_to_rgb(frame)
    kind = f"{type(frame).__module__}.{type(frame).__qualname__}"
    hint = ""
    if kind.startswith("torch."):
        hint = " For a tensor use t.cpu().numpy() (H x W x 3, uint8)."
    elif isinstance(frame, (str, os.PathLike)):
        hint = " To read image files, pass the folder that holds them."
    raise VideoInputError(
        f"{what} is a {kind}; frames must be numpy uint8 arrays (H x W x 3 RGB) or PIL images.{hint}"
    )


def read_image(path: Path) -> np.ndarray:
    """Read one JPEG/PNG frame upright (EXIF orientation applied) as (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as image:
            return _pil_to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise VideoInputError(
            f"could not read frame image {path}: {err}. Replace or delete the damaged file."
        ) from err


# --------------------------------------------------------------------------------------------
# Display orientation of video files (rotation metadata)
# --------------------------------------------------------------------------------------------


def _display_rotation_get(matrix: Sequence[int]) -> float:
    """FFmpeg's av_display_rotation_get: counter-clockwise degrees of a display matrix, or NaN."""
    a, b, c, d = (matrix[i] / 65536.0 for i in (0, 1, 3, 4))
    scale0, scale1 = math.hypot(a, c), math.hypot(b, d)
    if scale0 == 0.0 or scale1 == 0.0:
        return math.nan
    return -math.degrees(math.atan2(b / scale1, a / scale0))


def _orientation_from_matrix(matrix: Sequence[int]) -> _Orientation:
    """The upright transform of a display matrix, decided exactly as the ffmpeg / ffplay CLI do."""
    rotation = _display_rotation_get(matrix)
    if math.isnan(rotation):
        return _UPRIGHT
    theta = -round(rotation)  # clockwise degrees, as in fftools' get_rotation
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return (1, True) if matrix[3] > 0 else (3, False)  # transpose=cclock_flip / clock
    if abs(theta - 270) < 1:
        return (3, True) if matrix[3] < 0 else (1, False)  # transpose=clock_flip / cclock
    if abs(theta - 180) < 1:
        hflip, vflip = matrix[0] < 0, matrix[4] < 0
        return {(True, True): (2, False), (True, False): (0, True), (False, True): (2, True)}.get(
            (hflip, vflip), _UPRIGHT
        )
    if abs(theta) < 1:
        return (2, True) if matrix[4] < 0 else _UPRIGHT  # vflip
    _log.warning("ignoring a display rotation of %.1f degrees: only multiples of 90 are applied", theta)
    return _UPRIGHT


def _display_matrix(frame: av.VideoFrame) -> Optional[Tuple[int, ...]]:
    """The frame's DISPLAYMATRIX side data as 9 ints, or None."""
    try:
        for side_data in frame.side_data:
            kind = getattr(side_data.type, "name", str(side_data.type))
            if "DISPLAYMATRIX" in str(kind).upper():
                raw = bytes(side_data)
                if len(raw) == 36:
                    return struct.unpack("=9i", raw)  # int32_t[9] in native byte order
    except (AttributeError, TypeError, ValueError, KeyError):
        pass  # an older PyAV with another side-data API: fall back below
    return None


def _video_orientation(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> _Orientation:
    """How to turn this stream's frames upright, from the display matrix or the legacy rotate tag."""
    matrix = _display_matrix(frame)
    if matrix is not None:
        return _orientation_from_matrix(matrix)
    rotation = getattr(frame, "rotation", 0) or 0  # counter-clockwise degrees (PyAV >= 13)
    if rotation:
        clockwise = -rotation
    else:
        # FFmpeg < 5 exported the rotation as a "rotate" tag: clockwise degrees
        try:
            clockwise = float(stream.metadata.get("rotate", 0) or 0)
        except ValueError:
            clockwise = 0
    return {90: (3, False), 180: (2, False), 270: (1, False)}.get(int(round(clockwise)) % 360, _UPRIGHT)


def _apply_orientation(image: np.ndarray, orientation: _Orientation) -> np.ndarray:
    """Turn a decoded frame upright as a player would show it."""
    k, mirror = orientation
    if mirror:
        image = image[:, ::-1]
    if k % 4:
        image = np.rot90(image, k)
    return np.ascontiguousarray(image)


# --------------------------------------------------------------------------------------------
# Readers: one per kind of input; FrameSource adds peeking, re-iteration and size checks
# --------------------------------------------------------------------------------------------


class _Reader:
    """Produces a fresh iterator over a video's RGB frames on each call to frames()."""

    reopenable = True
    truncated = False
    fps: Optional[float] = None
    num_frames: Optional[int] = None

    def frames(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def frame_name(self, index: int) -> str:
        return f"frame {index}"

    def empty_error(self) -> VideoInputError:
        return VideoInputError(f"{self.describe()} has no frames; pass a video with at least one frame")


class _ArrayReader(_Reader):
    """Frames of a T x H x W [x C] uint8 array, as views (converted per frame where needed)."""

    def __init__(self, array: np.ndarray) -> None:
        _validate_video_array(array)
        self.array = array
        self.num_frames = int(array.shape[0])

    def describe(self) -> str:
        return f"array {tuple(self.array.shape)}"

    def frames(self) -> Iterator[np.ndarray]:
        for index in range(self.array.shape[0]):
            yield _array_frame_to_rgb(self.array[index], self.frame_name(index))


def _validate_video_array(array: np.ndarray) -> None:
    """Raise early for arrays that cannot be a T x H x W [x 1|3|4] uint8 video."""
    shape = tuple(array.shape)
    if array.ndim == 3 and shape[-1] in (1, 3, 4):
        raise VideoInputError(
            f"array of shape {shape} looks like one image (H x W x C), not a video: a video is "
            f"T x H x W x 3; pass x[None] for a one-frame video (a T x H x W grayscale video must be "
            f"wider than 4 pixels)"
        )
    if array.ndim == 4 and shape[-1] not in (1, 3, 4):
        hint = " It looks channels-first: use x.transpose(0, 2, 3, 1)." if shape[1] in (1, 3, 4) else ""
        raise VideoInputError(
            f"array of shape {shape} has {shape[-1]} channels; a video array must be T x H x W x 3 (RGB), "
            f"T x H x W x 4 (RGBA), T x H x W x 1 or T x H x W (grayscale), channels last.{hint}"
        )
    if array.ndim not in (3, 4):
        raise VideoInputError(
            f"array of shape {shape} has {array.ndim} dimensions; a video array must be T x H x W x 3 "
            f"(RGB) or T x H x W (grayscale), uint8"
        )
    if 0 in shape:
        raise VideoInputError(f"array of shape {shape} is empty: every axis (T, H, W, C) must be non-zero")
    _check_uint8(array, f"array of shape {shape}")


class _IterableReader(_Reader):
    """Frames from a user iterable; one-shot when it is itself an iterator (e.g. a generator)."""

    def __init__(self, frames: Iterable[object]) -> None:
        self.iterable = frames
        # not iter(frames) is frames: iter() may have side effects (a DataLoader starts its workers)
        self.reopenable = not isinstance(frames, IteratorABC)
        try:
            self.num_frames = len(frames)  # type: ignore[arg-type]
        except TypeError:
            self.num_frames = None

    def describe(self) -> str:
        if self.num_frames is None:
            return "iterator"
        return f"{type(self.iterable).__name__} ({self.num_frames} frames)"

    def frames(self) -> Iterator[np.ndarray]:
        for index, frame in enumerate(self.iterable):
            yield _frame_to_rgb(frame, f"frame {index} of the {self.describe()}")


def _natural_key(name: str) -> Tuple[object, ...]:
    """Sort key that orders frame_2.jpg before frame_10.jpg (zero-padded names sort as usual)."""
    parts = re.split(r"(\d+)", name)
    # even positions are text, odd positions digits, so ints and strs are never compared
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)) + (name,)


def _frame_files(folder: Path) -> List[Path]:
    """The JPEG/PNG frames of a folder, sorted by name; raise with what the folder holds when none."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: _natural_key(e.name))
    except OSError as err:
        raise VideoInputError(f"cannot list the frame folder {folder}: {err}; check its permissions") from err
    files = [
        Path(e.path)
        for e in entries
        if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()
    ]
    if files:
        return files
    subfolders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    others = [e.name for e in entries if not e.is_dir()]
    msg = f"folder {folder} has no JPEG/PNG frames (.jpg, .jpeg, .png)"
    if others:
        msg += f"; it holds {len(others)} other file(s): {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
    if subfolders:
        msg += (
            f"; it has {len(subfolders)} subfolder(s) such as {subfolders[0]!r}: pass one video's frame "
            f"folder, not a folder of videos"
        )
    if not others and not subfolders:
        msg += " (it is empty)"
    raise VideoInputError(msg + ". Pass a folder of frame images or a video file.")


class _ImageFilesReader(_Reader):
    """Frames from JPEG/PNG files (a YouTube-VIS frame folder, or one image), read with PIL."""

    def __init__(self, files: List[Path], source: str) -> None:
        self.files = files
        self.source = source
        self.num_frames = len(files)

    def describe(self) -> str:
        return self.source

    def frame_name(self, index: int) -> str:
        return f"frame {index} ({self.files[index].name})"

    def frames(self) -> Iterator[np.ndarray]:
        for path in self.files:
            yield read_image(path)


def _stream_seconds(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Optional[float]:
    """The video stream's duration in seconds, or None when only other streams' lengths are known."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", stream.metadata.get("DURATION", "").strip())
    if match:  # Matroska keeps per-track durations in a tag
        hours, minutes, secs = match.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(secs)
    if container.duration and len(container.streams) == 1:
        # with audio or a cover picture beside it, the container's length need not be the video's
        return container.duration / av.time_base
    return None


def _expected_frame_count(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: Optional[float]
) -> Optional[int]:
    """The frame count a container announces: its header count, else its duration times fps."""
    by_count = int(stream.frames) if stream.frames and stream.frames > 0 else None
    seconds = _stream_seconds(container, stream)
    by_duration = int(round(seconds * fps)) if seconds and fps else None
    if "mov" in container.format.name.split(",") and by_duration:
        # MP4/MOV count every sample, also those an edit list (a trim) hides; the duration does not
        return by_duration
    # elsewhere the header count is exact, while a damaged file's duration is guessed from its size
    return by_count or by_duration


def _header_frame_count(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: Optional[float]
) -> Optional[int]:
    """The frame count the container itself records (never a duration x rate guess), or None."""
    count = int(stream.frames) if stream.frames and stream.frames > 0 else None
    if count and "mov" in container.format.name.split(","):
        # MP4/MOV count every sample, also those an edit list (a trim) hides: the trimmed length caps it
        seconds = _stream_seconds(container, stream)
        if seconds and fps:
            return min(count, int(round(seconds * fps)))
    return count


def _ends_early(last_time: Optional[float], interval: Optional[float], seconds: Optional[float]) -> bool:
    """Whether the decoded frames stop well before the time the container says the stream lasts.

    Timestamps, not frame counts: a variable-frame-rate video has no frame count to infer from its duration.
    """
    if last_time is None or interval is None or not seconds:
        return False
    return seconds - (last_time + interval) > max(2 * interval, 0.05 * seconds)


class _VideoFileReader(_Reader):
    """Frames decoded by PyAV / FFmpeg, upright, streamed one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    def _open(self) -> av.container.InputContainer:
        try:
            container = av.open(str(self.path), metadata_errors="replace")
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
            raise VideoInputError(
                f"{self.path} is not a video FFmpeg can read ({err}). Pass a video file (mp4, mkv, avi, "
                f"webm, mov, ...), a folder of JPEG/PNG frames, or a uint8 array."
            ) from err
        if container.format.name == "tty":
            container.close()
            raise VideoInputError(
                f"{self.path} is a text file, not a video (FFmpeg would render it as ANSI art). "
                f"Pass a video file, a folder of JPEG/PNG frames, or a uint8 array."
            )
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            container.close()
            raise VideoInputError(
                f"{self.path} has no video stream (its streams: {', '.join(kinds)}). Pass a file with video."
            )
        return container

    def _read_metadata(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> None:
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else None
        self.num_frames = _expected_frame_count(container, stream, self.fps)
        self._header_count = _header_frame_count(container, stream, self.fps)
        self._seconds = _stream_seconds(container, stream)

    def frames(self) -> Iterator[np.ndarray]:
        container = self._open()
        with container:
            # FFmpeg's own choice (av_find_best_stream): a cover picture stored as a 1-frame video
            # stream loses to the real video even when it comes first
            stream = container.streams.best("video") or container.streams.video[0]
            stream.thread_type = "AUTO"  # slice + frame threads inside the codec
            self._read_metadata(container, stream)
            decoded = container.decode(stream)
            orientation: Optional[_Orientation] = None
            count = 0
            times: list[float] = []  # presentation times of the last frames, for the end-of-stream check
            while True:
                try:
                    frame = next(decoded)
                except StopIteration:
                    break
                except av.error.FFmpegError as err:
                    if count == 0:
                        raise VideoInputError(
                            f"{self.path} has a video stream but no frame could be decoded ({err}); "
                            f"the file is damaged or its codec is unsupported"
                        ) from err
                    # stop rather than skip: frame i must stay frame i of the video for the results
                    self._report_truncated(count, f"decoding stopped with: {err}")
                    return
                if orientation is None:
                    orientation = _video_orientation(frame, stream)
                if frame.time is not None:
                    times = (times + [float(frame.time)])[-32:]
                yield _apply_orientation(frame.to_ndarray(format="rgb24"), orientation)
                count += 1
            if count == 0:
                raise VideoInputError(
                    f"{self.path} has a video stream but no decodable frames; the file is empty or damaged"
                )
            # FFmpeg ends a cut-off stream quietly: a shortfall against the header's own count, or frames
            # that stop well before the stream's recorded end, are the signs
            expected = self._header_count
            if expected is not None and expected - count >= max(2, math.ceil(0.05 * expected)):
                self._report_truncated(count, f"the container's header records {expected} frames")
            elif expected is None:
                gaps = np.diff(times)
                interval = float(np.median(gaps)) if gaps.size else None
                last = times[-1] if times else None
                if _ends_early(last, interval, self._seconds):
                    self._report_truncated(
                        count, f"frames end at {last:.2f} s, the container records {self._seconds:.2f} s"
                    )

    def _report_truncated(self, count: int, reason: str) -> None:
        if self.truncated:
            return  # said once per source, not on every pass
        self.truncated = True
        message = (
            f"{self.path} looks truncated or damaged: decoded {count} frame(s) ({reason}); "
            f"continuing with the {count} frame(s) decoded"
        )
        _log.warning(message)
        warnings.warn(message, TruncatedVideoWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class FrameSource:
    """The frames of one video as (H, W, 3) uint8 RGB C-contiguous arrays, decoded lazily.

    ``info`` is known on return from :func:`open_video`. Iterating again restarts at frame 0 when
    ``reopenable`` (files, folders, arrays, lists); a one-shot iterator raises VideoInputError.
    Frames of an RGB uint8 array input are views of it: copy before writing into them.
    """

    def __init__(self, reader: _Reader) -> None:
        """Open ``reader`` and read its first frame (use :func:`open_video` instead)."""
        self._reader = reader
        self.reopenable: bool = reader.reopenable
        self._closed = False
        self._live: "weakref.WeakSet[Iterator[np.ndarray]]" = weakref.WeakSet()
        frames = self._track(reader.frames())
        try:
            first = next(frames)
        except StopIteration:
            raise reader.empty_error() from None
        self._pending: Optional[Iterator[np.ndarray]] = chain([first], frames)
        height, width = first.shape[:2]
        self.info = VideoInfo(reader.describe(), int(height), int(width), reader.fps, reader.num_frames)
        _log.debug("opened %s", self.info)

    @property
    def truncated(self) -> bool:
        """True once decoding hit damage after at least one good frame."""
        return self._reader.truncated

    def _track(self, frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        self._live.add(frames)
        return frames

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._closed:
            raise ValueError(f"{self.info.source}: the FrameSource is closed")
        if self._pending is not None:
            frames, self._pending = self._pending, None
        elif self.reopenable:
            frames = self._track(self._reader.frames())
        else:
            raise VideoInputError(
                "this video is a one-shot iterator (e.g. a generator) and was already iterated; pass a "
                "list, an array, a file or a folder to read the video more than once"
            )
        return self._checked(frames)

    def _checked(self, frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        size = (self.info.height, self.info.width)
        for index, frame in enumerate(frames):
            if frame.shape[:2] != size:
                raise VideoInputError(
                    f"{self.info.source}: {self._reader.frame_name(index)} is {frame.shape[0]}x{frame.shape[1]} "
                    f"(HxW) but frame 0 is {size[0]}x{size[1]}; all frames of a video must have one size. "
                    f"Resize the frames to one size (for a video file, re-encode it at a fixed size, e.g. "
                    f"ffmpeg -i in.mp4 -vf scale={size[1]}:{size[0]} out.mp4)"
                )
            yield frame

    def close(self) -> None:
        """Release open files and decoders; iterating afterwards raises ValueError."""
        self._closed = True
        self._pending = None
        for frames in list(self._live):
            try:
                frames.close()  # type: ignore[attr-defined]
            except ValueError:
                pass  # running in another thread (a prefetcher): it closes when that thread drops it

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FrameSource({self.info}, reopenable={self.reopenable}, truncated={self.truncated})"


def _reader_for_path(path: Path) -> _Reader:
    """A reader for a video file, a frame folder or a single image file."""
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the current directory {os.getcwd()})"
        raise VideoInputError(f"video path does not exist: {path}{where}; check the path")
    if path.is_dir():
        return _ImageFilesReader(_frame_files(path), str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        # one image through PIL, like a folder's frames, so that its EXIF orientation is honoured
        return _ImageFilesReader([path], str(path))
    return _VideoFileReader(path)


def _reader_for(video: object) -> _Reader:
    """Dispatch on the kind of input."""
    if isinstance(video, (str, os.PathLike)):
        if not str(os.fspath(video)).strip():
            raise VideoInputError("the video path is empty; pass the path of a video file or a frame folder")
        return _reader_for_path(Path(os.fspath(video)))
    if isinstance(video, np.ndarray):
        return _ArrayReader(video)
    kind = f"{type(video).__module__}.{type(video).__qualname__}"
    if kind.startswith("torch."):
        hint = "convert it with x.cpu().numpy() (uint8, T x H x W x 3 RGB)"
    elif isinstance(video, (bytes, bytearray, memoryview)) or hasattr(video, "read"):
        hint = "pass the path of the video file instead of its contents"
    elif isinstance(video, Image.Image):
        hint = "pass [image] for a one-frame video, or a folder of frames"
    elif isinstance(video, dict):
        hint = "pass the frames themselves (a list or an array), not a dict"
    elif isinstance(video, IterableABC):
        return _IterableReader(video)
    else:
        hint = "pass a video file path, a frame folder, a uint8 array T x H x W x 3 or an iterable of frames"
    raise VideoInputError(f"unsupported video input of type {kind}: {hint}")


def open_video(video: VideoLike) -> FrameSource:
    """Open a video file, a folder of JPEG/PNG frames, a uint8 array or an iterable of frames."""
    return FrameSource(_reader_for(video))


# --------------------------------------------------------------------------------------------
# Live sources: network streams and capture devices (runtime.stream)
# --------------------------------------------------------------------------------------------

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "tcp", "udp", "srt", "rtp")


class StreamStalledError(VideoInputError):
    """A live source sent no frame for longer than its timeout (after any reconnects allowed)."""


def is_live_source(video: object) -> bool:
    """True for a URL of a network stream (rtsp://, tcp://, ...) or a capture device (/dev/video*)."""
    if not isinstance(video, (str, os.PathLike)):
        return False
    text = str(os.fspath(video))
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    return scheme in LIVE_SCHEMES or text.startswith("/dev/video")


class _LiveReader(_Reader):
    """Frames of a live URL or capture device, decoded by PyAV as they arrive; one pass only.

    A read that blocks longer than ``timeout`` seconds (FFmpeg's interrupt callback) counts as a stall:
    the reader reopens the source up to ``reconnect`` times, then raises StreamStalledError.
    """

    reopenable = False

    def __init__(
        self,
        url: str,
        format: Optional[str] = None,
        options: Optional[dict] = None,
        timeout: float = 10.0,
        reconnect: int = 0,
        reconnect_delay: float = 1.0,
    ) -> None:
        if timeout <= 0:
            raise VideoInputError(f"timeout must be > 0 seconds, got {timeout}")
        if reconnect < 0:
            raise VideoInputError(f"reconnect must be a count >= 0, got {reconnect}")
        self.url, self.format, self.options = url, format, dict(options or {})
        self.timeout, self.reconnect, self.reconnect_delay = float(timeout), int(reconnect), float(reconnect_delay)
        self.frames_read = 0

    def describe(self) -> str:
        return self.url

    def _open(self) -> av.container.InputContainer:
        try:
            container = av.open(
                self.url, format=self.format, options=self.options, timeout=self.timeout, metadata_errors="replace"
            )
        except (av.error.FFmpegError, OSError) as err:
            raise VideoInputError(
                f"cannot open the live source {self.url} ({err}). Check that the sender or camera is running and "
                f"reachable, the URL (scheme, host, port, path) and, for a device, format= (e.g. 'v4l2')"
            ) from err
        if not container.streams.video:
            container.close()
            raise VideoInputError(f"the live source {self.url} carries no video stream")
        return container

    def _retry(self, attempt: int, what: str) -> bool:
        """Wait before reconnect number ``attempt``; False once the allowed reconnects are spent."""
        if attempt > self.reconnect:
            return False
        _log.warning("%s: %s; reconnecting (%d of %d)", self.url, what, attempt, self.reconnect)
        import time

        time.sleep(self.reconnect_delay)
        return True

    def frames(self) -> Iterator[np.ndarray]:
        attempt = 0
        while True:
            try:
                container = self._open()
            except VideoInputError as err:
                attempt += 1
                if not self._retry(attempt, str(err)):
                    raise
                continue
            with container:
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else self.fps
                orientation: Optional[_Orientation] = None
                try:
                    for frame in container.decode(stream):
                        if orientation is None:
                            orientation = _video_orientation(frame, stream)
                        self.frames_read += 1
                        yield _apply_orientation(frame.to_ndarray(format="rgb24"), orientation)
                    return  # the sender ended the stream
                except av.error.FFmpegError as err:
                    yield from self._drain(stream, orientation)
                    stall = f"no data for {self.timeout:g} s after {self.frames_read} frame(s) ({err})"
            attempt += 1
            if not self._retry(attempt, stall):
                raise StreamStalledError(
                    f"the live source {self.url} stalled: {stall}. The sender stopped or the network dropped; "
                    f"pass a longer timeout or reconnect=N to retry"
                )

    def _drain(self, stream: av.video.stream.VideoStream, orientation: Optional[_Orientation]) -> Iterator[np.ndarray]:
        """The frames the decoder still holds when reading fails: every frame that arrived is kept."""
        try:
            for frame in stream.codec_context.decode(None):
                if orientation is None:
                    orientation = _video_orientation(frame, stream)
                self.frames_read += 1
                yield _apply_orientation(frame.to_ndarray(format="rgb24"), orientation)
        except av.error.FFmpegError:
            return

    def empty_error(self) -> VideoInputError:
        return VideoInputError(f"the live source {self.url} ended before sending a frame")


def open_live(
    url: str,
    format: Optional[str] = None,
    options: Optional[dict] = None,
    timeout: float = 10.0,
    reconnect: int = 0,
    reconnect_delay: float = 1.0,
) -> FrameSource:
    """Open a network stream or capture device; ``format``/``options`` go to FFmpeg (e.g. 'v4l2', video_size)."""
    return FrameSource(_LiveReader(url, format, options, timeout, reconnect, reconnect_delay))
