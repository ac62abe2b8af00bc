"""Synthetic video instance segmentation data: clips for demos, and whole datasets in YouTube-VIS and COCO format.

Four shape classes (see ``SYNTHETIC_CLASSES``) with per-instance colours and textures move over textured
backgrounds, occlude each other, and enter, leave or cross the frame border. ``write_synthetic_dataset`` writes
JPEG frames plus a YouTube-VIS ``instances.json`` (usable as evaluation ground truth) and, optionally, a COCO
still-image set whose annotations mix compressed RLEs and polygons.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from vita_train.utils.atomic import atomic_write

from .synthetic_render import SYNTHETIC_CLASSES, SyntheticClip, render_clip, render_still

__all__ = [
    "SYNTHETIC_CLASSES",
    "SyntheticArgumentError",
    "SyntheticClip",
    "SyntheticDatasetPaths",
    "SyntheticTargetError",
    "moving_shapes_clip",
    "render_clip",
    "render_still",
    "write_synthetic_dataset",
]

log = logging.getLogger(__name__)

_MIN_SIZE = 32
_JPEG_QUALITY = 95
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Stream tags mixed into the seed, so videos and COCO stills never share random numbers.
_VIDEO_STREAM, _STILL_STREAM, _DEMO_STREAM = 0, 1, 2


class SyntheticArgumentError(ValueError):
    """An argument of ``write_synthetic_dataset`` out of range; ``parameter`` names it, so a CLI can name its flag."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem


class SyntheticTargetError(ValueError):
    """The split folder holds files this module did not write: nothing is written over them."""


@dataclass(frozen=True)
class SyntheticDatasetPaths:
    """Where ``write_synthetic_dataset`` put things; the COCO fields are None when no stills were written."""

    ytvis_json: Path
    ytvis_frames: Path
    coco_json: Path | None
    coco_images: Path | None


def moving_shapes_clip(num_frames: int = 12, height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB: textured shapes moving and occluding each other over a textured background."""
    if num_frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need at least 1 frame of 8x8 pixels, got T={num_frames}, {height}x{width}")
    return render_clip(num_frames, height, width, np.random.default_rng([seed, _DEMO_STREAM])).frames


def write_synthetic_dataset(
    root: str | Path,
    num_videos: int = 20,
    num_frames: int = 12,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    split: str = "train",
    coco_images: int = 0,
) -> SyntheticDatasetPaths:
    """Write ``root/<split>/`` with YouTube-VIS frames + ``instances.json`` and, if asked, a COCO still set."""
    _validate(num_videos, num_frames, height, width, seed, split, coco_images)
    split_dir = Path(root) / split
    _check_target(split_dir)
    frames_dir = split_dir / "JPEGImages"
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SYNTHETIC_CLASSES)]

    videos: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for v in range(num_videos):
        clip = render_clip(num_frames, height, width, _rng(seed, split, _VIDEO_STREAM, v))
        video_id, name = v + 1, f"video_{v + 1:05d}"
        file_names = [f"{name}/{t:05d}.jpg" for t in range(num_frames)]
        (frames_dir / name).mkdir(parents=True, exist_ok=True)
        for frame, file_name in zip(clip.frames, file_names):
            _save_jpeg(frame, frames_dir / file_name)
        videos.append(
            {"id": video_id, "width": width, "height": height, "length": num_frames, "file_names": file_names}
        )
        for n, label in enumerate(clip.labels):
            segs, areas, boxes = _encode_track(clip.masks[n])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "video_id": video_id,
                    "category_id": int(label) + 1,
                    "iscrowd": 0,
                    "segmentations": segs,
                    "areas": areas,
                    "bboxes": boxes,
                    "height": height,
                    "width": width,
                    "length": num_frames,
                }
            )
    # JSON last: a complete instances.json promises that every frame it names is already on disk.
    ytvis_json = split_dir / "instances.json"
    _write_json(ytvis_json, {"videos": videos, "categories": categories, "annotations": annotations})
    log.info("wrote %d synthetic videos (%d tracks) to %s", num_videos, len(annotations), ytvis_json)

    coco_json = coco_dir = None
    if coco_images > 0:
        coco_json, coco_dir = _write_coco(split_dir / "coco", coco_images, height, width, seed, split, categories)
    return SyntheticDatasetPaths(
        ytvis_json=ytvis_json, ytvis_frames=frames_dir, coco_json=coco_json, coco_images=coco_dir
    )


def _write_coco(
    coco_root: Path, num_images: int, height: int, width: int, seed: int, split: str, categories: list[dict]
) -> tuple[Path, Path]:
    images_dir = coco_root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for k in range(num_images):
        still: SyntheticClip = render_still(height, width, _rng(seed, split, _STILL_STREAM, k))
        file_name = f"{k:06d}.jpg"
        _save_jpeg(still.frames[0], images_dir / file_name)
        images.append({"id": k + 1, "file_name": file_name, "height": height, "width": width})
        for n, label in enumerate(still.labels):
            mask = still.masks[n, 0]
            polygon = still.polygons[n]
            segmentation = [polygon.reshape(-1).tolist()] if polygon is not None else _encode(mask[None])[0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k + 1,
                    "category_id": int(label) + 1,
                    "iscrowd": 0,
                    "segmentation": segmentation,
                    "area": int(mask.sum()),
                    "bbox": _bbox(mask),
                }
            )
    coco_json = coco_root / "instances.json"
    _write_json(coco_json, {"images": images, "categories": categories, "annotations": annotations})
    n_poly = sum(isinstance(a["segmentation"], list) for a in annotations)
    log.info(
        "wrote %d synthetic COCO images (%d objects, %d as polygons) to %s",
        num_images,
        len(annotations),
        n_poly,
        coco_json,
    )
    return coco_json, images_dir


def _check_target(split_dir: Path) -> None:
    """``split_dir`` is new, empty, or a synthetic split written here before (rewritten alike, the same files for
    the same arguments); anything else in it is the user's: SyntheticTargetError naming it, nothing written."""
    if not split_dir.exists():
        return
    if not split_dir.is_dir():
        raise SyntheticTargetError(f"{split_dir} is a file, not a folder for the split")
    theirs = [p.name for p in split_dir.iterdir() if p.name not in ("JPEGImages", "instances.json", "coco")]
    frames = split_dir / "JPEGImages"
    if frames.is_dir():
        theirs += [f"JPEGImages/{p.name}" for p in frames.iterdir() if not re.fullmatch(r"video_\d{5}", p.name)]
    coco = split_dir / "coco"
    if coco.is_dir():
        theirs += [f"coco/{p.name}" for p in coco.iterdir() if p.name not in ("images", "instances.json")]
    for name in ("instances.json", "coco/instances.json"):
        if (split_dir / name).exists() and not _written_here(split_dir / name):
            theirs.append(name)
    if theirs:
        shown = ", ".join(sorted(theirs)[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise SyntheticTargetError(f"{split_dir} already holds files this command did not write ({shown}); give "
                                   "another --out or --split: nothing was written")


def _written_here(path: Path) -> bool:
    """True where ``path`` is a json of this module's: its categories are the synthetic classes."""
    try:
        categories = json.loads(path.read_text()).get("categories")
        return [c.get("name") for c in categories] == list(SYNTHETIC_CLASSES)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _validate(
    num_videos: int, num_frames: int, height: int, width: int, seed: int, split: str, coco_images: int
) -> None:
    for name, value, low in (
        ("num_videos", num_videos, 1),
        ("num_frames", num_frames, 1),
        ("height", height, _MIN_SIZE),
        ("width", width, _MIN_SIZE),
        ("seed", seed, 0),
        ("coco_images", coco_images, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SyntheticArgumentError(name, f"must be an integer, got {value!r}")
        if value < low:
            what = "pixels" if name in ("height", "width") else ""
            raise SyntheticArgumentError(name, f"must be >= {low}{' ' + what if what else ''}, got {value}")
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split) or split in (".", ".."):
        raise SyntheticArgumentError(
            "split", f"must be a plain directory name (letters, digits, '_', '-', '.'), got {split!r}"
        )


def _rng(seed: int, split: str, stream: int, index: int) -> np.random.Generator:
    """Generator for one item: the split name is hashed in so 'val' never repeats 'train' for the same seed."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), stream, index])


def _save_jpeg(frame: np.ndarray, path: Path) -> None:
    Image.fromarray(frame).save(path, format="JPEG", quality=_JPEG_QUALITY)


def _encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """Compressed RLEs with str counts for a (T, H, W) bool stack, one pycocotools call for the whole stack."""
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def _bbox(mask: np.ndarray) -> list[float]:
    """Tight [x, y, w, h] of a non-empty mask, in pixels, as COCO floats."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def _encode_track(masks: np.ndarray) -> tuple[list, list, list]:
    """Per-frame (segmentation, area, bbox) lists for one track; frames with an empty mask are null (absent)."""
    rles = _encode(masks)
    segs, areas, boxes = [], [], []
    for mask, rle in zip(masks, rles):
        area = int(mask.sum())
        segs.append(rle if area else None)
        areas.append(area if area else None)
        boxes.append(_bbox(mask) if area else None)
    return segs, areas, boxes


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, separators=(",", ":")), binary=False)
