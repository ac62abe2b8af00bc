"""``threads``: end-to-end speed when the model is loaded on the main thread and the video is segmented on a
worker thread (a service answering requests on worker threads), against both on the main thread.

Each figure is its own fresh process (``benchmarks.peak_child``), so neither run inherits the other's thread
pools. On the CPU the two should match: ``runtime.load`` builds a torch model on a short-lived thread, so that
the main thread keeps no OpenMP team to slow a worker thread's (``runtime/openmp_team.py``).
"""

from __future__ import annotations

from typing import Any

from .clip import benchmark_clip
from .memory import child_specs, run_child
from .progress import bar
from .record import Column, Record
from .settings import Settings
from .workspace import Workspace


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """One row per backend/precision: s/frame segmenting on the main thread, on a worker thread, and their ratio."""
    clip = benchmark_clip(s, ws)
    specs = child_specs(s, ws, rec)
    table = rec.table(
        "threads", "Segmenting on a worker thread after loading on the main thread",
        [Column("backend", "backend"), Column("precision", "precision"),
         Column("s_per_frame_main", "s/frame, segmented on the main thread", "time"),
         Column("s_per_frame_worker", "s/frame, segmented on a worker thread", "time"),
         Column("worker_vs_main", "worker / main", "ratio")],
        keys=("backend", "precision"),
        caption=(f"{ws.device}, {s.threads} threads; {clip.description}; each figure is one fresh process "
                 "(runtime.load on its main thread, then runtime.segment), decoding included, loading not."),
    )
    for spec in bar(specs, s.progress, desc="threads"):
        row: dict[str, Any] = {"backend": spec.backend, "precision": spec.precision}
        for where in ("main", "worker"):
            figures, why = run_child(s, ws, spec, clip, segment_on=where)
            if why:
                rec.note(why)
            row[f"s_per_frame_{where}"] = figures["seconds"] / figures["frames"] if figures else None
        main, worker = row["s_per_frame_main"], row["s_per_frame_worker"]
        row["worker_vs_main"] = worker / main if main and worker else None
        rec.add(table, row)
