"""Per-frame detector time: ONNX Runtime vs torch eager, same weights, same run, same machine.

  python -m benchmarks detector-backends [--preset vita_r50_ytvis19] [--size 360x640] [--frames 10] [--threads 2]
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


def _time_per_frame(fn: Callable[[np.ndarray], object], frames: np.ndarray, warmup: int) -> list[float]:
    for f in frames[:warmup]:
        fn(f[None])
    times = []
    for f in frames[warmup:]:
        start = time.perf_counter()
        fn(f[None])
        times.append(time.perf_counter() - start)
    return times


def run(preset: str, size: tuple[int, int], frames: int, threads: int, out_dir: Path, warmup: int = 2) -> dict:
    """Export a randomly initialised preset at a fixed size, time both backends on the same frames."""
    import onnxruntime as ort
    import torch

    from export import ExportOptions, export_model
    from export.graphs import DetectorGraph
    from vita_train import VitaModel, preset as get_preset, save_checkpoint

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = VitaModel(get_preset(preset)).eval()
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (frames + warmup, *size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{preset}.pth"
        save_checkpoint(ckpt, model)
        start = time.perf_counter()
        export_dir = export_model(ckpt, ExportOptions(out=Path(tmp) / "export", size=size, validation_frames=(1, 7)))
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(export_dir / "detector.onnx"), options, providers=["CPUExecutionProvider"])
        graph = DetectorGraph(model).eval()

        def torch_detect(x: np.ndarray) -> object:
            with torch.no_grad():
                return graph(torch.from_numpy(x))

        torch_times = _time_per_frame(torch_detect, clip, warmup)
        ort_times = _time_per_frame(lambda x: sess.run(None, {"frames": x}), clip, warmup)
    report = {
        "benchmark": "detector-backends",
        "preset": preset,
        "frame_size": list(size),
        "frames_timed": frames,
        "threads": threads,
        "torch_eager_s_per_frame": statistics.median(torch_times),
        "onnxruntime_s_per_frame": statistics.median(ort_times),
        "onnxruntime_speedup": statistics.median(torch_times) / statistics.median(ort_times),
        "export_s": export_s,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "detector_backends.json").write_text(json.dumps(report, indent=1))
    (out_dir / "detector_backends.md").write_text(
        f"| backend | s/frame ({preset}, {size[0]}x{size[1]}, {threads} threads) |\n|---|---|\n"
        f"| torch eager | {report['torch_eager_s_per_frame']:.3f} |\n"
        f"| onnxruntime | {report['onnxruntime_s_per_frame']:.3f} |\n\n"
        f"onnxruntime / torch speed-up: {report['onnxruntime_speedup']:.2f}x\n"
    )
    return report
