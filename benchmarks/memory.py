"""``memory``: the peak resident memory of a fresh process that loads the model and segments a clip, with the
default settings, per backend and precision and per clip length (``--lengths``, default 36 and 360 frames).

What a user's process peaks at (loading included), and whether it stays flat as the video grows. Each
figure comes from its own child interpreter (``benchmarks.peak_child``): the benchmark process itself holds
every earlier row's model and libraries, which is why e2e's in-process peaks are higher.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .clip import Clip, benchmark_clip
from .e2e import requested_specs
from .measure import GB
from .progress import bar
from .record import Column, Record
from .settings import Settings
from .workspace import PRECISIONS, BackendSpec, Workspace, available_specs, skipped_note

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def _clips(s: Settings, ws: Workspace) -> list[Clip]:
    """--video as it is, else the generated clip at every --lengths."""
    if s.video is not None:
        return [benchmark_clip(s, ws)]
    h, w = s.size
    return [Clip(ws.clip_file(n, h, w), n, h, w, f"{n} frames") for n in s.lengths]


def run_child(s: Settings, ws: Workspace, spec: BackendSpec, clip: Clip,
              segment_on: str = "main") -> tuple[Optional[dict[str, Any]], str]:
    """({peak_rss_bytes, frames, seconds} of a fresh process segmenting ``clip`` with ``spec``, or None; why not,
    if None). ``segment_on="worker"``: loaded on the child's main thread, segmented on another."""
    size = ws.resized(clip.height, clip.width)
    model = ws.checkpoint() if spec.backend == "torch" else ws.export(size, tensorrt=spec.backend == "tensorrt",
                                                                      precision=spec.precision)
    # the child runs in the repository (to import benchmarks): the caller's relative paths would point there
    cmd = [sys.executable, "-m", "benchmarks.peak_child", str(Path(model).absolute()), str(Path(clip.video).absolute()),
           "--backend", spec.backend, "--dtype", PRECISIONS[spec.precision], "--device", ws.device,
           "--threads", str(s.threads), "--segment-on", segment_on]
    try:
        # generous: a cold process (kernel builds included) at several seconds a frame
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120 + 10 * clip.frames)
    except subprocess.TimeoutExpired:
        return None, f"{spec.label}, {clip.frames} frames: the child process ran out of time"
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return None, f"{spec.label}, {clip.frames} frames: the child process failed ({tail[0]})"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def child_specs(s: Settings, ws: Workspace, rec: Record) -> list[BackendSpec]:
    """The requested backend/precision rows a fresh child process can run here (eager detector); a note for
    each one this machine cannot run."""
    available, missing = available_specs(ws.device)
    specs = [x for x in requested_specs(s, ("torch", "onnxruntime")) if not x.compiled]
    if ws.is_export:
        specs = [x for x in specs if x.backend != "torch"]
    for x in [x for x in specs if x not in available]:
        rec.note(skipped_note(x, missing))
    return [x for x in specs if x in available]


def child_peak(s: Settings, ws: Workspace, spec: BackendSpec, clip: Clip) -> tuple[Optional[int], str]:
    """(peak RSS in bytes of a fresh process segmenting ``clip`` with ``spec``, or None; why not, if None)."""
    figures, why = run_child(s, ws, spec, clip)
    return (figures["peak_rss_bytes"] if figures else None), why


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """One row per backend/precision: fresh-process peak RSS at each clip length and last / first."""
    clips = _clips(s, ws)
    # a compiled detector changes speed, not what a fresh process holds
    specs = child_specs(s, ws, rec)
    columns = [Column("backend", "backend"), Column("precision", "precision")]
    columns += [Column(f"peak_rss_gb_{c.frames}", f"peak RSS, {c.frames} frames (GB)", "memory") for c in clips]
    if len(clips) > 1:
        columns.append(Column("growth", f"peak at {clips[-1].frames} / at {clips[0].frames} frames", "ratio"))
    what = clips[0].description if s.video is not None else \
        f"a generated clip of moving shapes, {clips[0].height}x{clips[0].width}, MP4"
    table = rec.table(
        "memory", "Peak resident memory of a fresh process: runtime.load + runtime.segment, default settings",
        columns, keys=("backend", "precision"),
        caption=(f"{ws.device}, {s.threads} threads; each figure is one child process (imports, model loading and "
                 f"segmenting {what}), the kernel's peak-RSS mark (VmHWM). Machines and runs differ by a few "
                 "hundredths of a GB."),
    )
    for spec in bar(specs, s.progress, desc="memory"):
        row: dict[str, Any] = {"backend": spec.backend, "precision": spec.precision}
        peaks = []
        for clip in clips:
            peak, why = child_peak(s, ws, spec, clip)
            if why:
                rec.note(why)
            row[f"peak_rss_gb_{clip.frames}"] = peak / GB if peak else None
            peaks.append(peak)
        if len(clips) > 1:
            row["growth"] = peaks[-1] / peaks[0] if peaks[0] and peaks[-1] else None
        rec.add(table, row)
