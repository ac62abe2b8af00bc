"""runtime.token_store: a video's frame tokens copied out of malloc's heap and handed back in frame order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.token_store import TokenStore


@pytest.mark.parametrize("make", [
    lambda a: torch.from_numpy(a),
    lambda a: torch.from_numpy(a).to(torch.bfloat16),
    lambda a: a,
])
def test_tokens_come_back_in_order_across_mappings(make):
    """Batches of 1-3 frames over mappings of 7 frames' bytes: the views, concatenated, are the batches
    concatenated, bit for bit, of the same kind and dtype; a copy, not the caller's memory."""
    rng = np.random.default_rng(0)
    batches = [make(rng.standard_normal((n, 5, 4)).astype(np.float32)) for n in (1, 3, 2, 3, 1, 2, 3)]
    frame_bytes = 5 * 4 * batches[0].element_size() if isinstance(batches[0], torch.Tensor) else 5 * 4 * 4
    store = TokenStore(chunk_bytes=7 * frame_bytes)
    for b in batches:
        store.add(b)
    views = store.arrays()
    assert len(views) > 1 and sum(v.shape[0] for v in views) == 15
    if isinstance(batches[0], torch.Tensor):
        assert all(v.dtype == batches[0].dtype for v in views)
        assert torch.equal(torch.cat(views), torch.cat(batches))
        batches[0].zero_()
        assert not torch.equal(torch.cat(store.arrays())[:1], batches[0])
    else:
        np.testing.assert_array_equal(np.concatenate(views), np.concatenate(batches))
        assert all(v.dtype == np.float32 for v in views)


def test_a_changed_frame_shape_is_refused():
    store = TokenStore()
    store.add(torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match="one video's frames give the same"):
        store.add(torch.zeros(1, 6, 4))
    assert TokenStore().arrays() == []
