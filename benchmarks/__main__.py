"""``python -m benchmarks <name> ...``: run one benchmark, write JSON + markdown under --out."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="name", required=True)
    det = sub.add_parser("detector-backends", help="detector s/frame: onnxruntime vs torch eager (CPU)")
    det.add_argument("--preset", default="vita_r50_ytvis19")
    det.add_argument("--size", type=_size, default=(360, 640))
    det.add_argument("--frames", type=int, default=10)
    det.add_argument("--threads", type=int, default=2)
    det.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.name == "detector-backends":
        from .detector_backends import run

        report = run(args.preset, args.size, args.frames, args.threads, args.out)
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
