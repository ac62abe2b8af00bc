"""``python -m runtime stream SOURCE --model M --out results.jsonl [--render overlay.mp4]``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from ..cli_options import StopSignals, add_run_options, check_outputs, load_segmenter, segment_options
from .outputs import JsonlWriter, OverlayWriter

log = logging.getLogger(__name__)


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def stream_main(argv: list[str]) -> int:
    """Run the ``stream`` subcommand; 0 when the stream ended, 130 on Ctrl-C or SIGTERM (everything so far is
    written and the files closed)."""
    p = argparse.ArgumentParser(
        prog="python -m runtime stream",
        description="Segment a live or endless video clip by clip; one JSON line per clip, written as it finishes.",
    )
    p.add_argument("source", help="rtsp:// / http(s):// / tcp:// / udp:// URL, /dev/video0, video file or frame folder")
    p.add_argument("--out", required=True, help="JSON-lines file: one line per clip, appended and flushed")
    p.add_argument("--render", help="overlay video written as the clips come (.mkv survives a kill; .mp4 needs a clean end)")
    p.add_argument("--clip", type=int, default=36, help="frames per clip")
    p.add_argument("--overlap", type=int, default=6, help="frames shared by consecutive clips")
    p.add_argument("--association", default="hungarian", choices=["hungarian", "greedy"])
    p.add_argument("--min-iou", type=float, default=0.3, help="mask IoU needed to continue a track")
    p.add_argument("--max-missed", type=int, default=1, help="clips a track may miss before it ends")
    p.add_argument("--min-score", type=float, default=0.0, help="drop instances scoring below this")
    p.add_argument("--timeout", type=float, default=10.0, help="live sources: seconds without data that end the stream")
    p.add_argument("--reconnect", type=int, default=0, help="live sources: reopen this many times after a stall")
    p.add_argument("--format", help="FFmpeg input format (e.g. v4l2, mpegts)")
    p.add_argument("--option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="FFmpeg input option, repeatable (e.g. video_size=640x480)")
    add_run_options(p)
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model is required")
    check_outputs(p, [args.source, args.model], [args.out], args.render)
    from .engine import stream

    segmenter = load_segmenter(args)
    options = {k: v for k, v in segment_options(args).items() if k not in ("feature_policy", "progress")}
    clips = stream(
        args.source, segmenter, clip_len=args.clip, overlap=args.overlap, association=args.association,
        min_iou=args.min_iou, max_missed=args.max_missed, min_score=args.min_score, timeout_s=args.timeout,
        reconnect=args.reconnect, format=args.format, options=dict(args.option), keep_frames=bool(args.render),
        **options,
    )  # fmt: skip
    stops = StopSignals()
    out = JsonlWriter(args.out)
    overlay = OverlayWriter(args.render) if args.render else None
    try:
        for clip in clips:
            out.write(clip)
            if overlay is not None:
                overlay.write(clip)
            log.info("clip %d: frames %d-%d, %d instances, latency %.2f s (compute %.2f s)",
                     clip.index, clip.first_frame, clip.end - 1, len(clip.instances), clip.latency_s, clip.compute_s)
    except (Exception, KeyboardInterrupt) as e:
        if not (stops.requested or isinstance(e, KeyboardInterrupt)):
            raise
        log.info("interrupted: %d clip(s) written to %s", out.lines, args.out)
        return 130
    finally:
        clips.close()
        out.close()
        if overlay is not None:
            overlay.close()
    log.info("stream ended: %d clip(s) written to %s", out.lines, args.out)
    return 0
