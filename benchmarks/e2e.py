"""``e2e``: ``runtime.segment`` on a clip per backend: s/frame, fps, per-stage latency, peak memory,
time to first result, and the speed-up against the plain fp32 torch reference measured in the same run."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Optional

from . import references
from .clip import Clip, benchmark_clip
from .measure import GB, DeviceMemory, device_sync, peak_rss_bytes, reset_peak_rss
from .progress import bar
from .record import Column, Record, stat
from .settings import Settings
from .stages import STAGES, StageTimer
from .workspace import REFERENCE, BackendSpec, Workspace, available_specs, skipped_note

log = logging.getLogger(__name__)

STAGE_KEYS = {name: "stage_" + name.replace("+", "_").replace(" ", "_") for name in STAGES}


def requested_specs(s: Settings, default: tuple[str, ...]) -> list[BackendSpec]:
    """Backend/precision pairs the settings ask for (``default`` backends when none are named)."""
    specs = [BackendSpec(b, p) for b in (s.backends or default) for p in (s.precisions or ("fp32",))]
    if s.compile:  # each torch row also compiled, right after its eager twin
        specs = [v for x in specs for v in ((x, replace(x, compiled=True)) if x.backend == "torch" else (x,))]
    return list(dict.fromkeys(specs))


def with_streams(s: Settings, specs: list[BackendSpec], device: str) -> list[BackendSpec]:
    """Each CPU torch / onnxruntime spec once for every count of ``s.detector_streams`` (unchanged without any)."""
    if not s.detector_streams or str(device).startswith("cuda"):
        return specs
    return list(dict.fromkeys(
        v for x in specs
        for v in ([replace(x, streams=n) for n in s.detector_streams] if x.backend in ("torch", "onnxruntime") else [x])))


def segment_repeats(
    s: Settings, ws: Workspace, spec: BackendSpec, clip: Clip, repeats: int, **options: Any
) -> dict[str, Any]:
    """Load ``spec``, segment ``clip`` once cold, then ``repeats`` times; times, stages, memory, last result."""
    size = ws.resized(clip.height, clip.width)
    if spec.backend != "torch":
        ws.export(size, tensorrt=spec.backend == "tensorrt", precision=spec.precision)  # not timed
    sync = device_sync(ws.device)
    memory = DeviceMemory(ws.device)
    start = time.perf_counter()
    segmenter = ws.segmenter(spec, size)
    timer = StageTimer(segmenter.backend, sync)
    segmenter.backend = timer
    result, cold = timer.run(lambda: segmenter.segment(clip.video, **options))
    first_result = time.perf_counter() - start
    for _ in range(max(s.warmup - 1, 0)):
        timer.run(lambda: segmenter.segment(clip.video, **options))
    walls, stages, peaks, device_peaks = [], {k: [] for k in STAGES}, [], []
    for _ in range(repeats):
        reset_peak_rss()
        memory.reset()
        result, wall = timer.run(lambda: segmenter.segment(clip.video, **options))
        walls.append(wall)
        for k, v in timer.stages.items():
            stages[k].append(v)
        peaks.append(peak_rss_bytes())
        device_peaks.append(memory.peak())
    return {"walls": walls, "stages": stages, "peak_rss": max(p for p in peaks if p is not None) if any(peaks) else None,
            "peak_device": max(device_peaks) if device_peaks[0] is not None else None,
            "first_result": first_result, "cold": cold, "result": result, "backend": timer}


def _per_frame(values: list[float], frames: int) -> dict[str, Any]:
    return stat([v / frames for v in values])


def official_figure(s: Settings, config: Any, clip: Clip, device: str, cpu: dict[str, Any]) -> tuple[Optional[float], str]:
    """The official code's s/frame to compare with (--official-s-per-frame, else the figure for this CPU kind)
    and what it is; None, and why, when the run is not the setting those figures are for."""
    mismatch = references.reference_mismatch(config, clip.frames, (clip.height, clip.width))
    if mismatch:
        given = " (also the time given with --official-s-per-frame)" if s.official_s_per_frame is not None else ""
        return None, (f"left empty: the official code's figure{given} is for {references.REFERENCE_TEXT}, and "
                      f"{'; '.join(mismatch)}")
    if s.official_s_per_frame is not None:
        return s.official_s_per_frame, f"official code on this machine, {s.official_s_per_frame:g} s/frame (--official-s-per-frame)"
    figure = references.official_cpu_figure(cpu) if device == "cpu" else None
    if figure is None:
        where = "this CPU kind" if device == "cpu" else device
        return None, f"no official figure for {where} (give one with --official-s-per-frame)"
    return figure[0], figure[1] + ", not measured here: machines of one kind differ"


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """Measure every requested backend after the torch fp32 reference."""
    from runtime.backends.base import detector_streams

    clip = benchmark_clip(s, ws)
    available, missing = available_specs(ws.device)
    specs = [REFERENCE] + with_streams(s, [x for x in requested_specs(s, ("torch", "onnxruntime")) if x != REFERENCE],
                                       ws.device)
    if ws.is_export:
        specs = [x for x in specs if x.backend != "torch"]
    # a compiled row runs wherever its eager twin does
    skipped = [x for x in specs if replace(x, compiled=False, streams=None) not in available]
    specs = [x for x in specs if x not in skipped]
    for x in skipped:
        rec.note(skipped_note(x, missing))
    columns = [Column("backend", "backend"), Column("precision", "precision"), Column("kernels", "kernels"),
               Column("detector_streams", "detector calls at once", "count"),
               Column("s_per_frame", "s/frame", "time"), Column("fps", "frames/s", "rate")]
    columns += [Column(STAGE_KEYS[k], f"{k} s/frame", "time") for k in STAGES]
    columns += [Column("peak_rss_gb", "peak host RSS in this process (GB)", "memory"), Column("peak_device_gb", "peak device memory (GB)", "memory"),
                Column("first_result_s", "time to first result (s)", "time"),
                Column("speedup_vs_reference", "speed-up vs torch fp32 reference (same run)", "ratio"),
                Column("speedup_vs_official", "speed-up vs the official code (see caption)", "ratio")]
    official, official_text = official_figure(s, ws.config, clip, ws.device, rec.environment.get("cpu", {}))
    if official is None:
        rec.note(f"speed-up vs the official code: {official_text}")
    table = rec.table(
        "e2e", f"End to end: runtime.segment, {clip.description}", columns, keys=("backend", "precision", "kernels", "detector_streams"),
        caption=(f"{ws.device}, {s.threads} threads; median (min–max) over {s.repeats} runs after {s.warmup} warm-up. "
                 "Stages: decode+resize is the time the loop waited for the background reader; time to first "
                 "result is loading plus the first (cold) segment call. Peak host RSS: this benchmark process, which "
                 "still holds the earlier rows' libraries and freed memory (a fresh process's: the memory benchmark). Speed-up = s/frame of the plain fp32 PyTorch "
                 "path (reference kernels) / this s/frame, both measured in this run. Speed-up vs the official code: "
                 + (f"{official_text} / this s/frame." if official else f"{official_text}.")),
    )
    reference_s = None
    for spec in bar(specs, s.progress, desc="e2e"):
        m = segment_repeats(s, ws, spec, clip, s.repeats)
        per_frame = _per_frame(m["walls"], clip.frames)
        if spec == REFERENCE:
            reference_s = per_frame["median"]
        row = {"backend": spec.backend, "precision": spec.precision, "kernels": spec.kernels_label,
               "detector_streams": detector_streams(m["backend"]), "s_per_frame": per_frame,
               "fps": stat([clip.frames / w for w in m["walls"]])}
        for k in STAGES:
            row[STAGE_KEYS[k]] = _per_frame(m["stages"][k], clip.frames) if max(m["stages"][k]) > 0 else None
        row["peak_rss_gb"] = m["peak_rss"] / GB if m["peak_rss"] else None
        row["peak_device_gb"] = m["peak_device"] / GB if m["peak_device"] else None
        row["first_result_s"] = m["first_result"]
        row["speedup_vs_reference"] = reference_s / per_frame["median"] if reference_s else None
        row["speedup_vs_official"] = official / per_frame["median"] if official else None
        rec.add(table, row)
    others = rec.table(
        "e2e_references", "Other machines' figures (not measured here)",
        [Column("source", "source"), Column("machine", "machine"), Column("setting", "setting"),
         Column("s_per_frame", "s/frame"), Column("fps", "frames/s"), Column("memory_gb", "memory (GB)")],
        caption="Reported for other machines and setups; for orientation only, not comparable to the rows above.",
    )
    for row in references.E2E:
        rec.add(others, dict(row))
    from .plots import stage_bars

    rec.plots += stage_bars(rec.out_dir / "e2e_stages.png", table, STAGE_KEYS)
