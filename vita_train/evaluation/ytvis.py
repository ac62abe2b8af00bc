"""YouTube-VIS video AP/AR, reproducing the numbers of the official ytvos.py / ytvoseval.py (segm)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from vita_train.evaluation.video_iou import Track, build_track, video_iou

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# linspace in float64, as the official code: the 9th IoU threshold is 0.8999999999999999 and several recall
# thresholds are not i/100; both decide matches and precision look-ups at the boundaries.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
# Video ranges (not COCO's 32²/96²), both ends inclusive.
AREA_RANGES = ((0.0, 1e10), (0.0, 128.0**2), (128.0**2, 256.0**2), (256.0**2, 1e10))
AREA_LABELS = ("all", "small", "medium", "large")


class EvaluationError(ValueError):
    """Ground truth or results that cannot be evaluated, with what is wrong and where."""


@dataclass
class _Video:
    id: int
    height: int | None
    width: int | None
    length: int


@dataclass
class _PairResult:
    """Matching of one (video, category) under every area range."""

    scores: np.ndarray  # (D,) descending, at most MAX_DETS[-1]
    matched: list[np.ndarray]  # per area range, (T, D) bool
    ignored: list[np.ndarray]  # per area range, (T, D) bool
    positives: list[int]  # per area range, number of non-ignored GTs


def check_ground_truth(gt: str | Path | dict) -> None:
    """Raise EvaluationError where ``gt`` cannot be evaluated against (read and checked as evaluate_ytvis does)."""
    _parse_gt(*_load_json(gt, "ground truth"))


def evaluate_ytvis(gt: str | Path | dict, results: str | Path | list) -> dict[str, float]:
    """The 12 official YouTube-VIS stats (STAT_NAMES order) of ``results`` against ``gt``; -1 means undefined."""
    gt_data, gt_name = _load_json(gt, "ground truth")
    videos, cat_ids, gts = _parse_gt(gt_data, gt_name)
    res_data, res_name = _load_json(results, "results")
    dets = _parse_results(res_data, res_name, gt_name, videos, set(cat_ids))
    pairs = {key: _evaluate_pair(dets.get(key, []), gts.get(key, [])) for key in set(gts) | set(dets)}
    precision, recall = _accumulate(pairs, sorted(videos), cat_ids)
    return dict(zip(STAT_NAMES, _summarize(precision, recall)))


# ----------------------------------------------------------------------------------------------- loading


def _load_json(source: Any, what: str) -> tuple[Any, str]:
    """The parsed JSON and a name for messages: the file path, or a description of the in-memory object."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise EvaluationError(
                f"{what} file {path} does not exist or is not a file; pass the path of the {what} JSON file"
            )
        try:
            with path.open("rb") as fh:
                return json.load(fh), str(path)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EvaluationError(f"{what} file {path} is not valid JSON ({exc}); re-export it as JSON") from exc
    return source, f"the in-memory {what}"


def _bad(name: str, problem: str, fix: str) -> EvaluationError:
    """The error for ``problem`` in the input called ``name``, with what to do about it."""
    return EvaluationError(f"{name}: {problem}; {fix}")


def _require(obj: Any, keys: tuple[str, ...], name: str, what: str) -> None:
    """Raise unless ``obj`` is an object with all of ``keys``."""
    if not isinstance(obj, dict):
        raise _bad(name, f"{what} is a {type(obj).__name__}, not an object", "check the file's format")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _bad(name, f"{what} has no {', '.join(repr(k) for k in missing)}", "add the missing field(s)")


def _id(value: Any, name: str, where: str, field: str) -> int | str:
    """A video/category id as JSON gives it: an integer or a string, never a float, bool, list or null."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    raise _bad(name, f"{where} has {field} {value!r} ({type(value).__name__})", f"make '{field}' an integer")


def _count(value: Any, name: str, where: str, field: str) -> int:
    """A frame count or size field as a non-negative int (an integral float is accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _bad(name, f"{where} has {field} {value!r}", f"make '{field}' a non-negative integer")


def _parse_gt(data: Any, name: str) -> tuple[dict[int, _Video], list[int], dict[tuple[int, int], list[Track]]]:
    """Videos by id, sorted category ids and the GT tracks per (video, category) in file order."""
    if not isinstance(data, dict):
        raise _bad(name, f"ground truth is a {type(data).__name__}", "expected a YouTube-VIS dataset object")
    missing = [k for k in ("videos", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise _bad(
            name,
            f"ground truth has no list {', '.join(repr(k) for k in missing)}",
            "pass a YouTube-VIS annotation file with 'videos', 'annotations' and 'categories'",
        )
    videos: dict[int, _Video] = {}
    for v in data["videos"]:
        _require(v, ("id",), name, "a video entry")
        vid = _id(v["id"], name, "a video entry", "id")
        if vid in videos:
            raise _bad(name, f"video id {vid!r} occurs more than once", "give every video a unique id")
        where = f"video {vid!r}"
        if v.get("length") is not None:
            length = _count(v["length"], name, where, "length")
        elif isinstance(v.get("file_names"), list):
            length = len(v["file_names"])
        else:
            raise _bad(name, f"{where} has neither 'length' nor 'file_names'", "add its number of frames")
        h, w = v.get("height"), v.get("width")
        h = None if h is None else _count(h, name, where, "height")
        w = None if w is None else _count(w, name, where, "width")
        videos[vid] = _Video(vid, h, w, length)
    for c in data["categories"]:
        _require(c, ("id",), name, "a category entry")
    ids = {_id(c["id"], name, "a category entry", "id") for c in data["categories"]}
    cat_ids = sorted(ids, key=lambda i: (isinstance(i, str), i))
    cat_set = set(cat_ids)

    gts: dict[tuple[int, int], list[Track]] = defaultdict(list)
    seen: set[int] = set()
    dropped = 0
    for ann in data["annotations"]:
        _require(ann, ("id", "video_id", "category_id", "segmentations"), name, "an annotation")
        ann_id = ann["id"]
        if isinstance(ann_id, bool) or not isinstance(ann_id, int):
            raise _bad(name, f"an annotation has id {ann_id!r}", "give every annotation a unique integer id")
        if ann_id in seen:
            raise _bad(name, f"annotation id {ann_id} occurs more than once", "give every annotation a unique id")
        if ann_id == 0:
            # the official matcher stores GT ids as match markers, where 0 means "unmatched"
            raise _bad(name, "annotation id 0 is not allowed", "renumber annotation ids from 1")
        seen.add(ann_id)
        video = videos.get(_id(ann["video_id"], name, f"annotation {ann_id}", "video_id"))
        if video is None or _id(ann["category_id"], name, f"annotation {ann_id}", "category_id") not in cat_set:
            dropped += 1  # the official API silently leaves these out as well
            continue
        where = f"annotation {ann_id} (video {video.id})"
        track = _track(ann_id, ann["segmentations"], video, name, where)
        # the ranges use the dataset's own per-frame areas, the IoU the masks
        areas = ann.get("areas")
        track.mean_area = _mean_truthy(areas if isinstance(areas, list) else track.pixels.tolist())
        track.crowd = bool(ann.get("iscrowd", 0))
        gts[video.id, ann["category_id"]].append(track)
    if dropped:
        logger.warning("%s: %d annotation(s) with an unknown video or category were left out", name, dropped)
    return videos, cat_ids, dict(gts)


def _parse_results(
    data: Any, name: str, gt_name: str, videos: dict[int, _Video], cat_ids: set[int]
) -> dict[tuple[int, int], list[Track]]:
    """Detections per (video, category), in results-file order."""
    if not isinstance(data, list):
        raise _bad(name, f"results are a {type(data).__name__}", "expected a JSON list of per-video predictions")
    dets: dict[tuple[int, int], list[Track]] = defaultdict(list)
    for index, r in enumerate(data):
        what = f"result #{index}"
        _require(r, ("video_id", "category_id", "segmentations"), name, what)
        video = videos.get(_id(r["video_id"], name, what, "video_id"))
        if video is None:
            # the repr and type tell '42' (a string) from the ground truth's 42
            raise _bad(
                name,
                f"{what} has video_id {r['video_id']!r} ({type(r['video_id']).__name__}), which is not a video in "
                f"{gt_name}",
                "evaluate against the ground truth of the same split, with video ids of the same type",
            )
        if _id(r["category_id"], name, what, "category_id") not in cat_ids:
            raise _bad(
                name,
                f"{what} (video {video.id!r}) has category_id {r['category_id']!r} "
                f"({type(r['category_id']).__name__}), not a category of {gt_name}",
                "map predictions to the dataset's category ids",
            )
        if "score" not in r:
            raise _bad(name, f"{what} (video {video.id}) has no 'score'", "add the prediction's confidence")
        score = r["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise _bad(name, f"{what} (video {video.id}) has score {score!r}", "scores must be finite numbers")
        # detection ids are 1..N in file order, as loadRes numbers them
        track = _track(index + 1, r["segmentations"], video, name, f"{what} (video {video.id})")
        track.mean_area = _mean_truthy(track.pixels.tolist())
        track.score = float(score)
        dets[video.id, r["category_id"]].append(track)
    return dict(dets)


def _track(ann_id: int, segs: Any, video: _Video, name: str, where: str) -> Track:
    """A track from one RLE/polygons (or null) per frame, checked against the video's length and size."""
    if not isinstance(segs, list):
        raise _bad(name, f"{where}: 'segmentations' is not a list", "give one RLE (or null) per frame")
    if len(segs) != video.length:
        raise _bad(
            name,
            f"{where} has {len(segs)} per-frame segmentations but the video has {video.length} frames",
            "give exactly one RLE (or null) per frame of the video",
        )
    frames = [_rle_string(seg, video, name, f"{where} frame {i}") for i, seg in enumerate(segs)]
    try:
        return build_track(ann_id, frames, (video.height or 0) * (video.width or 0))
    except ValueError as exc:
        raise _bad(name, f"{where} has a malformed RLE ({exc})", "re-encode it with pycocotools") from exc


def _rle_string(seg: Any, video: _Video, name: str, where: str) -> bytes | None:
    """Compressed RLE counts of an RLE, an uncompressed RLE or polygons; None for a falsy (absent) frame."""
    if not seg:
        return None
    try:
        if isinstance(seg, list):
            if video.height is None or video.width is None:
                raise _bad(name, f"{where} is a polygon but video {video.id} has no height/width", "add them")
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, video.height, video.width))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            h, w = (int(x) for x in seg["size"])
            if isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, h, w)
            elif isinstance(seg["counts"], (str, bytes)):
                rle = {"size": [h, w], "counts": seg["counts"]}
            else:
                raise _bad(name, f"{where}: RLE 'counts' is a {type(seg['counts']).__name__}", "use a string or list")
        else:
            raise _bad(name, f"{where} is neither an RLE nor polygons", "use {'size': [h, w], 'counts': ...}")
        counts = rle["counts"]
        counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except EvaluationError:
        raise
    except (TypeError, ValueError, IndexError) as exc:
        raise _bad(name, f"{where} is not a valid segmentation ({exc})", "check its RLE/polygon encoding") from exc
    h, w = (int(x) for x in rle["size"])
    if video.height is None or video.width is None:  # the first mask seen fixes the size of such a video
        video.height, video.width = h, w
    if (h, w) != (video.height, video.width):
        raise _bad(
            name,
            f"{where} has mask size {h}x{w} but video {video.id} is {video.height}x{video.width}",
            "encode masks at the video's original resolution",
        )
    return counts


def _mean_truthy(areas: list) -> float:
    """Mean of the non-null, non-zero per-frame areas (0 if none): the track's area for the range buckets."""
    kept = [a for a in areas if a]
    return float(np.array(kept).mean()) if kept else 0.0


# ---------------------------------------------------------------------------------------------- matching


def _evaluate_pair(dets: list[Track], gts: list[Track]) -> _PairResult:
    """Score-sorted top detections of one (video, category) matched to its GTs under each area range."""
    order = np.argsort([-d.score for d in dets], kind="mergesort")[: MAX_DETS[-1]]
    dets = [dets[i] for i in order]
    ious = video_iou(dets, gts)
    crowd = np.array([g.crowd for g in gts], dtype=bool)
    gt_area = np.array([g.mean_area for g in gts], dtype=np.float64)
    dt_area = np.array([d.mean_area for d in dets], dtype=np.float64)
    result = _PairResult(np.array([d.score for d in dets], dtype=np.float64), [], [], [])
    for lo, hi in AREA_RANGES:
        gt_ignore = crowd | (gt_area < lo) | (gt_area > hi)
        matched, ignored = _greedy_match(ious, gt_ignore, crowd)
        # an unmatched detection outside the range is not an FP of that range
        ignored |= ~matched & ((dt_area < lo) | (dt_area > hi))[None, :]
        result.matched.append(matched)
        result.ignored.append(ignored)
        result.positives.append(int(np.count_nonzero(~gt_ignore)))
    return result


def _greedy_match(ious: np.ndarray, gt_ignore: np.ndarray, crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, D) matched and matched-to-ignored flags: each detection in turn, all IoU thresholds at once."""
    n_d, n_g = ious.shape
    n_t = len(IOU_THRESHOLDS)
    matched = np.zeros((n_t, n_d), dtype=bool)
    ignored = np.zeros((n_t, n_d), dtype=bool)
    if n_d == 0 or n_g == 0:
        return matched, ignored
    above = ious[:, None, :] >= IOU_THRESHOLDS[None, :, None]  # (D, T, G); equal to the threshold matches
    taken = np.zeros((n_t, n_g), dtype=bool)
    rows = np.arange(n_t)
    for d in range(n_d):
        cand = above[d] & ~(taken & ~crowd)  # a crowd GT absorbs any number of detections
        regular = cand & ~gt_ignore
        # A detection that can take a regular GT never falls through to an ignored one, whatever its IoU.
        pool = np.where(regular.any(axis=1, keepdims=True), regular, cand)
        ok = pool.any(axis=1)
        # best IoU, and among equal IoUs the later GT (file order within the regular/ignored group)
        pick = n_g - 1 - np.argmax(np.where(pool, ious[d], -1.0)[:, ::-1], axis=1)
        taken[rows[ok], pick[ok]] = True
        matched[:, d] = ok
        ignored[:, d] = ok & gt_ignore[pick]
    return matched, ignored


# ------------------------------------------------------------------------------------------ accumulation


def _accumulate(
    pairs: dict[tuple[int, int], _PairResult], video_ids: list[int], cat_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """precision (T, R, K, A, M) and recall (T, K, A, M), -1 where a category/range has no positive."""
    n_t, n_r, n_k, n_a, n_m = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(cat_ids), len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((n_t, n_r, n_k, n_a, n_m))
    recall = -np.ones((n_t, n_k, n_a, n_m))
    eps = np.spacing(1)
    for k, cat in enumerate(cat_ids):
        # ascending video id, so that score ties across videos resolve by video id
        entries = [pairs[v, cat] for v in video_ids if (v, cat) in pairs]
        if not entries:
            continue
        for a in range(n_a):
            n_pos = sum(e.positives[a] for e in entries)
            if n_pos == 0:
                continue
            for m, max_det in enumerate(MAX_DETS):
                scores = np.concatenate([e.scores[:max_det] for e in entries])
                order = np.argsort(-scores, kind="mergesort")
                hit = np.concatenate([e.matched[a][:, :max_det] for e in entries], axis=1)[:, order]
                skip = np.concatenate([e.ignored[a][:, :max_det] for e in entries], axis=1)[:, order]
                tp = np.cumsum(hit & ~skip, axis=1).astype(np.float64)
                fp = np.cumsum(~hit & ~skip, axis=1).astype(np.float64)
                n_det = scores.size
                if n_det == 0:
                    recall[:, k, a, m] = 0.0
                    precision[:, :, k, a, m] = 0.0
                    continue
                rc = tp / n_pos
                pr = tp / (fp + tp + eps)
                recall[:, k, a, m] = rc[:, -1]
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
                for t in range(n_t):
                    at = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    # recall levels never reached have precision 0
                    precision[t, :, k, a, m] = np.where(at < n_det, pr[t, np.minimum(at, n_det - 1)], 0.0)
    return precision, recall


def _summarize(precision: np.ndarray, recall: np.ndarray) -> list[float]:
    """The 12 stats: means over the defined (> -1) entries, in STAT_NAMES order."""

    def mean(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(np.mean(defined)) if defined.size else -1.0

    def ap(area: str = "all", iou: float | None = None) -> float:
        s = precision[..., AREA_LABELS.index(area), MAX_DETS.index(100)]
        return mean(s if iou is None else s[np.where(IOU_THRESHOLDS == iou)[0]])

    def ar(area: str = "all", max_det: int = 100) -> float:
        return mean(recall[..., AREA_LABELS.index(area), MAX_DETS.index(max_det)])

    return [
        ap(), ap(iou=0.5), ap(iou=0.75), ap("small"), ap("medium"), ap("large"),
        ar(max_det=1), ar(max_det=10), ar(), ar("small"), ar("medium"), ar("large"),
    ]  # fmt: skip
