"""A video's frame tokens, kept out of malloc's heap while the detector runs.

Every frame leaves tokens (100 x 256 float32, 100 KB) that live until the token engine has run. Allocated by the
detector among its transient blocks in the one malloc arena (``runtime/host_memory.py``), they landed in the
holes those blocks left and split them; with two detector calls at once the heap then grew with the video: the
torch backend's peak crept from 1.39 to 1.47 GB over 360 frames (full-size R-50, 360x640, AMD EPYC Zen 2),
and stayed at 1.39-1.41 with the tokens copied out. Here they are copied into anonymous memory mappings of their
own: only the pages written count towards resident memory, so a short video's tokens cost what they did.
"""

from __future__ import annotations

import mmap
from typing import Any, Optional

import numpy as np

CHUNK_BYTES = 64 << 20


class TokenStore:
    """Frame tokens (B, Q, C) added batch by batch (torch CPU tensors or numpy arrays, one kind and per-frame shape
    per store), handed back by ``arrays()`` as a few views in frame order. Tensors on a GPU are kept as given."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self._kept: list[Any] = []  # device tensors, as given
        self._chunks: list[tuple[np.ndarray, int]] = []  # (bytes of one mapping, frames written into it)
        self._like: Optional[Any] = None  # the first batch: kind, dtype and per-frame shape of every one
        self._frame_bytes = 0

    def add(self, tokens: Any) -> None:
        """Keep a batch's tokens (a copy, on the CPU)."""
        if _is_torch(tokens) and tokens.device.type != "cpu":
            self._kept.append(tokens)
            return
        if self._like is None:
            self._like = tokens[:0]
            self._frame_bytes = _raw(tokens[:1]).nbytes
        elif tokens.dtype != self._like.dtype or tuple(tokens.shape[1:]) != tuple(self._like.shape[1:]):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} and {tokens.dtype} after "
                             f"{tuple(self._like.shape[1:])} and {self._like.dtype}: one video's frames give the same")
        raw = _raw(tokens)
        frames = tokens.shape[0]
        if not self._chunks or (self._chunks[-1][1] + frames) * self._frame_bytes > self._chunks[-1][0].nbytes:
            size = max(self.chunk_bytes, raw.nbytes)
            self._chunks.append((np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8), 0))
        chunk, used = self._chunks[-1]
        chunk[used * self._frame_bytes : used * self._frame_bytes + raw.nbytes] = raw
        self._chunks[-1] = (chunk, used + frames)

    def arrays(self) -> list[Any]:
        """What was added, oldest first: one (frames, Q, C) view per mapping (device tensors as given)."""
        if self._kept:
            return list(self._kept)
        return [self._view(chunk[: used * self._frame_bytes], used) for chunk, used in self._chunks]

    def _view(self, raw: np.ndarray, frames: int) -> Any:
        like = self._like
        shape = (frames, *like.shape[1:])
        if _is_torch(like):
            import torch

            return torch.from_numpy(raw).view(like.dtype).view(shape)
        return raw.view(like.dtype).reshape(shape)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _raw(tokens: Any) -> np.ndarray:
    """The bytes of a CPU batch as a flat uint8 array (bf16 included, which numpy has no type for)."""
    if _is_torch(tokens):
        import torch

        return tokens.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(tokens).reshape(-1).view(np.uint8)
