"""Bias adds fused with the Relu or residual add after them (vita.ops::BiasRelu / BiasResidual): which pairs are
rewritten, and the outputs equal ONNX Runtime's own Add and Relu bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import onnxruntime_fusions, onnxruntime_kernels


def _model(after: str, residual_shape: tuple = (1, 37, 24), bias_dims: int = 1, extra_reader: bool = False):
    """X (1, 37, 16) -> MatMul W -> Add bias -> ``after`` ("Relu" or "Add": + R) -> Y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((24,) if bias_dims == 1 else (1, 24)).astype(np.float32), "B")]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["M"]), helper.make_node("Add", ["M", "B"], ["A"])]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 37, 16])]
    if after == "Relu":
        nodes.append(helper.make_node("Relu", ["A"], ["Y"]))
    else:
        nodes.append(helper.make_node("Add", ["R", "A"], ["Y"]))
        inputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, list(residual_shape)))
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 37, 24])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["A"], ["Z"]))
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, 37, 24]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(onnxruntime_kernels.build()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, onnxruntime_fusions.fuse(copy)


@pytest.fixture(scope="module", autouse=True)
def _library():
    try:
        onnxruntime_kernels.build()
    except RuntimeError as e:
        pytest.skip(f"the operator library does not build here: {e}")


@pytest.mark.parametrize("after, op", [("Relu", "BiasRelu"), ("Add", "BiasResidual")])
def test_pairs_become_one_operator_with_equal_outputs(after, op):
    model = _model(after)
    rng = np.random.default_rng(1)
    feeds = {"X": rng.standard_normal((1, 37, 16)).astype(np.float32)}
    if after == "Add":
        feeds["R"] = rng.standard_normal((1, 37, 24)).astype(np.float32)
    fused, count = _fused(model)
    assert count == 1
    assert [n.op_type for n in fused.graph.node] == ["MatMul", op]
    onnx.checker.check_model(fused)
    got, want = _run(fused, feeds)[0], _run(model, feeds)[0]
    assert np.array_equal(got, want)
    # a control: the bias is read (off by one everywhere it is dropped)
    feeds2 = dict(feeds)
    init = {t.name: t for t in fused.graph.initializer}["B"]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1, "B"))
    assert not np.array_equal(_run(fused, feeds2)[0], want)


@pytest.mark.parametrize("kwargs", [
    dict(after="Add", residual_shape=(1, 1, 24)),  # a broadcast residual
    dict(after="Relu", bias_dims=2),  # a bias that is not 1-D
    dict(after="Relu", extra_reader=True),  # the biased output has another reader
])
def test_other_pairs_are_left_alone(kwargs):
    model = _model(**kwargs)
    before = model.SerializeToString()
    fused, count = _fused(model)
    assert count == 0 and fused.SerializeToString() == before


def test_the_operator_names_what_is_wrong():
    from onnx import helper as h

    graph = h.make_graph([h.make_node("BiasRelu", ["X", "B"], ["Y"], domain="vita.ops")], "g",
                         [h.make_tensor_value_info("X", TensorProto.FLOAT, [2, 5]),
                          h.make_tensor_value_info("B", TensorProto.FLOAT, [4])],
                         [h.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("vita.ops", 1)])
    with pytest.raises(Exception, match="the bias must be the last axis of x"):
        _run(model, {"X": np.zeros((2, 5), np.float32), "B": np.zeros(4, np.float32)})


def test_shape_inference_sees_the_graph_without_a_copy_of_its_weights():
    """The residual check's shapes come from a graph whose large initializers are typed inputs (no data): the
    same shapes as inferring on the whole model, which had copied the detector's weights twice at load."""
    model = _model("Add")
    light = onnxruntime_fusions.without_weights(model)
    assert [t.name for t in light.graph.initializer] == ["B"]  # 96 bytes kept; W (1.5 KB) is an input
    assert "W" in [i.name for i in light.graph.input]
    full = onnx.shape_inference.infer_shapes(model)
    want = {v.name: v.type for v in full.graph.value_info}
    got = {v.name: v.type for v in onnx.shape_inference.infer_shapes(light).graph.value_info}
    assert got == want and "M" in got


def _group_norm_graph(relu: bool, groups: int = 4, channels: int = 16) -> onnx.ModelProto:
    """A real torch export of Conv -> GroupNorm [-> ReLU] (the pixel decoder's ConvGN), dynamic size."""
    import io

    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(8, channels, 3, padding=1), torch.nn.GroupNorm(groups, channels)]
    if relu:
        layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 8, 9, 11),), buffer, dynamo=False, opset_version=17, input_names=["X"],
                      output_names=["Y"], dynamic_axes={"X": {0: "n", 2: "h", 3: "w"}})
    return onnx.load_from_string(buffer.getvalue()), net


def _group_norm64(net, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net.double()(torch.from_numpy(x).double()).numpy()


@pytest.mark.parametrize("relu", [False, True])
def test_group_norm_chain_becomes_one_operator_as_accurate_as_the_chain(relu):
    model, net = _group_norm_graph(relu)
    fused, count = _fused(model)
    assert count == 1
    assert [n.op_type for n in fused.graph.node] == ["Conv", "GroupNorm"]
    assert [a.i for a in fused.graph.node[1].attribute if a.name == "relu"] == [int(relu)]
    onnx.checker.check_model(fused)
    # no constant left unread (ONNX Runtime warns about each)
    read = {i for n in fused.graph.node for i in n.input}
    assert all(t.name in read for t in fused.graph.initializer)
    for shape in ((1, 8, 9, 11), (2, 8, 40, 33)):
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3 + 1
        got, chain = _run(fused, {"X": x})[0], _run(model, {"X": x})[0]
        exact = _group_norm64(net, x)
        scale = np.abs(exact).max()
        err, chain_err = np.abs(got - exact).max() / scale, np.abs(chain - exact).max() / scale
        assert err <= max(2 * chain_err, 1e-6), (err, chain_err)
        if relu:
            assert (got >= 0).all()


def test_group_norm_fusion_control_a_wrong_gamma_fails_the_bound():
    model, net = _group_norm_graph(True)
    fused, _ = _fused(model)
    gamma = next(t for t in fused.graph.initializer if t.name.endswith("/gamma"))
    g = numpy_helper.to_array(gamma).copy()
    g[3] *= 1.001
    gamma.CopyFrom(numpy_helper.from_array(g, gamma.name))
    x = np.random.default_rng(0).standard_normal((1, 8, 9, 11)).astype(np.float32)
    exact = _group_norm64(net, x)
    err = np.abs(_run(fused, {"X": x})[0] - exact).max() / np.abs(exact).max()
    assert err > 1e-4


def test_group_norm_chains_with_an_affine_instance_norm_are_left_alone():
    model, _ = _group_norm_graph(False)
    norm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    scale = next(n for n in model.graph.node if n.output[0] == norm.input[1]).attribute[0].t  # a Constant's value
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2))
    before = model.SerializeToString()
    fused, count = _fused(model)
    assert count == 0 and fused.SerializeToString() == before


def test_group_norm_operator_names_what_is_wrong():
    from onnx import helper as h

    node = h.make_node("GroupNorm", ["X", "G", "B"], ["Y"], domain="vita.ops", groups=3, epsilon=1e-5, relu=0)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "XGB"],
                         [h.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("vita.ops", 1)])
    feeds = {"X": np.zeros((1, 8, 2, 2), np.float32), "G": np.ones(8, np.float32), "B": np.zeros(8, np.float32)}
    with pytest.raises(Exception, match="C a multiple of 3 groups"):
        _run(model, feeds)
