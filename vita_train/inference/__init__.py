"""The official test-time path: preprocessing, a minimal exact video inference, post-processing."""

from .postprocess import VideoPrediction, postprocess, select_topk
from .preprocess import resize_frame, resized_size
from .video import predict_video

__all__ = ["VideoPrediction", "postprocess", "select_topk", "resize_frame", "resized_size", "predict_video"]
