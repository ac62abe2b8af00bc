"""Denormals flushed on the calling thread around CPU graph calls, and only there."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.float_env import denormals_flushed

TINY = np.float32(1e-40)  # a denormal float32


def _survives() -> bool:
    """Whether a denormal input and result survive arithmetic on this thread."""
    return bool((np.array([TINY]) * np.float32(1.0))[0] != 0) and bool(np.float32(1e-30) * np.float32(1e-10) != 0)


def test_flushed_inside_restored_after():
    assert _survives()
    with denormals_flushed() as flushed:
        if not flushed:
            pytest.skip("no glibc x86-64 float environment here: the context does nothing")
        assert not _survives()
    assert _survives()


def test_restored_when_the_block_raises():
    with pytest.raises(ValueError):
        with denormals_flushed():
            raise ValueError("the graph call failed")
    assert _survives()


def test_other_threads_are_left_alone():
    """A thread already running (the frame reader, the spool's writer) keeps its own float settings."""
    seen, go, done = [], threading.Event(), threading.Event()

    def check() -> None:
        go.wait()
        seen.append(_survives())
        done.set()

    worker = threading.Thread(target=check)
    worker.start()
    with denormals_flushed():
        go.set()
        done.wait()
    worker.join()
    assert seen == [True]


def test_masked_softmax_stays_exact_when_flushed():
    """ONNX Runtime's softmax over -inf-masked keys (the frame decoder's masked attention), run as the backend
    runs it, against float64: flushing changes nothing above 1e-38."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from runtime.float_env import ORT_DENORMAL_AS_ZERO

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 100, 384])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 100, 384])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry(ORT_DENORMAL_AS_ZERO, "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((2, 8, 100, 384)) * 8).astype(np.float32)
    scores[rng.random(scores.shape) < 0.9] = -np.inf
    scores[..., 0] = rng.standard_normal(scores.shape[:-1])  # every row keeps a key
    with denormals_flushed():
        (got,) = session.run(None, {"x": scores})
    ref = np.exp(scores.astype(np.float64) - scores.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert np.abs(got - ref).max() < 1e-6
    assert (got[np.isneginf(scores)] == 0).all()
    # control: a softmax over the wrong axis is far off
    assert np.abs(np.swapaxes(got, -1, -2)[..., :100, :100] - ref[..., :100, :100]).max() > 1e-2
