"""``python -m benchmarks <name> ...`` (also ``vita-bench``): run benchmarks, write JSON + markdown + plots."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from .settings import QUICK, Settings
from .suite import BENCHMARKS, BenchmarkFailed, InputError

NAMES = list(BENCHMARKS) + ["all"]
# the old single benchmark: the detector, torch vs onnxruntime, one frame per call at 360p
ALIASES = {"detector-backends": "detector"}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 360x640, got {text!r}") from None
    return h, w


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("all benchmarks")
    g.add_argument("--out", type=Path, default=None, help="results directory (default bench_results)")
    g.add_argument("--preset", default=None, help="model preset with random weights (default vita_r50_ytvis19; vita_tiny with --quick)")
    g.add_argument("--model", type=Path, default=None, help="a checkpoint or an export directory instead of random weights")
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default cuda when torch sees one, else cpu)")
    g.add_argument("--backend", action="append", choices=("torch", "onnxruntime", "tensorrt"), help="repeatable")
    g.add_argument("--precision", action="append", choices=("fp32", "fp16", "bf16"), help="repeatable (default fp32)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: all usable)")
    g.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median, min, max)")
    g.add_argument("--warmup", type=int, default=None, help="untimed runs first")
    g.add_argument("--quick", action="store_true", help="vita_tiny and small sizes (about a minute for `all` on 2 cores)")
    g.add_argument("--compare", type=Path, default=None, metavar="OLD_DIR", help="flag >10%% regressions against an older results directory")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bars (default: when stderr is a terminal)")
    g = common.add_argument_group("e2e, prune, backends")
    g.add_argument("--video", type=Path, default=None, help="a video file instead of the generated clip")
    g.add_argument("--frames", type=int, default=None, help="generated clip length (default 36)")
    g.add_argument("--size", type=_size, default=None, help="generated clip size HxW (default 360x640)")
    g.add_argument("--compile", action="store_true", help="also run each torch row with the detector through torch.compile")
    g.add_argument("--official-s-per-frame", type=float, default=None, metavar="S",
                   help="the official code's s/frame measured on this machine with the full-size R-50 on the "
                        "36-frame 360x640 clip (e2e's speed-up column, filled only for that setting; default: the "
                        "recorded figure for this CPU kind, if any)")
    g.add_argument("--detector-streams", type=_ints, default=None, metavar="N[,N...]",
                   help="e2e: a CPU torch / onnxruntime row for each count of detector calls run at once (default: "
                        "the backend's choice, 2 with two threads or more)")
    g = common.add_argument_group("detector")
    g.add_argument("--batches", type=_ints, default=None, help="comma-separated batch sizes (default 1,2,4,8,16)")
    g.add_argument("--resolutions", type=_ints, default=None, help="shortest edges, 16:9 frames (default 360,480,720)")
    g = common.add_argument_group("tokens")
    g.add_argument("--min-frames", type=int, default=None, help="smallest T (default 36)")
    g.add_argument("--max-frames", type=int, default=None, help="largest T (default 10000)")
    g.add_argument("--points", type=int, default=None, help="log-spaced values of T (default 7)")
    g.add_argument("--prune-frames", type=int, default=None, help="T of the pruning-ratio rows (default 360)")
    g.add_argument("--kernel-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="also run benchmarks.kernels.token_scale at the same T (default on; it doubles the time)")
    g = common.add_argument_group("maxframes")
    g.add_argument("--budget-gb", type=float, default=None, help="memory budget (default 12): host RSS on CPU, torch-allocated on CUDA")
    g.add_argument("--windows", type=_ints, default=None, help="window sizes W (default 3,6,12)")
    g.add_argument("--ratios", type=_floats, default=None, help="pruning ratios r (default 1.0,0.75,0.5)")
    g.add_argument("--scope", choices=("tokens", "runtime", "both"), default=None, help="token engine, whole runtime, or both")
    g.add_argument("--policies", type=lambda t: tuple(t.split(",")), default=None, help="feature policies of the runtime rows")
    g.add_argument("--probe-timeout", type=float, default=None, help="seconds one probe may take (default 600)")
    g.add_argument("--tolerance", type=float, default=None, help="stop when the bracket is this fraction of T (default 0.02)")
    g.add_argument("--frame-cap", type=int, default=None, help="largest T probed (default 100000)")
    g.add_argument("--runtime-frame-cap", type=int, default=None, help="largest T probed for the whole runtime (default: --frame-cap)")
    g = common.add_argument_group("prune")
    g.add_argument("--prune-ratios", type=_floats, default=None, help="r values (default 1.0,0.9,0.75,0.5,0.25)")
    g = common.add_argument_group("memory")
    g.add_argument("--lengths", type=_ints, default=None, help="clip lengths in frames, one fresh process each (default 36,360)")

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="name", required=True)
    for name in NAMES:
        title = BENCHMARKS[name][1] if name in BENCHMARKS else "every benchmark above, then the report"
        sub.add_parser(name, parents=[common], help=title)
    sub.add_parser("detector-backends", parents=[common], help="old name of `detector --batches 1 --resolutions 360`")
    rep = sub.add_parser("report", help="render every results JSON of a directory into one markdown page")
    rep.add_argument("dir", type=Path)
    rep.add_argument("--out", type=Path, default=None, help="markdown file, or a folder for report.md (default DIR/report.md)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings: defaults, then --quick's, then what the command line names."""
    s = dataclasses.replace(Settings(), **QUICK, quick=True) if args.quick else Settings()
    if args.name == "detector-backends":
        s.batches, s.resolutions = (1,), (360,)
    named = {
        "out": args.out, "preset": args.preset, "model": args.model, "threads": args.threads, "repeats": args.repeats,
        "warmup": args.warmup, "compare": args.compare, "video": args.video, "frames": args.frames, "size": args.size,
        "batches": args.batches, "resolutions": args.resolutions, "min_frames": args.min_frames,
        "max_frames": args.max_frames, "points": args.points, "prune_frames": args.prune_frames, "kernel_scale": args.kernel_scale,
        "budget_gb": args.budget_gb, "windows": args.windows, "ratios": args.ratios, "scope": args.scope,
        "policies": args.policies, "probe_timeout": args.probe_timeout, "tolerance": args.tolerance, "frame_cap": args.frame_cap, "runtime_frame_cap": args.runtime_frame_cap,
        "prune_ratios": args.prune_ratios, "lengths": args.lengths, "official_s_per_frame": getattr(args, "official_s_per_frame", None),
        "detector_streams": getattr(args, "detector_streams", None),
    }
    for key, value in named.items():
        if value is not None:
            setattr(s, key, value)
    s.size = tuple(s.size)
    for key in ("batches", "resolutions", "windows", "ratios", "policies", "prune_ratios", "lengths", "precisions", "backends",
                "detector_streams"):
        setattr(s, key, tuple(getattr(s, key)))
    s.out = Path(s.out)
    s.backends = tuple(args.backend or ())
    s.precisions = tuple(args.precision or ())
    s.compile = bool(getattr(args, "compile", False))
    if args.threads is None:
        s.threads = _usable_cpus()
    if args.device is None:
        import torch

        s.device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        s.device = args.device
    s.progress = sys.stderr.isatty() if args.progress is None else args.progress
    check_settings(s)
    return s


def check_settings(s: Settings) -> None:
    """Option values no benchmark can use, refused before anything runs: ValueError naming the option."""
    if s.out.exists() and not s.out.is_dir():
        raise ValueError(f"--out {s.out} is a file; give a directory (it is made if missing)")
    if s.compare is not None and s.compare.resolve() == s.out.resolve():
        # the first row written would replace the very record it is to be compared with
        raise ValueError(f"--compare {s.compare} is the --out folder; write the new run to another folder "
                         "(--out NEW) to compare it with the results already there")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", s.device):
        raise ValueError(f"--device {s.device}: use cpu, cuda or cuda:N")
    if s.device.startswith("cuda"):
        import torch

        index = int(s.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {s.device}: torch sees {torch.cuda.device_count()} CUDA devices here; "
                             "use --device cpu" + (f" or cuda:0..{torch.cuda.device_count() - 1}"
                                                   if torch.cuda.device_count() else ""))
    if s.official_s_per_frame is not None and not s.official_s_per_frame > 0:
        raise ValueError(f"--official-s-per-frame must be a positive number of seconds, got {s.official_s_per_frame}")
    if any(n < 1 for n in s.detector_streams):
        raise ValueError(f"--detector-streams: counts of detector calls at once must be >= 1, got {list(s.detector_streams)}")
    if s.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {s.warmup}")
    counts = {"--repeats": [s.repeats], "--threads": [s.threads], "--frames": [s.frames], "--batches": s.batches,
              "--resolutions": s.resolutions, "--min-frames": [s.min_frames], "--max-frames": [s.max_frames],
              "--points": [s.points], "--prune-frames": [s.prune_frames], "--lengths": s.lengths,
              "--windows": s.windows, "--frame-cap": [s.frame_cap],
              "--runtime-frame-cap": [s.runtime_frame_cap] if s.runtime_frame_cap is not None else []}
    for option, values in counts.items():
        if any(v < 1 for v in values):
            raise ValueError(f"{option} must be >= 1, got {','.join(map(str, values))}")
    if min(s.size) < 1:
        raise ValueError(f"--size must be HxW with both at least 1, e.g. 360x640, got {s.size[0]}x{s.size[1]}")
    for option, values in {"--batches": s.batches, "--lengths": s.lengths, "--windows": s.windows,
                           "--ratios": s.ratios, "--prune-ratios": s.prune_ratios}.items():
        if not values:
            raise ValueError(f"{option} needs at least one value")
    if s.min_frames > s.max_frames:
        raise ValueError(f"--min-frames {s.min_frames} is more than --max-frames {s.max_frames}")
    for option, values in {"--ratios": s.ratios, "--prune-ratios": s.prune_ratios}.items():
        if any(not 0 < r <= 1 for r in values):
            raise ValueError(f"{option}: pruning ratios are the fraction of tokens kept, in (0, 1], got "
                             f"{','.join(f'{r:g}' for r in values)}")
    for option, value in {"--budget-gb": s.budget_gb, "--probe-timeout": s.probe_timeout,
                          "--tolerance": s.tolerance}.items():
        if not value > 0:
            raise ValueError(f"{option} must be a positive number, got {value:g}")



def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 1 when a benchmark failed, 130 when interrupted (results so far are written)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.name == "report":
        from .report import write_report

        try:
            path = write_report(args.dir, args.out)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(path)
        return 0
    try:
        s = settings_from(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from runtime.cli_options import StopSignals

    from .suite import run

    StopSignals()  # a kill ends like Ctrl-C: results written, probes stopped
    name = ALIASES.get(args.name, args.name)
    names = list(BENCHMARKS) if name == "all" else [name]
    try:
        records = run(names, s)
    except KeyboardInterrupt:
        print(f"interrupted: the results measured so far are in {s.out}", file=sys.stderr)
        return 130
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BenchmarkFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for rec in records:
        print(rec.md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
