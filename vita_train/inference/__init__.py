"""The official test-time path: preprocessing (torch-free), a minimal exact video inference, post-processing."""

from __future__ import annotations

from vita_train.utils.lazy import lazy_getattr

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


__getattr__ = lazy_getattr("vita_train.inference", _EXPORTS)
