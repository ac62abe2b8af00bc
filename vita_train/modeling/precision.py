"""The reduced-precision policy of the per-frame detector, in one place (CPU bf16 inference).

``cast_detector(model, torch.bfloat16)`` stores the weights of every convolution, linear layer and
embedding of the detector (backbone, pixel decoder, frame decoder, VITA's mask-feature conv) in bf16;
activations then flow in bf16 between them. What stays float32:

- normalisations (LayerNorm, GroupNorm, the frozen batch norm): their parameters stay fp32 and the
  kernels reduce in fp32 (a frozen batch norm is folded into its convolution in fp32, then cast);
- softmax reduces in fp32 (PyTorch's CPU kernels accumulate bf16 inputs in fp32);
- deformable sampling positions: reference points plus offsets are added and normalised in fp32, and
  the bilinear corner weights are computed from them in fp32;
- position encodings are computed in fp32 and rounded once when added;
- the frame decoder's attention-mask threshold (sigmoid(x) < 0.5) and every output the runtime reads
  (frame queries, logits, mask features) are cast back to fp32 by the backend;
- the VITA token engine (a few % of the time) stays fp32.

On CUDA the torch backend uses autocast instead (fp16/bf16), with the pixel decoder in fp32 as in the
official code; ``export.reduced_precision`` writes the exported graphs' policy.
"""

from __future__ import annotations

import torch
from torch import nn

from .onednn import bf16_supported  # noqa: F401  (the policy's entry point; defined beside the bf16 fast path)
from .resnet import FrozenBatchNorm2d

NORMS = (nn.LayerNorm, nn.GroupNorm, FrozenBatchNorm2d)


def cast_detector(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the detector's weights in ``dtype`` except normalisations; the token engine is left as it is."""
    parts = [model.backbone, model.pixel_decoder, model.frame_decoder, model.vita.vita_mask_features]
    for part in parts:
        for module in part.modules():
            if isinstance(module, NORMS):
                continue
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
    return model


def detector_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the detector computes in: that of its first weight (float32 unless cast)."""
    return next(model.backbone.parameters()).dtype
