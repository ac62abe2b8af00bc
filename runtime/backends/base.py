"""What the streaming loop needs from a backend. Arrays are the backend's own (torch tensors, numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import numpy as np


@dataclass
class Detection:
    """One detector batch after optional pruning."""

    tokens: Any  # (B, N, C) frame queries kept
    query_index: Optional[np.ndarray]  # (B, N) slot of each kept token, None when nothing was pruned
    mask_features: Any  # (B, D, Hp/4, Wp/4)


@dataclass
class Selection:
    """Top-k (video query, class) pairs."""

    scores: np.ndarray  # (k,) class probabilities
    labels: np.ndarray  # (k,)
    query_index: np.ndarray  # (k,)


class MaskHead(Protocol):
    """Masks of the selected video queries, chunk by chunk, accumulating the mask-quality score."""

    def masks(self, mask_features: Any) -> np.ndarray:
        """(t, D, h, w) features -> (k, t, H, W) bool masks at the original size."""

    def mask_quality(self) -> np.ndarray:
        """(k,) mean soft mask inside the hard mask over all chunks so far."""


def default_batch_size(backend: "Backend") -> int:
    """Frames per detector call when the options name none: 8 on CUDA; on the CPU 1 in fp32 (as fast per frame as 2,
    measured, with a third less peak memory) and 2 in bf16 (faster per frame, and half the activation bytes)."""
    if str(backend.device).startswith("cuda"):
        return 8
    return 2 if getattr(backend, "dtype", "float32") == "bfloat16" else 1


def detector_streams(backend: "Backend") -> int:
    """How many detector calls the streaming loop runs at once, each on its own thread: what the backend declares
    (``detector_streams``, where its ``detect`` may be called from several threads at once), else 1."""
    return max(1, int(getattr(backend, "detector_streams", 1)))


def chosen_detector_streams(asked: Optional[int], can_overlap: bool, threads: int) -> int:
    """A CPU backend's ``detector_streams``: ``asked``, or where None two calls at once when they ``can_overlap``
    (the backend's CPU path) with two threads or more, else one; fewer than one is refused."""
    streams = asked if asked is not None else (2 if can_overlap and threads >= 2 else 1)
    if streams < 1:
        raise ValueError(f"detector_streams must be 1 or more, got {streams}")
    return streams


def mask_chunk_size(backend: "Backend") -> int:
    """Frames per mask-head call: the config's chunk on CUDA (it bounds device memory there, as in the official
    code); one frame on the CPU, where a chunk saves nothing and its features in flight (five 15 MB frames,
    read ahead while the last is used) added 0.15 GB to the peak: one frame at a time fits in memory the
    detector freed. Masks and scores are the same either way (each frame is computed on its own)."""
    if str(backend.device).startswith("cuda"):
        return backend.config.test.mask_chunk
    return 1


class Backend(Protocol):
    """A loaded model that can detect, track and make masks."""

    config: Any  # vita_train.config.ModelConfig
    device: str

    def detect(self, frames: np.ndarray, prune_ratio: float) -> Detection:
        """(B, Hr, Wr, 3) uint8 resized RGB frames -> tokens and mask features."""

    def mask_features(self, frames: np.ndarray) -> Any:
        """Mask features only (second pass of the recompute policy)."""

    def track(self, tokens: Sequence[Any], query_index: Optional[Sequence[np.ndarray]], window: Optional[int],
              owned: bool = False) -> tuple[np.ndarray, Any]:
        """All frames' tokens -> (video class logits (Nv, K+1) numpy, mask embeddings). ``owned``: the caller
        gives ``tokens`` up, and one array is worked on in place instead of copied (a long video's tokens are
        then in memory once)."""

    def select(self, logits: np.ndarray, k: int) -> Selection:
        """The official top-k over (video query, class) pairs."""

    def mask_head(self, mask_embed: Any, selection: Selection, resized: tuple[int, int], padded: tuple[int, int], orig: tuple[int, int]) -> MaskHead:
        """A MaskHead for the selected queries."""

    def concat(self, arrays: Sequence[Any]) -> Any:
        """Concatenate along the first axis."""

    def to_host(self, features: Any) -> np.ndarray:
        """Features to host memory: float16 when they leave a GPU, as they are for a CPU run (float32, or a
        bf16 run's bits as int16; exact either way, the disk spool then bounds memory). Frames along the first
        axis; the rest of the layout and the dtype are the backend's own (``from_host`` reads them back)."""

    def from_host(self, features: np.ndarray) -> Any:
        """Host features back to the backend's compute type."""

    def nbytes(self, features: Any) -> int:
        """Bytes held by ``features``."""

    def device_budget(self) -> int:
        """Bytes of device memory features may take under the auto policy."""
