"""Running benchmarks by name into one results directory; ``all`` runs every one and renders the report."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from . import environment
from .record import Record, load_record
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


class InputError(ValueError):
    """An option names something the benchmarks cannot use; found before anything was measured or written."""


# the benchmarks whose rows are the --backend x --precision pairs asked for
BY_BACKEND = ("e2e", "detector", "backends", "memory", "threads")


def _check_backends(names: list[str], s: Settings) -> None:
    """Each backend named runs one of the precisions asked for on this device, and each precision named runs on
    one of the backends (a benchmark of nothing but rows this machine cannot run would be an empty table). Named
    for benchmarks whose rows are fixed (kernels, precision, ...), they are refused: they were ignored."""
    from .workspace import BackendSpec, available_specs, unavailable_reason

    if not any(n in BY_BACKEND for n in names):
        given = [o for o, v in (("--backend", s.backends), ("--precision", s.precisions)) if v]
        verb = "choose" if len(given) == 2 else "chooses"
        raise InputError(f"{' and '.join(given)} {verb} the rows of {', '.join(BY_BACKEND)}; {', '.join(names)} "
                         "takes neither (its rows are fixed: see its title in --help); drop the option or run one "
                         "of those")
    available, missing = available_specs(s.device)
    backends, precisions = s.backends or ("torch", "onnxruntime"), s.precisions or ("fp32",)
    runs = {(x.backend, x.precision) for x in available}
    for backend in s.backends:
        if not any((backend, p) in runs for p in precisions):
            raise InputError(f"--backend {backend} runs none of the precisions asked for ({', '.join(precisions)}) on "
                             f"{s.device}: {unavailable_reason(BackendSpec(backend, precisions[0]), missing)}")
    for precision in s.precisions:
        if not any((b, precision) in runs for b in backends):
            why = "; ".join(dict.fromkeys(unavailable_reason(BackendSpec(b, precision), missing) for b in backends))
            raise InputError(f"--precision {precision} runs on none of the backends asked for ({', '.join(backends)}) "
                             f"on {s.device}: {why}")


def check_inputs(names: list[str], s: Settings, ws: Workspace) -> None:
    """The preset, model, video and --compare records the options name, checked once before any benchmark runs
    (each would otherwise fail every benchmark in turn, or a comparison after the measuring)."""
    from vita_train.presets import preset

    try:
        preset(s.preset)
    except KeyError as e:
        raise InputError(f"--preset: {e.args[0]}") from None
    try:
        ws.model_info()
    except (ValueError, OSError) as e:  # the loaders' ModelPathError / CheckpointError / ExportFormatError
        raise InputError(f"--model: {e}") from None
    if s.backends or s.precisions:
        _check_backends(names, s)
    if s.video is not None:
        from runtime.video_io import open_video

        try:
            open_video(s.video).close()
        except (ValueError, OSError) as e:  # VideoInputError names the path and what is wrong with it
            raise InputError(f"--video: {e}") from None
    if s.compare is not None:
        if not s.compare.is_dir():
            raise InputError(f"--compare {s.compare} is not a directory; give a results directory of an earlier run")
        present = [s.compare / f"{name}.json" for name in names if (s.compare / f"{name}.json").exists()]
        if not present:
            raise InputError(f"--compare {s.compare} holds no {' / '.join(f'{n}.json' for n in names)} to compare with")
        for path in present:
            try:
                load_record(path)
            except ValueError as e:
                raise InputError(f"--compare: {e}") from None


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

            try:
                compare_record(rec, s.compare)
            except ValueError as e:  # an old record changed since the check: the measurements still stand
                log.error("%s: --compare: %s", name, e)
                rec.note(f"--compare: not compared ({e})")
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
    """Run ``names`` in order into ``s.out``; a failure is logged with its traceback and the rest still run.
    InputError, before anything is measured, when an option names something unusable."""
    configure(s)
    try:
        ws = Workspace(s.preset, s.model, s.device, s.threads)
    except FileNotFoundError as e:  # a --model that does not exist
        raise InputError(str(e)) from None
    records, failed = [], []
    try:
        check_inputs(names, s, ws)
        env = environment.capture(s.threads)
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
