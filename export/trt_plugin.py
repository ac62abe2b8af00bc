"""Multi-scale deformable attention in the form TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` takes.

``ms_deform_attn_sample_trt`` has the signature of ``vita_train.modeling.ms_deform_attn.ms_deform_attn_sample``
and returns exactly its result in eager mode; traced by ``torch.onnx.export(..., dynamo=False)`` it becomes one
custom node that the TensorRT ONNX parser turns into the plugin (then a Reshape to (N, Lq, heads*D)).

The plugin's contract, checked against NVIDIA/TensorRT plugin/multiscaleDeformableAttnPlugin
(multiscaleDeformableAttnPlugin.cpp: version "2", IPluginV3, TensorRT >= 10.11;
multiscaleDeformableAttnPluginLegacy.cpp: version "1", IPluginV2DynamicExt, every TensorRT 10; both registered
by initLibNvInferPlugins under the name "MultiscaleDeformableAttnPlugin_TRT", same inputs and output):

  inputs, in order
    0 value               (N, S, M, D)        float32 or float16
    1 spatial_shapes      (L, 2) as (H, W)    int32
    2 level_start_index   (L,)                int32, offset of each level in S
    3 sampling_locations  (N, Lq, M, L, P, 2) same type as value, (x, y) in [0, 1]
    4 attention_weights   (N, Lq, M, L, P)    same type as value
  output
    0                     (N, Lq, M, D)       same type as value  (4-D: we reshape to (N, Lq, M*D) after it)
  attributes: none (the creator has no fields).

The kernel samples at (x * W - 0.5, y * H - 0.5) with zeros outside, i.e. grid_sample(align_corners=False,
padding_mode="zeros"), which is the reference's semantics.

How the ONNX parser finds it (onnx/onnx-tensorrt ModelImporter.cpp, FallbackPluginImporter): an op type with
no built-in importer is looked up in the plugin registry by op_type, attribute ``plugin_version`` (default
"1") and ``plugin_namespace`` (default ""); the node's domain is not used for the lookup. We use the custom
domain ``trt`` so that onnx.checker (which skips unknown domains, but rejects unknown ops of the default
domain) accepts the graph. Export with ``custom_opsets={"trt": 1}`` (torch adds version 1 otherwise, with a
warning). ONNX Runtime cannot run such a graph: it is for TensorRT only, with plugins initialised.
"""

from __future__ import annotations

import warnings
from typing import Sequence, Union

import torch
from torch import Tensor

from vita_train.modeling.ms_deform_attn import ms_deform_attn_sample

PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "trt"
# version "2" (IPluginV3, TensorRT >= 10.11) is what the graph names: version "1" (IPluginV2DynamicExt, in every
# TensorRT 10 and 11) is deprecated since 10.11 (plugin/multiscaleDeformableAttnPlugin/README.md) and its
# configurePlugin asserts (ends the process) on a shape mismatch where version 2 returns an error. Both take the
# same inputs; export.tensorrt.build_engine points the nodes at "1" on a TensorRT older than 10.11.
PLUGIN_VERSION = "2"

Size = Union[int, Tensor]  # a python int, or a 0-dim tensor when the size is traced (dynamic H, W)


def _size_tensor(size: Size) -> Tensor:
    """A traced size stays a graph value; a python int becomes a constant."""
    return size if isinstance(size, Tensor) else torch.tensor(size)


def spatial_shapes_tensor(shapes: Sequence[tuple[Size, Size]], dtype: torch.dtype) -> Tensor:
    """Per-level sizes -> (L, 2) tensor of (H, W), traced sizes kept symbolic."""
    return torch.stack([torch.stack([_size_tensor(h), _size_tensor(w)]) for h, w in shapes]).to(dtype)


def plugin_shape_inputs(shapes: Sequence[tuple[Size, Size]]) -> tuple[Tensor, Tensor]:
    """Per-level sizes -> (spatial_shapes (L, 2) int32 as (H, W), level_start_index (L,) int32)."""
    spatial = spatial_shapes_tensor(shapes, torch.int32)
    starts = [torch.zeros((), dtype=torch.int64)]  # an op, not a constant: no tracer warning
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + _size_tensor(h) * _size_tensor(w))
    return spatial, torch.stack(starts).to(torch.int32)


class _MultiscaleDeformableAttn(torch.autograd.Function):
    """Forward is the reference; ``symbolic`` emits the plugin node."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, weights, shapes):  # noqa: D102
        n, _, heads, d = value.shape
        with warnings.catch_warnings():
            # int() of a traced size warns, but nothing traced here is kept: ``symbolic`` stands for it
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            sizes = [(int(h), int(w)) for h, w in shapes]
        return ms_deform_attn_sample(value, sizes, locations, weights).view(n, locations.shape[1], heads, d)

    @staticmethod
    def symbolic(g, value, spatial_shapes, level_start_index, locations, weights, shapes):  # noqa: D102
        out = g.op(
            f"{PLUGIN_DOMAIN}::{PLUGIN_OP}",
            value,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            plugin_version_s=PLUGIN_VERSION,
            plugin_namespace_s="",
        )
        # give the output its rank and known sizes, so later shape inference is not blind to it
        v, loc = value.type().varyingSizes(), locations.type().varyingSizes()  # None where unknown
        if v is not None and loc is not None and len(v) == 4 and len(loc) == 6:
            out.setType(value.type().with_sizes([v[0], loc[1], v[2], v[3]]))
        return out


def ms_deform_attn_sample_trt(
    value: Tensor, shapes: Sequence[tuple[Size, Size]], locations: Tensor, weights: Tensor
) -> Tensor:
    """``ms_deform_attn_sample`` that exports as MultiscaleDeformableAttnPlugin_TRT; same inputs, same result.

    value (N, S, heads, D); locations (N, Lq, heads, levels, points, 2) as (x, y) in [0, 1];
    weights (N, Lq, heads, levels, points). Returns (N, Lq, heads*D).
    """
    if not torch.onnx.is_in_onnx_export():
        return ms_deform_attn_sample(value, shapes, locations, weights)
    spatial_shapes, level_start_index = plugin_shape_inputs(shapes)
    out = _MultiscaleDeformableAttn.apply(value, spatial_shapes, level_start_index, locations, weights, list(shapes))
    return out.flatten(2)
