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
from vita_train.utils.hashing import sha256_file
from export import tensorrt as trt_export
from export import trt_compat
from export.reduced_precision import precision_of, to_reduced_precision, variant_name
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
from .fake_tensorrt import FakeCudart, FakeTensorRT, add_runtime

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
    ops = {n.op_type for n in detector.graph.node}
    body_ops = {n.op_type for f in detector.functions for n in f.node}  # the plain form: a local function's body
    assert (PLUGIN_OP in ops, "MSDeformAttn" in ops, "GridSample" in body_ops) == (plugins, not plugins, not plugins)
    for graph in ("detector.onnx", "vita_tokens.onnx"):
        assert trt_compat.check_graph(export_dir / graph, plugins=plugins) == [], graph
        # as build_engine hands it to each TensorRT: the plugin version that TensorRT recommends
        for version in ("10.0.1", "10.11.0", "11.4.0"):
            model = onnx.load(str(export_dir / graph))
            trt_export.set_plugin_version(model, trt_export.plugin_version_for(version))
            assert trt_compat.check_graph(model, plugins=plugins, trt_version=version) == [], (graph, version)
    assert trt_compat.check_export(export_dir, plugins) == []


def test_tensorrt_targeted_export_fails_on_what_the_parser_would_refuse(tmp_path, monkeypatch):
    from export.graphs import DetectorGraph

    def permute_first(self, frames):  # the detector graph as it was: a UINT8 Transpose before the cast
        out = self.model.detect(frames.permute(0, 3, 1, 2))
        return out.frame_queries, out.frame_logits, out.mask_features

    monkeypatch.setattr(DetectorGraph, "forward", permute_first)
    out = tmp_path / "refused"
    with pytest.raises(trt_compat.TensorRTCompatibilityError, match=r"(?s)would refuse 2 part.*'/Transpose'.*UINT8"):
        export_model(OfficialCase("r50_tiny").ckpt, ExportOptions(out=out, validate=False, tensorrt=True))
    assert not out.exists()  # before any TensorRT import or GPU work, and nothing left behind


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
    assert {a.name: a.s.decode() for a in node.attribute} == {"plugin_version": "2", "plugin_namespace": ""}
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


# ---------------------------------------------------------------- reduced-precision graph variants


def _typed(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


_LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("msda", ["plain", "trt-plugin"])
def test_reduced_precision_variants_carry_the_policy(fixture_exports, msda, precision):
    export_dir = fixture_exports("r50_tiny", msda)
    for graph in ("detector.onnx", "vita_tokens.onnx"):
        fp32 = onnx.load(str(export_dir / graph))
        low = to_reduced_precision(fp32, precision)
        assert precision_of(low) == precision and precision_of(fp32) == "fp32"
        # the interface is the fp32 graph's: same names, same types
        for a, b in ((fp32.graph.input, low.graph.input), (fp32.graph.output, low.graph.output)):
            assert [(v.name, v.type.tensor_type.elem_type) for v in a] == [(v.name, v.type.tensor_type.elem_type) for v in b]
        assert trt_compat.check_graph(low, plugins=msda == "trt-plugin") == [], graph
        types = _typed(low)
        fp32_types = _typed(fp32)
        sampling = {fp32.graph.node[i].name for i in _sampling_indices(fp32, fp32_types)}
        if graph == "detector.onnx":
            assert sampling, "the positions and weights of deformable sampling were not found"
        for node in low.graph.node:
            floats = [types.get(t) for t in (*node.input, *node.output) if types.get(t) in (1, 10, 16)]
            kept = (node.op_type in ("LayerNormalization", "Softmax", "Less", "InstanceNormalization", "GridSample",
                                     PLUGIN_OP, "MSDeformAttn") or node.name in sampling
                    or (precision == "fp16" and "/pixel_decoder/" in node.name))
            if kept and node.op_type != "Cast":  # the pass's Casts at the scope's edges carry both types
                assert set(floats) <= {TensorProto.FLOAT}, (node.name, floats)
        low_ops = {n.op_type for n in low.graph.node if any(types.get(o) == _LOW[precision] for o in n.output)}
        assert "MatMul" in low_ops
        pixel_low = {n.op_type for n in low.graph.node if "/pixel_decoder/" in n.name
                     and any(types.get(o) == _LOW[precision] for o in n.output)}
        if graph == "detector.onnx":
            # opset 17's Conv takes no bfloat16 (Conv-22 does): the bf16 variant keeps convolutions in fp32
            assert ("Conv" in low_ops) == (precision == "fp16")
            # the one policy: bf16 runs the pixel decoder's projections reduced (as the torch backend), fp16 not
            assert ("MatMul" in pixel_low) == (precision == "bf16")


def _sampling_indices(model, types) -> set[int]:
    from export.reduced_precision import sampling_nodes

    return sampling_nodes(model.graph, types)


def test_fp16_variant_agrees_with_fp32_in_onnxruntime(fixture_exports):
    ort = pytest.importorskip("onnxruntime")
    export_dir = fixture_exports("r50_tiny", "plain")
    frames = OfficialCase("r50_tiny").frames[:2]
    fp32 = ort.InferenceSession(str(export_dir / "detector.onnx"), providers=["CPUExecutionProvider"])
    low = to_reduced_precision(onnx.load(str(export_dir / "detector.onnx")), "fp16")
    fp16 = ort.InferenceSession(low.SerializeToString(), providers=["CPUExecutionProvider"])
    ref, out = fp32.run(None, {"frames": frames}), fp16.run(None, {"frames": frames})
    assert all(o.dtype == np.float32 for o in out)
    # mask features pass through the fp32 pixel decoder: close (measured 2.7e-3 of the largest value);
    # queries and logits go through the attention-mask threshold, where fp16 rounding flips some decisions
    feats_ref, feats = ref[2], out[2]
    assert np.abs(feats - feats_ref).max() <= 1e-2 * np.abs(feats_ref).max()
    small = _small_graph()
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    a = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(to_reduced_precision(small, "fp16").SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2)


def test_export_cli_writes_precision_variants_and_runs_the_static_check(tmp_path):
    from export.__main__ import main as export_cli

    out = tmp_path / "bf16"
    ckpt = OfficialCase("r50_tiny").ckpt
    assert export_cli(["--ckpt", str(ckpt), "--out", str(out), "--no-validate", "--precision", "bf16",
                       "--msda", "trt-plugin"]) == 0
    meta = __import__("json").loads((out / "vita.json").read_text())
    assert meta["precision"]["graphs"] == "bf16"
    assert meta["precision"]["files"] == {"detector": "detector.bf16.onnx", "vita_tokens": "vita_tokens.bf16.onnx"}
    assert meta["precision"]["tensorrt_static_check"]["findings"] == 0 and "tensorrt" not in meta
    for name in ("detector.bf16.onnx", "vita_tokens.bf16.onnx"):
        assert precision_of(onnx.load(str(out / name))) == "bf16"
    assert variant_name("detector.onnx", "fp32") == "detector.onnx"
    with pytest.raises(SystemExit):  # argparse's usage error
        export_cli(["--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--fp16", "--precision", "bf16"])


# ---------------------------------------------------------------- the builder against TensorRT 10.x and 11.x


def _small_graph() -> onnx.ModelProto:
    """frames-like input -> a matmul head, a layer norm and a pixel-decoder-scoped add, as the exports name nodes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.ones(8, np.float32), "g"),
             onnx.numpy_helper.from_array(np.zeros(8, np.float32), "b0")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/frame_decoder/proj/MatMul"),
             helper.make_node("LayerNormalization", ["h", "g", "b0"], ["n"], name="/frame_decoder/norm/LayerNorm", axis=-1),
             helper.make_node("Add", ["n", "x"], ["a"], name="/pixel_decoder/Add"),
             helper.make_node("Relu", ["a"], ["y"], name="/frame_decoder/Relu")]
    model = helper.make_model(helper.make_graph(nodes, "small", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


_PROFILE = {"x": ((1, 8), (4, 8), (16, 8))}


@pytest.fixture
def small_graphs(tmp_path):
    model = _small_graph()
    onnx.save(model, str(tmp_path / "g.onnx"))
    onnx.save(to_reduced_precision(model, "fp16"), str(tmp_path / "g.fp16.onnx"))
    return tmp_path


def _use(monkeypatch, version: str) -> FakeTensorRT:
    fake = FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


@pytest.mark.parametrize("version", ["10.8.0.43", "11.4.0.106"])
def test_strongly_typed_build_takes_precision_from_the_graph(small_graphs, monkeypatch, version):
    trt = _use(monkeypatch, version)
    plan = trt_export.build_engine(small_graphs / "g.fp16.onnx", small_graphs / "g.engine", _PROFILE, tf32=False)
    assert plan == trt_export.PrecisionPlan("fp16", strongly_typed=True)
    # TensorRT 10: 1 << kSTRONGLY_TYPED (= 1); TensorRT 11: always strongly typed, the deprecated flag not passed
    assert trt.named("builder.create_network") == [("builder.create_network", 2 if trt.legacy else 0)]
    flags = trt.named("config.set_flag")
    assert flags == []  # no FP16/BF16 builder flag in either version: the graph's types decide
    assert trt.named("config.clear_flag") == [("config.clear_flag", "TF32")]
    assert not [c for c in trt.calls if c[0].startswith("layer.")]  # no per-layer precision
    assert trt.named("config.add_optimization_profile")[0][1] == {"x": _PROFILE["x"]}
    assert (small_graphs / "g.engine").read_bytes() == b"engine:" + version.encode()


def test_tensorrt_10_legacy_fp16_flags_on_an_fp32_graph(small_graphs, monkeypatch):
    trt = _use(monkeypatch, "10.8.0.43")
    plan = trt_export.build_engine(small_graphs / "g.onnx", small_graphs / "g.engine", _PROFILE, precision="fp16")
    assert plan == trt_export.PrecisionPlan("fp16", strongly_typed=False, legacy_flag="FP16")
    assert trt.named("builder.create_network") == [("builder.create_network", 0)]  # weakly typed
    assert trt.named("config.set_flag") == [("config.set_flag", "FP16"), ("config.set_flag", "PREFER_PRECISION_CONSTRAINTS")]
    pinned = {c[1] for c in trt.named("layer.precision")}
    assert pinned == {"/frame_decoder/norm/LayerNorm", "/pixel_decoder/Add"}  # normalisation, pixel decoder
    assert len(trt.named("layer.set_output_type")) == 2
    assert trt.named("config.clear_flag") == []  # TF32 stays on unless asked


def test_tensorrt_11_refuses_the_removed_fp16_flag_with_what_to_do(small_graphs, monkeypatch):
    _use(monkeypatch, "11.4.0.106")
    with pytest.raises(trt_export.EngineBuildError, match=r"no BuilderFlag.FP16.*removed in 11.0.*--precision fp16"):
        trt_export.build_engine(small_graphs / "g.onnx", small_graphs / "g.engine", _PROFILE, precision="fp16")
    with pytest.raises(ValueError, match="computes in fp16"):
        trt_export.build_engine(small_graphs / "g.fp16.onnx", small_graphs / "g.engine", _PROFILE, precision="bf16")


def test_legacy_path_skips_layers_with_a_missing_output(tmp_path, monkeypatch):
    trt = _use(monkeypatch, "10.12.0.36")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    node = helper.make_node("Dropout", ["x"], ["y"], name="/pixel_decoder/Dropout")
    onnx.save(helper.make_model(helper.make_graph([node], "d", [x], [y])), str(tmp_path / "d.onnx"))
    trt_export.build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", {"x": ((1, 4), (1, 4), (2, 4))}, "fp16")
    assert trt.named("layer.") == []  # get_output(1) is None: the layer is left alone, not an AttributeError


def test_plugin_version_follows_the_installed_tensorrt(tmp_path, monkeypatch):
    model = _to_onnx(_TinyMSDA(), _tiny_msda_args(), _MSDA_IN, _MSDA_OUT, _MSDA_AXES)
    path = tmp_path / "msda.onnx"
    onnx.save(model, str(path))
    profiles = {"f0": ((1, 8, 2, 2), (1, 8, 4, 6), (2, 8, 8, 8)), "f1": ((1, 8, 1, 1), (1, 8, 2, 3), (2, 8, 4, 4)),
                "locations": ((1, 1, 2, 2, 3, 2), (1, 5, 2, 2, 3, 2), (2, 9, 2, 2, 3, 2)),
                "weights": ((1, 1, 2, 2, 3), (1, 5, 2, 2, 3), (2, 9, 2, 2, 3))}
    for version, expected, parse in (("10.8.0.43", "1", "parser.parse"), ("10.11.0.33", "2", "parser.parse_from_file"),
                                     ("11.4.0.106", "2", "parser.parse_from_file")):
        trt = _use(monkeypatch, version)
        trt_export.build_engine(path, tmp_path / "msda.engine", profiles, plugins=True)
        assert trt.calls[0][0] == "Builder" and trt.named("parser.")[0][0] == parse
        node = _plugin_node(trt.parsed[-1])
        assert {a.name: a.s.decode() for a in node.attribute}["plugin_version"] == expected, version
        # one logger for the process, handed to init_libnvinfer_plugins and kept alive
        assert trt.plugin_inits == [trt_export.trt_logger(trt)]
        trt_export.build_engine(path, tmp_path / "msda.engine", profiles, plugins=True)
        assert len(trt.plugin_inits) == 1  # initialised once


def test_timing_cache_is_reused_and_a_foreign_one_replaced(small_graphs, monkeypatch, caplog):
    trt = _use(monkeypatch, "11.4.0.106")
    cache = small_graphs / trt_export.TIMING_CACHE_FILE
    trt_export.build_engine(small_graphs / "g.onnx", small_graphs / "g.engine", _PROFILE, timing_cache=cache)
    assert trt.named("config.create_timing_cache") == [("config.create_timing_cache", b"")]
    assert cache.read_bytes() == b"|timed"
    trt_export.build_engine(small_graphs / "g.onnx", small_graphs / "g.engine", _PROFILE, timing_cache=cache)
    assert trt.named("config.create_timing_cache")[-1] == ("config.create_timing_cache", b"|timed")
    cache.write_bytes(b"foreign gpu")
    trt_export.build_engine(small_graphs / "g.onnx", small_graphs / "g.engine", _PROFILE, timing_cache=cache)
    assert trt.named("config.create_timing_cache")[-2:] == [("config.create_timing_cache", b"foreign gpu"),
                                                            ("config.create_timing_cache", b"")]
    assert "does not fit" in caplog.text and cache.read_bytes() == b"|timed"


def test_engine_cache_key_rebuilds_only_stale_engines(tmp_path, monkeypatch):
    meta = _fake_export_graphs(tmp_path)
    monkeypatch.setattr(trt_export, "compute_capability", lambda device=0: "9.0")
    trt = _use(monkeypatch, "10.16.1.11")
    trt_export.build_engines(tmp_path, meta, precision="fp16", workspace_gb=1.0)
    built = trt.named("builder.build_serialized_network")
    assert len(built) == 2 and (tmp_path / trt_export.TIMING_CACHE_FILE).is_file()
    record = meta["tensorrt"]["engines"]["detector"]
    assert record["onnx"] == "detector.fp16.onnx" and record["plan"] == {"strongly_typed": True, "legacy_flag": None}
    assert record["cache_fields"]["compute_capability"] == "9.0" and record["cache_fields"]["precision"] == "fp16"
    assert meta["tensorrt"]["precision"] == "fp16" and meta["tensorrt"]["timing_cache"] == "tensorrt.timing_cache"
    trt_export.build_engines(tmp_path, meta, precision="fp16", workspace_gb=1.0)
    assert len(trt.named("builder.build_serialized_network")) == 2  # both up to date: nothing rebuilt
    monkeypatch.setattr(trt_export, "compute_capability", lambda device=0: "8.9")  # another GPU
    trt_export.build_engines(tmp_path, meta, precision="fp16", workspace_gb=1.0)
    assert len(trt.named("builder.build_serialized_network")) == 4
    trt = _use(monkeypatch, "11.4.0.106")  # another TensorRT
    trt_export.build_engines(tmp_path, meta, precision="fp16", workspace_gb=1.0)
    assert len(trt.named("builder.build_serialized_network")) == 2
    onnx.save(to_reduced_precision(onnx.load(str(tmp_path / "vita_tokens.onnx")), "fp16", scopes=("/embed/",)),
              str(tmp_path / "vita_tokens.fp16.onnx"))  # another graph
    trt_export.build_engines(tmp_path, meta, precision="fp16", workspace_gb=1.0)
    assert len(trt.named("builder.build_serialized_network")) == 3  # only the token engine


def test_rebuild_cli_builds_only_what_is_stale(tmp_path, monkeypatch, capsys):
    from vita_train.export_format import FORMAT_NAME, FORMAT_VERSION

    meta = _fake_export_graphs(tmp_path)
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
    (tmp_path / "vita.json").write_text(__import__("json").dumps(meta))
    monkeypatch.setattr(trt_export, "compute_capability", lambda device=0: "9.0")
    trt = _use(monkeypatch, "11.4.0.106")
    assert trt_export.main([str(tmp_path), "--precision", "fp16"]) == 0
    assert len(trt.named("builder.build_serialized_network")) == 2
    assert trt_export.main([str(tmp_path)]) == 0  # precision and TF32 as recorded: nothing stale
    assert len(trt.named("builder.build_serialized_network")) == 2
    assert "up to date (fp16, TensorRT 11.4.0.106)" in capsys.readouterr().out
    assert trt_export.main([str(tmp_path), "--force"]) == 0
    assert len(trt.named("builder.build_serialized_network")) == 4
    assert trt_export.main([str(tmp_path / "missing")]) == 2


def test_engine_cache_key_covers_every_field():
    base = dict(onnx_sha256="a" * 64, trt_version="10.16.1", compute_capability="9.0", precision="fp16",
                profiles=_PROFILE, plugins=False, tf32=True)
    key = trt_export.engine_cache_key(trt_export.engine_cache_fields(**base))
    changes = dict(onnx_sha256="b" * 64, trt_version="11.4.0", compute_capability="8.9", precision="fp32",
                   profiles={"x": ((1, 8), (8, 8), (16, 8))}, plugins=True, tf32=False)
    for name, value in changes.items():
        assert trt_export.engine_cache_key(trt_export.engine_cache_fields(**{**base, name: value})) != key, name


def test_network_flags_and_versions():
    assert trt_export.network_flags(FakeTensorRT("10.0.1"), True) == 2
    assert trt_export.network_flags(FakeTensorRT("10.0.1"), False) == 0
    assert trt_export.network_flags(FakeTensorRT("11.1.0"), True) == 0
    assert trt_export.plugin_version_for("10.10.0.31") == "1" and trt_export.plugin_version_for("10.11.0") == "2"
    assert trt_export.version_tuple("11.4.0.106") == (11, 4)


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


def test_engine_run_stages_through_pinned_buffers_and_checks_addresses(tmp_path):
    trt, rt = add_runtime(FakeTensorRT("11.4.0.106")), FakeCudart()
    (tmp_path / "e.engine").write_bytes(b"engine")
    cuda = trt_backend._Cuda(rt, 0)
    engine = trt_backend._Engine(trt, trt.Runtime(None), cuda, tmp_path / "e.engine")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(engine.run({"x": x}, 7)["y"], 2 * x)
    assert rt.copies == [("cudaMemcpyHostToDevice", True), ("cudaMemcpyDeviceToHost", True)]  # pinned host side
    allocated = rt.allocations
    out = engine.run({"x": x[:2].astype(np.float64)}, 7)["y"]  # smaller: buffers reused; float64 cast on staging
    assert rt.allocations == allocated and out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_array_equal(out, 2 * x[:2])
    engine.close()
    assert rt.blocks == {}  # device and pinned buffers freed
    trt = add_runtime(FakeTensorRT("11.4.0.106"), refuse={"y"})
    refusing = trt_backend._Engine(trt, trt.Runtime(None), cuda, tmp_path / "e.engine")
    with pytest.raises(RuntimeError, match="refused the address of y"):
        refusing.run({"x": x}, 7)


def _install_fakes(monkeypatch, trt: FakeTensorRT, rt: FakeCudart) -> None:
    import types as types_

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    bindings = types_.ModuleType("cuda.bindings")
    bindings.runtime = rt
    monkeypatch.setitem(sys.modules, "cuda", types_.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)


def test_backend_refuses_stale_engines(tmp_path, monkeypatch):
    for name in ("detector.engine", "vita_tokens.engine"):
        (tmp_path / name).write_bytes(b"engine")
    (tmp_path / "detector.onnx").write_bytes(b"graph v1")
    meta = _meta()
    fields = {"tensorrt": "11.4.0.106", "compute_capability": "9.0",
              "onnx_sha256": sha256_file(tmp_path / "detector.onnx"), "precision": "fp16"}
    meta["tensorrt"] = {"engines": {"detector": {"file": "detector.engine", "onnx": "detector.onnx",
                                                 "cache_fields": fields}}}
    _install_fakes(monkeypatch, add_runtime(FakeTensorRT("11.4.0.106")), FakeCudart((9, 0)))
    with trt_backend.TensorRTBackend(tmp_path, meta) as backend:  # fresh: loads
        assert backend._detector.inputs == ["x"]
    _install_fakes(monkeypatch, add_runtime(FakeTensorRT("11.4.0.106")), FakeCudart((8, 9)))
    with pytest.raises(trt_backend.StaleEngineError, match=r"compute_capability 9.0 -> 8.9.*python -m export.tensorrt"):
        trt_backend.TensorRTBackend(tmp_path, meta)
    _install_fakes(monkeypatch, add_runtime(FakeTensorRT("10.16.1.11")), FakeCudart((9, 0)))
    with pytest.raises(trt_backend.StaleEngineError, match=r"tensorrt 11.4.0.106 -> 10.16.1.11"):
        trt_backend.TensorRTBackend(tmp_path, meta)
    (tmp_path / "detector.onnx").write_bytes(b"graph v2")
    _install_fakes(monkeypatch, add_runtime(FakeTensorRT("11.4.0.106")), FakeCudart((9, 0)))
    with pytest.raises(trt_backend.StaleEngineError, match="onnx_sha256"):
        trt_backend.TensorRTBackend(tmp_path, meta)


def test_cuda_python_must_match_the_tensorrt_wheel():
    assert trt_backend.cuda_majors([("tensorrt_cu12", "10.16.1"), ("cuda-python", "12.9.4"), ("numpy", "2")]) == (12, 12)
    assert trt_backend.cuda_majors([("tensorrt-cu13-libs", "11.4"), ("cuda-bindings", "13.0.1")]) == (13, 13)
    assert trt_backend.cuda_majors([("numpy", "2.0")]) == (None, None)
    trt_backend.check_cuda_majors(12, 12)
    trt_backend.check_cuda_majors(None, 13)  # unknown: nothing to compare
    with pytest.raises(ImportError, match=r"CUDA 12 but cuda-python 13.x.*cuda-python>=12,<13.*gpu-cu12"):
        trt_backend.check_cuda_majors(*trt_backend.cuda_majors([("tensorrt-cu12", "11.4"), ("cuda-python", "13.4.4")]))


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
    """tensorrt, or a skip: both wheels install on CPU-only Linux, so a CUDA device is asked for too."""
    trt = pytest.importorskip("tensorrt", reason=NEEDS_TRT)
    try:
        cudart = trt_backend._import_cudart()
    except ImportError:
        pytest.skip(NEEDS_TRT)
    err, count = cudart.cudaGetDeviceCount()  # (err, n); with no driver or device, err says why
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        pytest.skip(f"no CUDA device ({getattr(err, 'name', err)}): {NEEDS_TRT}")
    return trt


def test_gpu_tests_skip_without_a_cuda_device(monkeypatch):
    trt = FakeTensorRT("11.4.0.106")
    _install_fakes(monkeypatch, trt, FakeCudart(devices=0))
    with pytest.raises(pytest.skip.Exception, match="no CUDA device"):
        _require_trt()
    _install_fakes(monkeypatch, trt, FakeCudart(devices=1))
    assert _require_trt() is trt


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


def _fake_export_graphs(tmp_path) -> dict:
    """The two fake graphs (and their fp16 variants) in ``tmp_path``; returns their vita.json."""
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
    trt_export.prepare_graphs(tmp_path, meta, "fp16")
    return meta


def _fake_export(tmp_path, precision="fp32"):
    meta = _fake_export_graphs(tmp_path)
    torch.manual_seed(0)
    det, tok = _FakeDetector().eval(), _FakeTokens().eval()
    # TF32 off: the comparisons below hold engines to 1e-4 (TF32 rounds fp32 matmul inputs to 10-bit mantissas)
    trt_export.build_engines(tmp_path, meta, precision=precision, workspace_gb=1.0, tf32=False)
    return meta, det, tok


# TF32 is off in these builds, so fp32 engines meet 1e-4; fp16 engines: the fp16 rounding of O(1) values
_TOLERANCE = {"fp32": {"rtol": 1e-4, "atol": 1e-5}, "fp16": {"rtol": 2e-2, "atol": 2e-2}}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_and_backend_round_trip(tmp_path, precision):
    _require_trt()
    meta, det, tok = _fake_export(tmp_path, precision)
    tol = _TOLERANCE[precision]
    assert (tmp_path / "detector.engine").stat().st_size > 0 and meta["tensorrt"]["engines"]["detector"]
    rng = np.random.default_rng(0)
    with trt_backend.TensorRTBackend(tmp_path, meta, "cuda:0") as backend:
        for shape in ((6, 40, 56, 3), (2, 72, 96, 3), (1, 40, 56, 3)):  # batch split, growth, reuse
            frames = rng.integers(0, 256, shape, dtype=np.uint8)
            detection = backend.detect(frames, prune_ratio=0.6)
            with torch.no_grad():
                q, logits, feats = det(torch.from_numpy(frames))
            np.testing.assert_allclose(detection.mask_features, feats.numpy(), **tol)
            kept, index = trt_backend.numpy_ops.prune_frame_queries(q.numpy(), logits.numpy(), 0.6)
            if precision == "fp32":  # fp16 may reorder near-equal no-object probabilities when pruning
                np.testing.assert_allclose(detection.tokens, kept, **tol)
                np.testing.assert_array_equal(detection.query_index, index)
        tokens = [rng.standard_normal((t, 5, 8)).astype(np.float32) for t in (3, 4)]
        logits, embed = backend.track(tokens, None, None)
        with torch.no_grad():
            ref_logits, ref_embed = tok(torch.from_numpy(np.concatenate(tokens)), torch.arange(5).repeat(7, 1))
        np.testing.assert_allclose(logits, ref_logits.numpy(), **tol)
        np.testing.assert_allclose(embed, ref_embed.numpy(), **tol)
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
    trt_export.build_engine(path, engine_path, profiles, plugins=True, tf32=False)
    cuda = trt_backend._Cuda(trt_backend._import_cudart(), 0)
    trt_backend._init_plugins(trt)
    engine = trt_backend._Engine(trt, trt.Runtime(trt_backend._trt_logger(trt)), cuda, engine_path)
    stream = cuda.call(cuda.rt.cudaStreamCreate())
    try:
        out = engine.run(dict(zip(_MSDA_IN, (a.numpy() for a in args))), stream)["out"]
    finally:
        engine.close()
        cuda.call(cuda.rt.cudaStreamDestroy(stream))
    with torch.no_grad():
        ref = _TinyMSDA(ms_deform_attn_sample)(*args)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5)
