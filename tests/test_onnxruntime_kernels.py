"""The vita.ops::MSDeformAttn ONNX node: its standard-op function body and the compiled ONNX Runtime operator,
both held to the plain torch reference on random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from export import msda_onnx
from kernels.reference import ms_deform_attn_from_projections
from runtime.backends import onnxruntime_kernels

# ONNX inputs of the node, in order
NAMES = ["value", "spatial_shapes", "reference_points", "offsets", "logits"]


def _node_model(levels: int, points: int, opset: int = 17) -> onnx.ModelProto:
    """A graph of one vita.ops::MSDeformAttn node, with its local function attached as export attaches it."""
    node = helper.make_node(msda_onnx.OP, NAMES, ["out"], domain=msda_onnx.DOMAIN, levels=levels, points=points)
    inputs = [
        helper.make_tensor_value_info("value", TensorProto.FLOAT, ["n", "s", "heads", "d"]),
        helper.make_tensor_value_info("spatial_shapes", TensorProto.INT64, [levels, 2]),
        helper.make_tensor_value_info("reference_points", TensorProto.FLOAT, ["r", "lq", 2]),
        helper.make_tensor_value_info("offsets", TensorProto.FLOAT, ["n", "lq", "o"]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "lq", "a"]),
    ]
    graph = helper.make_graph([node], "msda", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", "lq", "c"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = msda_onnx.attach_function(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto, fused: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if fused:
        options.register_custom_ops_library(str(onnxruntime_kernels.build()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(n, shapes, heads, d, points, lq, ref_batch, seed):
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, heads, d, generator=g)
    refs = torch.rand(ref_batch, lq, 2, generator=g) * 1.2 - 0.1  # some reference points outside [0, 1]
    offsets = torch.randn(n, lq, heads * levels * points * 2, generator=g) * 4  # many taps off the edges
    logits = torch.randn(n, lq, heads * levels * points, generator=g) * 3
    return value, refs, offsets, logits


def _feed(value, shapes, refs, offsets, logits):
    arrays = [value, torch.tensor(shapes, dtype=torch.int64), refs, offsets, logits]
    return {k: a.numpy() for k, a in zip(NAMES, arrays)}


CASES = [
    # n, shapes, heads, d, points, lq, reference batch
    (1, [(12, 20), (6, 10), (3, 5)], 8, 32, 4, 315, 1),
    (2, [(7, 9), (4, 5), (2, 3), (1, 2)], 4, 16, 2, 50, 2),
    (2, [(5, 6)], 2, 8, 3, 17, 1),
]


@pytest.mark.parametrize("case", CASES, ids=["detector-like", "4-levels", "1-level"])
@pytest.mark.parametrize("fused", [False, True], ids=["function-body", "compiled"])
def test_node_matches_the_torch_reference(case, fused):
    n, shapes, heads, d, points, lq, ref_batch = case
    levels = len(shapes)
    value, refs, offsets, logits = _inputs(n, shapes, heads, d, points, lq, ref_batch, seed=lq)
    expected = ms_deform_attn_from_projections(value.double(), shapes, refs.double(), offsets.double(), logits.double(),
                                               levels, points).numpy()
    fp32 = ms_deform_attn_from_projections(value, shapes, refs, offsets, logits, levels, points).numpy()
    got = _session(_node_model(levels, points), fused).run(None, _feed(value, shapes, refs, offsets, logits))[0]
    assert got.shape == (n, lq, heads * d)
    scale = np.abs(expected).max()
    # the torch fp32 reference's own distance from float64 sets the bar (x4)
    bar = max(4 * np.abs(fp32 - expected).max(), 1e-6 * scale)
    assert np.abs(got - expected).max() <= bar
    # negative control: one query's offsets moved by a pixel changes that query's output far beyond the bar
    moved = offsets.clone()
    moved[0, 0] += 1.0
    other = _session(_node_model(levels, points), fused).run(None, _feed(value, shapes, refs, moved, logits))[0]
    assert np.abs(other[0, 0] - expected[0, 0]).max() > 100 * bar


def test_compiled_operator_reports_bad_input_by_name():
    shapes = [(4, 5), (2, 3)]
    value, refs, offsets, logits = _inputs(1, shapes, 2, 8, 2, 10, 1, seed=0)
    session = _session(_node_model(2, 2), fused=True)
    feed = _feed(value, [(4, 5), (2, 4)], refs, offsets, logits)  # levels' sizes do not add up to S
    with pytest.raises(Exception, match="spatial_shapes.*do not add up to the value length"):
        session.run(None, feed)


def test_build_is_cached_and_a_failing_compiler_is_reported(tmp_path):
    first = onnxruntime_kernels.build(out_dir=tmp_path)
    assert onnxruntime_kernels.build(out_dir=tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    with pytest.raises(RuntimeError, match="failed"):
        onnxruntime_kernels.build(out_dir=tmp_path / "other", compiler="/bin/false")


def test_switch_off_runs_the_function_body(monkeypatch):
    monkeypatch.setenv("VITA_NATIVE_KERNELS", "0")
    options = ort.SessionOptions()
    assert onnxruntime_kernels.register(options) is False
