"""What a segmented video is: instances with per-frame COCO RLE masks, saved as JSON.

Torch-free on purpose (numpy, pycocotools and the standard library only): an edge image without
torch reads, writes and renders these results.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from pycocotools import mask as mask_utils

from vita_train.utils.atomic import atomic_write

logger = logging.getLogger(__name__)

RESULT_FORMAT = "vita-video-result"
RESULT_VERSION = 1


def _rle_for_json(rle: Optional[dict]) -> Optional[dict]:
    """A JSON-ready copy of an RLE: pycocotools hands back ``counts`` as bytes."""
    if rle is None:
        return None
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(s) for s in rle["size"]], "counts": counts}


def _rle_for_coco(rle: dict) -> dict:
    """An RLE that pycocotools accepts: compressed counts as bytes (a list of runs stays a list)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    elif isinstance(counts, list):
        # uncompressed runs: pycocotools wants them compressed before decode/area
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts}


@dataclass
class Instance:
    """One tracked object: class, score and one mask (RLE or None when empty) per frame."""

    label: int
    label_name: str
    score: float
    masks: list[Optional[dict]]
    boxes: list[Optional[list[float]]]

    def __post_init__(self) -> None:
        if len(self.masks) != len(self.boxes):
            raise ValueError(f"an instance needs one box per mask: {len(self.masks)} masks, {len(self.boxes)} boxes")

    def size(self) -> Optional[tuple[int, int]]:
        """(height, width) read from any non-empty frame's RLE; None when every frame is empty."""
        for rle in self.masks:
            if rle is not None:
                return int(rle["size"][0]), int(rle["size"][1])
        return None

    def mask(self, t: int, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Decoded (H, W) bool mask of frame ``t``; all False where the frame's mask is empty.

        ``size`` (height, width) is only needed for an instance whose every frame is empty, since
        then no RLE says how large the frame is (VideoResult.mask passes it).
        """
        rle = self.masks[t]
        if rle is not None:
            return mask_utils.decode(_rle_for_coco(rle)).astype(bool)
        size = size or self.size()
        if size is None:
            raise ValueError("every frame of this instance is empty; pass size=(height, width)")
        return np.zeros(size, dtype=bool)

    def box(self, t: int) -> Optional[list[float]]:
        """[x, y, w, h] in frame ``t``: the stored box, else computed from the mask; None where empty."""
        if self.boxes[t] is not None:
            return [float(v) for v in self.boxes[t]]
        if self.masks[t] is None:
            return None
        return [float(v) for v in mask_utils.toBbox(_rle_for_coco(self.masks[t]))]

    def area(self) -> list[int]:
        """Mask area in pixels, per frame (0 where empty)."""
        return [0 if rle is None else int(mask_utils.area(_rle_for_coco(rle))) for rle in self.masks]


@dataclass
class VideoResult:
    """Every instance found in one video, with the video's size and metadata."""

    instances: list[Instance]
    height: int
    width: int
    num_frames: int
    fps: Optional[float] = None
    class_names: tuple[str, ...] = ()
    source: Optional[str] = None
    # the input ended early (decode error): the instances cover only the frames that were decoded
    truncated: bool = False

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        for i, inst in enumerate(self.instances):
            if len(inst.masks) != self.num_frames:
                raise ValueError(f"instance {i} has {len(inst.masks)} frames but the video has {self.num_frames}")

    def mask(self, i: int, t: int) -> np.ndarray:
        """Decoded (H, W) bool mask of instance ``i`` in frame ``t``."""
        return self.instances[i].mask(t, size=(self.height, self.width))

    def to_ytvis(self, video_id: int) -> list[dict]:
        """Instances in the YouTube-VIS results format (category_id = label + 1, None for empty frames)."""
        return [
            {
                "video_id": int(video_id),
                "score": float(inst.score),
                "category_id": int(inst.label) + 1,
                "segmentations": [_rle_for_json(rle) for rle in inst.masks],
            }
            for inst in self.instances
        ]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form that ``save`` writes."""
        return {
            "format": RESULT_FORMAT,
            "version": RESULT_VERSION,
            "height": int(self.height),
            "width": int(self.width),
            "num_frames": int(self.num_frames),
            "fps": None if self.fps is None else float(self.fps),
            "class_names": list(self.class_names),
            "source": self.source,
            "truncated": bool(self.truncated),
            "instances": [_instance_to_dict(inst) for inst in self.instances],
        }

    def save(self, path: Union[str, Path]) -> None:
        """Write the result as JSON, atomically: ``path`` is either the old file or the whole new one."""
        data = self.to_dict()
        atomic_write(path, lambda f: json.dump(data, f, allow_nan=False), binary=False)
        logger.info("saved %d instances over %d frames to %s", len(self.instances), self.num_frames, path)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "the data") -> "VideoResult":
        """Inverse of ``to_dict``; ValueError when ``data`` is not a saved VideoResult."""
        if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
            raise ValueError(f"{origin} is not a saved VideoResult (no format {RESULT_FORMAT!r} marker)")
        if data.get("version") != RESULT_VERSION:
            raise ValueError(
                f"{origin} is a VideoResult of format version {data.get('version')!r}; "
                f"this runtime reads version {RESULT_VERSION}"
            )
        try:
            instances = [_instance_from_dict(d) for d in data["instances"]]
            return cls(
                instances=instances,
                height=int(data["height"]),
                width=int(data["width"]),
                num_frames=int(data["num_frames"]),
                fps=None if data.get("fps") is None else float(data["fps"]),
                class_names=tuple(data.get("class_names", ())),
                source=data.get("source"),
                truncated=bool(data.get("truncated", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{origin} is a damaged VideoResult: {type(e).__name__}: {e}") from e

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VideoResult":
        """Read a result written by ``save``; ValueError for any other file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a saved VideoResult (not JSON: {e})") from e
        return cls.from_dict(data, origin=str(path))

    def render(self, path: Union[str, Path], video: Any, fps: Optional[float] = None, **opts: Any) -> None:
        """Write an overlay video of this result on ``video`` (a video file, a frame folder or RGB frames)."""
        from .render import render_overlay  # rendering pulls in PyAV and PIL: only when asked

        render_overlay(self, video, path, fps=fps, **opts)


def _instance_to_dict(inst: Instance) -> dict[str, Any]:
    """One instance's JSON-ready form."""
    return {
        "label": int(inst.label),
        "label_name": inst.label_name,
        "score": float(inst.score),
        "masks": [_rle_for_json(rle) for rle in inst.masks],
        "boxes": [None if box is None else [float(v) for v in box] for box in inst.boxes],
    }


def _instance_from_dict(d: dict) -> Instance:
    """Inverse of ``_instance_to_dict``."""
    return Instance(
        label=int(d["label"]),
        label_name=str(d["label_name"]),
        score=float(d["score"]),
        masks=list(d["masks"]),
        boxes=list(d["boxes"]),
    )


@dataclass
class MaskEncoder:
    """Builds per-instance RLE lists incrementally, chunk by chunk, so a whole video's masks are never held densely."""

    num_instances: int
    height: int
    width: int
    num_frames: int = field(default=0, init=False)
    _masks: list[list[Optional[dict]]] = field(init=False, repr=False)
    _boxes: list[list[Optional[list[float]]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._masks = [[] for _ in range(self.num_instances)]
        self._boxes = [[] for _ in range(self.num_instances)]

    def add(self, masks: np.ndarray) -> None:
        """Append the next frames: ``masks`` is (num_instances, t, H, W) bool."""
        masks = np.asarray(masks)
        self._check(masks)
        if masks.dtype != bool:
            # pycocotools compares against 0/1 exactly: a mask holding 2 or 255 would be mis-encoded
            masks = masks != 0
        k, t = masks.shape[:2]
        if k == 0 or t == 0:
            self.num_frames += t
            return
        # one encode call for the whole chunk: pycocotools wants (H, W, N) uint8 in Fortran order, i.e. every
        # mask transposed in memory; a plain uint8 copy through the transposed view is that layout (casting
        # bool to uint8 on the way, as asfortranarray does, took 1.5x as long: 1.3 ms a frame of 10 masks)
        flat = masks.reshape(k * t, self.height, self.width).view(np.uint8)
        stack = np.empty((k * t, self.width, self.height), dtype=np.uint8)
        np.copyto(stack, flat.transpose(0, 2, 1))
        stack = stack.transpose(2, 1, 0)
        rles = mask_utils.encode(stack)
        nonempty = stack.any(axis=(0, 1))
        boxes = mask_utils.toBbox(rles)
        for n, (rle, box, keep) in enumerate(zip(rles, boxes, nonempty)):
            i = n // t
            self._masks[i].append(_rle_for_json(rle) if keep else None)
            self._boxes[i].append([float(v) for v in box] if keep else None)
        self.num_frames += t

    def finish(self) -> tuple[list[list[Optional[dict]]], list[list[Optional[list[float]]]]]:
        """Per-instance mask and box lists for every frame added so far."""
        return [list(m) for m in self._masks], [list(b) for b in self._boxes]

    def _check(self, masks: np.ndarray) -> None:
        """Refuse chunks of the wrong shape, or scores passed where a thresholded mask belongs."""
        expected = (self.num_instances, self.height, self.width)
        if masks.ndim != 4 or (masks.shape[0], *masks.shape[2:]) != expected:
            raise ValueError(
                f"masks must be (num_instances, t, H, W) = ({expected[0]}, t, {expected[1]}, {expected[2]}); "
                f"got {masks.shape}"
            )
        if masks.dtype != bool and not np.issubdtype(masks.dtype, np.integer):
            raise TypeError(f"masks must be bool (threshold scores first); got dtype {masks.dtype}")
