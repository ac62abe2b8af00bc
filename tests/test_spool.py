"""The temporary-file spool (background writes) and the feature store's fallback when the file cannot be written."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from runtime.backends.torch_backend import TorchBackend
from runtime.feature_store import FeatureStore
from runtime.spool import ArraySpool
from vita_train.presets import preset
from vita_train.modeling.vita_model import VitaModel


def _arrays(rng: np.random.Generator) -> list[np.ndarray]:
    parts = [rng.standard_normal((n, 3, 4, 5)).astype(np.float32) for n in (1, 3, 2, 1, 4)]
    parts[1] = np.asfortranarray(parts[1])  # any memory order is written in C order
    return parts


def _spool(direct: bool) -> ArraySpool:
    """A spool writing one array ahead; skips the test where direct I/O is asked for and refused."""
    spool = ArraySpool(prefix="vita-test-", pending=1, direct=direct)
    if direct and not spool.direct:
        spool.close()
        pytest.skip(f"the temporary folder {spool.directory} does not take direct I/O")
    return spool


@pytest.mark.parametrize("direct", [True, False])
def test_background_writes_read_back_in_order_and_exactly(direct):
    """Direct I/O (items at aligned offsets, 240-byte items padded to a block) and buffered writes alike."""
    rng = np.random.default_rng(0)
    parts = _arrays(rng)
    spool = _spool(direct)
    try:
        for p in parts:
            spool.append(p)
        expected = np.concatenate(parts)
        for size in (1, 3, 11, 20):
            got = np.concatenate(list(spool.chunks(size)))
            assert got.dtype == expected.dtype and np.array_equal(got, expected)
            assert [len(c) for c in spool.chunks(size)] == [min(size, 11 - s) for s in range(0, 11, size)]
    finally:
        spool.close()


def test_block_sized_items_are_read_ahead_exactly_and_a_stopped_reader_does_not_hang():
    """Items that fill whole 4 KB blocks (as a frame of float32 features does) take the read-ahead path."""
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 2, 512)).astype(np.float32) for n in (2, 5, 1)]  # 4096-byte items
    spool = _spool(direct=True)
    try:
        for p in parts:
            spool.append(p)
        expected = np.concatenate(parts)
        for size in (1, 3, 8, 9):
            chunks = list(spool.chunks(size))
            assert [len(c) for c in chunks] == [min(size, 8 - s) for s in range(0, 8, size)]
            assert all(c.flags.writeable and c.flags.c_contiguous for c in chunks)
            assert np.array_equal(np.concatenate(chunks), expected)
        reader = spool.chunks(2)
        assert np.array_equal(next(reader), expected[:2])
        reader.close()  # the caller stops early: the read in flight finishes, nothing waits forever
    finally:
        spool.close()


def test_a_failed_write_is_an_oserror_and_nothing_hangs():
    """/dev/full answers every write with ENOSPC, from the writer thread: flush and chunks raise it, close returns."""
    spool = ArraySpool(prefix="vita-test-")
    spool.file.close()
    spool.file = open("/dev/full", "w+b", buffering=0)
    for _ in range(4):  # more than the pending limit: the writer keeps draining after the error
        try:
            spool.append(np.ones((1, 1024), np.float32))
        except OSError:
            break
    with pytest.raises(OSError, match="writing the temporary spool file failed"):
        spool.flush()
    with pytest.raises(OSError):
        list(spool.chunks(1))
    spool.close()


def test_written_now_a_failed_write_raises_at_append_and_keeps_the_earlier_arrays(tmp_path):
    """pending=0 (the token store's file): each append writes; one that fails half-way raises OSError there,
    and the file is cut back to the arrays before it, which read back whole. A later append goes on from
    there."""
    import errno
    import io

    class FillingFile(io.FileIO):
        full = False

        def write(self, data):
            if self.full:  # half of it lands, then the disk is full
                super().write(memoryview(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    spool = ArraySpool(prefix="vita-test-", directory=str(tmp_path), pending=0, direct=False)
    try:
        spool.file.close()
        spool.file = FillingFile(tmp_path / "spool.bin", "w+b")
        items = np.arange(5 * 256, dtype=np.float32).reshape(5, 256)
        spool.append(items[:2])
        spool.file.full = True
        with pytest.raises(OSError, match="No space left"):
            spool.append(items[2:4])
        assert spool.count == 2 and spool.file.seek(0, 2) == 2 * 256 * 4
        spool.file.full = False
        spool.append(items[4:])
        np.testing.assert_array_equal(np.concatenate(list(spool.chunks(2))), items[[0, 1, 4]])
    finally:
        spool.close()


def test_shape_change_is_refused_with_both_shapes():
    spool = ArraySpool(prefix="vita-test-")
    try:
        spool.append(np.zeros((1, 2, 3), np.float32))
        with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
            spool.append(np.zeros((1, 3, 2), np.float32))
    finally:
        spool.close()


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    torch.manual_seed(0)
    return TorchBackend(VitaModel(preset("vita_tiny")).eval(), device="cpu")


def _features(n: int) -> torch.Tensor:
    # the CPU detector's features are channels-last; the host layout keeps them as they are in memory
    return torch.randn(n, 8, 6, 10).contiguous(memory_format=torch.channels_last)


def test_disk_tier_gives_back_the_features_exactly(backend):
    feats = [_features(n) for n in (2, 1, 3)]
    store = FeatureStore(backend, "disk", 0, 0)
    try:
        for f in feats:
            store.add(f)
        store.finish()
        got = torch.cat(list(store.chunks(4)))
    finally:
        store.close()
    assert torch.equal(got, torch.cat(feats))


def test_auto_falls_back_to_recompute_when_the_spool_cannot_be_written(backend, caplog):
    store = FeatureStore(backend, "auto", 0, 0)
    store.add(_features(1))
    assert store.spool is not None
    store.spool.file.close()
    store.spool.file = open("/dev/full", "w+b", buffering=0)
    with caplog.at_level(logging.WARNING, logger="runtime.feature_store"):
        for _ in range(4):
            store.add(_features(1))
        store.finish()
    assert store.needs_recompute and store.spool is None
    assert "recomputing them in a second pass" in caplog.text


def test_forced_disk_policy_names_the_way_out_when_the_spool_cannot_be_written(backend):
    store = FeatureStore(backend, "disk", 0, 0)
    store.add(_features(1))
    store.spool.file.close()
    store.spool.file = open("/dev/full", "w+b", buffering=0)
    with pytest.raises(OSError, match="feature_policy='recompute'"):
        for _ in range(4):
            store.add(_features(1))
        store.finish()
    store.close()
