"""3x3 convolutions rewritten as vita.ops::WinogradInput -> MatMul -> vita.ops::WinogradOutput for ONNX Runtime,
held to a float64 convolution as closely as the plain torch reference of the same algorithm is."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import onnxruntime_kernels, onnxruntime_winograd
from vita_train.modeling.winograd import reference_conv
from vita_train.winograd_transforms import tile_for


def _conv_model(cin: int, cout: int, bias: bool, after: str = "Relu", stride: int = 1, dilation: int = 1,
                group: int = 1, kernel: int = 3, seed: int = 0) -> onnx.ModelProto:
    """X -> Conv -> ``after`` (Relu, Identity, or "Relu+Add": a Relu and a second consumer) -> Y."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((cout, cin // group, kernel, kernel)) / np.sqrt(kernel * kernel * cin)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"))
        inputs.append("B")
    pad = dilation * (kernel // 2)
    nodes = [helper.make_node("Conv", inputs, ["C"], pads=[pad] * 4, strides=[stride] * 2, dilations=[dilation] * 2,
                              group=group, kernel_shape=[kernel, kernel])]
    if after == "Relu+Add":
        nodes += [helper.make_node("Relu", ["C"], ["R"]), helper.make_node("Add", ["R", "C"], ["Y"])]
    else:
        nodes.append(helper.make_node(after, ["C"], ["Y"]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", cin, "h", "w"])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(onnxruntime_kernels.build()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, onnxruntime_winograd.rewrite(copy)


def _truth(model: onnx.ModelProto, x: np.ndarray, dtype=torch.float64, winograd_tile: int = 0) -> np.ndarray:
    """The graph's Conv (+ Relu) in torch: F.conv2d, or the plain Winograd reference of that tile."""
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    w, b = inits["W"].to(dtype), inits.get("B")
    b = None if b is None else b.to(dtype)
    xt = torch.from_numpy(x).to(dtype)
    y = reference_conv(xt, w, b, winograd_tile) if winograd_tile else torch.nn.functional.conv2d(xt, w, b, padding=1)
    if model.graph.node[-1].op_type == "Relu":
        y = y.relu()
    return y.numpy().astype(np.float64)


CASES = [  # (n, cin, cout, h, w, bias, after)
    (1, 8, 16, 5, 7, True, "Relu"),  # F(4x4), ragged tiles on both axes
    (2, 16, 8, 9, 13, False, "Identity"),  # a batch of two, no bias, no ReLU
    (1, 3, 5, 1, 1, True, "Relu"),  # one pixel: every tap but the centre is padding
    (1, 64, 64, 30, 41, False, "Relu"),
    (1, 512, 256, 6, 11, True, "Identity"),  # F(2x2): the larger weights
    (2, 24, 40, 18, 2, True, "Relu"),  # narrower than one tile
    (1, 16, 24, 7, 70, True, "Identity"),  # F(4x4), rows of 18 tiles: 8 at a time in registers, then the rest
    (1, 512, 32, 5, 37, True, "Relu"),  # F(2x2), rows of 19 tiles: likewise
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[6]}")
def test_winograd_graph_matches_float64_as_the_torch_reference_does(case):
    n, cin, cout, h, w, bias, after = case
    model = _conv_model(cin, cout, bias, after)
    rewritten, count = _rewritten(model)
    assert count == 1
    assert [nd.op_type for nd in rewritten.graph.node][:4] == ["Shape", "WinogradInput", "MatMul", "WinogradOutput"]
    assert ("Relu" in [nd.op_type for nd in rewritten.graph.node]) is False  # fused into WinogradOutput
    x = np.random.default_rng(1).standard_normal((n, cin, h, w)).astype(np.float32)
    ours = _run(rewritten, x)
    truth = _truth(model, x)
    tile = tile_for(cin, cout)
    reference = _truth(model, x, torch.float32, tile)  # the same algorithm in plain torch ops, float32
    ref_err, err = np.abs(reference - truth).max(), np.abs(ours - truth).max()
    assert ours.shape == truth.shape
    assert err <= 2 * ref_err + 1e-6 * np.abs(truth).max(), (err, ref_err)
    # and as close to ONNX Runtime's own Conv as the Winograd error allows
    assert np.abs(ours - _run(model, x)).max() <= 2 * ref_err + 2e-6 * np.abs(truth).max()


def test_a_wrong_transformed_weight_fails_the_same_check():
    """Negative control: one Winograd point's weights scaled by 1.001 is caught."""
    model = _conv_model(16, 16, True, "Relu")
    rewritten, _ = _rewritten(model)
    u = next(t for t in rewritten.graph.initializer if t.name.endswith("/weight"))
    arr = numpy_helper.to_array(u).copy()
    arr[7] *= 1.001
    u.CopyFrom(numpy_helper.from_array(arr, u.name))
    x = np.random.default_rng(1).standard_normal((1, 16, 12, 12)).astype(np.float32)
    truth = _truth(model, x)
    ref_err = np.abs(_truth(model, x, torch.float32, 4) - truth).max()
    assert np.abs(_run(rewritten, x) - truth).max() > 2 * ref_err + 1e-6 * np.abs(truth).max()


@pytest.mark.parametrize("variant", [
    {"stride": 2}, {"dilation": 2}, {"group": 2}, {"kernel": 1}, {"kernel": 5},
], ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()))
def test_other_convolutions_are_left_alone(variant):
    model = _conv_model(8, 8, True, "Relu", **variant)
    rewritten, count = _rewritten(model)
    assert count == 0 and rewritten == model


def test_a_weight_that_is_not_a_constant_is_left_alone():
    model = _conv_model(8, 8, True, "Relu")
    w = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    del model.graph.initializer[0]
    rewritten, count = _rewritten(model)
    assert count == 0


def test_relu_stays_separate_when_the_convolution_has_other_consumers():
    model = _conv_model(8, 16, True, "Relu+Add")
    rewritten, count = _rewritten(model)
    ops = [nd.op_type for nd in rewritten.graph.node]
    assert count == 1 and "Relu" in ops and "Add" in ops
    out = next(nd for nd in rewritten.graph.node if nd.op_type == "WinogradOutput")
    assert helper.get_attribute_value(next(a for a in out.attribute if a.name == "relu")) == 0
    x = np.random.default_rng(2).standard_normal((1, 8, 10, 10)).astype(np.float32)
    c = _truth(_conv_model(8, 16, True, "Identity"), x)
    truth = np.maximum(c, 0) + c
    ref_err = np.abs(_truth(_conv_model(8, 16, True, "Identity"), x, torch.float32, 4) - c).max()
    assert np.abs(_run(rewritten, x) - truth).max() <= 3 * ref_err + 1e-6


def test_the_file_on_disk_and_unused_weights(tmp_path):
    """The rewrite drops the replaced 3x3 weight, keeps every other initializer, and declares the vita.ops domain."""
    model = _conv_model(8, 8, True, "Relu")
    rewritten, _ = _rewritten(model)
    names = {t.name for t in rewritten.graph.initializer}
    assert "W" not in names and any(n.endswith("/weight") for n in names) and any(n.endswith("/bias") for n in names)
    assert any(o.domain == onnxruntime_winograd.DOMAIN for o in rewritten.opset_import)


def test_products_that_do_not_fit_the_input_get_a_clear_error():
    graph = helper.make_graph(
        [helper.make_node("WinogradOutput", ["P", "S", "B"], ["Y"], domain="vita.ops", tile=4, relu=0)], "bad",
        [helper.make_tensor_value_info("P", TensorProto.FLOAT, [36, 8, "t"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 8, 12, 12], np.int64), "S"), numpy_helper.from_array(np.zeros(8, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("vita.ops", 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(onnxruntime_kernels.build()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="WinogradOutput: products .* do not fit tile 4 of an input of shape"):
        session.run(None, {"P": np.zeros((36, 8, 10), np.float32)})  # 12x12 at tile 4 has 9 tiles, not 10
