"""A minimal, exact video inference: the official order of operations on an in-memory clip."""

from __future__ import annotations

import numpy as np
import torch

from ..modeling.vita_model import VitaModel
from .postprocess import VideoPrediction, chunks, postprocess
from .preprocess import padded_size, resize_frame, resized_size


def predict_video(model: VitaModel, frames: np.ndarray) -> VideoPrediction:
    """(T, H, W, 3) uint8 RGB frames -> top-k instances with masks at the original size.

    Holds the whole clip in memory; the streaming runtime (``runtime.segment``) is the bounded-memory path.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError("frames must be a (T, H, W, 3) uint8 RGB array")
    if min(frames.shape[:3]) == 0:
        raise ValueError(f"frames must not have a zero-sized axis, got shape {frames.shape}")
    cfg = model.config
    h, w = frames.shape[1:3]
    size = resized_size(h, w, cfg.input.min_size_test, cfg.input.max_size_test)
    device = next(model.parameters()).device
    queries, features = [], []
    with torch.no_grad():
        for batch in chunks(torch.from_numpy(frames), cfg.test.detector_chunk):
            resized = np.stack([resize_frame(f, size) for f in batch.numpy()])
            images = torch.from_numpy(resized).permute(0, 3, 1, 2).to(device)
            out = model.detect(images)
            queries.append(out.frame_queries)
            features.append(out.mask_features)
        pred_logits, mask_embed = model.track(torch.cat(queries))
        mask_features = torch.cat(features)
        return postprocess(
            pred_logits,
            mask_embed,
            chunks(mask_features, cfg.test.mask_chunk),
            resized_size=size,
            padded_size=padded_size(size, cfg.input.size_divisibility),
            orig_size=(h, w),
            topk=cfg.test.topk,
        )
