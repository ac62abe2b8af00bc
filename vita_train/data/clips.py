"""Turn a video record or a COCO image record into a training clip.

A clip is a dict::

    images  uint8 (T, 3, h, w) RGB       every frame of a clip has the same size
    labels  int64 (G,)                   0-based class index in the target label space
    ids     int64 (G, T)                 track id where the instance is visible, -1 elsewhere
    masks   bool  (G, T, h, w)           visible masks, all False where ids is -1
    source  str                          what the clip came from, for messages

Instances visible in none of the (augmented) frames are dropped. For videos the track id is the
JSON annotation id; for COCO pseudo-videos it is the instance's index in its image record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from runtime.video_io import VideoInputError, read_image
from vita_train.data.augment import AugmentConfig, ClipTransform, sample_clip_transform
from vita_train.data.records import ImageDataset, ImageRecord, Segmentation, VideoDataset, decode_segmentation

__all__ = [
    "ClipSource",
    "ImageClipSource",
    "SampleError",
    "VideoClipSource",
    "assemble_clip",
    "make_source",
    "sample_frame_indices",
]


class SampleError(RuntimeError):
    """One dataset item could not be turned into a clip (unreadable frame, undecodable mask); names file and ids."""


class ClipSource(Protocol):
    """Anything that turns item indices into clips: :class:`VideoClipSource`, :class:`ImageClipSource`."""

    name: str

    def __len__(self) -> int: ...

    def make_clip(self, item: int, rng: np.random.Generator) -> dict: ...


def sample_frame_indices(length: int, num_frames: int, frame_range: int, rng: np.random.Generator) -> list[int]:
    """Official clip sampling: a uniform reference frame plus num_frames-1 draws near it, sorted."""
    if length < 1 or num_frames < 1:
        raise ValueError(f"need length >= 1 and num_frames >= 1, got {length}, {num_frames}")
    ref = int(rng.integers(length))
    candidates = np.array(
        list(range(max(0, ref - frame_range), ref)) + list(range(ref + 1, min(length, ref + frame_range + 1))),
        dtype=np.int64,
    )
    if num_frames == 1:
        return [ref]
    if candidates.size == 0:
        # one-frame video (or frame_range 0): the clip repeats the only frame available
        return [ref] * num_frames
    others = rng.choice(candidates, size=num_frames - 1, replace=True)
    return sorted([ref] + [int(i) for i in others])


def _read_frame(path: str, height: int, width: int, what: str) -> np.ndarray:
    try:
        image = read_image(Path(path))
    except VideoInputError as err:
        raise SampleError(f"{what}: {err}") from err
    if image.shape[:2] != (height, width):
        raise SampleError(
            f"{what}: {path} is {image.shape[1]}x{image.shape[0]} (after EXIF orientation) but the JSON says "
            f"{width}x{height}; fix the JSON's size or the file"
        )
    return image


def _decode(segm: Optional[Segmentation], height: int, width: int, what: str) -> np.ndarray:
    try:
        return decode_segmentation(segm, height, width)
    except Exception as err:  # pycocotools raises assorted types on corrupt RLE/polygons
        raise SampleError(f"{what}: undecodable segmentation ({type(err).__name__}: {err})") from err


def assemble_clip(
    frames: list[np.ndarray],
    frame_masks: list[np.ndarray],
    frame_rows: list[list[int]],
    track_ids: list[int],
    labels: list[int],
    source: str,
) -> dict:
    """Build the clip dict from augmented frames and per-frame masks of the listed instance rows."""
    num_frames = len(frames)
    h, w = frames[0].shape[:2]
    num = len(track_ids)
    masks = np.zeros((num, num_frames, h, w), dtype=bool)
    for t, (m, rows) in enumerate(zip(frame_masks, frame_rows)):
        if rows:
            masks[rows, t] = m
    visible = masks.reshape(num, num_frames, h * w).any(axis=2)  # explicit size: num may be 0
    ids = np.where(visible, np.asarray(track_ids, dtype=np.int64).reshape(num, 1), -1)
    keep = visible.any(axis=1)
    images = np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2))
    return {
        "images": torch.from_numpy(images),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)[keep].reshape(-1)),
        "ids": torch.from_numpy(np.ascontiguousarray(ids[keep].reshape(-1, num_frames))),
        "masks": torch.from_numpy(np.ascontiguousarray(masks[keep])),
        "source": source,
    }


class VideoClipSource:
    """Clips of ``num_frames`` frames sampled from the videos of a :class:`VideoDataset`."""

    def __init__(
        self,
        dataset: VideoDataset,
        num_frames: int,
        frame_range: int,
        augment: Optional[AugmentConfig] = None,
        name: Optional[str] = None,
    ) -> None:
        if num_frames < 1 or frame_range < 0:
            raise ValueError(f"need num_frames >= 1 and frame_range >= 0, got {num_frames}, {frame_range}")
        self.dataset = dataset
        self.num_frames = num_frames
        self.frame_range = frame_range
        self.augment = augment if augment is not None else AugmentConfig()
        self.name = name or dataset.name

    def __len__(self) -> int:
        return len(self.dataset.videos)

    def make_clip(self, item: int, rng: np.random.Generator) -> dict:
        """The clip of video ``item`` (an index into dataset.videos) under the draws of ``rng``."""
        rec = self.dataset.videos[item]
        idx = sample_frame_indices(rec.length, self.num_frames, self.frame_range, rng)
        insts = [inst for inst in rec.instances if any(inst.segmentations[f] is not None for f in idx)]
        tf: ClipTransform = sample_clip_transform(rec.height, rec.width, self.num_frames, self.augment, rng)
        cache: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}
        frames, frame_masks, frame_rows = [], [], []
        for t, f in enumerate(idx):
            if f not in cache:
                what = f"{self.name}: video {rec.video_id} frame {f} ({rec.file_names[f]})"
                image = _read_frame(rec.file_names[f], rec.height, rec.width, what)
                rows = [g for g, inst in enumerate(insts) if inst.segmentations[f] is not None]
                masks = np.zeros((len(rows), rec.height, rec.width), dtype=bool)
                for k, g in enumerate(rows):
                    masks[k] = _decode(
                        insts[g].segmentations[f], rec.height, rec.width,
                        f"{self.name}: video {rec.video_id} annotation {insts[g].ann_id} frame {f}",
                    )
                cache[f] = (image, masks, rows)
            image, masks, rows = cache[f]
            frames.append(tf.frames[t].apply_image(image))
            frame_masks.append(tf.frames[t].apply_masks(masks))
            frame_rows.append(rows)
        return assemble_clip(
            frames, frame_masks, frame_rows,
            [inst.ann_id for inst in insts], [inst.label for inst in insts],
            f"{self.name}:video {rec.video_id} frames {idx}",
        )


class ImageClipSource:
    """COCO pseudo-videos: one image repeated ``num_frames`` times, each copy augmented on its own path."""

    def __init__(
        self,
        dataset: ImageDataset,
        num_frames: int,
        augment: Optional[AugmentConfig] = None,
        name: Optional[str] = None,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"need num_frames >= 1, got {num_frames}")
        self.dataset = dataset
        self.num_frames = num_frames
        self.augment = augment if augment is not None else AugmentConfig()
        self.name = name or dataset.name

    def __len__(self) -> int:
        return len(self.dataset.images)

    def make_clip(self, item: int, rng: np.random.Generator) -> dict:
        """The pseudo-video of image ``item`` (an index into dataset.images) under the draws of ``rng``."""
        rec: ImageRecord = self.dataset.images[item]
        tf = sample_clip_transform(rec.height, rec.width, self.num_frames, self.augment, rng, pseudo=True)
        what = f"{self.name}: image {rec.image_id} ({rec.file_name})"
        image = _read_frame(rec.file_name, rec.height, rec.width, what)
        masks = np.zeros((len(rec.instances), rec.height, rec.width), dtype=bool)
        for g, inst in enumerate(rec.instances):
            masks[g] = _decode(
                inst.segmentation, rec.height, rec.width,
                f"{self.name}: image {rec.image_id} annotation {inst.ann_id}",
            )
        rows = list(range(len(rec.instances)))
        frames = [ft.apply_image(image) for ft in tf.frames]
        frame_masks = [ft.apply_masks(masks) for ft in tf.frames]
        return assemble_clip(
            frames, frame_masks, [rows] * self.num_frames,
            rows, [inst.label for inst in rec.instances],
            f"{self.name}:image {rec.image_id}",
        )


def make_source(
    dataset: VideoDataset | ImageDataset,
    num_frames: int,
    frame_range: int = 20,
    augment: Optional[AugmentConfig] = None,
    name: Optional[str] = None,
) -> ClipSource:
    """A :class:`VideoClipSource` or :class:`ImageClipSource` for ``dataset``, by its type."""
    if isinstance(dataset, VideoDataset):
        return VideoClipSource(dataset, num_frames, frame_range, augment, name)
    if isinstance(dataset, ImageDataset):
        return ImageClipSource(dataset, num_frames, augment, name)
    raise TypeError(f"expected a VideoDataset or ImageDataset, got {type(dataset).__name__}")
