"""Load and validate YouTube-VIS / OVIS video annotations and COCO image annotations into records.

Everything that can be checked without decoding pixels is checked here, at load time, so that a
broken dataset fails in the first second of a run rather than hours into it: the JSON itself, the
categories, the video/image ids annotations refer to, the per-frame segmentation counts and
formats, and that every referenced image file exists. Errors raise :class:`DatasetError` naming the
JSON file, the offending id and what to do.

Class labels are 0-based positions of the categories in ascending id order (detectron2's contiguous
ids), so YouTube-VIS / OVIS category id k is label k - 1 whatever the order of the ``categories`` list;
their ids must be 1..K, as results report label + 1 as the category id. With a ``category_map`` (source
category id -> 0-based target index) labels are in the target label space; then annotations of unmapped
categories are dropped (COCO -> YouTube-VIS joint training).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "DatasetError",
    "ImageDataset",
    "ImageInstance",
    "ImageRecord",
    "Segmentation",
    "VideoDataset",
    "VideoInstance",
    "VideoRecord",
    "decode_segmentation",
    "load_coco",
    "load_ytvis",
]

log = logging.getLogger(__name__)

# A compressed RLE dict {"size": [h, w], "counts": bytes | str} or a list of polygons (flat x, y lists).
Segmentation = Union[dict, list]

_MAX_LISTED = 5  # how many offending paths / ids a message lists before summarising
_MAX_WARNINGS = 20  # per-annotation warnings before the rest are only counted


class DatasetError(ValueError):
    """A dataset JSON or its files are unusable; the message names the file, the id and what to do."""


@dataclass(frozen=True)
class VideoInstance:
    """One annotated instance track of a video."""

    ann_id: int  # the JSON annotation id, used as the track id
    label: int  # 0-based class index in the target label space
    segmentations: tuple[Optional[Segmentation], ...]  # one per frame; None where the instance is absent


@dataclass(frozen=True)
class VideoRecord:
    """One video: its frame files and instance tracks."""

    video_id: int
    file_names: tuple[str, ...]
    height: int
    width: int
    instances: tuple[VideoInstance, ...]

    @property
    def length(self) -> int:
        """Number of frames."""
        return len(self.file_names)


@dataclass
class VideoDataset:
    """A loaded YouTube-VIS / OVIS style video dataset."""

    name: str
    json_path: str
    image_root: str
    class_names: Optional[tuple[str, ...]]
    videos: list[VideoRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.videos)


@dataclass(frozen=True)
class ImageInstance:
    """One annotated instance of an image."""

    ann_id: int
    label: int
    segmentation: Segmentation


@dataclass(frozen=True)
class ImageRecord:
    """One image and its instances."""

    image_id: int
    file_name: str
    height: int
    width: int
    instances: tuple[ImageInstance, ...]


@dataclass
class ImageDataset:
    """A loaded COCO style image dataset."""

    name: str
    json_path: str
    image_root: str
    class_names: Optional[tuple[str, ...]]
    images: list[ImageRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


# ------------------------------------------------------------------------------------------------
# Segmentations
# ------------------------------------------------------------------------------------------------


def _int(value: Any, where: str, field: str) -> int:
    """A JSON integer (or integral number) field as an int; a DatasetError naming the entry and field otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise DatasetError(f"{where}: {field!r} must be an integer, got {value!r}; fix the JSON")


def _number(value: Any, where: str, field: str) -> float:
    """A JSON number field as a float; a DatasetError naming the entry and field otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise DatasetError(f"{where}: {field!r} must be a number, got {value!r}; fix the JSON")


def _file_name(value: Any, where: str, field: str) -> str:
    """A frame/image path field; a DatasetError naming the entry and field unless it is a non-empty string."""
    if isinstance(value, str) and value:
        return value
    raise DatasetError(f"{where}: {field!r} entries must be non-empty file paths, got {value!r}; fix the JSON")


def _normalize_segmentation(segm: Any, height: int, width: int, where: str) -> Optional[Segmentation]:
    """Validate one frame's segmentation; return a compressed RLE or valid polygons, or None if empty."""
    if segm is None:
        return None
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise DatasetError(f"{where}: an RLE segmentation needs 'counts' and 'size', got keys {sorted(segm)}")
        size = segm["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise DatasetError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
        size = [_int(v, where, "size") for v in size]
        if size != [height, width]:
            raise DatasetError(
                f"{where}: RLE size {size} differs from the frame size [{height}, {width}] given in the JSON; "
                "re-export the annotation at the image's resolution"
            )
        counts = segm["counts"]
        try:
            if isinstance(counts, list):
                rle = mask_util.frPyObjects(segm, height, width)  # uncompressed -> compressed, smaller in memory
            elif isinstance(counts, (str, bytes)):
                rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            else:
                raise TypeError(f"counts is a {type(counts).__name__}")
            area = int(mask_util.area(rle))
        except (TypeError, ValueError, UnicodeEncodeError) as err:
            raise DatasetError(f"{where}: undecodable RLE segmentation ({err})") from err
        return rle if area > 0 else None
    if isinstance(segm, list):
        if segm and not any(isinstance(p, (list, tuple)) for p in segm):  # would read as no polygon at all
            raise DatasetError(f"{where}: segmentation is a flat list of {len(segm)} coordinates; polygons are a "
                               "list of [x1, y1, x2, y2, ...] lists: wrap it as [[...]]")
        # polygons with fewer than 3 points are dropped, as in the official loader
        polys = [
            [_number(v, where, "segmentation polygon coordinate") for v in p]
            for p in segm
            if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0
        ]
        return polys or None
    raise DatasetError(
        f"{where}: segmentation must be an RLE dict, a list of polygons or null, got {type(segm).__name__}"
    )


def decode_segmentation(segm: Optional[Segmentation], height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of a normalised segmentation (RLE dict, polygons or None)."""
    if segm is None:
        return np.zeros((height, width), dtype=bool)
    if isinstance(segm, dict):
        counts = segm["counts"]
        if isinstance(counts, list):
            rle = mask_util.frPyObjects(segm, height, width)
        else:
            rle = {"size": list(segm["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        mask = mask_util.decode(rle)
    else:
        rles = mask_util.frPyObjects(segm, height, width)
        mask = mask_util.decode(mask_util.merge(rles))
    if mask.shape[:2] != (height, width):
        raise ValueError(f"decoded mask is {mask.shape[:2]}, expected {(height, width)}")
    return mask.astype(bool, copy=False)


# ------------------------------------------------------------------------------------------------
# Shared loading helpers
# ------------------------------------------------------------------------------------------------


def _read_json(json_path: Union[str, os.PathLike]) -> dict:
    path = os.fspath(json_path)
    if not os.path.isfile(path):
        raise DatasetError(f"annotation file {path} does not exist; check the dataset path")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"could not read annotation file {path}: {err}. Re-download or re-export it.") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _require_list(data: dict, key: str, path: str, kind: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise DatasetError(
            f"{path}: missing or invalid {key!r} list; is this a {kind} annotation file? (top-level keys: "
            f"{sorted(data)})"
        )
    return value


def _categories(
    data: dict, path: str, category_map: Optional[Mapping[int, int]]
) -> tuple[set[int], dict[int, int], Optional[tuple[str, ...]]]:
    """Known category ids, id -> label, and class names (None when a category_map decides the labels)."""
    cats = _require_list(data, "categories", path, "COCO/YouTube-VIS")
    name_of: dict[int, str] = {}
    for c in cats:
        if not isinstance(c, dict) or "id" not in c:
            raise DatasetError(f"{path}: every entry of 'categories' needs an 'id', got {c!r}")
        cid = _int(c["id"], f"{path}: category {c.get('name', c['id'])!r}", "id")
        if cid in name_of:
            raise DatasetError(f"{path}: category id {cid} appears twice in 'categories'")
        name_of[cid] = str(c.get("name", cid))
    ids = sorted(name_of)
    if category_map is None:
        return set(ids), {cid: i for i, cid in enumerate(ids)}, tuple(name_of[cid] for cid in ids)
    return set(ids), {int(k): int(v) for k, v in category_map.items()}, None


def _check_files(paths: Iterable[str], json_path: str, image_root: str) -> None:
    paths = list(paths)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        raise DatasetError(
            f"{json_path}: {len(missing)} of {len(paths)} image files are missing under {image_root} "
            f"(e.g. {listed}); check that image_root is the folder the JSON's file names are relative to, "
            "or re-extract the frames"
        )


class _EmptyReporter:
    """Warn (or raise in strict mode) for annotations without any mask, without flooding the log."""

    def __init__(self, json_path: str, strict: bool) -> None:
        self.json_path = json_path
        self.strict = strict
        self.count = 0

    def __call__(self, what: str) -> None:
        msg = f"{self.json_path}: {what} has no non-empty mask"
        if self.strict:
            raise DatasetError(msg + "; remove or fix the annotation (or load with strict=False to skip it)")
        self.count += 1
        if self.count <= _MAX_WARNINGS:
            log.warning("%s; skipping it", msg)

    def summary(self) -> None:
        if self.count > _MAX_WARNINGS:
            log.warning(
                "%s: skipped %d annotations without a non-empty mask (%d not listed above)",
                self.json_path, self.count, self.count - _MAX_WARNINGS,
            )


def _dims(entry: dict, path: str, what: str) -> tuple[int, int]:
    missing = [k for k in ("height", "width") if k not in entry]
    if missing:
        raise DatasetError(f"{path}: {what} needs integer 'height' and 'width' (no {', '.join(map(repr, missing))})")
    height = _int(entry["height"], f"{path}: {what}", "height")
    width = _int(entry["width"], f"{path}: {what}", "width")
    if height <= 0 or width <= 0:
        raise DatasetError(f"{path}: {what} has size {height}x{width}")
    return height, width


# ------------------------------------------------------------------------------------------------
# YouTube-VIS / OVIS
# ------------------------------------------------------------------------------------------------


def load_ytvis(
    json_path: Union[str, os.PathLike],
    image_root: Union[str, os.PathLike],
    name: str = "ytvis",
    *,
    category_map: Optional[Mapping[int, int]] = None,
    class_names: Optional[Sequence[str]] = None,
    strict: bool = False,
    check_files: bool = True,
    filter_empty: bool = True,
) -> VideoDataset:
    """Load a YouTube-VIS / OVIS training JSON into a validated :class:`VideoDataset`."""
    path = os.fspath(json_path)
    root = os.fspath(image_root)
    data = _read_json(path)
    videos_json = _require_list(data, "videos", path, "YouTube-VIS/OVIS")
    anns_json = _require_list(data, "annotations", path, "YouTube-VIS/OVIS (training split)")
    known_cats, label_of, names = _categories(data, path, category_map)
    if category_map is None and sorted(known_cats) != list(range(1, len(known_cats) + 1)):
        raise DatasetError(
            f"{path}: category ids are {sorted(known_cats)}, but YouTube-VIS/OVIS ids must be 1..K (a model's label "
            "k is reported as category id k + 1); renumber the categories and their annotations, or give a category_map"
        )
    if class_names is not None:
        names = tuple(class_names)

    videos: dict[int, dict] = {}
    for index, v in enumerate(videos_json):
        if not isinstance(v, dict) or "id" not in v:
            raise DatasetError(f"{path}: every entry of 'videos' needs an 'id', got {str(v)[:200]}")
        vid = _int(v["id"], f"{path}: entry #{index} of 'videos'", "id")
        if vid in videos:
            raise DatasetError(f"{path}: video id {vid} appears twice in 'videos'")
        files = v.get("file_names")
        if not isinstance(files, list) or not files:
            raise DatasetError(f"{path}: video {vid} needs a non-empty 'file_names' list")
        for f in files:
            _file_name(f, f"{path}: video {vid}", "file_names")
        if "length" in v and _int(v["length"], f"{path}: video {vid}", "length") != len(files):
            raise DatasetError(
                f"{path}: video {vid} has length {v['length']} but {len(files)} file_names; fix the JSON"
            )
        videos[vid] = v

    reporter = _EmptyReporter(path, strict)
    per_video: dict[int, list[VideoInstance]] = {vid: [] for vid in videos}
    seen_ann: set[int] = set()
    unmapped = crowd = 0
    for index, a in enumerate(anns_json):
        if not isinstance(a, dict) or "id" not in a:
            raise DatasetError(f"{path}: every annotation needs an 'id', got {str(a)[:200]}")
        aid = _int(a["id"], f"{path}: annotation #{index}", "id")
        if aid in seen_ann:
            raise DatasetError(f"{path}: annotation id {aid} appears twice; track ids must be unique")
        seen_ann.add(aid)
        vid = a.get("video_id")
        vid = None if vid is None else _int(vid, f"{path}: annotation {aid}", "video_id")
        if vid is None or vid not in videos:
            raise DatasetError(
                f"{path}: annotation {aid} refers to video id {vid}, which is not in 'videos'; "
                "the annotation file is inconsistent (re-export it or remove the annotation)"
            )
        cat = a.get("category_id")
        cat = None if cat is None else _int(cat, f"{path}: annotation {aid} (video {vid})", "category_id")
        if cat is None or cat not in known_cats:
            raise DatasetError(
                f"{path}: annotation {aid} (video {vid}) has category_id {cat}, which is not in 'categories' "
                f"(ids {sorted(known_cats)}); add the category or fix the annotation"
            )
        if a.get("iscrowd", 0):
            crowd += 1  # crowd regions are not training targets in the official mapper
            continue
        label = label_of.get(cat)
        if label is None:
            unmapped += 1
            continue
        v = videos[vid]
        height, width = _dims(v, path, f"video {vid}")
        segms = a.get("segmentations")
        if not isinstance(segms, list):
            raise DatasetError(f"{path}: annotation {aid} (video {vid}) needs a 'segmentations' list")
        if len(segms) != len(v["file_names"]):
            raise DatasetError(
                f"{path}: annotation {aid} has {len(segms)} segmentations but video {vid} has "
                f"{len(v['file_names'])} frames; there must be one entry (or null) per frame"
            )
        norm = tuple(
            _normalize_segmentation(s, height, width, f"{path}: annotation {aid} (video {vid}) frame {t}")
            for t, s in enumerate(segms)
        )
        if all(s is None for s in norm):
            reporter(f"annotation {aid} (video {vid})")
            continue
        per_video[vid].append(VideoInstance(ann_id=aid, label=label, segmentations=norm))
    reporter.summary()
    if unmapped:
        log.info("%s: dropped %d annotations of categories outside the category map", path, unmapped)
    if crowd:
        log.info("%s: dropped %d crowd annotations", path, crowd)

    records: list[VideoRecord] = []
    for vid in sorted(videos):
        instances = per_video[vid]
        if filter_empty and not instances:
            continue
        v = videos[vid]
        height, width = _dims(v, path, f"video {vid}")
        files = tuple(os.path.join(root, f) for f in v["file_names"])
        records.append(VideoRecord(vid, files, height, width, tuple(instances)))
    if filter_empty and len(records) < len(videos):
        log.info("%s: %d of %d videos have no usable annotation and are skipped", path,
                 len(videos) - len(records), len(videos))
    if not records:
        raise DatasetError(f"{path}: no video with a usable annotation; nothing to train on")
    if check_files:
        _check_files((f for r in records for f in r.file_names), path, root)
    log.info("%s: loaded %d videos, %d instance tracks", path, len(records),
             sum(len(r.instances) for r in records))
    return VideoDataset(name=name, json_path=path, image_root=root, class_names=names, videos=records)


# ------------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------------


def load_coco(
    json_path: Union[str, os.PathLike],
    image_root: Union[str, os.PathLike],
    name: str = "coco",
    *,
    category_map: Optional[Mapping[int, int]] = None,
    class_names: Optional[Sequence[str]] = None,
    strict: bool = False,
    check_files: bool = True,
    filter_empty: bool = True,
) -> ImageDataset:
    """Load a COCO instance-segmentation JSON into a validated :class:`ImageDataset`."""
    path = os.fspath(json_path)
    root = os.fspath(image_root)
    data = _read_json(path)
    images_json = _require_list(data, "images", path, "COCO")
    anns_json = _require_list(data, "annotations", path, "COCO instances")
    known_cats, label_of, names = _categories(data, path, category_map)
    if class_names is not None:
        names = tuple(class_names)

    images: dict[int, dict] = {}
    for index, im in enumerate(images_json):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DatasetError(f"{path}: every entry of 'images' needs 'id' and 'file_name', got {str(im)[:200]}")
        iid = _int(im["id"], f"{path}: entry #{index} of 'images'", "id")
        _file_name(im["file_name"], f"{path}: image {iid}", "file_name")
        if iid in images:
            raise DatasetError(f"{path}: image id {iid} appears twice in 'images'")
        images[iid] = im

    reporter = _EmptyReporter(path, strict)
    per_image: dict[int, list[ImageInstance]] = {iid: [] for iid in images}
    unmapped = crowd = 0
    for index, a in enumerate(anns_json):
        if not isinstance(a, dict) or "id" not in a:
            raise DatasetError(f"{path}: every annotation needs an 'id', got {str(a)[:200]}")
        aid = _int(a["id"], f"{path}: annotation #{index}", "id")
        iid = a.get("image_id")
        iid = None if iid is None else _int(iid, f"{path}: annotation {aid}", "image_id")
        if iid is None or iid not in images:
            raise DatasetError(
                f"{path}: annotation {aid} refers to image id {iid}, which is not in 'images'; "
                "the annotation file is inconsistent (re-export it or remove the annotation)"
            )
        cat = a.get("category_id")
        cat = None if cat is None else _int(cat, f"{path}: annotation {aid} (image {iid})", "category_id")
        if cat is None or cat not in known_cats:
            raise DatasetError(
                f"{path}: annotation {aid} (image {iid}) has category_id {cat}, which is not in 'categories' "
                f"(ids {sorted(known_cats)}); add the category or fix the annotation"
            )
        if a.get("iscrowd", 0):
            crowd += 1
            continue
        label = label_of.get(cat)
        if label is None:
            unmapped += 1
            continue
        height, width = _dims(images[iid], path, f"image {iid}")
        segm = _normalize_segmentation(
            a.get("segmentation"), height, width, f"{path}: annotation {aid} (image {iid})"
        )
        area = a.get("area")
        area = None if area is None else _number(area, f"{path}: annotation {aid} (image {iid})", "area")
        if segm is None or (area is not None and area <= 0):
            reporter(f"annotation {aid} (image {iid})")
            continue
        per_image[iid].append(ImageInstance(ann_id=aid, label=label, segmentation=segm))
    reporter.summary()
    if unmapped:
        log.info("%s: dropped %d annotations of categories outside the category map", path, unmapped)
    if crowd:
        log.info("%s: dropped %d crowd annotations", path, crowd)

    records: list[ImageRecord] = []
    for iid in sorted(images):
        instances = per_image[iid]
        if filter_empty and not instances:
            continue
        im = images[iid]
        height, width = _dims(im, path, f"image {iid}")
        records.append(ImageRecord(iid, os.path.join(root, im["file_name"]), height, width, tuple(instances)))
    if filter_empty and len(records) < len(images):
        log.info("%s: %d of %d images have no usable annotation and are skipped", path,
                 len(images) - len(records), len(images))
    if not records:
        raise DatasetError(f"{path}: no image with a usable annotation; nothing to train on")
    if check_files:
        _check_files((r.file_name for r in records), path, root)
    log.info("%s: loaded %d images, %d instances", path, len(records), sum(len(r.instances) for r in records))
    return ImageDataset(name=name, json_path=path, image_root=root, class_names=names, images=records)
