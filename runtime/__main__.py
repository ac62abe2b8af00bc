"""Command line of the runtime.

  python -m runtime VIDEO --model PATH --out results.json [--render overlay.mp4] [--prune-ratio R] ...
  python -m runtime --demo [--out-dir DIR]
  python -m runtime dataset --ytvis-json valid.json --frames ROOT --model PATH --out results.json
  python -m runtime stream SOURCE --model PATH --out results.jsonl [--render overlay.mkv] [--clip 36 --overlap 6]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from .cli_options import add_run_options, check_outputs, load_segmenter, segment_options
from .segmenter import ModelPathError
from .video_io import VideoInputError


def _segment_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime", description="Segment every instance of a video with VITA.")
    p.add_argument("video", nargs="?", help="video file, frame folder")
    p.add_argument("--out", help="results JSON to write")
    p.add_argument("--render", help="overlay video to write (.mp4, .mkv, ...)")
    p.add_argument("--demo", action="store_true", help="segment a generated clip with the built-in model")
    p.add_argument("--out-dir", default="vita_demo", help="--demo: where to write its files")
    add_run_options(p)
    args = p.parse_args(argv)
    if args.demo:
        from .demo import run_demo

        run_demo(Path(args.out_dir), progress=args.progress)
        return 0
    if not args.video or not args.model or not args.out:
        p.error("VIDEO, --model and --out are required (or use --demo)")
    check_outputs(p, [args.video, args.model], [args.out], args.render)
    segmenter = load_segmenter(args)
    result = segmenter.segment(args.video, **segment_options(args))
    result.save(args.out)
    if args.render:
        result.render(args.render, args.video)
    logging.getLogger("runtime").info("%d instances over %d frames -> %s", len(result.instances), result.num_frames,
                                      args.out)
    return 0


def _dataset_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime dataset", description="YouTube-VIS submission file for a dataset.")
    p.add_argument("--ytvis-json", required=True, type=Path)
    p.add_argument("--frames", required=True, type=Path, help="root the json's file_names are relative to")
    p.add_argument("--out", required=True, type=Path)
    add_run_options(p)
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model is required")
    check_outputs(p, [str(args.ytvis_json), args.model], [str(args.out)])
    from .dataset import run_dataset

    run_dataset(load_segmenter(args), args.ytvis_json, args.frames, args.out, **segment_options(args))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m runtime`` / ``vita-segment``."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] == "dataset":
            return _dataset_main(argv[1:])
        if argv and argv[0] == "stream":
            from .streaming.cli import stream_main

            return stream_main(argv[1:])
        return _segment_main(argv)
    except (VideoInputError, ModelPathError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
