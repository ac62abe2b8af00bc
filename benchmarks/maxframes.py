"""``maxframes``: the longest video (T frames) that completes under a memory budget, per window W and
pruning ratio r, for the token engine alone and for the whole runtime under each feature policy.

Each probe runs in a fresh child process (forked from a server that has imported torch but run
nothing), bounded in memory (see probe.py) and in time. The search doubles T until a probe fails,
then narrows the bracket, guessing from the memory the passing probes used (memory grows linearly
in T) and bisecting when the guess does not help, until it is within the tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Optional

from . import references
from .measure import GB, MB, available_memory
from .probe import ProbeJob, forkserver, probe
from .progress import bar
from .record import Column, Record
from .settings import Settings
from .workspace import Workspace

log = logging.getLogger(__name__)
MAX_PROBES = 14
PAPER_BUDGET = 12 * GB  # Table 4's Titan XP


def _line(passes: list[tuple[int, int]]) -> Optional[tuple[float, float]]:
    """(bytes per frame, bytes at T = 0) of the line through the longest passing probe's peak and the
    longest one at most 70% of its T (far enough apart that noise does not tilt the line)."""
    if len(passes) < 2:
        return None
    ordered = sorted(passes)
    t2, m2 = ordered[-1]
    t1, m1 = next((p for p in reversed(ordered[:-1]) if p[0] <= 0.7 * t2), ordered[0])
    if t2 == t1 or m2 <= m1:
        return None
    slope = (m2 - m1) / (t2 - t1)
    return slope, m2 - slope * t2


def _guess(passes: list[tuple[int, int]], budget: int) -> Optional[int]:
    """T where that line reaches the budget."""
    line = _line(passes)
    return None if line is None else int((budget - line[1]) / line[0])


def search(run: Callable[[int], dict[str, Any]], start: int, budget: int, cap: int, tolerance: float) -> dict[str, Any]:
    """Largest T for which ``run(T)`` fits: {max_frames, first_failing, probes, limited_by, peak_gb, seconds}."""
    lo, hi = 0, None  # largest passing T, smallest failing T
    passes: list[tuple[int, int]] = []
    lo_result: dict[str, Any] = {}
    reasons: list[str] = []
    t = max(1, min(cap, start))
    probes = 0
    while probes < MAX_PROBES:
        result = run(t)
        probes += 1
        if result["ok"]:
            lo, lo_result = t, result
            passes.append((t, result["peak_bytes"]))
        else:
            hi = t
            reasons.append(result["reason"])
        if lo >= cap or (hi is not None and hi - lo <= max(1, int(tolerance * max(lo, 1)))):
            break
        guess = _guess(passes, budget)
        if hi is None:
            if guess is None or guess <= lo:
                t = 4 * lo  # no usable slope yet: grow
            elif lo < 0.97 * guess:
                t = int(0.98 * guess)  # just below the predicted limit
            else:
                t = int(1.02 * guess) + 1  # just above it, to close the bracket
            t = min(max(t, lo + 1), cap)
        else:
            # the linear guess when it falls inside the bracket (every third probe bisects instead)
            inside = guess is not None and lo < guess < hi and probes % 3 != 0
            t = min(max(guess if inside else (lo + hi) // 2, lo + 1), hi - 1)
    line = _line(passes)
    return {
        "mb_per_frame": line[0] / MB if line else None,
        "estimate_12gb": int((PAPER_BUDGET - line[1]) / line[0]) if line else None,
        "max_frames": lo or None,
        "first_failing": hi,
        "probes": probes,
        "limited_by": "frame cap" if lo >= cap else (reasons[-1] if reasons else "probe count"),
        "peak_gb": lo_result["peak_bytes"] / GB if lo_result else None,
        "seconds": lo_result.get("seconds"),
    }


def _configs(s: Settings) -> list[tuple[str, str, int, float]]:
    """(kind, policy, W, r) in table order."""
    out = []
    if s.scope in ("tokens", "both"):
        out += [("tokens", "-", w, r) for w in s.windows for r in s.ratios]
    if s.scope in ("runtime", "both"):
        out += [("runtime", p, w, r) for p in s.policies for w in s.windows for r in s.ratios]
    return out


def _budget_bytes(s: Settings) -> int:
    """The budget in bytes; on CPU refused when the machine has less memory available than that."""
    budget = int(s.budget_gb * GB)
    if budget <= 0:
        raise ValueError(f"--budget-gb must be positive, got {s.budget_gb}")
    if not s.device.startswith("cuda"):
        available = available_memory()
        if available is not None and budget > available - GB // 2:
            raise ValueError(f"--budget-gb {s.budget_gb} is more than this machine has available "
                             f"({available / GB:.1f} GB); lower it")
    return budget


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """Search each configuration; a row per configuration, beside the paper's Table 4 / Table 6."""
    budget = _budget_bytes(s)
    ckpt = str(ws.checkpoint())
    ctx = forkserver()
    measure = "torch-allocated device memory" if s.device.startswith("cuda") else "peak resident memory (RSS) of the whole process"
    table = rec.table(
        "maxframes", f"Longest video under {s.budget_gb:g} GB",
        [Column("part", "what runs"), Column("policy", "feature policy"), Column("window", "W"), Column("ratio", "r"),
         Column("max_frames", "max frames T", "frames"), Column("first_failing", "first T that did not fit", "count"),
         Column("limited_by", "limited by"), Column("peak_gb", "peak at max T (GB)", "memory"),
         Column("seconds", "time at max T (s)", "time"), Column("probes", "probes", "count"),
         Column("mb_per_frame", "memory per frame (MB)", "memory"),
         Column("estimate_12gb", "T at 12 GB (linear estimate)", "count"),
         Column("paper", "paper (Titan XP 12 GB, 360x640)")],
        keys=("part", "policy", "window", "ratio"),
        caption=(f"{ws.device}, {s.threads} threads; budget = {measure}, including the model and the framework. "
                 f"Whole-runtime rows segment {s.size[0]}x{s.size[1]} frames from an iterator. Search tolerance "
                 f"{100 * s.tolerance:g}%, each probe limited to {s.probe_timeout:g} s, T capped at {s.frame_cap} (whole runtime: {s.runtime_frame_cap or s.frame_cap}). "
                 "Memory per frame: slope through two passing probes far apart in T; the 12 GB estimate extends that line "
                 "(an extrapolation, not a measurement). Paper figures: Table 4 (r = 1) and Table 6's 2635 frames at "
                 "W = 6, r = 0.75."),
    )
    # the paper measured the full-size R-50's token engine; another model's token counts and widths differ
    mismatch = references.reference_mismatch(ws.config)
    if mismatch:
        rec.note(f"paper column left empty: Table 4 / 6 are for {references.REFERENCE_TEXT}, and {'; '.join(mismatch)}")
    for kind, policy, window, ratio in bar(_configs(s), s.progress, desc="maxframes"):
        job = ProbeJob(kind=kind, checkpoint=ckpt, device=s.device, threads=s.threads, frames=0, window=window,
                       ratio=ratio, budget_bytes=budget, policy="auto" if policy == "-" else policy, size=tuple(s.size))
        cap = s.frame_cap if kind == "tokens" else (s.runtime_frame_cap or s.frame_cap)

        def run_at(t: int, job: ProbeJob = job) -> dict[str, Any]:
            result = probe(ctx, replace(job, frames=t), s.probe_timeout)
            log.info("maxframes %s %s W=%d r=%g T=%d: %s", kind, policy, window, ratio, t,
                     "fits" if result["ok"] else result["reason"])
            return result

        found = search(run_at, 4 * max(window, 1), budget, cap, s.tolerance)
        paper = references.paper_max_frames(window, ratio) if kind == "tokens" and not mismatch else None
        rec.add(table, {"part": "token engine" if kind == "tokens" else "whole runtime", "policy": policy,
                        "window": window, "ratio": ratio, "paper": paper, **found})
    if s.scope in ("tokens", "both"):
        others = rec.table("maxframes_paper_others", "Paper Table 4: other methods (Titan XP 12 GB, 360x640)",
                           [Column("method", "method"), Column("max_frames", "max frames")])
        for method, frames in references.TABLE4_OTHERS.items():
            rec.add(others, {"method": method, "max_frames": frames})
