"""The detector graph's last step, VITA's 1x1 mask-feature projection, taken out of the graph (ONNX Runtime, CPU).

``split`` makes the graph's ``mask_features`` output the projection's input (the pixel decoder's /4 map) and
returns the projection's weight and bias, which the mask head then folds into the selected embeddings
(vita_train/mask_projection.py): the torch backend's CPU path, on the same graph file. Like the Winograd
rewrite it works on an in-memory copy (the onnx package); without onnx the graph runs as exported.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

OUTPUT = "mask_features"


def _attributes(node: Any) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def split(model: Any) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """In ``model`` (an onnx.ModelProto), replace the 1x1 Conv that makes the ``mask_features`` output by its input;
    returns (weight (D, C), bias (D,)) float32, or None (the graph unchanged) where that output is not such a Conv."""
    from onnx import numpy_helper

    graph = model.graph
    outputs = [o for o in graph.output if o.name == OUTPUT]
    producers = [n for n in graph.node if OUTPUT in n.output]
    if len(outputs) != 1 or len(producers) != 1:
        return None
    conv = producers[0]
    initializers = {t.name: t for t in graph.initializer}
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2:
        return None
    constants = [name for name in conv.input[1:] if name]  # the weight, and the bias where the export kept one
    if any(name not in initializers for name in constants):
        return None
    a = _attributes(conv)
    weight = numpy_helper.to_array(initializers[conv.input[1]])
    if (weight.ndim != 4 or weight.shape[2:] != (1, 1) or a.get("group", 1) != 1
            or any(s != 1 for s in a.get("strides", [1, 1])) or any(p != 0 for p in a.get("pads", [0, 0, 0, 0]))):
        return None
    bias = numpy_helper.to_array(initializers[constants[1]]) if len(constants) > 1 else np.zeros(weight.shape[0], np.float32)
    source = conv.input[0]
    graph.node.remove(conv)
    # the output keeps its place (sessions return outputs in order) and takes the map's name and width
    out = outputs[0]
    out.name = source
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 4:
        dims[1].ClearField("dim_param")
        dims[1].dim_value = int(weight.shape[1])
    used = {name for node in graph.node for name in node.input}
    for name in constants:
        if name not in used:
            graph.initializer.remove(initializers[name])
    return weight.reshape(weight.shape[0], -1).astype(np.float32), bias.astype(np.float32)
