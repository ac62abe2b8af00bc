"""How far one segmentation result is from another: instances matched one to one by video mask IoU."""

from __future__ import annotations

from typing import Any

import numpy as np


def _areas_and_masks(result: Any) -> list[np.ndarray]:
    """Per instance, its (T, H, W) bool masks packed to bits (a 360x640x36 video stays small)."""
    return [np.packbits(np.stack([result.mask(i, t) for t in range(result.num_frames)]).reshape(-1))
            for i in range(len(result.instances))]


def _popcount(bits: np.ndarray) -> int:
    return int(np.unpackbits(bits).sum())


def video_iou_matrix(a: Any, b: Any) -> np.ndarray:
    """(len(a), len(b)) IoU of whole-video masks (intersection and union summed over frames)."""
    ma, mb = _areas_and_masks(a), _areas_and_masks(b)
    area_a, area_b = [_popcount(m) for m in ma], [_popcount(m) for m in mb]
    iou = np.zeros((len(ma), len(mb)))
    for i, x in enumerate(ma):
        for j, y in enumerate(mb):
            inter = _popcount(x & y)
            union = area_a[i] + area_b[j] - inter
            iou[i, j] = inter / union if union else 1.0
    return iou


def agreement(reference: Any, other: Any) -> dict[str, Any]:
    """Mean and minimum IoU over the reference's instances (unmatched = 0), label agreement and mean / max
    |score difference| of the pairs matched by maximum total IoU."""
    from scipy.optimize import linear_sum_assignment

    if not reference.instances:
        return {"mean_iou": None, "min_iou": None, "label_agreement": None, "score_diff": None,
                "max_score_diff": None, "matched": 0}
    iou = video_iou_matrix(reference, other)
    rows, cols = linear_sum_assignment(-iou) if iou.size else ([], [])
    matched = [(i, j) for i, j in zip(rows, cols)]
    labels = [reference.instances[i].label == other.instances[j].label for i, j in matched]
    diffs = [abs(reference.instances[i].score - other.instances[j].score) for i, j in matched]
    return {
        "mean_iou": float(sum(iou[i, j] for i, j in matched) / len(reference.instances)),
        "label_agreement": float(np.mean(labels)) if labels else 0.0,
        "score_diff": float(np.mean(diffs)) if diffs else None,
        "max_score_diff": float(max(diffs)) if diffs else None,
        # the worst reference instance: unmatched ones count as 0
        "min_iou": float(min(iou[i, j] for i, j in matched)) if len(matched) == len(reference.instances) else 0.0,
        "matched": len(matched),
    }
