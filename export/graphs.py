"""Thin wrappers that fix the exported graphs' inputs and outputs; the model itself is unchanged."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from vita_train.modeling.vita_model import VitaModel


class DetectorGraph(nn.Module):
    """uint8 RGB frames (B, H, W, 3) -> frame_queries, frame_logits, mask_features.

    Normalisation and the pad to the size divisibility happen inside, so the graph cannot be fed wrongly.
    """

    def __init__(self, model: VitaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """frames: (B, H, W, 3) uint8, already resized (shortest edge to the test size)."""
        # cast before the permute: TensorRT's ONNX parser refuses any UINT8 tensor that is not a graph input or
        # output (onnx-tensorrt ModelImporter.cpp; docs/operators.md), so the Transpose must see floats
        frames = frames.to(self.model.pixel_mean.dtype)
        out = self.model.detect(frames.permute(0, 3, 1, 2))
        return out.frame_queries, out.frame_logits, out.mask_features


class TokenGraph(nn.Module):
    """All frames' tokens (T, N, C) and their query slots (T, N) -> pred_logits (Nv, K+1), mask_embed (Nv, D).

    Padding to a multiple of W, the alternating shifted windows and their masks are inside the graph
    (VitaModule.encode_blocks: frame-level biases broadcast to tokens, no dense per-window mask).
    """

    def __init__(self, model: VitaModel) -> None:
        super().__init__()
        self.vita = copy.deepcopy(model.vita).eval()
        self.vita.export_mode = True

    def forward(self, frame_queries: Tensor, query_index: Tensor) -> tuple[Tensor, Tensor]:
        """frame_queries (T, N, C) float32; query_index (T, N) int64."""
        out = self.vita(frame_queries.unsqueeze(0), query_index)
        return out.pred_logits[0], out.pred_mask_embed[0]


DETECTOR_INPUTS = ["frames"]
DETECTOR_OUTPUTS = ["frame_queries", "frame_logits", "mask_features"]
TOKENS_INPUTS = ["frame_queries", "query_index"]
TOKENS_OUTPUTS = ["pred_logits", "mask_embed"]
