"""Running benchmarks by name into one results directory; ``all`` runs every one and renders the report."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from . import environment
from .record import Record
from .settings import Settings
from .workspace import Workspace

log = logging.getLogger(__name__)

# name -> (module, title); the order is the order of `all`
BENCHMARKS: dict[str, tuple[str, str]] = {
    "e2e": ("benchmarks.e2e", "End to end (runtime.segment)"),
    "detector": ("benchmarks.detector", "Detector latency and throughput"),
    "tokens": ("benchmarks.tokens", "Token engine scaling in T"),
    "maxframes": ("benchmarks.maxframes", "Longest video under a memory budget"),
    "prune": ("benchmarks.prune", "Token pruning: speed and agreement"),
    "backends": ("benchmarks.backends", "Backends side by side"),
    "kernels": ("benchmarks.kernel_suite", "Fast kernels against their references"),
    "memory": ("benchmarks.memory", "Peak memory of a fresh process, in video length"),
    "threads": ("benchmarks.caller_thread", "Segmenting on a worker thread"),
    "precision": ("benchmarks.precision_suite", "bf16 against fp32, beside fp32 against itself"),
}


class BenchmarkFailed(RuntimeError):
    """One or more benchmarks raised; their JSON says ``failed`` and holds what was measured."""


def configure(s: Settings) -> None:
    """Thread counts for torch (onnxruntime gets them per session)."""
    import torch

    torch.set_num_threads(s.threads)


def run_one(name: str, s: Settings, ws: Workspace, env: dict[str, Any]) -> Record:
    """Run benchmark ``name``; its files are written as it goes and marked complete / interrupted / failed."""
    module_name, title = BENCHMARKS[name]
    # the machine's matmul rate just before and just after this benchmark: its own copy of the environment
    rates = {"before": environment.machine_rates(s.device)}
    rec = Record(name, title, s.out, {**env, "matmul_gflops": rates}, s.to_dict())
    rec.model = ws.model_info()
    rec.flush()
    try:
        importlib.import_module(module_name).run(s, ws, rec)
        rates["after"] = environment.machine_rates(s.device)
        if s.compare is not None:
            from .compare import compare_record

            compare_record(rec, s.compare)
    except KeyboardInterrupt:
        rec.finish("interrupted")
        raise
    except Exception as e:
        rec.note(f"failed: {type(e).__name__}: {e}")
        rec.finish("failed")
        raise
    rec.finish("complete")
    log.info("%s: wrote %s and %s", name, rec.json_path, rec.md_path)
    return rec


def run(names: list[str], s: Settings) -> list[Record]:
    """Run ``names`` in order into ``s.out``; a failure is logged with its traceback and the rest still run."""
    configure(s)
    env = environment.capture(s.threads)
    ws = Workspace(s.preset, s.model, s.device, s.threads)
    records, failed = [], []
    try:
        for name in names:
            try:
                records.append(run_one(name, s, ws, env))
            except Exception as e:
                log.error("benchmark %s failed: %s: %s", name, type(e).__name__, e, exc_info=True)
                failed.append(name)
    finally:
        ws.close()
    if len(names) > 1:
        from .report import write_report

        write_report(s.out)
    if failed:
        raise BenchmarkFailed(f"benchmarks {failed} failed; see their JSON/markdown in {s.out} and the log above")
    return records
