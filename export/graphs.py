"""Thin wrappers that fix the exported graphs' inputs and outputs; the model itself is unchanged."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from vita_train.modeling.vita_model import VitaModel
from vita_train.token_steps import (
    ATTEND_INPUTS,
    ATTEND_OUTPUTS,
    DECODE_INPUTS,
    DECODE_OUTPUTS,
    ENCODE_INPUTS,
    ENCODE_OUTPUTS,
    LAST_DECODE_OUTPUTS,
)


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


class EncodeStepGraph(nn.Module):
    """Encoder layer i over whole windows: blocks (Nw, Wb, N, C), frame_valid (Nw, Wb) -> encoded (Nw, Wb, N, C).

    The window layout (which frames, shifted or not, padding) is the caller's: vita_train.token_steps.
    """

    def __init__(self, model: VitaModel, layer: int) -> None:
        super().__init__()
        self.vita, self.layer = model.vita, layer

    def forward(self, blocks: Tensor, frame_valid: Tensor) -> Tensor:
        """blocks float32, frame_valid bool."""
        return self.vita.encode_window_step(self.layer, blocks, frame_valid)


class AttendStepGraph(nn.Module):
    """Decoder layer i's cross-attention over one chunk of tokens -> attended (heads, Nv, d), lse (heads, Nv).

    Layer 0 starts from the learnt queries and has no ``output`` input.
    """

    def __init__(self, model: VitaModel, layer: int) -> None:
        super().__init__()
        self.vita, self.layer = model.vita, layer

    def forward(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        """[output (Nv, C),] tokens (F, N, C) float32, query_index (F, N) int64."""
        output, (tokens, query_index) = (None, args) if self.layer == 0 else (args[0], args[1:])
        return self.vita.attend_step(self.layer, output, tokens, query_index)


class DecodeStepGraph(nn.Module):
    """The rest of decoder layer i: [output,] attended -> decoded (Nv, C); the last layer -> pred_logits, mask_embed."""

    def __init__(self, model: VitaModel, layer: int) -> None:
        super().__init__()
        self.vita, self.layer = model.vita, layer

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        """[output (Nv, C),] attended (heads, Nv, d)."""
        output, attended = (None, args[0]) if self.layer == 0 else args
        return self.vita.decode_step(self.layer, output, attended)


def step_io(kind: str, layer: int, last: bool) -> tuple[list[str], list[str]]:
    """Input and output names of one step graph (layer 0 has no ``output`` input; the last decode step outputs the heads)."""
    inputs, outputs = {
        "encode": (ENCODE_INPUTS, ENCODE_OUTPUTS),
        "attend": (ATTEND_INPUTS, ATTEND_OUTPUTS),
        "decode": (DECODE_INPUTS, LAST_DECODE_OUTPUTS if last else DECODE_OUTPUTS),
    }[kind]
    return [name for name in inputs if layer > 0 or name != "output"], list(outputs)


DETECTOR_INPUTS = ["frames"]
DETECTOR_OUTPUTS = ["frame_queries", "frame_logits", "mask_features"]
TOKENS_INPUTS = ["frame_queries", "query_index"]
TOKENS_OUTPUTS = ["pred_logits", "mask_embed"]
