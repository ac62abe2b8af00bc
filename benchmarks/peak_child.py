"""A fresh process that loads a model as a user does (``runtime.load``), segments one video and prints one JSON
line: its peak resident memory and the seconds the segmenting took. The ``memory`` and ``threads`` benchmarks run it.

``python -m benchmarks.peak_child MODEL VIDEO --backend torch --dtype float32 --threads 2 [--segment-on worker]``.
A fresh interpreter, so the figure is what a user's process holds: the onnxruntime backend runs without torch here.
``--segment-on worker`` loads on the main thread and segments on another one, as a service that answers requests
on worker threads does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

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
    p.add_argument("--segment-on", choices=("main", "worker"), default="main",
                   help="the thread that segments (the model is loaded on the main thread either way)")
    args = p.parse_args(argv)
    _limit_threads(args.threads)

    import runtime

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    segmenter = runtime.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype)

    def segment() -> tuple[Any, float]:
        start = time.perf_counter()
        result = runtime.segment(args.video, segmenter)
        return result, time.perf_counter() - start

    if args.segment_on == "worker":
        from runtime.openmp_team import on_short_lived_thread

        result, seconds = on_short_lived_thread(segment, name="segment-worker")
    else:
        result, seconds = segment()
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "frames": result.num_frames, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
