"""Linking a new clip's instances to live tracks: video mask IoU over the shared frames, then a matching."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from vita_train.evaluation.video_iou import build_track, video_iou

# Among pairs of equal IoU (top-k repeats one query's mask under several classes) prefer the same label;
# small enough never to outweigh a real IoU difference of 1e-3.
_LABEL_TIE_BREAK = 1e-6

Masks = Sequence[Optional[dict]]  # per-frame COCO RLE (JSON form) or None where empty


def _counts(rle: Optional[dict]) -> Optional[bytes]:
    if rle is None:
        return None
    counts = rle["counts"]
    return counts.encode("ascii") if isinstance(counts, str) else counts


def mask_iou(tracks: Sequence[Masks], instances: Sequence[Masks], frame_pixels: int) -> np.ndarray:
    """(T, I) video IoU: intersections and unions summed over the frames both lists cover, from the RLEs."""
    def build(masks: Sequence[Masks]):
        return [build_track(i, [_counts(r) for r in m], frame_pixels) for i, m in enumerate(masks)]

    return video_iou(build(tracks), build(instances))


def match(
    iou: np.ndarray,
    method: str,
    min_iou: float,
    track_labels: Optional[Sequence[int]] = None,
    instance_labels: Optional[Sequence[int]] = None,
) -> list[tuple[int, int]]:
    """(track, instance) pairs: Hungarian (scipy's linear_sum_assignment) or greedy by IoU, each >= min_iou."""
    if iou.size == 0:
        return []
    gain = iou.astype(np.float64)
    if track_labels is not None and instance_labels is not None:
        gain = gain + _LABEL_TIE_BREAK * (np.asarray(track_labels)[:, None] == np.asarray(instance_labels)[None, :])
    # pairs that may not link add nothing, so they cannot pull the assignment away from pairs that may
    gain[iou < min_iou] = 0.0
    if method == "hungarian":
        # imported here: the torch-free edge install (numpy, av, onnxruntime, ...) need not carry scipy
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(gain, maximize=True)
        pairs = list(zip(rows.tolist(), cols.tolist()))
    elif method == "greedy":
        pairs = _greedy(gain)
    else:
        raise ValueError(f"association must be 'hungarian' or 'greedy', got {method!r}")
    # an IoU of exactly 0 never links, whatever min_iou says
    return sorted((t, i) for t, i in pairs if iou[t, i] >= min_iou and iou[t, i] > 0)


def _greedy(gain: np.ndarray) -> list[tuple[int, int]]:
    """Best remaining pair first; each track and instance used once (stable on ties: lower indices first)."""
    order = np.argsort(-gain, axis=None, kind="stable")
    used_t, used_i = set(), set()
    pairs = []
    for flat in order.tolist():
        t, i = divmod(flat, gain.shape[1])
        if t in used_t or i in used_i:
            continue
        used_t.add(t)
        used_i.add(i)
        pairs.append((t, i))
        if len(used_t) == gain.shape[0] or len(used_i) == gain.shape[1]:
            break
    return pairs
