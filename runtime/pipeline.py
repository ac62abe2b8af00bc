"""The streaming loop: decode -> detect per frame batch -> tokens -> token engine -> masks -> results.

Only tokens (Nf x C per frame) are held for the whole video; mask features follow the FeatureStore
policy, and masks are encoded to RLE chunk by chunk.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

import numpy as np

from vita_train.inference.preprocess import padded_size, resize_frame, resized_size

from .backends.base import Backend, default_batch_size, detector_streams, mask_chunk_size
from .feature_store import FeatureStore
from .host_memory import release_freed_memory
from .options import SegmentOptions
from .prefetch import in_order, prefetch
from .results import Instance, MaskEncoder, VideoResult
from .spool import ArraySpool
from .token_store import TokenStore
from .video_io import FrameSource, VideoInputError, open_video

log = logging.getLogger(__name__)


def _batches(frames: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kw)


def run(backend: Backend, video: Any, options: SegmentOptions) -> VideoResult:
    """Segment ``video`` (path, frame folder, uint8 array or iterable of frames) with ``backend``."""
    cfg = backend.config
    source: FrameSource = open_video(video)
    spool: Optional[ArraySpool] = None
    store: Optional[FeatureStore] = None
    try:
        info = source.info
        h, w = info.height, info.width
        min_size = options.min_size or cfg.input.min_size_test
        max_size = options.max_size or cfg.input.max_size_test
        size = resized_size(h, w, min_size, max_size)
        padded = padded_size(size, cfg.input.size_divisibility)
        batch_size = options.batch_size or default_batch_size(backend)
        device_budget = (
            int(options.device_budget_mb * 2**20) if options.device_budget_mb is not None else backend.device_budget()
        )
        store = FeatureStore(backend, options.feature_policy, device_budget, int(options.host_budget_mb * 2**20))
        if options.feature_policy in ("auto", "recompute") and not source.reopenable:
            spool = ArraySpool(prefix="vita-frames-")

        def resize(frame: np.ndarray) -> np.ndarray:
            out = resize_frame(frame, size)
            if spool is not None:
                spool.append(out[None])
            return out

        tokens, indices = TokenStore(memory_budget=int(options.token_memory_mb * 2**20)), []
        num_frames = 0
        resized = prefetch(iter(source), resize, options.queue_size)
        bar = _progress(resized, options.progress, total=info.num_frames, desc="detect", unit="frame")

        def detect(batch: np.ndarray) -> Any:
            return backend.detect(batch, options.prune_ratio)

        batches = _batches(iter(bar), batch_size)
        for det in in_order(detect, batches, detector_streams(backend), name="vita-detector"):
            tokens.add(det.tokens)
            indices.append(det.query_index)
            store.add(det.mask_features)
            num_frames += det.tokens.shape[0]
        store.finish()
        if num_frames == 0:
            raise VideoInputError(f"{info.source} has no frames to segment")
        if source.truncated:
            log.warning("%s ended early: segmented the %d frames that decoded", info.source, num_frames)

        release_freed_memory()  # the detector's working memory, before the tokens come back (runtime/token_store.py)
        # one array, given up: the token engine works in it, so the tokens are in memory once
        logits, mask_embed = backend.track([tokens.take()], None if indices[0] is None else indices, options.window,
                                           owned=True)
        del tokens, indices
        selection = backend.select(logits, options.topk or cfg.test.topk)
        head = backend.mask_head(mask_embed, selection, size, padded, (h, w))
        encoder = MaskEncoder(len(selection.scores), h, w)
        chunk = mask_chunk_size(backend)
        if store.needs_recompute:
            feature_chunks = _recompute(backend, source, spool, size, batch_size, chunk, options.queue_size)
        else:
            feature_chunks = store.chunks(chunk)
        steps = -(-num_frames // chunk)
        for features in _progress(feature_chunks, options.progress, total=steps, desc="masks", unit="chunk"):
            encoder.add(head.masks(features))
        rles, boxes = encoder.finish()
        scores = selection.scores * head.mask_quality()
    finally:
        if store is not None:
            store.close()
        if spool is not None:
            spool.close()
        source.close()
    names = cfg.label_names()
    instances = [
        Instance(label=int(lab), label_name=names[int(lab)], score=float(s), masks=m, boxes=b)
        for s, lab, m, b in zip(scores, selection.labels, rles, boxes)
    ]
    instances.sort(key=lambda inst: -inst.score)
    return VideoResult(
        instances=instances,
        height=h,
        width=w,
        num_frames=num_frames,
        fps=info.fps,
        class_names=tuple(names),
        source=info.source,
        truncated=bool(source.truncated),
    )


def _recompute(backend, source, spool, size, batch_size, chunk, queue_size) -> Iterator[Any]:
    """Second pass: re-read the frames and recompute mask features, yielding chunks of ``chunk`` frames."""
    frames = (f[0] for f in spool.chunks(1)) if spool is not None else prefetch(iter(source), lambda f: resize_frame(f, size), queue_size)
    # batches of a multiple of the chunk keep chunk boundaries where the official code has them
    step = max(chunk, (batch_size // chunk) * chunk)
    batches = _batches(iter(frames), step)
    for features in in_order(backend.mask_features, batches, detector_streams(backend), name="vita-detector"):
        for start in range(0, features.shape[0], chunk):
            yield features[start : start + chunk]
