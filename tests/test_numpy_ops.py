"""runtime.backends.numpy_ops against the torch references it replaces in torch-free backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.backends import numpy_ops
from vita_train.inference import postprocess as ref_post
from vita_train.inference import pruning as ref_prune

from .conftest import assert_imports_without


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _boundary_gap(values: np.ndarray, k: int) -> float:
    """How far the k-th largest value is from the next one, relative to it (inf when all are kept).

    float32 softmax values are good to a few 1e-7 relative; a gap of 1e-5 relative cannot flip.
    """
    s = np.sort(values)[::-1]
    return float((s[k - 1] - s[k]) / abs(s[k - 1])) if 0 < k < s.size else np.inf


def _torch_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(x).reshape(-1, 1, *x.shape[-2:])
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False)
    return out.reshape(*x.shape[:-2], *size).numpy()


@pytest.mark.parametrize(
    "shape,size",
    [
        ((2, 3, 7, 9), (28, 36)),  # x4 up, odd sizes
        ((4, 32, 56), (128, 224)),  # x4 up, the mask head's shape
        ((3, 10, 10), (3, 5)),  # down
        ((2, 13, 17), (13, 17)),  # identity
        ((1, 1), (4, 4)),  # 1 pixel
        ((2, 5, 1), (3, 7)),  # 1 column
        ((2, 20, 30), (57, 11)),  # up one axis, down the other, non-integer ratios
    ],
)
def test_resize_bilinear_matches_interpolate(shape, size):
    x = (_rng(0).standard_normal(shape) * 10).astype(np.float32)
    ours = numpy_ops.resize_bilinear(x, size)
    theirs = _torch_resize(x, size)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_softmax_matches_torch_and_is_stable():
    x = (_rng(1).standard_normal((6, 42)) * 30).astype(np.float32)
    x[0, 0] = 1e4  # would overflow exp without the shift
    ours = numpy_ops.softmax(x)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, torch.from_numpy(x).softmax(-1).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(numpy_ops.softmax(x, axis=0), torch.from_numpy(x).softmax(0).numpy(), atol=1e-6)


def test_sigmoid_has_no_overflow():
    x = np.array([-1e4, -100.0, -88.8, 0.0, 88.8, 100.0, 1e4], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        ours = numpy_ops.sigmoid(x)
    np.testing.assert_allclose(ours, torch.from_numpy(x).sigmoid().numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("num_queries,num_classes,k", [(100, 41, 10), (50, 26, 30), (3, 2, 100), (7, 5, 1)])
def test_select_topk_matches_torch(num_queries, num_classes, k):
    logits = (_rng(k).standard_normal((num_queries, num_classes + 1)) * 3).astype(np.float32)
    # top-k is a hard decision: two float32 implementations may order scores within ~1e-7 either way
    assert _boundary_gap(_softmax64(logits)[:, :-1].ravel(), k) > 1e-5, "the input sits on the top-k boundary"
    scores, labels, query = numpy_ops.select_topk(logits, k)
    ref = ref_post.select_topk(torch.from_numpy(logits), k)
    assert labels.dtype == np.int64 and query.dtype == np.int64 and scores.dtype == np.float32
    assert np.all(np.diff(scores) <= 0), "best first"
    ours = {(int(q), int(c)): float(s) for q, c, s in zip(query, labels, scores)}
    theirs = {(int(q), int(c)): float(s) for q, c, s in zip(ref.query_index, ref.labels, ref.scores)}
    assert ours.keys() == theirs.keys()
    assert max(abs(ours[key] - theirs[key]) for key in ours) <= 1e-6


def test_select_topk_zero():
    scores, labels, query = numpy_ops.select_topk(np.zeros((4, 3), np.float32), 0)
    assert scores.shape == labels.shape == query.shape == (0,)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.3, 0.01, 0.99])
def test_prune_matches_torch(ratio):
    rng = _rng(2)
    queries = rng.standard_normal((3, 100, 16)).astype(np.float32)
    logits = (rng.standard_normal((3, 100, 42)) * 3).astype(np.float32)
    no_object = _softmax64(logits)[..., -1]
    keep = index_count = ref_prune.kept_per_frame(100, ratio)
    # which tokens are kept is a hard decision: check the input does not sit on it in any frame
    assert min(_boundary_gap(-frame, keep) for frame in no_object) > 1e-5, "the input sits on the pruning boundary"
    kept, index = numpy_ops.prune_frame_queries(queries, logits, ratio)
    assert index.shape == (3, index_count)
    ref_kept, ref_index = ref_prune.prune_frame_queries(torch.from_numpy(queries), torch.from_numpy(logits), ratio)
    assert index.dtype == np.int64 and np.all(np.diff(index, axis=1) > 0), "ascending slots"
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(kept, ref_kept.numpy())


def test_prune_ratio_one_and_invalid():
    queries = np.zeros((1, 10, 4), np.float32)
    logits = np.zeros((1, 10, 3), np.float32)
    kept, index = numpy_ops.prune_frame_queries(queries, logits, 1.0)
    assert kept is queries and index is None
    for ratio in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError) as ours:
            numpy_ops.prune_frame_queries(queries, logits, ratio)
        with pytest.raises(ValueError) as theirs:
            ref_prune.prune_frame_queries(torch.from_numpy(queries), torch.from_numpy(logits), ratio)
        assert str(ours.value) == str(theirs.value)


def test_mask_head_matches_mask_scorer():
    k, t, dim, feat_hw = 10, 5, 64, (32, 56)
    resized, padded, orig = (128, 213), (128, 224), (120, 200)
    rng = _rng(3)
    embed = (rng.standard_normal((k, dim)) * 0.3).astype(np.float32)
    chunks = [rng.standard_normal((t, dim, *feat_hw)).astype(np.float32) for _ in range(2)]

    ours = numpy_ops.MaskHead(embed, resized, padded, orig)
    theirs = ref_post.MaskScorer(torch.from_numpy(embed), resized, padded, orig)
    for chunk in chunks:
        mask = ours.masks(chunk)
        ref = theirs.masks(torch.from_numpy(chunk)).numpy()
        assert mask.shape == ref.shape == (k, t, *orig) and mask.dtype == bool
        # the reference's final logits, to check that disagreements sit only on the decision boundary
        logits = torch.einsum("qc,tchw->qthw", torch.from_numpy(embed), torch.from_numpy(chunk))
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        logits = F.interpolate(logits[..., : resized[0], : resized[1]], size=orig, mode="bilinear", align_corners=False)
        differ = mask != ref
        assert differ.mean() < 1e-4
        assert np.all(np.abs(logits.numpy()[differ]) < 1e-4)
    np.testing.assert_allclose(ours.mask_quality(), theirs.mask_quality().numpy(), rtol=0, atol=1e-5)
    assert ours.mask_quality().dtype == np.float32


def test_imports_without_torch():
    assert_imports_without(["runtime.backends.numpy_ops"])


def test_mask_head_large_logits_do_not_overflow():
    rng = _rng(4)
    embed = (rng.standard_normal((3, 8)) * 1e3).astype(np.float32)
    chunk = rng.standard_normal((2, 8, 6, 10)).astype(np.float32)
    ours = numpy_ops.MaskHead(embed, (20, 37), (24, 40), (30, 50))
    theirs = ref_post.MaskScorer(torch.from_numpy(embed), (20, 37), (24, 40), (30, 50))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        mask = ours.masks(chunk)
    ref = theirs.masks(torch.from_numpy(chunk)).numpy()
    assert (mask != ref).mean() < 1e-3
    np.testing.assert_allclose(ours.mask_quality(), theirs.mask_quality().numpy(), rtol=0, atol=1e-5)
