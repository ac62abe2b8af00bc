"""TensorRT export and backend: pure logic here; engine builds and runs where TensorRT and a GPU are."""

from __future__ import annotations

import io
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export import ExportOptions, export_model
from export import tensorrt as trt_export
from export import trt_compat
from export.trt_plugin import (
    PLUGIN_DOMAIN,
    PLUGIN_OP,
    _MultiscaleDeformableAttn,
    ms_deform_attn_sample_trt,
)
from runtime.backends import tensorrt_backend as trt_backend
from vita_train.config import ModelConfig
from vita_train.modeling.ms_deform_attn import ms_deform_attn_sample

from .conftest import OFFICIAL_CASES, OfficialCase, assert_imports_without

NEEDS_TRT = "TensorRT >= 10 and an NVIDIA GPU are needed (pip install tensorrt cuda-python)"


def _meta(fixed_size=None, max_batch=16, max_frames=300) -> dict:
    """vita.json as export/exporter.py writes it (the keys the TensorRT code reads)."""
    return {
        "model_config": ModelConfig().to_dict(),
        "dims": {"num_classes": 40, "num_frame_queries": 100, "hidden_dim": 256, "num_video_queries": 100,
                 "mask_dim": 256, "mask_stride": 4},
        "window": 6,
        "preprocessing": {"min_size": 360, "max_size": 640, "size_divisibility": 32, "fixed_size": fixed_size},
        "limits": {"max_batch": max_batch, "max_frames": max_frames},
        "msda": "plain",
    }


def _to_onnx(module: torch.nn.Module, args: tuple, names_in: list[str], names_out: list[str], axes=None, opset=17):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset, input_names=names_in,
                          output_names=names_out, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


# ---------------------------------------------------------------- profiles


def test_default_profiles_dynamic_size():
    profiles = trt_export.default_profiles(_meta())
    assert profiles["detector"] == {"frames": ((1, 32, 32, 3), (8, 360, 640, 3), (16, 640, 640, 3))}
    assert profiles["vita_tokens"] == {
        "frame_queries": ((1, 1, 256), (64, 100, 256), (300, 100, 256)),
        "query_index": ((1, 1), (64, 100), (300, 100)),
    }
    for graph in profiles.values():
        trt_export.check_profiles(graph)


def test_default_profiles_fixed_size_and_small_limits():
    profiles = trt_export.default_profiles(_meta(fixed_size=[480, 864], max_batch=4, max_frames=20))
    assert profiles["detector"] == {"frames": ((1, 480, 864, 3), (4, 480, 864, 3), (4, 480, 864, 3))}
    assert profiles["vita_tokens"]["query_index"] == ((1, 1), (20, 100), (20, 100))


def test_default_profiles_opt_respects_the_longest_edge_cap():
    meta = _meta()
    meta["preprocessing"].update(min_size=480, max_size=700)
    lo, opt, hi = trt_export.default_profiles(meta)["detector"]["frames"]
    assert opt == (8, 480, 700, 3) and hi == (16, 700, 700, 3)


@pytest.mark.parametrize(
    "profiles,inputs,message",
    [
        ({"x": ((1, 2), (1, 1), (1, 3))}, None, "min <= opt <= max"),
        ({"x": ((1, 2), (1, 2, 3), (1, 3))}, None, "one rank"),
        ({"x": ((0, 2), (1, 2), (1, 3))}, None, "1 <= min"),
        ({"y": ((1,), (1,), (1,))}, {"x": (3,)}, "not inputs"),
        ({}, {"x": (-1, 3)}, "no profile"),
        ({"x": ((1, 2), (1, 2), (4, 2))}, {"x": (-1, 3)}, "fixed to 3"),
        ({"x": ((1,), (1,), (4,))}, {"x": (-1, 3)}, "rank"),
    ],
)
def test_check_profiles_rejects(profiles, inputs, message):
    with pytest.raises(ValueError, match=message):
        trt_export.check_profiles(profiles, inputs)


def test_check_profiles_accepts_fixed_inputs_without_profile():
    trt_export.check_profiles({"x": ((1, 3), (2, 3), (4, 3))}, {"x": (-1, 3), "scale": (1,)})


def test_keeps_fp32():
    assert trt_export.keeps_fp32("/model/pixel_decoder/transformer/encoder/layers.0/self_attn/Mul", "ELEMENTWISE")
    assert trt_export.keeps_fp32("/vita/enc/norm/LayerNormalization", "NORMALIZATION")
    assert not trt_export.keeps_fp32("/model/backbone/res2/Conv", "CONVOLUTION")
    assert not trt_export.keeps_fp32("/model/pixel_decoder/Conv", "CONVOLUTION", scopes=())


# ---------------------------------------------------------------- operator support


def test_op_list_is_the_tensorrt_10_table():
    ops = trt_export.TRT_ONNX_SUPPORTED_OPS
    assert len(ops) == 150  # rows marked Y at the pinned commit
    assert {"GridSample", "LayerNormalization", "NonZero", "Einsum", "If", "Loop", "TopK"} <= ops
    assert not {"Det", "Unique", "SequenceConstruct", "BitwiseAnd", "Col2Im"} & ops


class _Supported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x, grid):
        y = self.conv(x)
        y = torch.nn.functional.grid_sample(y, grid, align_corners=False)
        y = self.norm(y.flatten(2).transpose(1, 2)).softmax(-1)
        return y @ y.transpose(1, 2), torch.nonzero(y[0, :, 0] > 0.1)


class _Det(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.det(x).unsqueeze(-1) * torch.unique(x).sum()


def test_unsupported_ops_on_exported_graphs(tmp_path):
    ok = _to_onnx(_Supported(), (torch.randn(1, 3, 8, 8), torch.rand(1, 4, 4, 2) * 2 - 1), ["x", "grid"], ["a", "b"])
    assert "NonZero" in {n.op_type for n in ok.graph.node}  # supported since TensorRT 8.5
    path = tmp_path / "ok.onnx"
    onnx.save(ok, str(path))
    assert trt_export.unsupported_ops(path) == []

    bad = _to_onnx(_Det(), (torch.randn(2, 3, 3),), ["x"], ["y"])
    assert trt_export.unsupported_ops(bad) == ["Det", "Unique"]


def _det_graph(name: str) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Det", ["m"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [])],
    )


def test_unsupported_ops_looks_into_subgraphs_and_functions():
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    m = helper.make_tensor_value_info("m", TensorProto.FLOAT, [3, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    branch = helper.make_graph(
        [helper.make_node("ReduceSum", ["m"], ["s"], keepdims=0)], "else", [],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=_det_graph("then"), else_branch=branch)
    model = helper.make_model(helper.make_graph([node], "g", [cond, m], [out]))
    assert trt_export.unsupported_ops(model) == ["Det"]

    # a call to a model-local function is imported as its body: judged by what is inside
    body = [helper.make_node("Unique", ["x"], ["u"]), helper.make_node("ReduceSum", ["u"], ["z"], keepdims=0)]
    func = helper.make_function("local", "MyOp", ["x"], ["z"], body, [helper.make_opsetid("", 17)])
    call = helper.make_node("MyOp", ["m"], ["y"], domain="local")
    model = helper.make_model(
        helper.make_graph([call], "g", [m], [out]), functions=[func],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    assert trt_export.unsupported_ops(model) == ["Unique"]


def test_describe_parse_failure_names_every_error():
    errors = [
        trt_export.ParserErrorInfo(3, "/det/Det", "Det", "UNSUPPORTED_NODE", "No importer registered for op: Det"),
        trt_export.ParserErrorInfo(7, "/msda", PLUGIN_OP, "UNSUPPORTED_NODE", "Plugin not found"),
        trt_export.ParserErrorInfo(-1, "", "", "INVALID_GRAPH", "bad graph"),
    ]
    text = trt_export.describe_parse_failure("g.onnx", errors, ["Det"])
    assert "3 error(s)" in text and "node 3 '/det/Det' (Det)" in text and "No importer registered" in text
    assert "the graph: bad graph" in text and "does not list as supported: Det" in text
    assert "plugins=True" in text


# ---------------------------------------------------------------- static check of the exported graphs


@pytest.fixture(scope="module")
def fixture_exports(tmp_path_factory):
    """Each official fixture exported once per --msda mode, without validation (the graphs are what matter)."""
    made = {}

    def get(name: str, msda: str):
        if (name, msda) not in made:
            out = tmp_path_factory.mktemp("trt") / f"{name}_{msda}"
            made[name, msda] = export_model(OfficialCase(name).ckpt, ExportOptions(out=out, validate=False, msda=msda))
        return made[name, msda]

    return get


def _uint8_intermediates(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    io = {v.name for v in (*inferred.graph.input, *inferred.graph.output)}
    return [v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == TensorProto.UINT8
            and v.name not in io]


# swin_tiny takes over a minute per export on 2 cores: in the slow run (pytest -m slow)
_FIXTURES = [pytest.param(n, marks=pytest.mark.slow) if n == "swin_tiny" else n for n in OFFICIAL_CASES]


@pytest.mark.parametrize("msda", ["plain", "trt-plugin"])
@pytest.mark.parametrize("name", _FIXTURES)
def test_exported_graphs_pass_the_static_tensorrt_check(fixture_exports, name, msda):
    export_dir = fixture_exports(name, msda)
    detector = onnx.load(str(export_dir / "detector.onnx"))
    # the parser refuses a UINT8 tensor anywhere but at the graph's inputs and outputs: frames are cast first
    assert _uint8_intermediates(detector) == []
    first = next(n for n in detector.graph.node if "frames" in n.input)
    assert first.op_type == "Cast"
    assert detector.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8  # the interface is unchanged
    plugins = msda == "trt-plugin"
    for graph in ("detector.onnx", "vita_tokens.onnx"):
        assert trt_compat.check_graph(export_dir / graph, plugins=plugins, trt_version="10.0.1") == [], graph
    assert trt_compat.check_export(export_dir, plugins) == []


def test_static_check_finds_what_the_parser_refuses():
    u8 = helper.make_tensor_value_info("frames", TensorProto.UINT8, [1, 4, 4, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    # the detector graph as it was: a Transpose of the uint8 frames before the Cast
    nodes = [helper.make_node("Transpose", ["frames"], ["t"], name="/Transpose", perm=[0, 3, 1, 2]),
             helper.make_node("Cast", ["t"], ["y"], name="/Cast", to=TensorProto.FLOAT)]
    findings = trt_compat.check_graph(helper.make_model(helper.make_graph(nodes, "old", [u8], [out])))
    assert {(f.node, f.problem) for f in findings} == {("/Transpose", "type"), ("/Transpose", "uint8-intermediate")}
    assert "UINT8" in str(findings[0])
    with pytest.raises(trt_compat.TensorRTCompatibilityError, match="would refuse 2 part"):
        trt_compat.raise_if_incompatible(findings)
    # BOOL into an op whose column has no BOOL; INT64 into a float-only op; an op not in the list
    b = helper.make_tensor_value_info("b", TensorProto.BOOL, [3])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [3])
    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, [3])
    nodes = [helper.make_node("Mul", ["b", "b"], ["m"], name="mul"), helper.make_node("Sqrt", ["i"], ["s"], name="sqrt"),
             helper.make_node("Det", ["f"], ["d"], name="det")]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("m", TensorProto.BOOL), ("s", TensorProto.INT64),
                                                                   ("d", TensorProto.FLOAT))]
    findings = trt_compat.check_graph(helper.make_model(helper.make_graph(nodes, "g", [b, i, f], outs)))
    assert [(x.node, x.problem) for x in findings] == [("mul", "type"), ("mul", "type"), ("sqrt", "type"), ("det", "op")]
    # a UINT8 graph output produced by a Cast is allowed (ModelImporter only refuses non-output UINT8 tensors)
    cast = helper.make_node("Cast", ["f"], ["u"], to=TensorProto.UINT8)
    u_out = helper.make_tensor_value_info("u", TensorProto.UINT8, [3])
    assert trt_compat.check_graph(helper.make_model(helper.make_graph([cast], "g", [f], [u_out]))) == []


def test_static_check_of_plugin_nodes():
    value = helper.make_tensor_value_info("value", TensorProto.FLOAT, [1, 30, 2, 4])
    shapes = helper.make_tensor_value_info("shapes", TensorProto.INT64, [2, 2])
    starts = helper.make_tensor_value_info("starts", TensorProto.INT32, [2])
    loc = helper.make_tensor_value_info("loc", TensorProto.FLOAT16, [1, 5, 2, 2, 3, 2])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 5, 2, 2, 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5, 2, 4])
    node = helper.make_node(PLUGIN_OP, ["value", "shapes", "starts", "loc", "w"], ["out"], name="msda",
                            domain=PLUGIN_DOMAIN, plugin_version="2", plugin_namespace="")
    model = helper.make_model(helper.make_graph([node], "g", [value, shapes, starts, loc, w], [out]))
    assert [f.problem for f in trt_compat.check_graph(model)] == ["op"]  # without plugins it is an unknown op
    details = [f.detail for f in trt_compat.check_graph(model, plugins=True, trt_version="10.8.0")]
    assert len(details) == 3
    assert "one of FP32/FP16, are FP32, FP16, FP32" in details[0]
    assert "spatial_shapes must be INT32, is INT64" in details[1]
    assert "plugin_version '2' needs TensorRT >= 10.11" in details[2]


# ---------------------------------------------------------------- the plugin form of deformable attention


def _msda_inputs(seed: int, n=2, shapes=((6, 8), (3, 4), (2, 2)), lq=7, heads=2, d=4, points=3):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, heads, d, generator=g)
    # some samples fall outside [0, 1]: the zero padding must match as well
    locations = torch.rand(n, lq, heads, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(n, lq, heads, len(shapes), points, generator=g).softmax(-1)
    return value, list(shapes), locations, weights


@pytest.mark.parametrize("seed", [0, 1])
def test_plugin_form_equals_reference_in_eager_mode(seed):
    value, shapes, locations, weights = _msda_inputs(seed)
    ref = ms_deform_attn_sample(value, shapes, locations, weights)
    assert torch.equal(ms_deform_attn_sample_trt(value, shapes, locations, weights), ref)
    # what export traces through (the autograd.Function's forward) is the reference too, in the plugin's 4-D layout
    spatial = torch.tensor(shapes, dtype=torch.int32)
    out = _MultiscaleDeformableAttn.apply(value, spatial, None, locations, weights, shapes)
    assert out.shape == (2, 7, 2, 4) and torch.equal(out.flatten(2), ref)


class _TinyMSDA(torch.nn.Module):
    """Two feature maps -> value, sampled at given locations, as the pixel decoder does it."""

    def __init__(self, sample=ms_deform_attn_sample_trt, heads=2) -> None:
        super().__init__()
        self.sample, self.heads = sample, heads

    def forward(self, f0, f1, locations, weights):
        n, c = f0.shape[:2]
        shapes = [(f0.shape[-2], f0.shape[-1]), (f1.shape[-2], f1.shape[-1])]
        value = torch.cat([f0.flatten(2), f1.flatten(2)], 2).transpose(1, 2).reshape(n, -1, self.heads, c // self.heads)
        return self.sample(value, shapes, locations, weights)


def _tiny_msda_args(h0=4, w0=6, h1=2, w1=3, n=1, lq=5):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, 8, h0, w0, generator=g), torch.randn(n, 8, h1, w1, generator=g),
            torch.rand(n, lq, 2, 2, 3, 2, generator=g), torch.rand(n, lq, 2, 2, 3, generator=g))


_MSDA_IN, _MSDA_OUT = ["f0", "f1", "locations", "weights"], ["out"]
_MSDA_AXES = {"f0": {0: "n", 2: "h0", 3: "w0"}, "f1": {0: "n", 2: "h1", 3: "w1"},
              "locations": {0: "n", 1: "q"}, "weights": {0: "n", 1: "q"}, "out": {0: "n", 1: "q"}}


def _plugin_node(model: onnx.ModelProto) -> onnx.NodeProto:
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_OP]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    return nodes[0]


def _shape(model: onnx.ModelProto, name: str) -> tuple[int, list]:
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    t = infos[name].type.tensor_type
    return t.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return onnx.numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def test_plugin_export_static_shapes():
    model = _to_onnx(_TinyMSDA(), _tiny_msda_args(), _MSDA_IN, _MSDA_OUT)
    onnx.checker.check_model(model, full_check=True)  # custom domains are not checked against schemas
    node = _plugin_node(model)
    assert node.domain == PLUGIN_DOMAIN and len(node.input) == 5 and len(node.output) == 1
    assert {a.name: a.s.decode() for a in node.attribute} == {"plugin_version": "1", "plugin_namespace": ""}
    assert {o.domain: o.version for o in model.opset_import}[PLUGIN_DOMAIN] == 1
    np.testing.assert_array_equal(_constant(model, node.input[1]), np.array([[4, 6], [2, 3]], dtype=np.int32))
    np.testing.assert_array_equal(_constant(model, node.input[2]), np.array([0, 24], dtype=np.int32))
    assert _constant(model, node.input[1]).dtype == np.int32 and _constant(model, node.input[2]).dtype == np.int32

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # data_prop: sizes through Reshape
    assert _shape(inferred, node.input[0]) == (TensorProto.FLOAT, [1, 30, 2, 4])  # value (N, S, M, D)
    assert _shape(inferred, node.input[3]) == (TensorProto.FLOAT, [1, 5, 2, 2, 3, 2])
    assert _shape(inferred, node.input[4]) == (TensorProto.FLOAT, [1, 5, 2, 2, 3])
    assert _shape(inferred, node.output[0]) == (TensorProto.FLOAT, [1, 5, 2, 4])  # the plugin's (N, Lq, M, D)
    assert _shape(inferred, "out") == (TensorProto.FLOAT, [1, 5, 8])  # reshaped to (N, Lq, M*D)
    assert trt_export.unsupported_ops(model) == [PLUGIN_OP]
    assert trt_export.unsupported_ops(model, plugins=True) == []


def test_plugin_export_dynamic_shapes_compute_the_level_tables(tmp_path):
    model = _to_onnx(_TinyMSDA(), _tiny_msda_args(), _MSDA_IN, _MSDA_OUT, _MSDA_AXES)
    onnx.checker.check_model(model, full_check=True)
    node = _plugin_node(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    assert _shape(inferred, node.input[1]) == (TensorProto.INT32, [2, 2])
    assert _shape(inferred, node.input[2]) == (TensorProto.INT32, [2])
    assert len(_shape(inferred, node.output[0])[1]) == 4
    # the level tables follow the input sizes: run their subgraph (no plugin in it) at other sizes
    path = tmp_path / "msda.onnx"
    onnx.save(inferred, str(path))
    tables = tmp_path / "tables.onnx"
    onnx.utils.extract_model(str(path), str(tables), ["f0", "f1"], [node.input[1], node.input[2]], check_model=False)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tables), providers=["CPUExecutionProvider"])
    f0, f1, _, _ = _tiny_msda_args(h0=10, w0=7, h1=5, w1=4, n=2)
    spatial, starts = session.run(None, {"f0": f0.numpy(), "f1": f1.numpy()})
    np.testing.assert_array_equal(spatial, [[10, 7], [5, 4]])
    np.testing.assert_array_equal(starts, [0, 70])
    assert spatial.dtype == np.int32 and starts.dtype == np.int32


# ---------------------------------------------------------------- backend logic


def test_device_index():
    assert trt_backend.device_index("cuda") == 0 and trt_backend.device_index("cuda:3") == 3
    for bad in ("cpu", "cuda:x", "mps:0"):
        with pytest.raises(ValueError, match="CUDA device"):
            trt_backend.device_index(bad)


def test_output_shapes_from_metadata():
    dims = _meta()["dims"]
    shapes = trt_backend.detector_output_shapes(dims, 32, batch=3, height=360, width=641)
    assert shapes == {"frame_queries": (3, 100, 256), "frame_logits": (3, 100, 41), "mask_features": (3, 256, 96, 168)}
    assert trt_backend.tokens_output_shapes(dims) == {"pred_logits": (100, 41), "mask_embed": (100, 256)}


def test_buffer_bookkeeping():
    mib = trt_backend.BUFFER_GRANULARITY
    assert trt_backend.grown_capacity(0, 10) == mib
    assert trt_backend.grown_capacity(0, 0) == mib  # zero-size tensors still get a valid address
    assert trt_backend.grown_capacity(mib, mib) == mib  # fits: reused
    assert trt_backend.grown_capacity(4 * mib, 10) == 4 * mib  # smaller shapes reuse the larger buffer
    assert trt_backend.grown_capacity(mib, mib + 1) == 2 * mib
    assert trt_backend.batch_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert trt_backend.batch_slices(3, 8) == [slice(0, 3)]


def test_check_in_profile_and_query_index():
    trt_backend.check_in_profile("frames", (2, 360, 640, 3), (1, 32, 32, 3), (16, 640, 640, 3))
    with pytest.raises(ValueError, match=r"outside the engine's profile.*: rebuild"):
        trt_backend.check_in_profile("frames", (2, 720, 1280, 3), (1, 32, 32, 3), (16, 640, 640, 3), "rebuild")
    index = trt_backend.full_query_index(3, 4)
    assert index.dtype == np.int64 and index.shape == (3, 4) and (index == np.arange(4)).all()


def test_modules_import_without_tensorrt():
    assert_imports_without(["runtime.backends.tensorrt_backend"], blocked=("tensorrt", "cuda", "torch"))
    assert_imports_without(["export.tensorrt"], blocked=("tensorrt",))


def test_clear_errors_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    graph = tmp_path / "g.onnx"
    onnx.save(_to_onnx(_Det(), (torch.randn(2, 3, 3),), ["x"], ["y"]), str(graph))
    with pytest.raises(ImportError, match="TensorRT is not installed: pip install"):
        trt_export.build_engine(graph, tmp_path / "g.engine", {"x": ((1, 3, 3), (2, 3, 3), (4, 3, 3))})
    with pytest.raises(FileNotFoundError, match="no ONNX graph"):
        trt_export.build_engine(tmp_path / "missing.onnx", tmp_path / "g.engine", {})
    with pytest.raises(FileNotFoundError, match="--tensorrt"):
        trt_backend.TensorRTBackend(tmp_path, _meta())
    for name in ("detector.engine", "vita_tokens.engine"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        trt_backend.TensorRTBackend(tmp_path, _meta())


# ---------------------------------------------------------------- with TensorRT and a GPU


def _require_trt():
    trt = pytest.importorskip("tensorrt", reason=NEEDS_TRT)
    try:
        trt_backend._import_cudart()
    except ImportError:
        pytest.skip(NEEDS_TRT)
    return trt


class _FakeDetector(torch.nn.Module):
    """The detector graph's interface on a few ops: frames -> queries, logits, mask features."""

    def __init__(self, nf=5, c=8, k=3, d=4) -> None:
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(nf, c))
        self.proj = torch.nn.Linear(3, c)
        self.cls = torch.nn.Linear(c, k + 1)
        self.mask = torch.nn.Conv2d(3, d, 1)

    def forward(self, frames):
        x = frames.float().permute(0, 3, 1, 2) / 255.0  # cast first: no UINT8 intermediate (TensorRT refuses it)
        h, w = x.shape[-2:]
        x = torch.nn.functional.pad(x, (0, (-w) % 32, 0, (-h) % 32))
        q = self.queries[None] + self.proj(x.mean((2, 3)))[:, None]
        return q, self.cls(q), self.mask(torch.nn.functional.avg_pool2d(x, 4))


class _FakeTokens(torch.nn.Module):
    """The token graph's interface: (T, N, C) tokens and (T, N) slots -> (Nv, K+1), (Nv, D)."""

    def __init__(self, nf=5, c=8, k=3, d=4, nv=6) -> None:
        super().__init__()
        self.slot = torch.nn.Embedding(nf, c)
        self.video = torch.nn.Parameter(torch.randn(nv, c))
        self.cls, self.embed = torch.nn.Linear(c, k + 1), torch.nn.Linear(c, d)

    def forward(self, frame_queries, query_index):
        pooled = (frame_queries + self.slot(query_index)).mean((0, 1))
        v = self.video + pooled
        return self.cls(v), self.embed(v)


def _fake_export(tmp_path, fp16=False):
    meta = _meta(max_batch=4, max_frames=16)
    meta["dims"] = {"num_classes": 3, "num_frame_queries": 5, "hidden_dim": 8, "num_video_queries": 6,
                    "mask_dim": 4, "mask_stride": 4}
    meta["model_config"] = ModelConfig(num_classes=3).to_dict()
    meta["preprocessing"].update(min_size=40, max_size=96)
    torch.manual_seed(0)
    det, tok = _FakeDetector().eval(), _FakeTokens().eval()
    frames = torch.zeros(1, 40, 56, 3, dtype=torch.uint8)
    onnx.save(_to_onnx(det, (frames,), ["frames"], ["frame_queries", "frame_logits", "mask_features"],
                       {"frames": {0: "b", 1: "h", 2: "w"}}), str(tmp_path / "detector.onnx"))
    queries, index = torch.zeros(3, 5, 8), torch.arange(5).repeat(3, 1)
    onnx.save(_to_onnx(tok, (queries, index), ["frame_queries", "query_index"], ["pred_logits", "mask_embed"],
                       {"frame_queries": {0: "t", 1: "n"}, "query_index": {0: "t", 1: "n"}}),
              str(tmp_path / "vita_tokens.onnx"))
    trt_export.build_engines(tmp_path, meta, fp16=fp16, workspace_gb=1.0)
    return meta, det, tok


def test_engine_build_and_backend_round_trip(tmp_path):
    _require_trt()
    meta, det, tok = _fake_export(tmp_path)
    assert (tmp_path / "detector.engine").stat().st_size > 0 and meta["tensorrt"]["engines"]["detector"]
    rng = np.random.default_rng(0)
    with trt_backend.TensorRTBackend(tmp_path, meta, "cuda:0") as backend:
        for shape in ((6, 40, 56, 3), (2, 72, 96, 3), (1, 40, 56, 3)):  # batch split, growth, reuse
            frames = rng.integers(0, 256, shape, dtype=np.uint8)
            detection = backend.detect(frames, prune_ratio=0.6)
            with torch.no_grad():
                q, logits, feats = det(torch.from_numpy(frames))
            np.testing.assert_allclose(detection.mask_features, feats.numpy(), rtol=1e-4, atol=1e-5)
            kept, index = trt_backend.numpy_ops.prune_frame_queries(q.numpy(), logits.numpy(), 0.6)
            np.testing.assert_allclose(detection.tokens, kept, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(detection.query_index, index)
        tokens = [rng.standard_normal((t, 5, 8)).astype(np.float32) for t in (3, 4)]
        logits, embed = backend.track(tokens, None, None)
        with torch.no_grad():
            ref_logits, ref_embed = tok(torch.from_numpy(np.concatenate(tokens)), torch.arange(5).repeat(7, 1))
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(embed, ref_embed.numpy(), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="window"):
            backend.track(tokens, None, window=meta["window"] + 1)
        with pytest.raises(ValueError, match="outside the engine's profile"):
            backend.detect(np.zeros((1, 200, 40, 3), np.uint8), 1.0)


def test_engine_build_reports_parser_errors(tmp_path):
    _require_trt()
    path = tmp_path / "det.onnx"
    onnx.save(_to_onnx(_Det(), (torch.randn(2, 3, 3),), ["x"], ["y"]), str(path))
    with pytest.raises(trt_export.EngineBuildError, match="Det"):
        trt_export.build_engine(path, tmp_path / "det.engine", {})


def test_plugin_engine_matches_reference(tmp_path):
    trt = _require_trt()
    args = _tiny_msda_args(n=2, lq=5)
    path = tmp_path / "msda.onnx"
    onnx.save(_to_onnx(_TinyMSDA(), args, _MSDA_IN, _MSDA_OUT, _MSDA_AXES), str(path))
    profiles = {
        "f0": ((1, 8, 2, 2), (2, 8, 4, 6), (2, 8, 8, 8)), "f1": ((1, 8, 1, 1), (2, 8, 2, 3), (2, 8, 4, 4)),
        "locations": ((1, 1, 2, 2, 3, 2), (2, 5, 2, 2, 3, 2), (2, 9, 2, 2, 3, 2)),
        "weights": ((1, 1, 2, 2, 3), (2, 5, 2, 2, 3), (2, 9, 2, 2, 3)),
    }
    engine_path = tmp_path / "msda.engine"
    trt_export.build_engine(path, engine_path, profiles, plugins=True)
    cuda = trt_backend._Cuda(trt_backend._import_cudart(), 0)
    logger = trt_backend._trt_logger(trt)
    trt.init_libnvinfer_plugins(logger, "")
    engine = trt_backend._Engine(trt, trt.Runtime(logger), cuda, engine_path)
    stream = cuda.call(cuda.rt.cudaStreamCreate())
    try:
        out = engine.run(dict(zip(_MSDA_IN, (a.numpy() for a in args))), stream)["out"]
    finally:
        engine.close()
        cuda.call(cuda.rt.cudaStreamDestroy(stream))
    with torch.no_grad():
        ref = _TinyMSDA(ms_deform_attn_sample)(*args)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5)
