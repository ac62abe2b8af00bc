"""The ``memory`` benchmark's child process: load a model as a user does (``runtime.load``), segment one video,
print the process's peak resident memory as one JSON line.

``python -m benchmarks.peak_child MODEL VIDEO --backend torch --dtype float32 --threads 2``. A fresh
interpreter, so the figure is what a user's process holds: the onnxruntime backend runs without torch here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from .measure import peak_rss_bytes


def _limit_threads(threads: int) -> None:
    """``threads`` CPUs for every library: the CPU affinity (onnxruntime's and the mask kernel's default) and
    OpenMP's count (torch's), set before any of them starts a thread pool."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])


def main(argv: Optional[list[str]] = None) -> int:
    """Segment VIDEO with MODEL and print {peak_rss_bytes, frames, seconds}."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.peak_child", description=__doc__)
    p.add_argument("model", help="a checkpoint or an export directory")
    p.add_argument("video")
    p.add_argument("--backend", required=True, choices=("torch", "onnxruntime", "tensorrt"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    _limit_threads(args.threads)

    import runtime

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    segmenter = runtime.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    start = time.perf_counter()
    result = runtime.segment(args.video, segmenter)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "frames": result.num_frames, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
