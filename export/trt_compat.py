"""Static TensorRT compatibility check of an ONNX graph: what the ONNX parser would refuse, found without a GPU.

The rules come from onnx/onnx-tensorrt at commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c ("ONNX-TensorRT 10.1 GA
release", 2024-06-17; its tables describe TensorRT 10.0, opsets 9 to 20), the floor of "TensorRT >= 10":

- op types: every row marked "Y" in ``docs/operators.md``;
- tensor types: each row's "Supported Types" column (checked on the op's data inputs), and the note "UINT8 is only
  supported as network input or output tensor types", which ``ModelImporter.cpp`` (parseNode) enforces on every
  node output: "TensorRT does not support UINT8 types for intermediate tensors!";
- plugin nodes: the inputs of ``MultiscaleDeformableAttnPlugin_TRT`` (export/trt_plugin.py states its contract).

Later parser releases only add ops and types, so an empty report holds for every TensorRT >= 10. The tables cannot
express every restriction of a row (constant inputs, attribute values): the parser keeps the last word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

PARSER_SOURCE = "onnx/onnx-tensorrt@96e78110 docs/operators.md (TensorRT 10.0)"

_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)
# "Supported Types" of every op marked "Y", grouped by identical columns (the table's "INF64" typo read as INT64)
_TYPE_GROUPS: dict[tuple[str, ...], tuple[str, ...]] = {
    _F: (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil", "Celu",
        "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf", "Exp", "Floor",
        "GRU", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization", "HardSigmoid",
        "HardSwish", "Hardmax", "ImageScaler", "InstanceNormalization", "IsInf", "LRN", "LSTM", "LayerNormalization",
        "LeakyRelu", "Log", "LogSoftmax", "LpNormalization", "LpPool", "MatMul", "MaxPool",
        "MeanVarianceNormalization", "PRelu", "ParametricSoftplus", "Pow", "QuantizeLinear", "RNN", "RandomNormal",
        "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize", "Round", "ScaledTanh",
        "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
        "ThresholdedRelu", "Upsample",
    ),
    _FI: (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual", "IsNaN",
        "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Range", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
        "ReduceSumSquare", "Relu", "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth",
        "Sub", "Sum", "TopK",
    ),
    _FIB: (
        "Concat", "Constant", "ConstantOfShape", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements",
        "GatherND", "Identity", "If", "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice",
        "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where",
    ),
    ("FP32", "FP16"): ("DeformConv", "GridSample", "Mish", "NonMaxSuppression", "NonZero", "RoiAlign"),
    ("BOOL",): ("And", "Not", "Or", "Xor"),
    _FIB + ("UINT8",): ("Cast", "CastLike"),
    ("INT8", "FP8", "INT4"): ("DequantizeLinear",),
    _FI + ("INT8",): ("Gelu",),
    _FI + ("FP8",): ("Mean",),
}  # fmt: skip
TRT_ONNX_TYPES: dict[str, frozenset[str]] = {op: frozenset(t) for t, ops in _TYPE_GROUPS.items() for op in ops}
# ONNX op types the TensorRT ONNX parser imports natively (the rows marked "Y"). Later tables only add ops
# (TensorRT 10.15's adds Attention, BlackmanWindow, HammingWindow, HannWindow, RMSNormalization, RotaryEmbedding,
# STFT, TensorScatter).
TRT_ONNX_SUPPORTED_OPS: frozenset[str] = frozenset(TRT_ONNX_TYPES)
# inputs that are not the op's data (shape, axis, index, scale operands): the column does not speak of them
_AUX_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2, 3}),  # roi, scales (float32 by the ONNX spec), sizes (int64)
    "Upsample": frozenset({1}),
    "CumSum": frozenset({1}),  # axis
    "Dropout": frozenset({1, 2}),  # ratio, training_mode (bool)
    "RoiAlign": frozenset({2}),  # batch_indices (int64)
    "NonMaxSuppression": frozenset({2, 3, 4}),
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "Einsum": frozenset(),
}
# graph inputs and outputs: the types of the data-type list at the top of docs/operators.md that are not
# "Quantized Types" (INT8, INT4, FP8 exist only through quantisation); DOUBLE is cast down with a warning
IO_TYPES = frozenset({"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"})

# plugin nodes our exports may contain (export/trt_plugin.py); the parser finds them by op type in the plugin
# registry that init_libnvinfer_plugins fills. Input contract of MultiscaleDeformableAttnPlugin_TRT, both versions
# (TensorRT plugin/multiscaleDeformableAttnPlugin: supportsFormatCombination): value, sampling_locations and
# attention_weights of one float type (FP32 or FP16), spatial_shapes and level_start_index INT32.
MSDA_PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
TRT_PLUGIN_OPS: frozenset[str] = frozenset({MSDA_PLUGIN_OP})
MSDA_PLUGIN_VERSIONS: dict[str, tuple[int, int]] = {"1": (10, 0), "2": (10, 11)}  # version -> first TensorRT

# onnx.TensorProto data type numbers -> the names operators.md uses
_ONNX_TYPE_NAMES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL",
    10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BF16",
    17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4",
}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT's ONNX parser would refuse."""

    graph: str  # the graph's file name, or its name when given a loaded model
    node: str  # node name ("" for the graph's inputs and outputs)
    op: str
    problem: str  # "op" | "uint8-intermediate" | "type" | "io-type" | "plugin"
    detail: str

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.node or self.op else "graph"
        return f"{self.graph}: {where}: {self.detail}"


class TensorRTCompatibilityError(ValueError):
    """A graph that is meant for TensorRT has parts its ONNX parser refuses; the message lists them."""


def type_name(elem_type: int) -> str:
    """ONNX TensorProto data type -> the name operators.md uses (FP32, INT64, ...)."""
    return _ONNX_TYPE_NAMES.get(int(elem_type), f"type {elem_type}")


def _load(model_or_path: Union[str, Path, Any]):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "graph"
    path = Path(model_or_path)
    # the structure and the types are all we need: leave external weights on disk
    return onnx.load(str(path), load_external_data=False), path.name


def _subgraphs(node) -> Iterator[Any]:
    """Graphs held in a node's attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _op_types(nodes: Iterable[Any], functions: Mapping[tuple[str, str], Any], seen: set) -> Iterator[str]:
    """Op types of ``nodes``, of their subgraphs, and of the model-local functions they call."""
    for node in nodes:
        key = (node.domain, node.op_type)
        if key in functions:
            # the parser imports a call to a model-local function as the function's body
            if key not in seen:
                seen.add(key)
                yield from _op_types(functions[key].node, functions, seen)
            continue
        yield node.op_type
        for graph in _subgraphs(node):
            yield from _op_types(graph.node, functions, seen)


def unsupported_ops(onnx_path: Union[str, Path, Any], plugins: bool = False) -> list[str]:
    """Sorted op types in the graph (subgraphs and local functions included) that TensorRT 10 cannot import.

    Like the parser, only the op type counts (not the domain). With ``plugins``, TRT_PLUGIN_OPS count as
    supported. ``onnx_path`` may also be a loaded onnx.ModelProto.
    """
    model, _ = _load(onnx_path)
    supported = TRT_ONNX_SUPPORTED_OPS | (TRT_PLUGIN_OPS if plugins else frozenset())
    functions = {(f.domain, f.name): f for f in model.functions}
    return sorted({op for op in _op_types(model.graph.node, functions, set()) if op not in supported})


def _value_types(graph) -> dict[str, int]:
    """Tensor name -> ONNX elem_type for every typed value of ``graph`` (initializers and constants included)."""
    types = {}
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _version_tuple(version: str) -> tuple[int, int]:
    parts = [int(p) if p.isdigit() else 0 for p in str(version).split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _check_plugin(node, types: Mapping[str, int], graph: str, trt_version: Optional[str]) -> list[Finding]:
    """Findings for one MultiscaleDeformableAttnPlugin_TRT node: input types and plugin version."""
    out = []

    def finding(detail: str) -> None:
        out.append(Finding(graph, node.name, node.op_type, "plugin", detail))

    if len(node.input) != 5 or len(node.output) != 1:
        finding(f"takes 5 inputs and gives 1 output, has {len(node.input)} and {len(node.output)}")
        return out
    names = [type_name(types[i]) if i in types else "unknown" for i in node.input]
    floats = {names[0], names[3], names[4]}
    if len(floats) != 1 or not floats <= {"FP32", "FP16"}:
        finding(f"value, sampling_locations and attention_weights must be one of FP32/FP16, are {names[0]}, "
                f"{names[3]}, {names[4]}")
    for i, what in ((1, "spatial_shapes"), (2, "level_start_index")):
        if names[i] != "INT32":
            finding(f"{what} must be INT32, is {names[i]}")
    attrs = {a.name: (a.s.decode() if a.s else "") for a in node.attribute}
    version = attrs.get("plugin_version", "1")  # the parser's default (ModelImporter: FallbackPluginImporter)
    if version not in MSDA_PLUGIN_VERSIONS:
        finding(f"plugin_version {version!r} does not exist; TensorRT has {sorted(MSDA_PLUGIN_VERSIONS)}")
    elif trt_version is not None and _version_tuple(trt_version) < MSDA_PLUGIN_VERSIONS[version]:
        first = ".".join(map(str, MSDA_PLUGIN_VERSIONS[version]))
        finding(f"plugin_version {version!r} needs TensorRT >= {first}; this is {trt_version}")
    return out


def _check_nodes(nodes: Sequence[Any], types: Mapping[str, int], outputs: set, graph: str, plugins: bool,
                 trt_version: Optional[str], functions: frozenset) -> Iterator[Finding]:
    for node in nodes:
        op = node.op_type
        if (node.domain, op) in functions:
            continue  # imported as the function's body: its op types are checked by unsupported_ops
        if op in TRT_PLUGIN_OPS and plugins:
            yield from _check_plugin(node, types, graph, trt_version)
            continue
        if op not in TRT_ONNX_TYPES:
            yield Finding(graph, node.name, op, "op", f"op type {op} is not in the parser's list ({PARSER_SOURCE})")
            continue
        allowed, aux = TRT_ONNX_TYPES[op], _AUX_INPUTS.get(op, frozenset())
        for i, name in enumerate(node.input):
            if name and i not in aux and name in types and type_name(types[name]) not in allowed:
                yield Finding(graph, node.name, op, "type",
                              f"input {i} {name!r} is {type_name(types[name])}; {op} takes {', '.join(sorted(allowed))}")
        for name in node.output:
            if name and types.get(name) == 2 and name not in outputs:  # 2 = UINT8
                yield Finding(graph, node.name, op, "uint8-intermediate",
                              f"output {name!r} is a UINT8 tensor that is not a graph output: TensorRT takes UINT8 "
                              "only as network input or output (cast to float before any other op)")
        for sub in _subgraphs(node):
            sub_types = {**types, **_value_types(sub)}
            yield from _check_nodes(sub.node, sub_types, outputs, graph, plugins, trt_version, functions)


def check_graph(
    model_or_path: Union[str, Path, Any], plugins: bool = False, trt_version: Optional[str] = None
) -> list[Finding]:
    """Everything in an ONNX graph that TensorRT's ONNX parser would refuse; empty when it parses.

    Checks op types, the types of each op's data inputs, UINT8 tensors that are not graph inputs or outputs,
    the graph's input and output types and, with ``plugins``, the plugin nodes' inputs and version
    (against ``trt_version`` when given). Types come from ONNX shape inference; local functions' bodies are
    checked for op types only.
    """
    import onnx

    model, graph_name = _load(model_or_path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot handle is judged on its own value_info
        inferred = model
    g = inferred.graph
    types = _value_types(g)
    outputs = {o.name for o in g.output}
    findings = []
    for v in (*g.input, *g.output):
        name = type_name(v.type.tensor_type.elem_type)
        if name not in IO_TYPES:
            findings.append(Finding(graph_name, "", "", "io-type",
                                    f"graph input/output {v.name!r} is {name}; TensorRT takes {sorted(IO_TYPES)}"))
    functions = frozenset((f.domain, f.name) for f in model.functions)
    findings += _check_nodes(g.node, types, outputs, graph_name, plugins, trt_version, functions)
    for op in unsupported_ops(model, plugins):
        if not any(f.op == op for f in findings):  # only inside local functions
            findings.append(Finding(graph_name, "", op, "op", f"op type {op} is not in the parser's list ({PARSER_SOURCE})"))
    return findings


def check_export(export_dir: Union[str, Path], plugins: bool, trt_version: Optional[str] = None) -> list[Finding]:
    """check_graph over both graphs of an export directory."""
    from vita_train.export_format import DETECTOR_FILE, TOKENS_FILE

    export_dir = Path(export_dir)
    return [f for name in (DETECTOR_FILE, TOKENS_FILE) for f in check_graph(export_dir / name, plugins, trt_version)]


def raise_if_incompatible(findings: Sequence[Finding]) -> None:
    """TensorRTCompatibilityError listing every finding; nothing when there is none."""
    if not findings:
        return
    shown = "\n".join(f"  - {f}" for f in findings[:30])
    more = f"\n  ... and {len(findings) - 30} more" if len(findings) > 30 else ""
    raise TensorRTCompatibilityError(
        f"TensorRT's ONNX parser would refuse {len(findings)} part(s) of the graphs (per {PARSER_SOURCE}):\n"
        f"{shown}{more}\nexport without --tensorrt for ONNX Runtime, or change the model so these ops and types go"
    )
