"""``detector``: per-frame latency and throughput of the detector vs batch size and resolution, per backend.

Frames are fed already resized (what the runtime's detector stage receives); onnxruntime gets a
fixed-size export per resolution, as a deployment would.
"""

from __future__ import annotations

import numpy as np

from .e2e import requested_specs
from .measure import device_sync, repeat
from .plots import detector_lines
from .progress import bar
from .record import Column, Record, stat
from .settings import Settings
from .workspace import Workspace, available_specs


def _sizes(s: Settings, ws: Workspace) -> list[tuple[str, tuple[int, int]]]:
    """(label, (h, w)) per resolution: 16:9 frames with the given shortest edge, or the clip's resized size."""
    if not s.resolutions:
        h, w = ws.resized(*s.size)
        return [(f"{h}x{w}", (h, w))]
    return [(f"{r}p", (r, int(round(r * 16 / 9)))) for r in s.resolutions]


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """Time ``backend.detect`` for every backend x resolution x batch size."""
    available, _ = available_specs(ws.device)
    specs = [x for x in requested_specs(s, ("torch", "onnxruntime")) if x in available]
    if ws.is_export:
        specs = [x for x in specs if x.backend != "torch"]
    table = rec.table(
        "detector", "Detector: latency and throughput vs batch size and resolution",
        [Column("backend", "backend"), Column("precision", "precision"), Column("resolution", "resolution"),
         Column("batch", "batch"), Column("ms_per_frame", "latency per frame (ms)", "time"),
         Column("ms_per_batch", "latency per call (ms)", "time"), Column("fps", "frames/s", "rate")],
        keys=("backend", "precision", "resolution", "batch"),
        caption=(f"{ws.device}, {s.threads} threads; median (min–max) over {s.repeats} calls after {s.warmup} warm-up; "
                 "resized uint8 frames in, frame queries, logits and mask features out; one call at a time with "
                 "every thread (segment runs two onnxruntime CPU calls at once: see e2e)."),
    )
    sync = device_sync(ws.device)
    rng = np.random.default_rng(0)
    jobs = [(spec, label, size) for spec in specs for label, size in _sizes(s, ws)]
    for spec, label, size in bar(jobs, s.progress, desc="detector"):
        backend = ws.backend(spec, size, one_call_at_a_time=True)
        for batch in s.batches:
            frames = rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
            times = repeat(lambda: backend.detect(frames, 1.0), s.repeats, s.warmup, sync)
            rec.add(table, {
                "backend": spec.backend, "precision": spec.precision, "resolution": label, "batch": batch,
                "ms_per_frame": stat([1000 * t / batch for t in times]), "ms_per_batch": stat([1000 * t for t in times]),
                "fps": stat([batch / t for t in times]),
            })
    rec.plots += detector_lines(rec.out_dir / "detector.png", table)
