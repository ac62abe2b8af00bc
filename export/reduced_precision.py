"""fp16 / bf16 variants of an exported fp32 ONNX graph, with the project's mixed-precision policy in its types.

TensorRT 11 builds every network strongly typed (NvInfer.h 11.0: kSTRONGLY_TYPED "is always enabled"; the builder
flags FP16/BF16 and per-layer precision were deprecated in 10.12 and removed in 11.0), so an engine's precision is
the precision of the ONNX graph's own tensors. This pass writes that precision into the graph once, for TensorRT 10
and 11 alike.

The mixed-precision policy is the torch backend's (``vita_train/modeling/precision.py`` states it once):

- deformable sampling stays fp32: every node from the offset and attention-logit projections (which run reduced)
  and the reference points up to the sampling node (our ``vita.ops::MSDeformAttn`` or TensorRT's
  MultiscaleDeformableAttnPlugin_TRT, which takes fp32 or fp16 only) computes in fp32, and so does the sampling;
- fp16 only: the whole pixel decoder (``/pixel_decoder/`` nodes) stays fp32, as in the official code, which runs
  it with autocast off (fp16's range does not hold it); a bf16 variant runs it reduced like the torch backend;
- normalisations (Layer/Group/Instance/BatchNormalization) and Softmax/LogSoftmax stay fp32 (their reductions
  overflow or lose mass in fp16);
- comparisons stay fp32 with the Sigmoid that feeds them: the frame decoder's attention-mask threshold
  ``sigmoid(x) < 0.5`` and every other mask threshold decide on fp32 values;
- position encodings and other overflow-prone math (CumSum, Sin, Cos, Exp, Log, Pow, Range) stay fp32;
- everything else that computes on floats (convolutions, matmuls, element-wise ops, data movement) runs in the
  reduced type, where the op's ONNX schema at the graph's opset takes it (bf16 Conv needs opset 22: at opset 17
  a bf16 variant keeps convolutions in fp32). Graph inputs and outputs keep their names and fp32 / uint8 / int64 types (a Cast at each end), so
  a runtime feeds and reads the variant exactly as the fp32 graph.

``to_reduced_precision`` is the reference; there is no fast path.
"""

from __future__ import annotations

from typing import AbstractSet, Any, Iterable, Optional

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16")
# the node-name scopes each reduced precision keeps in fp32 (the TensorRT 10 flag path pins the first for both)
KEEP_FP32_SCOPES = ("/pixel_decoder/",)
SCOPES_BY_PRECISION = {"fp16": KEEP_FP32_SCOPES, "bf16": ()}
# deformable-sampling nodes and their inputs that carry positions or attention weights (kept fp32 back to the
# projections); the value input (0) runs reduced up to the node
SAMPLING_INPUTS = {"MSDeformAttn": (2, 3, 4), "MultiscaleDeformableAttnPlugin_TRT": (3, 4)}
_PROJECTIONS = frozenset({"MatMul", "Gemm", "Conv"})
KEEP_FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "IsNaN", "IsInf",
    "CumSum", "Sin", "Cos", "Exp", "Log", "Pow", "Range",
})  # fmt: skip
# ops that may run in the reduced type: all their float inputs and outputs share one type T (except _AUX_INPUTS)
REDUCED_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum",
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Max", "Min", "Clip",
    "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "HardSigmoid", "HardSwish", "LeakyRelu",
    "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice", "Split", "Gather", "Expand",
    "Tile", "Pad", "Resize", "Where", "Identity", "Dropout",
})  # fmt: skip
# float inputs of a reduced op that keep their own type: Resize's roi and scales are fp32 by the ONNX spec
_AUX_INPUTS = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1}), "Dropout": frozenset({1})}
_COMPARISONS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"})
_FLOAT = 1  # onnx.TensorProto.FLOAT


def elem_type(precision: str) -> int:
    """'fp32' | 'fp16' | 'bf16' -> onnx.TensorProto data type."""
    import onnx

    types = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
    if precision not in types:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return types[precision]


def fp32_scopes(precision: str) -> tuple[str, ...]:
    """The node-name scopes the policy keeps in fp32 for ``precision`` ('fp16' / 'bf16')."""
    elem_type(precision)  # names a bad precision
    return SCOPES_BY_PRECISION.get(precision, ())


def sampling_nodes(graph: Any, types: dict[str, int]) -> set[int]:
    """Indices (in ``graph.node``) of the nodes that compute deformable sampling positions and attention weights:
    from each sampling node's position / weight inputs back to (not including) the projections, through
    float-valued nodes only (a shape computation is not followed into the network)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    found: set[int] = set()
    stack = [name for node in nodes for i, name in enumerate(node.input)
             if i in SAMPLING_INPUTS.get(node.op_type, ()) and name]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in found or nodes[i].op_type in _PROJECTIONS:
            continue
        if not any(types.get(o) == _FLOAT for o in nodes[i].output):
            continue
        found.add(i)
        stack.extend(name for name in nodes[i].input if name)
    return found


def keeps_fp32(node: Any, consumers: dict[str, list[Any]], scopes: Iterable[str] = KEEP_FP32_SCOPES,
               sampling: AbstractSet[int] = frozenset()) -> bool:
    """Whether the policy keeps ``node`` in fp32 (see the module docstring); ``sampling``: the ids of the nodes
    sampling_nodes() finds."""
    if node.op_type not in REDUCED_OPS or any(scope in node.name for scope in scopes) or id(node) in sampling:
        return True
    if node.op_type == "Sigmoid":  # a threshold's input: sigmoid(x) < 0.5 decides in fp32
        return any(c.op_type in _COMPARISONS for out in node.output for c in consumers.get(out, ()))
    return False


def _schema_allows(op: str, opset: int, precision: str) -> bool:
    """Whether the ONNX schema of ``op`` at ``opset`` takes the reduced type on its first input (bf16 Conv needs
    opset 22, for instance): an op whose schema does not stays fp32, so the variant is still a valid graph."""
    import onnx

    try:
        schema = onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        return False
    if not schema.inputs:
        return False
    wanted = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}[precision]
    type_str = schema.inputs[0].type_str
    for constraint in schema.type_constraints:
        if constraint.type_param_str == type_str:
            return wanted in constraint.allowed_type_strs
    return wanted == type_str


def _types(graph) -> dict[str, int]:
    types = {}
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _convert_tensor(tensor, precision: str):
    """An fp32 TensorProto as fp16 / bf16, same name."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    if precision == "fp16":
        converted = array.astype(np.float16)
    else:
        import ml_dtypes  # an onnx dependency: numpy has no bfloat16

        converted = array.astype(ml_dtypes.bfloat16)
    return numpy_helper.from_array(converted, tensor.name)


def to_reduced_precision(model: Any, precision: str, scopes: Optional[Iterable[str]] = None) -> Any:
    """A copy of the fp32 ONNX ``model`` whose float compute runs in ``precision`` ('fp16'/'bf16') per the policy.

    ``scopes``: node-name scopes kept in fp32 (default: the policy's for ``precision``, fp32_scopes). Graph inputs
    and outputs keep their names and types. Raises ValueError for graphs with control flow (If, Loop, Scan),
    which our exports do not have and this pass does not rewrite.
    """
    import onnx
    from onnx import helper

    low = elem_type(precision)
    if precision == "fp32":
        return onnx.ModelProto.FromString(model.SerializeToString())
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        raise ValueError("the precision pass does not rewrite graphs with control flow (If, Loop, Scan)")
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = _types(g)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # the node objects stay referenced for the whole pass: the sets below hold their ids, and protobuf makes a
    # fresh wrapper (with a new id) for an element nobody references
    nodes = list(g.node)
    scopes = fp32_scopes(precision) if scopes is None else tuple(scopes)
    sampling = {id(nodes[i]) for i in sampling_nodes(g, types)}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    allowed = {op: _schema_allows(op, opset, precision) for op in {n.op_type for n in g.node} & REDUCED_OPS}
    reduced = {id(n) for n in g.node if not keeps_fp32(n, consumers, scopes, sampling) and allowed[n.op_type]
               and all(types.get(o) == _FLOAT for o in n.output if o)
               and any(types.get(i) == _FLOAT for i in n.input)}
    initializers = {t.name: t for t in g.initializer}
    constants = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    graph_outputs = {o.name for o in g.output}
    suffix = {low: precision, _FLOAT: "fp32"}

    def converted_in_place(name: str) -> bool:
        """An fp32 weight read only at reduced inputs is stored in the reduced type (no Cast at run time)."""
        if name not in initializers and name not in constants:
            return False
        for c in consumers.get(name, ()):
            aux = _AUX_INPUTS.get(c.op_type, frozenset())
            if id(c) not in reduced or any(i in aux for i, n in enumerate(c.input) if n == name):
                return False
        return True

    now_low: set[str] = set()  # tensors that carry the reduced type after the pass
    for name in list(initializers) + list(constants):
        if types.get(name) == _FLOAT and converted_in_place(name):
            if name in initializers:
                initializers[name].CopyFrom(_convert_tensor(initializers[name], precision))
            else:
                attr = next(a for a in constants[name].attribute if a.name == "value")
                attr.t.CopyFrom(_convert_tensor(attr.t, precision))
            now_low.add(name)
    # a graph output computed in the reduced type keeps its name for the fp32 Cast at the end; the node and its
    # other consumers use the reduced tensor under a new name
    renamed: dict[str, str] = {}
    for node in g.node:
        if id(node) in reduced:
            for j, name in enumerate(node.output):
                if name in graph_outputs:
                    renamed[name] = node.output[j] = f"{name}/{precision}"
                    types[renamed[name]] = types[name]
            now_low.update(o for o in node.output if o)

    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}/to_{suffix[to]}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"{name}/Cast_{suffix[to]}", to=to))
        return casts[key]

    for node in g.node:
        is_low = id(node) in reduced
        aux = _AUX_INPUTS.get(node.op_type, frozenset())
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name in renamed:
                name = node.input[i] = renamed[name]
            if is_low and i not in aux and types.get(name) == _FLOAT and name not in now_low:
                node.input[i] = cast(name, low)
            elif (not is_low or i in aux) and name in now_low:
                node.input[i] = cast(name, _FLOAT)
        new_nodes.append(node)
        for name, inner in renamed.items():
            if inner in node.output:  # the interface stays fp32: compute reduced, hand out fp32
                new_nodes.append(helper.make_node("Cast", [inner], [name], name=f"{name}/Cast_out", to=_FLOAT))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale types: inferred again below
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def precision_of(model: Any) -> str:
    """'fp16' / 'bf16' when the graph computes in that type anywhere, else 'fp32'."""
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    found = set(_types(g).values())
    if onnx.TensorProto.BFLOAT16 in found:
        return "bf16"
    if onnx.TensorProto.FLOAT16 in found:
        return "fp16"
    return "fp32"


def reduced_fraction(model: Any) -> float:
    """Share of the graph's float-computing nodes whose outputs are in a reduced type (a policy summary)."""
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    types = _types(g)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    counted = [n for n in g.node if n.op_type != "Cast" and any(types.get(o) in floats for o in n.output)]
    if not counted:
        return 0.0
    low = [n for n in counted if any(types.get(o) in floats[1:] for o in n.output)]
    return len(low) / len(counted)


def variant_name(file_name: str, precision: Optional[str]) -> str:
    """'detector.onnx', 'fp16' -> 'detector.fp16.onnx'; fp32 / None -> the file itself."""
    if precision in (None, "fp32"):
        return file_name
    stem, dot, ext = file_name.rpartition(".")
    return f"{stem}.{precision}{dot}{ext}"
