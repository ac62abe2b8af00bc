"""A detector graph's bias adds fused with the Relu or residual Add that follows them, and its GroupNorms made
one operator (ONNX Runtime, CPU).

ONNX Runtime folds a MatMul's bias into Gemm only for 2-D inputs; the exported token linears are 3-D, so each
runs as MatMul, an Add of the bias over its whole output, and then a Relu (the FFNs' first linear) or a residual
Add (their second) over that output again. ``fuse`` replaces each such pair by one compiled pass from the
operator library (kernels/csrc/bias_ort.h):

    Add(MatMul(.), bias) -> Relu              becomes  vita.ops::BiasRelu(MatMul(.), bias)
    Add(MatMul(.), bias) -> Add(., residual)  becomes  vita.ops::BiasResidual(MatMul(.), bias, residual)

where the bias is a 1-D initializer and the first Add's output has no other reader; a residual whose inferred
shape is not the MatMul output's (a broadcast) keeps the two Adds. The operators add in the pairs' order, so
the outputs are equal bit for bit.

torch exports GroupNorm as five nodes, and the pixel decoder's ReLU follows (kernels/csrc/group_norm_ort.h):

    Reshape(x, [0, G, -1]) -> InstanceNormalization(scale 1, bias 0) -> Reshape(., Shape(x))
        -> Mul(gamma (C, 1, 1)) -> Add(beta (C, 1, 1)) [-> Relu]   becomes  vita.ops::GroupNorm(x, gamma, beta)

with the statistics summed in double (ONNX Runtime sums in float): equal to the chain up to float rounding.
Like the other rewrites it works on the in-memory copy (the onnx package).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Optional

import numpy as np

from .onnxruntime_winograd import DOMAIN

log = logging.getLogger(__name__)

RELU_OP, RESIDUAL_OP, GROUP_NORM_OP = "BiasRelu", "BiasResidual", "GroupNorm"


def standard(node: Any, op: Optional[str] = None) -> bool:
    """True for a node of the standard ONNX domain (and of op type ``op`` where given)."""
    return node.domain in ("", "ai.onnx") and (op is None or node.op_type == op)


# initializers larger than this go to shape inference as typed graph inputs, without their data
_SMALL_INITIALIZER_BYTES = 1024


def without_weights(model: Any) -> Any:
    """``model``'s graph with its large initializers as typed inputs: what shape inference needs, without a copy
    of the weights (inferring on the whole model serialised it and the weights twice: the full-size R-50's
    36-frame clip peaked at 1.38 GB instead of 0.88)."""
    from onnx import helper

    graph = model.graph
    small = [t for t in graph.initializer if len(t.raw_data) <= _SMALL_INITIALIZER_BYTES and not t.external_data]
    kept = {t.name for t in small}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
               for t in graph.initializer if t.name not in kept]
    light = helper.make_graph(list(graph.node), graph.name, list(graph.input) + weights, list(graph.output), small,
                              value_info=list(graph.value_info))
    return helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             functions=list(model.functions))


def _shapes(model: Any) -> dict[str, Optional[tuple]]:
    """Every value's inferred dims ((value or symbol) per axis), where onnx's shape inference gives them."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model))
    except Exception:  # noqa: BLE001 - no shapes known: residual fusions are then left out
        return {}
    shapes: dict[str, Optional[tuple]] = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = info.type.tensor_type
        if t.HasField("shape"):
            dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
                         for d in t.shape.dim)
            shapes[info.name] = None if None in dims or "" in dims else dims
    return shapes


def fuse(model: Any) -> int:
    """Replace, in place, the bias pairs and the GroupNorm chains of ``model`` (an onnx.ModelProto)'s main graph as
    the module docstring says; returns how many."""
    fused = _fuse_bias_pairs(model) + _fuse_group_norms(model)
    if fused and not any(o.domain == DOMAIN for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return fused


def _only_reader(name: str, consumers: dict, outputs: set) -> Optional[Any]:
    """The one node that reads ``name``, where no other node reads it and it is not a graph output."""
    readers = consumers.get(name, [])
    return readers[0] if len(readers) == 1 and name not in outputs else None


def _fuse_group_norms(model: Any) -> int:
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)  # held: protobuf may hand out a fresh wrapper (and id) on each access
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}

    def constant(name: str) -> Optional[Any]:
        """An initializer's or a Constant node's value."""
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and standard(node, "Constant") and [a.name for a in node.attribute] == ["value"]:
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    replace: dict[int, Any] = {}
    dropped: set[int] = set()
    added = []
    for first in nodes:
        if not standard(first, "Reshape") or len(first.input) != 2:
            continue
        target = constant(first.input[1])
        norm = _only_reader(first.output[0], consumers, outputs)
        if target is None or target.shape != (3,) or target[0] != 0 or target[2] != -1 or norm is None:
            continue
        groups = int(target[1])
        if not standard(norm, "InstanceNormalization") or len(norm.input) != 3:
            continue
        scale, shift = constant(norm.input[1]), constant(norm.input[2])
        if scale is None or shift is None or scale.shape != (groups,) or not (scale == 1).all() or (shift != 0).any():
            continue
        back = _only_reader(norm.output[0], consumers, outputs)
        if back is None or not standard(back, "Reshape"):
            continue
        shape_of = producers.get(back.input[1])
        if shape_of is None or not standard(shape_of, "Shape") or shape_of.input[0] != first.input[0] or shape_of.attribute:
            continue
        mul = _only_reader(back.output[0], consumers, outputs)
        add = _only_reader(mul.output[0], consumers, outputs) if mul is not None and standard(mul, "Mul") else None
        if add is None or not standard(add, "Add"):
            continue
        gamma = constant(mul.input[1] if mul.input[0] == back.output[0] else mul.input[0])
        beta = constant(add.input[1] if add.input[0] == mul.output[0] else add.input[0])
        if (gamma is None or beta is None or gamma.ndim < 1 or gamma.size != gamma.shape[0] or gamma.shape != beta.shape
                or gamma.dtype != np.float32 or beta.dtype != np.float32):
            continue
        relu = _only_reader(add.output[0], consumers, outputs)
        relu = relu if relu is not None and standard(relu, "Relu") else None
        last = relu or add
        epsilon = next((helper.get_attribute_value(a) for a in norm.attribute if a.name == "epsilon"), 1e-5)
        stem = f"{first.name or first.output[0]}/fused"
        tensors = (numpy_helper.from_array(gamma.reshape(-1), f"{stem}/gamma"),
                   numpy_helper.from_array(beta.reshape(-1), f"{stem}/beta"))
        fused = helper.make_node(GROUP_NORM_OP, [first.input[0], tensors[0].name, tensors[1].name], [last.output[0]],
                                 name=f"{stem}/{GROUP_NORM_OP}", domain=DOMAIN, groups=groups, epsilon=float(epsilon),
                                 relu=int(relu is not None))
        replace[id(last)] = fused
        dropped.update(id(n) for n in (first, norm, back, mul, add) if n is not last)
        if consumers[shape_of.output[0]] == [back]:
            dropped.add(id(shape_of))
        added.extend(tensors)
    if not replace:
        return 0
    kept = [replace.get(id(n), n) for n in nodes if id(n) not in dropped]
    # the chains' constants that nothing reads any more (ONNX Runtime would warn about each at load)
    read = {name for n in kept for name in n.input} | outputs
    read |= {name for n in kept for a in n.attribute if a.type == 5 for m in a.g.node for name in m.input}
    kept = [n for n in kept if not standard(n, "Constant") or any(o in read for o in n.output)]
    unread = [t for t in graph.initializer if t.name not in read]
    for t in unread:
        graph.initializer.remove(t)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    log.info("%d GroupNorms fused into one operator", len(replace))
    return len(replace)


def _fuse_bias_pairs(model: Any) -> int:
    from onnx import helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}
    shapes: Optional[dict] = None
    replace: dict[int, Any] = {}  # id(the pair's second node) -> the fused node
    dropped: set[int] = set()
    for add in graph.node:
        if not standard(add, "Add") or len(add.input) != 2:
            continue
        after = consumers[add.output[0]]
        if len(after) != 1 or add.output[0] in outputs or id(add) in replace or id(after[0]) in replace:
            continue
        bias_at = [i for i, name in enumerate(add.input) if name in initializers and len(initializers[name].dims) == 1]
        if len(bias_at) != 1:
            continue
        bias, x = add.input[bias_at[0]], add.input[1 - bias_at[0]]
        source = producers.get(x)
        if source is None or not standard(source, "MatMul") or initializers[bias].data_type != 1:  # FLOAT
            continue
        nxt = after[0]
        stem = f"{add.name or add.output[0]}/fused"
        if standard(nxt, "Relu"):
            fused = helper.make_node(RELU_OP, [x, bias], [nxt.output[0]], name=f"{stem}/{RELU_OP}", domain=DOMAIN)
        elif standard(nxt, "Add") and len(nxt.input) == 2:
            residual = nxt.input[1] if nxt.input[0] == add.output[0] else nxt.input[0]
            if shapes is None:
                shapes = _shapes(model)
            if residual == add.output[0] or shapes.get(residual) is None or shapes.get(residual) != shapes.get(x):
                continue
            fused = helper.make_node(RESIDUAL_OP, [x, bias, residual], [nxt.output[0]], name=f"{stem}/{RESIDUAL_OP}",
                                     domain=DOMAIN)
        else:
            continue
        # at the second node's place: the residual may be made after the first
        replace[id(nxt)] = fused
        dropped.add(id(add))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    log.info("%d bias adds fused with the Relu or residual add after them", len(replace))
    return len(replace)
