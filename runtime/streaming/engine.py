"""``runtime.stream``: clip-wise VITA on a live or endless video, with instances linked across clips.

Each frame is detected once, as it arrives; a clip of ``clip_len`` frames runs the token engine and the
mask head, and its first ``overlap`` frames are the last ones of the clip before (detections reused).
Only the current clip's tokens and mask features and the live tracks' last masks (RLE) are held.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Optional

import numpy as np

from vita_train.inference.preprocess import padded_size, resize_frame, resized_size

from ..backends.base import Backend, default_batch_size, detector_streams, mask_chunk_size
from ..options import SegmentOptions
from ..prefetch import in_order, prefetch
from ..results import MaskEncoder
from ..video_io import FrameSource, StreamStalledError
from .clip_buffer import ClipBuffer, FrameDetection
from .clip_result import ClipResult, TrackedInstance
from .options import StreamOptions
from .sources import open_source
from .tracks import TrackSet

log = logging.getLogger(__name__)


def stream(
    source: Any,
    model: Any,
    clip_len: int = 36,
    overlap: int = 6,
    association: str = "hungarian",
    min_iou: float = 0.3,
    **options: Any,
) -> Iterator[ClipResult]:
    """Segment ``source`` clip by clip, yielding each clip's result as soon as it is ready.

    ``source``: an ``rtsp://``/``http(s)://``/``tcp://``/``udp://`` URL, a capture device (``/dev/video0``;
    ``format=``/``options=`` go to FFmpeg), a video file, frame folder, uint8 array or frame iterator.
    ``model``: a path or a Segmenter. ``options``: StreamOptions fields (max_missed, min_score, timeout_s,
    reconnect, keep_frames, ...) and SegmentOptions fields (prune_ratio, window, topk, min_size, ...).
    Bad options and an unreachable source raise here, before the first clip. A live source that stalls
    raises StreamStalledError after the clip in progress has been yielded.
    """
    from ..segmenter import Segmenter, load

    stream_opts, rest = StreamOptions.split(
        dict(clip_len=clip_len, overlap=overlap, association=association, min_iou=min_iou, **options)
    )
    segmenter = model if isinstance(model, Segmenter) else load(model)
    segment_opts = segmenter.options.updated(**rest)
    src = open_source(source, stream_opts)
    return _clips(segmenter.backend, src, stream_opts, segment_opts)


class _ClipRunner:
    """Token engine + mask head on one clip's buffered detections; masks straight to RLE."""

    def __init__(self, backend: Backend, source: FrameSource, options: SegmentOptions) -> None:
        cfg = backend.config
        self.backend, self.options = backend, options
        self.orig = (source.info.height, source.info.width)
        min_size = options.min_size or cfg.input.min_size_test
        max_size = options.max_size or cfg.input.max_size_test
        self.size = resized_size(*self.orig, min_size, max_size)
        self.padded = padded_size(self.size, cfg.input.size_divisibility)
        self.topk = options.topk or cfg.test.topk
        self.chunk = mask_chunk_size(backend)

    def detect(self, frames: list[tuple[float, np.ndarray, Optional[np.ndarray]]]) -> list[FrameDetection]:
        """Run the detector once on a batch of (arrival, resized, original) frames."""
        det = self.backend.detect(np.stack([f[1] for f in frames]), self.options.prune_ratio)
        return [
            FrameDetection(
                det.tokens[b : b + 1],
                None if det.query_index is None else det.query_index[b : b + 1],
                det.mask_features[b : b + 1],
                arrived,
                original,
            )
            for b, (arrived, _, original) in enumerate(frames)
        ]

    def run(self, frames: list[FrameDetection]) -> tuple[np.ndarray, np.ndarray, list, list]:
        """(scores, labels, per-instance RLE lists, per-instance box lists) over the clip's frames."""
        backend = self.backend
        indices = None if frames[0].query_index is None else [f.query_index for f in frames]
        logits, embed = backend.track([f.tokens for f in frames], indices, self.options.window)
        selection = backend.select(logits, self.topk)
        head = backend.mask_head(embed, selection, self.size, self.padded, self.orig)
        encoder = MaskEncoder(len(selection.scores), *self.orig)
        for s in range(0, len(frames), self.chunk):
            part = [f.mask_features for f in frames[s : s + self.chunk]]
            encoder.add(head.masks(backend.concat(part) if len(part) > 1 else part[0]))
        rles, boxes = encoder.finish()
        return selection.scores * head.mask_quality(), selection.labels, rles, boxes


def _clips(backend: Backend, source: FrameSource, opts: StreamOptions, seg: SegmentOptions) -> Iterator[ClipResult]:
    """The generator behind ``stream``; closes ``source`` when done or abandoned."""
    try:
        runner = _ClipRunner(backend, source, seg)
        names = tuple(backend.config.label_names())
        tracks = TrackSet(opts, runner.orig[0] * runner.orig[1])
        buffer = ClipBuffer(opts.clip_len, opts.overlap)
        batch_size = seg.batch_size or default_batch_size(backend)

        def prepare(frame: np.ndarray) -> tuple[float, np.ndarray, Optional[np.ndarray]]:
            return time.monotonic(), resize_frame(frame, runner.size), frame if opts.keep_frames else None

        def clip() -> ClipResult:
            result = _run_clip(runner, buffer, tracks, opts, names, source)
            buffer.advance()
            return result

        pending: list = []
        stalled: list[StreamStalledError] = []
        frames = prefetch(iter(source), prepare, seg.queue_size)

        def arrived() -> Iterator[tuple[float, np.ndarray, Optional[np.ndarray]]]:
            try:
                yield from frames
            except StreamStalledError as err:
                stalled.append(err)  # finish the clip in progress first: what arrived is not lost

        try:
            if batch_size == 1:
                # one frame a call: a backend that runs several calls at once (detector_streams) gets the next
                # frames' calls started while the first runs; larger batches follow the buffer's room one at a time
                for detections in in_order(lambda item: runner.detect([item]), arrived(), detector_streams(backend),
                                           name="vita-detector"):
                    buffer.add(detections)
                    if buffer.full:
                        yield clip()
            else:
                for item in arrived():
                    pending.append(item)
                    if len(pending) >= min(batch_size, buffer.room()):
                        buffer.add(runner.detect(pending))
                        pending = []
                    if buffer.full:
                        yield clip()
        finally:
            frames.close()  # stops the decoding thread now, also when the caller abandons the stream
        if pending:
            buffer.add(runner.detect(pending))
        if buffer.new_frames > 0:
            yield clip()
        if source.truncated:
            log.warning("%s ended early: segmented the frames that decoded", source.info.source)
        if stalled:
            raise stalled[0]
    finally:
        source.close()


def _run_clip(
    runner: _ClipRunner, buffer: ClipBuffer, tracks: TrackSet, opts: StreamOptions, names: tuple, source: FrameSource
) -> ClipResult:
    """Segment the buffered clip, link its instances to tracks, and package the frames it finalises."""
    frames = buffer.frames
    n = len(frames)
    scores, labels, rles, boxes = runner.run(frames)
    keep = [i for i in range(len(scores)) if scores[i] >= opts.min_score]
    shared = max(opts.overlap, 1)  # without overlap, adjacent frames stand in for shared ones
    first = opts.overlap if buffer.clips else 0
    linked, ended = tracks.update(
        [int(labels[i]) for i in keep],
        [float(scores[i]) for i in keep],
        [rles[i][:shared] for i in keep],
        [rles[i][n - shared :] for i in keep],
    )
    instances = [
        TrackedInstance(
            track_id=track_id,
            label=label,
            label_name=names[label],
            score=float(scores[i]),
            clip_label=int(labels[i]),
            masks=rles[i][first:],
            boxes=boxes[i][first:],
            new=new,
        )
        for i, (track_id, label, new) in zip(keep, linked)
    ]
    instances.sort(key=lambda inst: -inst.score)
    now = time.monotonic()
    return ClipResult(
        index=buffer.clips,
        start=buffer.start,
        first_frame=buffer.start + first,
        end=buffer.start + n,
        height=runner.orig[0],
        width=runner.orig[1],
        instances=instances,
        ended_tracks=ended,
        latency_s=now - frames[first].arrived,
        compute_s=now - frames[-1].arrived,
        fps=source.info.fps,
        class_names=names,
        source=source.info.source,
        frames=[f.frame for f in frames[first:]] if opts.keep_frames else None,
    )
