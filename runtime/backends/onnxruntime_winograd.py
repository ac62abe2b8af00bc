"""A detector graph's stride-1 3x3 convolutions as Winograd transforms around one batched MatMul (ONNX Runtime, CPU).

ONNX Runtime's CPU Conv runs a 3x3 convolution as im2col and a GEMM: on an AVX2-only CPU (AMD EPYC Zen 2,
2 threads) the pixel decoder's 256-channel 3x3 at 1/4 scale (96x160) took 90 ms a frame, when the same work
as Winograd F(4x4,3x3) is a batched MatMul of 27 ms plus transforms. ``rewrite`` replaces each such Conv
(and the Relu that alone follows it) by

    WinogradInput(x) -> MatMul(U, .) -> WinogradOutput(., Shape(x), bias)

with U the transformed weights, (P, Cout, Cin) as an initializer, and the transforms the compiled operators
of kernels/csrc/winograd_ort.h (registered with the deformable-attention operator, one library). The tiles and
weights are the torch backend's (vita_train/winograd_transforms.py). The result equals the convolution up to
float rounding; ``tests/test_onnxruntime_winograd.py`` holds it to ONNX Runtime's own Conv.

The graph on disk is not changed: the rewritten copy is built in memory when a session is created. That needs
the ``onnx`` package; an edge install without it runs ONNX Runtime's Conv (and one warning says so).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np

from vita_train.winograd_transforms import tile_for, transform_weight

from ..native_build import cpu_isa

log = logging.getLogger(__name__)

DOMAIN = "vita.ops"
INPUT_OP, OUTPUT_OP = "WinogradInput", "WinogradOutput"


def applies() -> bool:
    """True where the rewrite pays: x86 CPUs with AVX2 or AVX-512, as the torch backend's Winograd path
    (``vita_train.modeling.winograd.winograd_cpu``; measured on AMD EPYC Zen 2 and Zen 4, not on Intel)."""
    return cpu_isa() in ("avx2", "avx512")


def _attributes(node: Any) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _eligible(node: Any, initializers: dict[str, Any]) -> bool:
    """A 2-D 3x3 Conv with stride 1, padding 1, no dilation, one group, and constant weight (and bias)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    if node.input[1] not in initializers or (len(node.input) > 2 and node.input[2] and node.input[2] not in initializers):
        return False
    a = _attributes(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("group", 1) != 1:
        return False
    dims = list(initializers[node.input[1]].dims)
    return (len(dims) == 4 and dims[2:] == [3, 3] and a.get("kernel_shape", [3, 3]) == [3, 3]
            and a.get("strides", [1, 1]) == [1, 1] and a.get("dilations", [1, 1]) == [1, 1]
            and a.get("pads", [0, 0, 0, 0]) == [1, 1, 1, 1]
            and initializers[node.input[1]].data_type == 1)  # TensorProto.FLOAT


def rewrite(model: Any) -> int:
    """Replace, in place, every eligible Conv of ``model`` (an onnx.ModelProto)'s main graph as the module
    docstring says; returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    nodes, dropped, count = [], set(), 0
    new_initializers: list[Any] = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        if not _eligible(node, initializers):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        cout, cin = weight.shape[:2]
        has_bias = len(node.input) > 2 and node.input[2]
        bias = numpy_helper.to_array(initializers[node.input[2]]) if has_bias else np.zeros(cout, np.float32)
        tile = tile_for(cin, cout)
        x, out = node.input[0], node.output[0]
        after = consumers[out]
        relu = len(after) == 1 and after[0].op_type == "Relu" and after[0].domain in ("", "ai.onnx") and out not in graph_outputs
        if relu:
            dropped.add(id(after[0]))
            out = after[0].output[0]
        stem = f"{node.name or out}/winograd"
        u_name, b_name = f"{stem}/weight", f"{stem}/bias"
        new_initializers += [numpy_helper.from_array(transform_weight(weight, tile), u_name),
                             numpy_helper.from_array(bias.astype(np.float32), b_name)]
        nodes += [
            helper.make_node("Shape", [x], [f"{stem}/shape"], name=f"{stem}/Shape"),
            helper.make_node(INPUT_OP, [x], [f"{stem}/tiles"], name=f"{stem}/{INPUT_OP}", domain=DOMAIN, tile=tile),
            helper.make_node("MatMul", [u_name, f"{stem}/tiles"], [f"{stem}/products"], name=f"{stem}/MatMul"),
            helper.make_node(OUTPUT_OP, [f"{stem}/products", f"{stem}/shape", b_name], [out],
                             name=f"{stem}/{OUTPUT_OP}", domain=DOMAIN, tile=tile, relu=int(relu)),
        ]
        count += 1
    if not count:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    log.info("%d 3x3 convolutions run as Winograd transforms around a MatMul", count)
    return count
