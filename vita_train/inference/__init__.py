"""The official test-time path: preprocessing (torch-free), a minimal exact video inference, post-processing."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VideoPrediction": "vita_train.inference.postprocess",
    "postprocess": "vita_train.inference.postprocess",
    "select_topk": "vita_train.inference.postprocess",
    "MaskScorer": "vita_train.inference.postprocess",
    "resize_frame": "vita_train.inference.preprocess",
    "resized_size": "vita_train.inference.preprocess",
    "padded_size": "vita_train.inference.preprocess",
    "predict_video": "vita_train.inference.video",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vita_train.inference' has no attribute {name!r}")
