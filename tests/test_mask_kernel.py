"""The compiled final-mask kernel against its numpy reference: the same masks bit for bit, the same sums."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import mask_kernel, numpy_ops


@pytest.fixture(scope="module")
def kernel():
    mask_kernel.build()  # a build error fails here (as the ONNX Runtime operator's tests do), not a silent skip
    if not mask_kernel.available():
        pytest.skip("compiled kernels are switched off (VITA_NATIVE_KERNELS=0)")
    return mask_kernel


# (h, w) logits, padded size, crop (the resized frame), original size: every branch of both resizes
CASES = [
    ((24, 40), (96, 160), (90, 160), (90, 160)),  # x4 up, crop rows, no second resize (the usual video)
    ((24, 40), (96, 160), (96, 150), (96, 150)),  # crop columns
    ((24, 40), (24, 160), (24, 160), (24, 160)),  # columns only in the first resize
    ((24, 40), (96, 40), (90, 40), (90, 40)),  # rows only
    ((24, 40), (24, 40), (24, 40), (24, 40)),  # identity throughout
    ((24, 40), (96, 160), (90, 160), (180, 320)),  # second resize up (a video larger than the test size)
    ((24, 40), (96, 160), (90, 160), (45, 80)),  # second resize down
    ((24, 40), (96, 160), (90, 160), (90, 200)),  # second resize of columns only
    ((24, 40), (96, 160), (90, 160), (120, 160)),  # second resize of rows only
    ((23, 37), (92, 148), (89, 141), (101, 163)),  # odd sizes everywhere
]


@pytest.mark.parametrize("logit_hw, padded, crop, orig", CASES)
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_matches_the_reference(kernel, logit_hw, padded, crop, orig, threads):
    rng = np.random.default_rng(sum(logit_hw + padded + orig))
    logits = (rng.standard_normal((4, 3, *logit_hw)) * 2).astype(np.float32)
    logits[0, 0] = np.abs(logits[0, 0])  # a query whose mask covers a whole frame
    logits[1, 1] = -np.abs(logits[1, 1])  # and an empty one
    logits[2, 2, ::3] = 0.0  # exactly on the threshold
    ref_masks, ref_sums = numpy_ops.masks_from_logits(logits, padded, crop, orig)
    masks, sums = kernel.masks_from_logits(logits, padded, crop, orig, threads)
    assert masks.shape == ref_masks.shape == (4, 3, *orig) and masks.dtype == bool
    assert np.array_equal(masks, ref_masks)
    assert np.array_equal(sums[..., 1], ref_sums[..., 1])  # hard-mask pixel counts
    np.testing.assert_allclose(sums[..., 0], ref_sums[..., 0], rtol=1e-6, atol=1e-6)
    assert masks[0, 0].all() and not masks[1, 1].any()


def test_a_moved_logit_map_is_caught(kernel):
    """Negative control: the comparison above sees a one-pixel shift of the input."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 2, 24, 40)).astype(np.float32)
    ref_masks, _ = numpy_ops.masks_from_logits(logits, (96, 160), (90, 160), (90, 160))
    masks, _ = kernel.masks_from_logits(np.roll(logits, 1, axis=-1), (96, 160), (90, 160), (90, 160), 2)
    assert not np.array_equal(masks, ref_masks)


def test_mask_head_scores_agree_with_and_without_the_kernel(kernel, monkeypatch):
    """MaskHead over several chunks: the same masks and mask quality whichever form runs."""
    rng = np.random.default_rng(1)
    embed = rng.standard_normal((5, 16)).astype(np.float32)
    chunks = [rng.standard_normal((t, 16, 12, 20)).astype(np.float32) for t in (3, 3, 1)]

    def run():
        head = numpy_ops.MaskHead(embed, (45, 80), (48, 80), (90, 160), threads=2)
        return [head.masks(c) for c in chunks], head.mask_quality()

    fast_masks, fast_quality = run()
    monkeypatch.setenv("VITA_NATIVE_KERNELS", "0")
    assert not mask_kernel.available()
    ref_masks, ref_quality = run()
    assert all(np.array_equal(a, b) for a, b in zip(fast_masks, ref_masks))
    np.testing.assert_allclose(fast_quality, ref_quality, rtol=1e-6)


def test_inconsistent_sizes_are_a_clear_error(kernel):
    logits = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="inconsistent sizes"):
        kernel.masks_from_logits(logits, (8, 8), (9, 8), (8, 8), 1)  # a crop larger than the padded frame
