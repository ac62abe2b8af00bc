"""Numpy twins of the torch post-processing (pruning, top-k, bilinear resize, masks) for torch-free backends.

Each function follows its reference in ``vita_train.inference`` (postprocess.py, pruning.py) and
``torch.nn.functional.interpolate``; tests/test_numpy_ops.py checks them against torch.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import mask_kernel


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Float32 softmax along ``axis``, shifted by the maximum so large logits cannot overflow."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Float32 logistic function that neither overflows nor warns for large |x|."""
    x = np.asarray(x, dtype=np.float32)
    # exp of a non-positive number is in (0, 1]: no overflow whatever the sign of x
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32, copy=False)


def kept_per_frame(num_queries: int, ratio: float) -> int:
    """How many of ``num_queries`` frame queries a ratio keeps: ceil(r * Nf), at least one."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in (0, 1] (1.0 = keep all), got {ratio}")
    return max(1, math.ceil(ratio * num_queries))


def prune_frame_queries(
    frame_queries: np.ndarray, frame_logits: np.ndarray, ratio: float
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(B, Nf, C) queries, (B, Nf, K+1) logits -> kept (B, k, C) and their ascending int64 slots (B, k).

    ``ratio == 1`` (nothing pruned) returns the input untouched and ``None``.
    """
    n = frame_queries.shape[1]
    keep = kept_per_frame(n, ratio)
    if keep == n:
        return frame_queries, None
    no_object = softmax(frame_logits)[..., -1]
    # stable sort: among equal no-object probabilities the lower slot wins, deterministically
    index = np.sort(np.argsort(no_object, axis=1, kind="stable")[:, :keep], axis=1).astype(np.int64)
    kept = np.take_along_axis(frame_queries, index[..., None], axis=1)
    return kept, index


def select_topk(pred_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Nv, K+1) logits -> (scores, labels, query_index) of the top-k (query, class) pairs, best first.

    Softmax over all K+1 classes, the no-object column dropped, top-k over the row-major flattened
    (query, class) probabilities, as the torch ``select_topk`` (which leaves its order unspecified).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    probs = softmax(pred_logits)[:, :-1]
    num_classes = probs.shape[1]
    flat = probs.ravel()
    k = min(k, flat.size)
    if k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.float32), empty, empty.copy()
    top = np.argpartition(-flat, k - 1)[:k]
    top = top[np.lexsort((top, -flat[top]))]  # by score descending, then by flat index
    return flat[top], top % num_classes, top // num_classes


def _linear_taps(in_size: int, out_size: int, count: Optional[int] = None) -> tuple[np.ndarray, ...]:
    """Lower/upper source index and their float32 weights for the first ``count`` of ``out_size`` outputs.

    As ATen with align_corners=False and no scale factor: src = max(0, in/out * (dst + 0.5) - 0.5).
    """
    count = out_size if count is None else count
    scale = np.float32(in_size) / np.float32(out_size)
    # ATen's build fuses this multiply-add (one rounding); the float64 product is exact, so rounding
    # once to float32 reproduces its weights bit for bit instead of 1-ulp off at some sizes
    src = (np.float64(scale) * (np.arange(count, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    w_hi = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return lo, hi, np.float32(1.0) - w_hi, w_hi


def _lerp(x: np.ndarray, axis: int, taps: tuple[np.ndarray, ...]) -> np.ndarray:
    """Gather both neighbours along ``axis`` and blend them; in place to spare large temporaries."""
    lo, hi, w_lo, w_hi = taps
    shape = (-1,) + (1,) * (-1 - axis)  # weights broadcast along ``axis`` (a negative axis)
    out = np.take(x, lo, axis=axis)  # np.take is ~2x faster than fancy indexing here
    out *= w_lo.reshape(shape)
    upper = np.take(x, hi, axis=axis)
    upper *= w_hi.reshape(shape)
    out += upper
    return out


def _resize(x: np.ndarray, out_hw: tuple[int, int], count_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes to ``out_hw``, computing only the top-left ``count_hw`` block."""
    h, w = x.shape[-2:]
    # an axis resized to its own size is exactly the input (weights 1 and 0 on the same pixel): skipped, and
    # the result may then be ``x`` itself
    # columns first, then rows: ATen's grouping h0*(w0*a + w1*b) + h1*(w0*c + w1*d)
    cols = x if w == out_hw[1] == count_hw[1] else _lerp(x, -1, _linear_taps(w, out_hw[1], count_hw[1]))
    return cols if h == out_hw[0] == count_hw[0] else _lerp(cols, -2, _linear_taps(h, out_hw[0], count_hw[0]))


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) -> (..., H, W) float32, as F.interpolate(mode="bilinear", align_corners=False)."""
    x = np.asarray(x, dtype=np.float32)
    size = (int(size[0]), int(size[1]))
    out = _resize(x, size, size)
    return out.copy() if out is x else out


def masks_from_logits(
    logits: np.ndarray, padded_size: tuple[int, int], crop: tuple[int, int], orig_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(k, t, h, w) float32 mask logits -> ((k, t, H, W) bool masks, (k, t, 2) float64 [soft sum, pixel count]).

    The logits are resized to ``padded_size`` (only its top-left ``crop``, the resized frame), where the sums of
    the sigmoid over the hard mask (sigmoid > 0.5) and its pixel count are taken per frame, then resized to
    ``orig_size`` and thresholded at 0. The plain reference of ``mask_kernel.masks_from_logits``.
    """
    k, t = logits.shape[:2]
    out = np.empty((k, t, *orig_size), dtype=bool)
    sums = np.empty((k, t, 2), dtype=np.float64)
    # a query at a time: temporaries 1/k the size, which caps peak memory and runs faster
    for q, query_logits in enumerate(logits):
        cropped = _resize(query_logits, padded_size, crop)
        # sigmoid(x) > 0.5 needs x > 0, so evaluating 1 / (1 + exp(-x)) at max(x, 0) is exact inside the
        # hard mask, cannot overflow, and gives exactly 0.5 (outside the mask) everywhere else
        soft = np.maximum(cropped, np.float32(0.0))
        np.negative(soft, out=soft)
        np.exp(soft, out=soft)
        soft += np.float32(1.0)
        np.reciprocal(soft, out=soft)
        hard = soft > 0.5
        sums[q, :, 1] = np.count_nonzero(hard, axis=(1, 2))
        soft *= hard
        sums[q, :, 0] = soft.sum(axis=(1, 2), dtype=np.float64)
        np.greater(_resize(cropped, orig_size, orig_size), 0.0, out=out[q])
    return out, sums


class MaskHead:
    """Numpy twin of ``vita_train.inference.postprocess.MaskScorer`` (runtime.backends.base.MaskHead).

    Mask quality is the mean sigmoid inside the hard mask at the resized (not the original) resolution,
    accumulated over every chunk of frames. The masks come from the compiled kernel where it runs
    (``mask_kernel``, bit-identical masks), else from ``masks_from_logits``.
    """

    def __init__(
        self,
        mask_embed: np.ndarray,
        resized_size: tuple[int, int],
        padded_size: tuple[int, int],
        orig_size: tuple[int, int],
        threads: int = 1,
        bias: Optional[np.ndarray] = None,
    ) -> None:
        """``bias`` (k,): added to each query's logits (a projection folded into ``mask_embed``)."""
        self.mask_embed = np.asarray(mask_embed, dtype=np.float32)  # (k, D) of the selected queries
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
        self.resized_size = (int(resized_size[0]), int(resized_size[1]))
        self.padded_size = (int(padded_size[0]), int(padded_size[1]))
        self.orig_size = (int(orig_size[0]), int(orig_size[1]))
        self.threads = threads
        # float64 sums: a long video adds millions of pixels per query; float32 would drift
        self.numerator = np.zeros(len(self.mask_embed), dtype=np.float64)
        self.denominator = np.zeros(len(self.mask_embed), dtype=np.float64)

    def masks(self, mask_features: np.ndarray) -> np.ndarray:
        """(t, D, h, w) features of consecutive frames -> (k, t, H, W) bool masks at the original size."""
        feats = np.asarray(mask_features, dtype=np.float32)
        t, d, h, w = feats.shape
        # a GEMM per frame on the features as they lie (tensordot would first copy them all into (D, t*h*w)),
        # then the small (t, k, h*w) logits reordered to (k, t, h, w)
        logits = np.matmul(self.mask_embed, np.ascontiguousarray(feats).reshape(t, d, h * w))
        if self.bias is not None:
            logits += self.bias[:, None]
        return self.masks_from_logits(logits.transpose(1, 0, 2).reshape(len(self.mask_embed), t, h, w))

    def masks_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """(k, t, h, w) mask logits of consecutive frames -> (k, t, H, W) bool masks; accumulates mask quality."""
        # resizing to the padded size then cropping = computing only the cropped block at the padded scale
        crop = (min(self.resized_size[0], self.padded_size[0]), min(self.resized_size[1], self.padded_size[1]))
        if mask_kernel.available():
            masks, sums = mask_kernel.masks_from_logits(logits, self.padded_size, crop, self.orig_size, self.threads)
        else:
            masks, sums = masks_from_logits(np.asarray(logits, dtype=np.float32), self.padded_size, crop, self.orig_size)
        self.numerator += sums[..., 0].sum(axis=1)
        self.denominator += sums[..., 1].sum(axis=1)
        return masks

    def mask_quality(self) -> np.ndarray:
        """(k,) float32 mean soft value inside the hard masks so far (0 for empty masks)."""
        return (self.numerator / (self.denominator + 1e-6)).astype(np.float32)
