"""``tokens``: token engine time and peak memory vs the number of frames T and vs the pruning ratio r,
with the fitted exponents of time and memory in T (the paper's claim: linear in T).

Frame queries are random: the engine's cost does not depend on their values. Each T runs in a fresh
process (as maxframes' probes do), so memory freed by one size does not hide the next one's peak.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from vita_train.inference.pruning import kept_per_frame

from .measure import GB, MB, available_memory, geometric_points, power_fit
from .plots import scaling
from .probe import ProbeJob, forkserver, probe
from .progress import bar
from .record import Column, Record, Table, scaled, stat
from .settings import Settings
from .workspace import Workspace

log = logging.getLogger(__name__)


def _measure(ctx: Any, job: ProbeJob, s: Settings) -> Optional[dict[str, Any]]:
    """Run ``job`` in a fresh child; {seconds (stat), peak_memory_mb} or None with the reason logged."""
    result = probe(ctx, job, s.probe_timeout)
    if not result["ok"]:
        log.warning("token engine at T=%d, r=%g did not complete: %s", job.frames, job.ratio, result["reason"])
        return None
    out = {"seconds": stat(result["times"]), "peak_memory_mb": max(result["growth_bytes"], 1) / MB}
    if "process_peak_bytes" in result:
        out["process_peak_mb"] = result["process_peak_bytes"] / MB
    return out


def _columns(first: Column) -> list[Column]:
    return [first, Column("tokens", "tokens per frame", "count"), Column("seconds", "token engine (s)", "time"),
            Column("ms_per_frame", "per frame (ms)", "time"), Column("peak_memory_mb", "peak memory above baseline (MB)", "memory"),
            Column("process_peak_mb", "process peak RSS (MB)", "memory")]


def _kernel_rows(rec: Record, s: Settings, ws: Workspace, frames: list[int]) -> None:
    """Rows from benchmarks.kernels.token_scale (the fused token engine), when that module exists."""
    try:
        from . import kernels
    except ImportError:
        rec.note("fused token engine: benchmarks.kernels is not present yet (kernels/ not present yet)")
        return
    # each T is a fresh process there too: in quick mode only the longest one
    rows = kernels.token_scale(s.preset, frames[-1:] if s.quick else frames, ws.device, threads=s.threads,
                               timeout=s.probe_timeout)
    if rows:
        from .kernel_suite import rows_table

        rows_table(rec, "kernels_tokens", "Fused token engine (benchmarks.kernels.token_scale)", rows,
                   "As measured by benchmarks.kernels.token_scale.")


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """Token engine over log-spaced T, then over the pruning ratios at ``prune_frames``; fits and plot."""
    cfg = ws.config
    n, c, w = cfg.frame_decoder.num_queries, cfg.frame_decoder.hidden_dim, cfg.vita.window
    where = f"{ws.device}, {s.threads} threads, W={w}, {n} tokens per frame (C={c})"
    available = available_memory()
    job = ProbeJob(kind="tokens", checkpoint=str(ws.checkpoint()), device=ws.device, threads=s.threads, frames=0,
                   window=w, ratio=1.0, budget_bytes=(available - GB) if available else 2**62,
                   warmup=s.warmup, repeats=s.repeats)
    ctx = forkserver()
    by_t = rec.table(
        "tokens_vs_frames", "Token engine vs number of frames T", _columns(Column("frames", "frames T", "count")),
        keys=("frames",),
        caption=(f"{where}; each T in a fresh process: median (min–max) over {s.repeats} runs after "
                 f"{s.warmup} warm-up (after a one-frame priming run); peak memory is the growth of peak RSS (CPU) or of torch-allocated "
                 "memory (CUDA) over what the process held before the T frames' tokens were made (the tokens count); the "
                 "process holds torch and the VitaModule alone, and the engine overwrites the tokens in place as the runtime "
                 "does; process peak RSS is the whole process's, loading included."),
    )
    for t in bar(geometric_points(s.min_frames, s.max_frames, s.points), s.progress, desc="tokens vs T"):
        m = _measure(ctx, replace(job, frames=t), s)
        if m is None:
            rec.note(f"T={t} and longer were not measured: the run did not complete (memory or --probe-timeout)")
            break
        rec.add(by_t, {"frames": t, "tokens": n, "ms_per_frame": scaled(m["seconds"], 1000 / t), **m})
    fits = _fit(rec, by_t, c)
    by_r = rec.table("tokens_vs_ratio", f"Token engine vs pruning ratio r (T = {s.prune_frames})",
                     _columns(Column("ratio", "ratio r", "count")), keys=("ratio",),
                     caption=f"{where}; kept tokens per frame = ceil(r x {n}), at random slots.")
    for r in bar(s.prune_ratios, s.progress, desc="tokens vs r"):
        m = _measure(ctx, replace(job, frames=s.prune_frames, ratio=r), s)
        if m is not None:
            rec.add(by_r, {"ratio": r, "tokens": kept_per_frame(n, r), "ms_per_frame": scaled(m["seconds"], 1000 / s.prune_frames), **m})
    if s.kernel_scale and by_t.rows:
        _kernel_rows(rec, s, ws, [r["frames"] for r in by_t.rows])
    rec.plots += scaling(rec.out_dir / "tokens.png", by_t, fits, f"{cfg.name} token engine, {where} (random weights)")


def _fit(rec: Record, table: Table, channels: int) -> dict[tuple[str, str], tuple[float, float, int, int]]:
    """Power-law exponents of time and memory in T, over all T and over the longest decade, as a table.

    A fixed cost (the engine's bounded chunk buffers, per-call overhead) bends the curve at small T, so the
    exponent over the longest decade (T >= max T / 10) is the one that says how long videos scale. Memory
    is also fitted as it is built, a linear term (the tokens) plus a constant (the working set): the
    least-squares line gives both, and the exponent of memory minus that constant shows what is left.
    """
    rows = table.rows
    if len(rows) < 2:
        return {}
    quantities = {"time": lambda r: r["seconds"]["median"], "memory": lambda r: r["peak_memory_mb"]}
    t_max = max(r["frames"] for r in rows)
    ranges = {"all T": rows, "longest decade": [r for r in rows if r["frames"] >= t_max / 10]}
    out = rec.table("tokens_fit", "Fitted exponents: quantity ~ c * T^p",
                    [Column("quantity", "quantity"), Column("over", "fitted over"), Column("range", "T"),
                     Column("points", "points", "count"), Column("exponent", "exponent p", "change")],
                    caption="Least squares in log-log space; p near 1 means linear in T.")
    fits: dict[tuple[str, str], tuple[float, float, int, int]] = {}
    for over, subset in ranges.items():
        if len(subset) < 2:
            continue
        t = [r["frames"] for r in subset]
        for name, get in quantities.items():
            p, c = power_fit(t, [get(r) for r in subset])
            fits[(name, over)] = (p, c, min(t), max(t))
            rec.add(out, {"quantity": f"token engine {name}", "over": over, "range": f"{min(t)}–{max(t)}",
                          "points": len(t), "exponent": p})
    t = np.asarray([r["frames"] for r in rows], dtype=float)
    memory = np.asarray([r["peak_memory_mb"] for r in rows], dtype=float)
    per_frame, constant = (float(v) for v in np.polyfit(t, memory, 1))
    fits[("memory line", "all T")] = (per_frame, constant, int(t.min()), int(t.max()))
    # at small T the tokens are a sliver of the constant: fit what is left where T >= max T / 10
    decade = t >= t_max / 10
    rest, t_rest = memory[decade] - constant, t[decade]
    if per_frame > 0 and len(t_rest) >= 2 and (rest > 0).all():
        p, _ = power_fit(list(t_rest), list(rest))
        rec.add(out, {"quantity": f"token engine memory − {constant:.0f} MB constant (b below)", "over": "longest decade",
                      "range": f"{int(t_rest.min())}–{int(t_rest.max())}", "points": len(t_rest), "exponent": p})
    line = rec.table("tokens_memory_line", "Memory as tokens plus a constant: memory = a * T + b",
                     [Column("per_frame_mb", "a: MB per frame", "memory"), Column("constant_mb", "b: constant (MB)", "change"),
                      Column("token_mb_per_frame", "tokens alone (MB per frame)", "memory")],
                     caption="Least-squares line through the peak memory above baseline at every T; the tokens alone "
                     "are N x C x 4 bytes per frame (fp32).")
    tokens = rows[0]["tokens"]
    rec.add(line, {"per_frame_mb": per_frame, "constant_mb": constant,
                   "token_mb_per_frame": tokens * channels * 4 / MB})
    return fits
