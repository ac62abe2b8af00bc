"""Multi-scale deformable attention as one ONNX node, ``vita.ops::MSDeformAttn``, defined in standard ops.

The exported detector carries each deformable-attention layer's sampling as one node, from the raw outputs of
its two projections (what ``kernels.reference.ms_deform_attn_from_projections`` takes), plus a model-local
ONNX function of that name whose body is the plain formulation (Softmax, the sampling positions, one
GridSample per level, the weighted sum). So the graph runs anywhere:

- an ONNX runtime without our operator expands the function (ONNX Runtime inlines it: the same graph as
  before this node existed);
- ONNX Runtime with the compiled operator registered (``runtime.backends.onnxruntime_kernels``) runs the node
  as one fused CPU kernel instead (a registered kernel takes precedence over a local function's body).

Node: inputs value (N, S, heads, D), spatial_shapes (L, 2) int64 as (H, W), reference_points (1 or N, Lq, 2)
as (x, y) in [0, 1], offsets (N, Lq, heads*L*P*2) in pixels of each level, logits (N, Lq, heads*L*P);
attributes ``levels`` and ``points``; output (N, Lq, heads*D).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from kernels.reference import ms_deform_attn_from_projections

from .trt_plugin import Size, spatial_shapes_tensor

DOMAIN = "vita.ops"
OP = "MSDeformAttn"
DOMAIN_VERSION = 1


class _FusedMSDeformAttn(torch.autograd.Function):
    """Forward is the reference; ``symbolic`` emits the one node."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, reference_points, offsets, logits, shapes, levels, points):  # noqa: D102
        with warnings.catch_warnings():
            # int() of a traced size warns, but nothing traced here is kept: ``symbolic`` stands for it
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            sizes = [(int(h), int(w)) for h, w in shapes]
        return ms_deform_attn_from_projections(value, sizes, reference_points, offsets, logits, levels, points)

    @staticmethod
    def symbolic(g, value, spatial_shapes, reference_points, offsets, logits, shapes, levels, points):  # noqa: D102
        out = g.op(f"{DOMAIN}::{OP}", value, spatial_shapes, reference_points, offsets, logits,
                   levels_i=levels, points_i=points)
        v, off = value.type().varyingSizes(), offsets.type().varyingSizes()  # None where unknown
        if v is not None and off is not None and len(v) == 4 and len(off) == 3:
            width = v[2] * v[3] if v[2] is not None and v[3] is not None else None
            out.setType(value.type().with_sizes([v[0], off[1], width]))
        return out


def ms_deform_attn_onnx(
    value: Tensor, shapes: Sequence[tuple[Size, Size]], reference_points: Tensor, offsets: Tensor, logits: Tensor,
    levels: int, points: int,
) -> Tensor:
    """``ms_deform_attn_from_projections`` that exports as one ``vita.ops::MSDeformAttn`` node; same result."""
    if not torch.onnx.is_in_onnx_export():
        sizes = [(int(h), int(w)) for h, w in shapes]
        return ms_deform_attn_from_projections(value, sizes, reference_points, offsets, logits, levels, points)
    spatial = spatial_shapes_tensor(shapes, torch.int64)
    return _FusedMSDeformAttn.apply(value, spatial, reference_points, offsets, logits, list(shapes), levels, points)


def function_proto(levels: int, points: int, opset: int) -> Any:
    """The node's definition in standard ONNX ops (the reference's order of operations), for ``levels`` levels
    of ``points`` points; heads, head width and every size are read from the inputs' shapes."""
    from onnx import TensorProto, helper

    nodes = []

    def op(op_type: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def const(name: str, values: list[int]) -> str:
        return op("Constant", [], name, value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    def dim(source: str, i: int, name: str) -> str:
        return op("Slice", [source, const(f"{name}_s", [i]), const(f"{name}_e", [i + 1])], name)

    lp = levels * points
    vshape = op("Shape", ["value"], "vshape")
    n, heads, width = dim(vshape, 0, "n"), dim(vshape, 2, "heads"), dim(vshape, 3, "head_dim")
    lq = dim(op("Shape", ["offsets"], "oshape"), 1, "lq")
    minus1, one = const("minus1", [-1]), const("one", [1])
    # weights: softmax over each head's levels*points, laid out (N*heads, 1, Lq, L*P) as the samples are
    w = op("Reshape", ["logits", op("Concat", [n, lq, heads, const("lp", [lp])], "w_shape", axis=0)], "w4")
    w = op("Softmax", [w], "w_soft", axis=-1)
    w = op("Transpose", [w], "w_t", perm=[0, 2, 1, 3])
    w = op("Reshape", [w, op("Concat", [minus1, one, lq, const("lp2", [lp])], "wt_shape", axis=0)], "w_heads")
    # sampling grid: (reference + offset / (W, H)) * 2 - 1, laid out (N, heads, Lq, L, P, 2)
    off_shape = op("Concat", [n, lq, heads, const("lpt", [levels, points, 2])], "off_shape", axis=0)
    off = op("Reshape", ["offsets", off_shape], "off6")
    wh = op("Cast", [op("Gather", ["spatial_shapes", const("xy", [1, 0])], "wh_int", axis=1)], "wh_f",
            to=TensorProto.FLOAT)
    wh = op("Reshape", [wh, const("wh_shape", [1, 1, 1, levels, 1, 2])], "wh")
    refs = op("Unsqueeze", ["reference_points", const("ref_axes", [2, 3, 4])], "refs6")
    loc = op("Add", [refs, op("Div", [off, wh], "scaled")], "locations")
    two = op("Constant", [], "two", value=helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]))
    unit = op("Constant", [], "unit", value=helper.make_tensor("unit", TensorProto.FLOAT, [], [1.0]))
    grid = op("Sub", [op("Mul", [loc, two], "loc2"), unit], "grid")
    grid = op("Transpose", [grid], "grid_t", perm=[0, 2, 1, 3, 4, 5])
    # each level's slice of the value table as (N*heads, D, H, W)
    area = op("Mul", [op("Gather", ["spatial_shapes", const("col_h", [0])], "hs", axis=1),
                      op("Gather", ["spatial_shapes", const("col_w", [1])], "ws", axis=1)], "area2")
    area = op("Reshape", [area, minus1], "area")
    ends = op("CumSum", [area, op("Constant", [], "axis0", value=helper.make_tensor("axis0", TensorProto.INT64, [], [0]))], "ends")
    starts = op("Sub", [ends, area], "starts")
    table = op("Transpose", ["value"], "table", perm=[0, 2, 3, 1])  # (N, heads, D, S)
    mode = "linear" if opset >= 20 else "bilinear"
    sampled = []
    for lvl in range(levels):
        at, nxt = const(f"l{lvl}", [lvl]), const(f"l{lvl}_next", [lvl + 1])
        part = op("Slice", [table, op("Slice", [starts, at, nxt], f"start{lvl}"), op("Slice", [ends, at, nxt], f"end{lvl}"),
                            const(f"axis3_{lvl}", [3])], f"part{lvl}")
        hw = op("Reshape", [op("Slice", ["spatial_shapes", at, nxt], f"hw{lvl}_2d"), minus1], f"hw{lvl}")
        image = op("Reshape", [part, op("Concat", [minus1, width, hw], f"img_shape{lvl}", axis=0)], f"image{lvl}")
        g = op("Gather", [grid, op("Constant", [], f"li{lvl}", value=helper.make_tensor(f"li{lvl}", TensorProto.INT64, [], [lvl]))],
               f"grid{lvl}_5d", axis=3)
        g = op("Reshape", [g, op("Concat", [minus1, lq, const(f"p2_{lvl}", [points, 2])], f"grid_shape{lvl}", axis=0)], f"grid{lvl}")
        sampled.append(op("GridSample", [image, g], f"sampled{lvl}", mode=mode, padding_mode="zeros", align_corners=0))
    cat = op("Concat", sampled, "samples", axis=-1)  # (N*heads, D, Lq, L*P), level-major like the weights
    summed = op("ReduceSum", [op("Mul", [cat, w], "weighted"), minus1], "summed", keepdims=0)  # (N*heads, D, Lq)
    out = op("Reshape", [summed, op("Concat", [n, minus1, lq], "out_shape", axis=0)], "out_t")
    op("Transpose", [out], "output", perm=[0, 2, 1])
    return helper.make_function(
        DOMAIN, OP, ["value", "spatial_shapes", "reference_points", "offsets", "logits"], ["output"], nodes,
        [helper.make_opsetid("", opset)], attributes=["levels", "points"],
    )


def attach_function(model: Any) -> Any:
    """Give ``model`` the local function for its ``vita.ops::MSDeformAttn`` nodes (none: unchanged)."""
    from onnx import helper

    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP]
    if not nodes:
        return model
    signatures = {tuple(sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute)) for n in nodes}
    if len(signatures) != 1:
        raise ValueError(f"the {OP} nodes disagree on levels/points: {sorted(signatures)}")
    attrs = dict(next(iter(signatures)))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    kept = [f for f in model.functions if (f.domain, f.name) != (DOMAIN, OP)]  # (re)attach: one definition
    del model.functions[:]
    model.functions.extend(kept)
    model.functions.append(function_proto(int(attrs["levels"]), int(attrs["points"]), opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
