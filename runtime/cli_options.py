"""The model and run options that every ``python -m runtime`` subcommand shares (segment, dataset, stream)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any, Optional

from vita_train.data.class_names import DATASET_CLASSES

from .segmenter import Segmenter


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Add the model, backend and segmenting options to ``p``."""
    p.add_argument("--model", help="official detectron2 checkpoint, one of ours, or an export directory")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], help="default: from what --model is")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--dataset", choices=sorted(DATASET_CLASSES),
                   help="the class names of an official checkpoint that has no config.yaml beside it (40 classes "
                        "are taken as ytvis_2019 unless this says ytvis_2021)")
    p.add_argument("--prune-ratio", type=float, default=1.0, help="top-r token pruning; 1.0 = off")
    p.add_argument("--window", type=int, help="VITA encoder window (0 = full attention)")
    p.add_argument("--topk", type=int, help="instances per video")
    p.add_argument("--min-size", type=int, help="test-time shortest edge")
    p.add_argument("--batch-size", type=int, help="frames per detector call")
    p.add_argument("--feature-policy", default="auto", choices=["auto", "device", "host", "disk", "recompute"])
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: compile the detector with torch.compile (minutes once, cached; then faster)")


def segment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SegmentOptions fields the parsed ``args`` set."""
    return dict(
        prune_ratio=args.prune_ratio,
        window=args.window,
        topk=args.topk,
        min_size=args.min_size,
        batch_size=args.batch_size,
        feature_policy=args.feature_policy,
        progress=args.progress,
    )


def load_segmenter(args: argparse.Namespace) -> Segmenter:
    """``runtime.load`` with the model options of the parsed ``args``."""
    from .segmenter import load

    return load(args.model, backend=args.backend, device=args.device, dtype=args.dtype, dataset=args.dataset,
                compile=args.compile)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_outputs(p: argparse.ArgumentParser, inputs: list[Optional[str]], outputs: list[str],
                  overlay: Optional[str] = None) -> None:
    """Exit with a usage error before any work where an output is one of the inputs, a folder, in a folder that
    cannot be written, or (``overlay``) a video container the renderer does not know: found only after a
    whole video had been segmented otherwise."""
    from .render import CONTAINERS

    for name in outputs + ([overlay] if overlay else []):
        target = Path(name)
        if any(_same_file(target, Path(i)) for i in inputs if i):
            p.error(f"{target} is one of the inputs; choose another output path")
        if target.is_dir():
            p.error(f"{target} is a folder; give the path of a file (in it, or elsewhere)")
        folder = next(d for d in (target.parent, *target.parent.parents) if d.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            p.error(f"cannot write {target}: {folder} is not a folder this user can write to")
    if overlay and Path(overlay).suffix.lower() not in CONTAINERS:
        p.error(f"cannot tell the container from {Path(overlay).name!r}: use one of {', '.join(CONTAINERS)}")


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, ``docker stop``, systemd) raise KeyboardInterrupt in the main thread,
    and ``requested`` remembers that one came, so a command ends through its Ctrl-C path (what it finished
    written, its files closed) also where a library turned the interrupt into another exception: pycocotools
    under numpy 2 raised TypeError when Ctrl-C landed in its mask decoding. Made once per command, on the main
    thread; a SIGINT ignored from the start (a background job) stays ignored."""

    def __init__(self) -> None:
        self.requested = False
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        self.requested = True
        raise KeyboardInterrupt
