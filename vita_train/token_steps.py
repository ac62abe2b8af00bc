"""The token engine over exported step graphs, chunk by chunk in numpy: memory bounded in the video length.

Torch-free (like ``export_format``): the onnxruntime backend runs it, and the exporter's validation
runs it on the graphs it has just written. The step graphs are traced from ``VitaModule``'s step forms
(``encode_window_step``, ``attend_step``, ``decode_step``); this module does what the torch engine's
``_encode_into`` / ``_decode_chunks`` do around them: lay each encoder layer's frames out in whole
(shifted) windows a few at a time, overwrite one token buffer in place, and read the tokens in chunks
for every decoder layer's cross-attention, combining the chunks exactly through their log-sum-exp.
Besides the tokens (T x N x C floats) only one chunk's inputs and the graph's working set exist (window 0,
full attention over all frames, is one window of T frames: quadratic in T, as in the torch engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np

# graph inputs and outputs (export/graphs.py traces these names; layer 0 has no "output" input)
ENCODE_INPUTS = ["blocks", "frame_valid"]
ENCODE_OUTPUTS = ["encoded"]
ATTEND_INPUTS = ["output", "tokens", "query_index"]
ATTEND_OUTPUTS = ["attended", "lse"]
DECODE_INPUTS = ["output", "attended"]
DECODE_OUTPUTS = ["decoded"]
LAST_DECODE_OUTPUTS = ["pred_logits", "mask_embed"]

# tokens per encoder call: two windows of the full-size model (W=6, 100 queries). ONNX Runtime builds each
# window's dense (heads, W*N, W*N) scores, so the working set is about 25 MB per window of that size
ENCODE_CHUNK_TOKENS = 1200
# tokens per decoder cross-attention call: its scores are (heads, Nv, tokens), small for 100 video queries
ATTEND_CHUNK_TOKENS = 4800


class Session(Protocol):
    """What is run: an ``onnxruntime.InferenceSession`` (or anything with its ``run``)."""

    def run(self, output_names: Optional[Sequence[str]], feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class WindowLayout:
    """Where frames sit in one encoder layer's windows: frame f in slot f + shift of blocks of ``size`` slots."""

    shift: int
    size: int
    blocks: int

    @classmethod
    def of(cls, num_frames: int, window: int, shifted: bool) -> "WindowLayout":
        """The official layout (``kernels.reference.frame_groups``): windows [kW - shift, (k+1)W - shift) of the
        real frames, shift = ceil(W/2) on shifted layers; window 0 is one window of every frame."""
        if window == 0:
            return cls(0, num_frames, 1)
        shift = math.ceil(window / 2) % window if shifted else 0  # W=1: a shift by a whole window is none
        return cls(shift, window, -(-(num_frames + shift) // window))

    def frames(self, first_block: int, end_block: int, num_frames: int) -> tuple[int, int]:
        """Frames [a, b) that blocks [first_block, end_block) hold."""
        return max(0, first_block * self.size - self.shift), min(num_frames, end_block * self.size - self.shift)


def _encode(steps: Sequence[Session], x: np.ndarray, window: int, chunk_tokens: int) -> None:
    """Every encoder layer over ``x`` (T, N, C) float32 in place, a few whole windows per call."""
    t, n, c = x.shape
    for i, step in enumerate(steps):
        layout = WindowLayout.of(t, window, shifted=i % 2 == 1)
        per = max(1, chunk_tokens // (layout.size * n))
        blocks = np.empty((min(per, layout.blocks), layout.size, n, c), np.float32)
        valid = np.empty(blocks.shape[:2], bool)
        for j in range(0, layout.blocks, per):
            m = min(per, layout.blocks - j)
            a, b = layout.frames(j, j + m, t)
            start = a + layout.shift - j * layout.size  # slot of frame a within these blocks
            slots, flags = blocks[:m].reshape(m * layout.size, n, c), valid[:m].reshape(-1)
            slots[:start] = 0.0  # padding slots: any finite value, masked as keys
            slots[start + b - a :] = 0.0
            slots[start : start + b - a] = x[a:b]
            flags[:] = False
            flags[start : start + b - a] = True
            (out,) = step.run(None, {"blocks": blocks[:m], "frame_valid": valid[:m]})
            x[a:b] = out.reshape(m * layout.size, n, c)[start : start + b - a]


def _decode(
    attend: Sequence[Session], decode: Sequence[Session], x: np.ndarray, index: Optional[np.ndarray], chunk_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """The decoder layers, each reading the encoded tokens ``x`` (T, N, C) chunk by chunk."""
    t, n, _ = x.shape
    per = max(1, chunk_tokens // n)
    slots = np.ascontiguousarray(np.broadcast_to(np.arange(n, dtype=np.int64), (min(per, t), n)))
    output: Optional[np.ndarray] = None
    for i, (attend_step, decode_step) in enumerate(zip(attend, decode)):
        acc = lse = None
        for a in range(0, t, per):
            e = min(a + per, t)
            feeds = {"tokens": x[a:e], "query_index": slots[: e - a] if index is None else index[a:e]}
            if output is not None:
                feeds["output"] = output
            out, chunk_lse = attend_step.run(None, feeds)
            if acc is None:
                acc, lse = out, chunk_lse
            else:
                total = np.logaddexp(lse, chunk_lse)
                acc = acc * np.exp(lse - total)[..., None] + out * np.exp(chunk_lse - total)[..., None]
                lse = total
        feeds = {"attended": acc.astype(np.float32, copy=False)}
        if output is not None:
            feeds["output"] = output
        result = decode_step.run(None, feeds)
        if i == len(decode) - 1:
            return result[0], result[1]
        output = result[0]
    raise ValueError("the token engine has no decoder layers")


@dataclass
class TokenSteps:
    """The step graphs' sessions of one export, run as the token engine: ``steps(queries, index)``."""

    encode: Sequence[Session]  # one per encoder layer (layer 0 also projects the frame queries)
    attend: Sequence[Session]  # one per decoder layer: its cross-attention over one chunk of tokens
    decode: Sequence[Session]  # one per decoder layer: the rest of it (the last also the heads)
    window: int
    encode_chunk_tokens: int = ENCODE_CHUNK_TOKENS
    attend_chunk_tokens: int = ATTEND_CHUNK_TOKENS

    def __call__(self, queries: np.ndarray, query_index: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """All frames' queries (T, N, C) float32, overwritten in place, and their slots (T, N) int64 or None
        (no pruning) -> pred_logits (Nv, K+1), mask_embed (Nv, D)."""
        if queries.dtype != np.float32 or not queries.flags.c_contiguous or not queries.flags.writeable:
            raise ValueError("the token steps take a writable C-contiguous float32 (T, N, C) array (overwritten in place)")
        if query_index is not None:
            query_index = np.ascontiguousarray(query_index, dtype=np.int64)
        _encode(self.encode, queries, self.window, self.encode_chunk_tokens)
        return _decode(self.attend, self.decode, queries, query_index, self.attend_chunk_tokens)

    @classmethod
    def open(
        cls,
        export_dir: Path,
        files: dict[str, list[str]],
        window: int,
        session: Any,
        encode_chunk_tokens: int = ENCODE_CHUNK_TOKENS,
        attend_chunk_tokens: int = ATTEND_CHUNK_TOKENS,
    ) -> "TokenSteps":
        """Sessions for the step files listed in vita.json (``files``: encode/attend/decode lists) via ``session(path)``."""
        made = {kind: [session(Path(export_dir) / name) for name in files[kind]] for kind in ("encode", "attend", "decode")}
        if len(made["attend"]) != len(made["decode"]) or not made["decode"] or not made["encode"]:
            raise ValueError(f"{export_dir}: vita.json lists an inconsistent set of token step graphs; export the model again")
        return cls(made["encode"], made["attend"], made["decode"], window, encode_chunk_tokens, attend_chunk_tokens)
