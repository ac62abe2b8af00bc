"""runtime.token_store: a video's frame tokens kept out of the detector's memory and handed back in frame order."""

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
    """Batches of 1-3 frames over mappings of 7 frames' bytes: one new array, the batches concatenated, bit for
    bit, of the same kind and dtype; a copy, not the caller's memory; the store emptied."""
    rng = np.random.default_rng(0)
    batches = [make(rng.standard_normal((n, 5, 4)).astype(np.float32)) for n in (1, 3, 2, 3, 1, 2, 3)]
    frame_bytes = 5 * 4 * batches[0].element_size() if isinstance(batches[0], torch.Tensor) else 5 * 4 * 4
    store = TokenStore(chunk_bytes=7 * frame_bytes)
    for b in batches:
        store.add(b)
    assert len(store._parts) == 3  # the mappings
    got = store.take()
    assert got.shape[0] == 15 and store._parts == []
    if isinstance(batches[0], torch.Tensor):
        assert got.dtype == batches[0].dtype and torch.equal(got, torch.cat(batches))
        batches[0].zero_()
        assert not torch.equal(got[:1], batches[0])
    else:
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.concatenate(batches))


def test_a_changed_frame_shape_is_refused():
    store = TokenStore()
    store.add(torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match="one video's frames give the same"):
        store.add(torch.zeros(1, 6, 4))
    assert TokenStore().take() is None


@pytest.mark.parametrize("make", [
    lambda a: torch.from_numpy(a),
    lambda a: torch.from_numpy(a).to(torch.bfloat16),
    lambda a: a,
])
def test_tokens_past_the_memory_budget_wait_in_a_file(make, tmp_path):
    """A budget of 4 frames: the first batches stay in memory, the rest go to an unnamed file in the given
    folder (nothing named is left there) and come back in order, bit for bit."""
    rng = np.random.default_rng(1)
    batches = [make(rng.standard_normal((n, 5, 4)).astype(np.float32)) for n in (1, 3, 2, 3, 1)]
    frame_bytes = 5 * 4 * (batches[0].element_size() if isinstance(batches[0], torch.Tensor) else 4)
    store = TokenStore(memory_budget=4 * frame_bytes, directory=str(tmp_path))
    for b in batches:
        store.add(b)
    assert store._memory_bytes == 4 * frame_bytes and store.frames_in_file == 6
    assert list(tmp_path.iterdir()) == []
    cat = torch.cat if isinstance(batches[0], torch.Tensor) else np.concatenate
    got = store.take()
    assert got.dtype == batches[0].dtype and (got == cat(batches)).all()
    assert store.frames_in_file == 0 and store._parts == []  # the file closed


def test_a_failing_disk_keeps_the_rest_in_memory_in_order(tmp_path, monkeypatch, caplog):
    """The disk fills after the first spilled batch: one warning, the later batches in memory, nothing lost or
    reordered. A folder that does not exist does the same from the start."""
    import errno

    import runtime.token_store as token_store

    calls = []

    def reserve(directory, nbytes):
        calls.append(nbytes)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(token_store, "check_disk_reserve", reserve)
    batches = [torch.randn(n, 5, 4) for n in (2, 2, 3, 1, 2)]
    store = TokenStore(memory_budget=2 * 5 * 4 * 4, directory=str(tmp_path))
    with caplog.at_level("WARNING", logger="runtime.token_store"):
        for b in batches:
            store.add(b)
    assert caplog.text.count("keeping them in memory") == 1 and store.frames_in_file == 2
    assert torch.equal(store.take(), torch.cat(batches))

    missing = TokenStore(memory_budget=0, directory=str(tmp_path / "missing"))
    for b in batches:
        missing.add(b)
    assert missing.frames_in_file == 0 and torch.equal(missing.take(), torch.cat(batches))
