"""The reduced-precision inference policy of the per-frame detector, in one place.

One rule for every backend, by dtype:

- **bf16** (the CPU torch backend through ``cast_detector``; CUDA autocast; exported ``--precision bf16`` graphs,
  ``export.reduced_precision``): convolutions, linear layers and embeddings of the backbone, pixel decoder and
  frame decoder run in bf16; what stays float32:

  - normalisations (LayerNorm, GroupNorm, the frozen batch norm): their parameters stay fp32 and the
    kernels reduce in fp32 (a frozen batch norm is folded into its convolution in fp32, then cast);
  - softmax reduces in fp32;
  - a 3x3 convolution that runs as Winograd on the CPU (``vita_train.modeling.winograd``) takes its bf16 input
    and gives bf16 output, but its Winograd domain (tiles, transformed weights, products) is fp32;
  - deformable sampling positions: reference points plus offsets are added and normalised in fp32, and
    the bilinear corner weights are computed from them in fp32 (the offset projection itself is bf16);
  - position encodings are computed in fp32 and rounded once when added;
  - every output the runtime reads (frame queries, logits, mask features) is fp32 to the runtime; the frame
    decoder's attention-mask threshold (sigmoid(x) < 0.5) decides in fp32 in exported graphs, while the CPU
    torch path takes the sigmoid of its bf16 logits in bf16, which rounds logits in (-0.004, 0) to 0.5 (not
    blocked). Measured (session 11, first 4 fixture frames): deciding in fp32 there changed as many decisions
    against fp32 (r50_tiny 0.5 / 1.9 / 2.6 % of the first three masks vs 0.4 / 1.6 / 2.3; swin_tiny 0.28 /
    0.84 / 1.31 vs 0.28 / 0.86 / 1.27) and moved the fixtures' top-k as their near-ties do, so it stays;
  - the VITA token engine (a few % of the time) stays fp32.

- **fp16** (CUDA autocast, exported ``--precision fp16`` graphs): the same, except that the whole pixel decoder
  stays fp32, as the official code runs it: fp16's range does not hold its activations.

Training under autocast follows the official code whatever the dtype (pixel decoder fp32): the bf16 pixel
decoder is an inference rule (``pixel_decoder_reduced``).
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


def pixel_decoder_reduced(device_type: str) -> bool:
    """Whether the pixel decoder runs under the caller's autocast: bf16 inference (no gradients recorded)."""
    return (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
            and not torch.is_grad_enabled())
