"""``python -m benchmarks.trt_check --out DIR``: TensorRT engines of the r50_tiny fixture, built, run, and held to
onnxruntime. A check for a CUDA machine (benchmarks/gpu.sh runs it); elsewhere it writes why it skipped.

Configs: ``fp32`` (TF32 off, so fp32 kernels are fp32), ``fp16`` (strongly typed, from the fp16 graph variant
with the mixed-precision policy of export/reduced_precision.py) and ``fp32-plugin`` (--msda trt-plugin: the
deformable-attention plugin at the version this TensorRT recommends). For each: build times, engine sizes, the
detector's and the token engine's outputs against onnxruntime on the same inputs (the fp32 graphs, CPU), and
the whole pipeline (runtime.segment) against the onnxruntime backend: labels, scores, mask IoU.

Writes DIR/trt_check.json; exits 0 when every config passes or when the check is skipped (no TensorRT, no
cuda-python, no CUDA device, no fixture), 1 when a config fails, 2 on a setup error (e.g. cuda-python's CUDA major
differs from TensorRT's).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vita_train.utils.atomic import atomic_write

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURE = REPO.parent / "shared" / "fixtures" / "official" / "r50_tiny"
CONFIGS = ("fp32", "fp16", "fp32-plugin")
# what each config must meet: max |a - b| / max |b| per output, against onnxruntime's fp32 graph on the same input;
# and end to end, the same labels with mask IoU at least ``iou``. fp16 figures are rounding plus the
# attention-mask threshold decisions fp16 flips (see tests/test_tensorrt.py); they are reported, judged end to end
# (the fp16 graph variant through onnxruntime on a CPU: same labels, IoU mean 0.989, min 0.984, scores within 5e-3).
TOLERANCE = {
    "fp32": {"detector": 1e-3, "tokens": 1e-3, "iou": 0.99},
    "fp32-plugin": {"detector": 1e-3, "tokens": 1e-3, "iou": 0.99},
    "fp16": {"detector": None, "tokens": 5e-2, "iou": 0.9},
}


def _rel(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """max |a - b| and the same over max |b|."""
    diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return {"max_abs": diff, "rel": diff / scale if scale else diff}


def probe() -> tuple[Optional[str], dict[str, Any]]:
    """(reason to skip or None, environment facts). Raises ImportError for a CUDA-major mismatch."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import tensorrt as trt
    except ImportError as e:
        return f"tensorrt is not importable ({e}); pip install 'vita-toolkit[gpu-cu12]' or '[gpu-cu13]'", env
    env["tensorrt"] = trt.__version__
    from runtime.backends import tensorrt_backend as backend

    try:
        cudart = backend._import_cudart()
    except ImportError as e:
        return f"cuda-python is not importable ({e})", env
    backend._import_tensorrt()  # the CUDA-major check: ImportError with what to install
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return f"no CUDA device (cudaGetDeviceCount: {getattr(err, 'name', err)}, {count})", env
    err, props = cudart.cudaGetDeviceProperties(0)
    if err == cudart.cudaError_t.cudaSuccess:
        name = props.name
        env["gpu"] = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    err, driver = cudart.cudaDriverGetVersion()
    env["cuda_driver"] = int(driver) if err == cudart.cudaError_t.cudaSuccess else None
    return None, env


def _export(ckpt: Path, out: Path, msda: str) -> Path:
    from export import ExportOptions, export_model

    # validation (against the torch model) is the export tests' job; here only the graphs matter. Small
    # profiles keep the builds short: the fixture's 120x200 frames resize to 128x213, inside 320x320, batch 8
    opts = ExportOptions(out=out, validate=False, msda=msda, precision="fp16" if msda == "plain" else None,
                         max_size=320, max_batch=8, max_frames=64)
    return export_model(ckpt, opts)


def _build(src: Path, dst: Path, precision: str, timing_cache: Optional[Path]) -> dict[str, Any]:
    """Copy the export ``src`` to ``dst`` and build its engines there; returns what the build took."""
    from export.tensorrt import TIMING_CACHE_FILE, build_engines
    from vita_train.export_format import METADATA_FILE

    shutil.copytree(src, dst)
    if timing_cache is not None and timing_cache.is_file():
        shutil.copy(timing_cache, dst / TIMING_CACHE_FILE)  # same TensorRT and GPU: reuse measured kernels
    meta = json.loads((dst / METADATA_FILE).read_text())
    start = time.perf_counter()
    build_engines(dst, meta, precision=precision, tf32=False, workspace_gb=2.0)
    seconds = time.perf_counter() - start
    (dst / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    return {
        "build_s": round(seconds, 2),
        "engines_mb": {g: round((dst / r["file"]).stat().st_size / 2**20, 2) for g, r in meta["tensorrt"]["engines"].items()},
        "plan": {g: r["plan"] for g, r in meta["tensorrt"]["engines"].items()},
        "plugin_version": meta["tensorrt"]["plugin_version"],
        "tf32": False,
    }


def _compare_graphs(ref_dir: Path, trt_dir: Path, frames: np.ndarray) -> dict[str, Any]:
    """Detector and token engine against onnxruntime's fp32 graphs, on the same inputs."""
    import onnxruntime as ort

    from runtime.backends.tensorrt_backend import TensorRTBackend
    from vita_train.export_format import read_metadata

    det = ort.InferenceSession(str(ref_dir / "detector.onnx"), providers=["CPUExecutionProvider"])
    tok = ort.InferenceSession(str(ref_dir / "vita_tokens.onnx"), providers=["CPUExecutionProvider"])
    names = ["frame_queries", "frame_logits", "mask_features"]
    ref = dict(zip(names, det.run(None, {"frames": frames})))
    index = np.broadcast_to(np.arange(ref["frame_queries"].shape[1]), ref["frame_queries"].shape[:2]).astype(np.int64)
    ref_logits, ref_embed = tok.run(None, {"frame_queries": ref["frame_queries"], "query_index": index})
    with TensorRTBackend(trt_dir, read_metadata(trt_dir), "cuda:0") as backend:
        out = backend._run_detector(frames)
        logits, embed = backend.track([ref["frame_queries"]], None, None)
    return {
        "detector": {n: _rel(out[n], ref[n]) for n in names},
        "tokens": {"pred_logits": _rel(logits, ref_logits), "mask_embed": _rel(embed, ref_embed)},
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _compare_segment(ref_dir: Path, trt_dir: Path, frames: np.ndarray) -> dict[str, Any]:
    """runtime.segment through TensorRT against the onnxruntime backend: labels, scores, matched mask IoU.

    Each onnxruntime instance is matched to the unused TensorRT instance of its label with the best mask IoU
    (several instances often share a label and near-equal scores, so matching by score can pair the wrong ones).
    """
    import runtime

    ref = runtime.segment(frames, runtime.load(ref_dir, backend="onnxruntime"))
    got = runtime.segment(frames, runtime.load(trt_dir, backend="tensorrt"))
    ref_masks = [np.stack([ref.mask(i, t) for t in range(ref.num_frames)]) for i in range(len(ref.instances))]
    got_masks = [np.stack([got.mask(j, t) for t in range(got.num_frames)]) for j in range(len(got.instances))]
    ious, score_diffs, used = [], [], set()
    for i, inst in enumerate(ref.instances):
        candidates = [j for j, g in enumerate(got.instances) if g.label == inst.label and j not in used]
        if not candidates:
            ious.append(0.0)
            continue
        j = max(candidates, key=lambda j: _iou(ref_masks[i], got_masks[j]))
        used.add(j)
        ious.append(_iou(ref_masks[i], got_masks[j]))
        score_diffs.append(abs(got.instances[j].score - inst.score))
    return {
        "labels_onnxruntime": sorted(i.label for i in ref.instances),
        "labels_tensorrt": sorted(i.label for i in got.instances),
        "mask_iou_mean": float(np.mean(ious)) if ious else None,
        "mask_iou_min": float(np.min(ious)) if ious else None,
        "score_diff_max": float(np.max(score_diffs)) if score_diffs else None,
    }


def _judge(name: str, result: dict[str, Any]) -> list[str]:
    """What ``result`` misses of TOLERANCE[name]; empty when it passes."""
    tol, misses = TOLERANCE[name], []
    for part in ("detector", "tokens"):
        if tol[part] is None:
            continue
        for output, err in result["graphs"][part].items():
            if err["rel"] > tol[part]:
                misses.append(f"{part} {output}: rel {err['rel']:.2e} > {tol[part]:.0e}")
    seg = result["segment"]
    if seg["labels_tensorrt"] != seg["labels_onnxruntime"]:
        misses.append(f"labels differ: {seg['labels_tensorrt']} vs {seg['labels_onnxruntime']}")
    if seg["mask_iou_min"] is not None and seg["mask_iou_min"] < tol["iou"]:
        misses.append(f"mask IoU min {seg['mask_iou_min']:.3f} < {tol['iou']}")
    return misses


def run(out: Path, fixture: Path, configs: tuple[str, ...]) -> dict[str, Any]:
    """The whole check; the report as written to JSON."""
    report: dict[str, Any] = {"check": "tensorrt", "fixture": str(fixture), "configs": {}}
    try:
        reason, env = probe()
    except ImportError as e:
        return {**report, "status": "error", "reason": str(e)}
    report["environment"] = env
    if reason is None and not (fixture / "model_final.pth").is_file():
        reason = f"no fixture checkpoint at {fixture / 'model_final.pth'}"
    if reason is not None:
        return {**report, "status": "skipped", "reason": f"skipped: {reason}"}
    frames = np.load(fixture / "frames.npy")
    ckpt, work = fixture / "model_final.pth", out / "work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        plain = _export(ckpt, work / "export_plain", "plain")  # the onnxruntime reference, and its fp16 variants
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        return {**report, "status": "failed", "reason": f"export failed: {type(e).__name__}: {e}"}
    plugin, cache = None, None
    for name in configs:
        try:
            if name == "fp32-plugin":
                plugin = plugin or _export(ckpt, work / "export_plugin", "trt-plugin")
            dst = work / name
            result: dict[str, Any] = {"build": _build(plugin if name == "fp32-plugin" else plain, dst,
                                                      name.split("-")[0], cache)}
            cache = dst / "tensorrt.timing_cache"
            result["graphs"] = _compare_graphs(plain, dst, frames[:4])
            result["segment"] = _compare_segment(plain, dst, frames)
            result["tolerance"] = TOLERANCE[name]
            result["misses"] = _judge(name, result)
            result["status"] = "ok" if not result["misses"] else "failed"
        except Exception as e:  # noqa: BLE001 - one config's failure is reported, the others still run
            log.exception("config %s failed", name)
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        report["configs"][name] = result
    failed = [n for n, r in report["configs"].items() if r["status"] != "ok"]
    report["status"] = "failed" if failed else "ok"
    return report


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.trt_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for trt_check.json (and the work files)")
    p.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="official fixture directory (r50_tiny)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--keep", action="store_true", help="keep the exports and engines under OUT/work")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configs = tuple(c for c in args.configs.split(",") if c)
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {CONFIGS}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.out, args.fixture, configs)
    if not args.keep:
        shutil.rmtree(args.out / "work", ignore_errors=True)
    text = json.dumps(report, indent=1)
    atomic_write(args.out / "trt_check.json", lambda f: f.write(text.encode()))
    summary = report.get("reason") or ", ".join(f"{n}: {r['status']}" for n, r in report["configs"].items())
    print(f"trt_check: {report['status']}; {summary} ({args.out / 'trt_check.json'})")
    return {"ok": 0, "skipped": 0, "failed": 1}.get(report["status"], 2)


if __name__ == "__main__":
    sys.exit(main())
