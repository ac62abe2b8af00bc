"""The kernels package measured: each fast kernel against its plain reference, and the token engine's
time and peak memory against the number of frames T (each T in a fresh process).

``measure`` and ``token_scale`` are what the ``kernels`` and ``tokens`` suites call; ``python -m
benchmarks.kernels {measure,scale}`` runs them alone and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import kernels
from kernels import reference

REPO = Path(__file__).resolve().parents[1]


def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def _compare(name: str, shape: str, ref: Callable[[], Any], fast: Callable[[], Any], device: str, repeats: int) -> dict:
    """Best-of-``repeats`` times of both, interleaved (the machine may be shared), and their max abs difference."""
    timed = _timer(device)
    out_ref, out_fast = ref(), fast()  # warm-up (and Triton compilation)
    best_ref = best_fast = math.inf
    for _ in range(repeats):
        best_ref = min(best_ref, timed(ref))
        best_fast = min(best_fast, timed(fast))
    if isinstance(out_ref, tuple):
        err = max(float((a - b).abs().max()) for a, b in zip(out_ref, out_fast))
    else:
        err = float((out_ref - out_fast).abs().max())
    impl = kernels.resolve("auto", torch.device(device).type)
    return {"name": name, "shape": shape, "kernel": impl, "device": device, "reference_s": best_ref,
            "kernel_s": best_fast, "speedup": best_ref / best_fast, "max_abs_error": err}


def _msda_case(frames: int, height: int, width: int, device: str, seed: int = 0):
    """Pixel-decoder deformable attention of ``frames`` frames of height x width: levels 1/8, 1/16, 1/32."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(math.ceil(height / s), math.ceil(width / s)) for s in (8, 16, 32)]
    total = sum(h * w for h, w in shapes)
    value = torch.randn(frames, total, 8, 32, generator=g)
    locations = torch.rand(frames, total, 8, 3, 4, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(frames, total, 8, 3, 4, generator=g).softmax(-1)
    return shapes, [t.to(device) for t in (value, locations, weights)]


def measure(quick: bool = False, device: str = "cpu") -> list[dict]:
    """One row per kernel and shape: reference_s, kernel_s (mode "auto" on ``device``), speedup, max_abs_error."""
    repeats = 2 if quick else 5
    rows = []
    n, w = 100, 6
    for t in ([12] if quick else [12, 24]):
        g = torch.Generator().manual_seed(t)
        q, k, v = (torch.randn(1, 8, t * n, 32, generator=g).to(device) for _ in range(3))
        for shifted in (False, True):
            with torch.no_grad():
                rows.append(_compare(
                    "window_attention" + (" shifted" if shifted else ""), f"B=1 heads=8 T={t} N={n} d=32 W={w}",
                    lambda: reference.window_attention(q, k, v, n, w, shifted),
                    lambda: kernels.window_attention(q, k, v, n, w, shifted), device, repeats))
    size = (192, 320) if quick else (384, 640)
    frames = 1 if quick else 2
    shapes, (value, locations, weights) = _msda_case(frames, *size, device)
    label = f"N={frames} frames {size[0]}x{size[1]} levels={shapes} heads=8 d=32 points=4"
    with torch.no_grad():
        rows.append(_compare("ms_deform_attn forward", label,
                             lambda: reference.ms_deform_attn(value, shapes, locations, weights),
                             lambda: kernels.ms_deform_attn(value, shapes, locations, weights), device, repeats))
    grad_out = torch.randn(frames, locations.shape[1], 256).to(device)

    def train_step(fn: Callable) -> Callable[[], tuple]:
        def step() -> tuple:
            inputs = [x.detach().requires_grad_() for x in (value, locations, weights)]
            torch.autograd.backward(fn(inputs[0], shapes, inputs[1], inputs[2]), grad_out)
            return tuple(x.grad for x in inputs)

        return step

    # with grad, "auto" on the CPU runs the reference (its backward measured faster): time the CPU form itself
    impl = kernels.resolve("auto", torch.device(device).type)
    fast = kernels.cpu.ms_deform_attn if impl == "cpu" else kernels.ms_deform_attn
    row = _compare("ms_deform_attn forward+backward", label, train_step(reference.ms_deform_attn), train_step(fast),
                   device, max(2, repeats // 2))
    if impl == "cpu":
        row["kernel"] = "cpu (auto runs the reference when grad is needed)"
    rows.append(row)
    for row in rows:
        row["threads"] = torch.get_num_threads()
    if device == "cpu" and kernels.native.available():
        rows += _detector_call_rows(quick, repeats)
    return rows


def _detector_call_rows(quick: bool, repeats: int) -> list[dict]:
    """The Winograd and masked-attention rows at the thread count one detector call runs with by default
    (two calls at once, each with half the threads): what decided their defaults, which differ at other counts
    (bf16 Winograd at 512 channels on an AMD EPYC Zen 4: 0.99-1.18x at one thread, 0.88x at two)."""
    from runtime.backends.base import chosen_detector_streams

    threads = torch.get_num_threads()
    per_call = max(1, threads // chosen_detector_streams(None, True, threads))
    torch.set_num_threads(per_call)
    try:
        rows = _winograd_rows(quick, repeats) + _masked_attention_rows(quick, repeats)
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        row["threads"] = per_call
    return rows


def _masked_attention_rows(quick: bool, repeats: int) -> list[dict]:
    """The compiled masked attention against scaled_dot_product_attention on the frame decoder's cross-attention
    shapes (100 queries, 8 heads of 32 channels, a boolean mask), float32 and bf16 where the CPU has it."""
    from vita_train.modeling.onednn import bf16_supported
    from vita_train.modeling.transformer_layers import NATIVE_ATTENTION_MIN_KEYS

    rows = []
    g = torch.Generator().manual_seed(0)
    for keys in ([3840] if quick else [3840, 960]):
        for dtype in [torch.float32] + ([torch.bfloat16] if bf16_supported() else []):
            q, k, v = (torch.randn(1, n, 256, generator=g).to(dtype) for n in (100, keys, keys))
            blocked = torch.rand(1, 100, keys, generator=g) < 0.5
            split = [t.view(1, t.shape[1], 8, 32).transpose(1, 2) for t in (q, k, v)]

            def sdpa(split=split, allowed=~blocked.unsqueeze(1)):
                return F.scaled_dot_product_attention(*split, attn_mask=allowed).transpose(1, 2).reshape(1, 100, 256)

            with torch.no_grad():
                row = _compare("masked attention (frame decoder)", f"100 queries, {keys} keys, 8 heads d=32, "
                               f"{str(dtype).replace('torch.', '')}", sdpa,
                               lambda q=q, k=k, v=v, m=blocked: kernels.native.masked_attention(q, k, v, m, 8),
                               "cpu", repeats)
            used = "on by default" if keys >= NATIVE_ATTENTION_MIN_KEYS else "off by default (below the key threshold)"
            row["kernel"] = f"cpu compiled, {used}"
            rows.append(row)
    return rows


def _winograd_rows(quick: bool, repeats: int) -> list[dict]:
    """The Winograd 3x3 convolution against the direct one on the full-size R-50 detector's stride-1 3x3 shapes
    at 360x640, measured on every CPU (the detector takes it only where ``winograd_cpu()``; these rows say
    whether it would pay on another CPU kind)."""
    from runtime.host_memory import keep_freed_memory
    from vita_train.modeling import winograd
    from vita_train.modeling.onednn import bf16_supported

    keep_freed_memory()  # the runtime's malloc settings: without them each buffer's pages fault in anew
    default = "on by default here" if winograd.winograd_cpu() else "off by default on this CPU"
    shapes = [(256, 96, 160), (64, 96, 160)] if quick else [(256, 96, 160), (64, 96, 160), (128, 48, 80),
                                                             (256, 24, 40), (512, 12, 20)]
    rows = []
    g = torch.Generator().manual_seed(0)
    for c, h, w in shapes:
        x = torch.randn(1, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)).contiguous(memory_format=torch.channels_last)
        bias = torch.randn(c, generator=g)
        conv = winograd.WinogradWeight()
        with torch.no_grad():
            row = _compare("conv3x3 (Winograd)", f"{c}->{c} channels {h}x{w} (R-50 at 360x640)",
                           lambda: F.conv2d(x, weight, bias, padding=1),
                           lambda: conv.conv(x, ("bench",), lambda: (weight, bias)), "cpu", repeats)
        tile = conv.tile
        row["kernel"] = f"cpu F({tile}x{tile},3x3), {default}"
        rows.append(row)
        if bf16_supported():
            xb, wb, bb = x.to(torch.bfloat16), weight.to(torch.bfloat16), bias.to(torch.bfloat16)
            conv16 = winograd.WinogradWeight()
            with torch.no_grad():
                row = _compare("conv3x3 (Winograd, bf16 in and out, float32 tiles)",
                               f"{c}->{c} channels {h}x{w} (R-50 at 360x640)",
                               lambda: F.conv2d(xb, wb, bb, padding=1),
                               lambda: conv16.conv(xb, ("bench",), lambda: (wb, bias)), "cpu", repeats)
            on = winograd.usable(xb, wb, 1, 1, "auto")
            row["kernel"] = f"cpu F({conv16.tile}x{conv16.tile},3x3), {'on' if on else 'off'} by default here"
            rows.append(row)
    return rows + _onnxruntime_winograd_rows(shapes, repeats)


def _onnxruntime_winograd_rows(shapes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    """The same shapes in ONNX Runtime (with the threads of one detector call, as the torch rows): a Conv graph
    against its Winograd rewrite (runtime/backends/onnxruntime_winograd.py); none where onnx, onnxruntime or
    the operator library is missing."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        from runtime.backends import onnxruntime_kernels, onnxruntime_winograd
    except ImportError:
        return []
    library = onnxruntime_kernels.library()
    if library is None:
        return []
    default = "on by default here" if onnxruntime_winograd.applies() else "off by default on this CPU"
    rng = np.random.default_rng(0)
    rows = []
    for c, h, w in shapes:
        weight = (rng.standard_normal((c, c, 3, 3)) / (3 * c**0.5)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])], "conv3x3",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b")])
        plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        rewritten = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnxruntime_winograd.rewrite(rewritten)
        sessions = []
        for model in (plain, rewritten):
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.register_custom_ops_library(str(library))
            sessions.append(ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]))
        feed = {"x": rng.standard_normal((1, c, h, w)).astype(np.float32)}
        row = _compare("conv3x3 (ONNX Runtime Winograd)", f"{c}->{c} channels {h}x{w} (R-50 at 360x640)",
                       lambda: torch.from_numpy(sessions[0].run(None, feed)[0]),
                       lambda: torch.from_numpy(sessions[1].run(None, feed)[0]), "cpu", repeats)
        tile = onnxruntime_winograd.tile_for(c, c)
        row["kernel"] = f"onnxruntime F({tile}x{tile},3x3), {default}"
        rows.append(row)
    return rows


_SCALE_SCRIPT = r"""
import json, resource, sys, time
import torch
from vita_train.modeling.vita_module import VitaModule
from vita_train.presets import preset
from benchmarks.kernels import counted_flops
from benchmarks.environment import matmul_rate

name, frames, device, token_dtype, threads, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
if threads:
    torch.set_num_threads(threads)
cfg = preset(name)
vita = VitaModule.from_config(cfg).to(device).eval()
vita.token_dtype = getattr(torch, token_dtype)
cuda = device.startswith("cuda")
sync = torch.cuda.synchronize if cuda else (lambda: None)


def floor():
    return matmul_rate(device)


floors = [floor()]
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n, c = cfg.frame_decoder.num_queries, cfg.frame_decoder.hidden_dim
tokens = torch.empty(1, frames, n, c, dtype=vita.token_dtype, device=device)
for i in range(0, frames, 1000):
    tokens[:, i : i + 1000].normal_()
with torch.no_grad():  # warm-up: one-time initialisation is not the engine's time
    vita(torch.randn(1, 2 * max(cfg.vita.window, 1) + 1, n, c, device=device))
if cuda: torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(repeats):  # the engine overwrites the tokens: later runs encode encoded tokens, at the same cost
    sync(); t0 = time.perf_counter()
    with torch.no_grad():
        out = vita(tokens, overwrite_input=True)
    float(out.pred_logits.sum())
    times.append(time.perf_counter() - t0)
    floors.append(floor())  # between runs too: on a shared machine the best of them is the floor
result = {"seconds": min(times), "times": times, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "baseline_rss_bytes": baseline, "floor_flops": max(floors), "threads": torch.get_num_threads(),
          "kernel": __import__("kernels").resolve(vita.kernels, torch.device(device).type)}
if cuda:
    result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
if frames <= 1000:  # counted on the same tokens after the timing (counting slows the run down)
    result["counted_flops"] = counted_flops(vita, tokens)
print(json.dumps(result))
"""


def counted_flops(vita: Any, tokens: Any) -> float:
    """FLOPs of one inference pass of ``vita`` over ``tokens``, counted by torch.utils.flop_counter.

    The counter knows neither the CPU flash-attention op, in-place ``addmm_`` nor MKL's packed linear;
    they are added with torch's own formulas (for SDPA and addmm) and 2 * rows * in * out.
    """
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop, sdpa_flop_count

    def sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def addmm_(self_shape, a, b, *args, out_shape=None, **kwargs) -> int:
        return addmm_flop(self_shape, a, b)

    def mkl_linear(x_shape, packed_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * weight_shape[0]

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa, torch.ops.aten.addmm_: addmm_}
    if hasattr(torch.ops.mkl, "_mkl_linear"):
        mapping[torch.ops.mkl._mkl_linear] = mkl_linear
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        vita(tokens, overwrite_input=True)
    return float(counter.get_total_flops())


def token_engine_flops(preset: str, frames: int) -> float:
    """Multiply-adds x 2 of the token engine on T frames (full windows assumed; heads and norms left out)."""
    from vita_train.presets import preset as load_preset

    cfg = load_preset(preset)
    v, n, c = cfg.vita, cfg.frame_decoder.num_queries, cfg.vita.hidden_dim
    keys = (v.window or frames) * n
    per_token = 2 * c * c  # input projection
    per_token += v.enc_layers * (2 * 4 * c * c + 2 * 2 * c * v.ffn_dim + 2 * 2 * keys * c)
    per_token += v.dec_layers * (2 * 2 * c * c + 2 * 2 * v.num_queries * c)  # cross-attention keys/values
    return float(frames * n * per_token)


def token_scale(
    preset: str, frames: list[int], device: str = "cpu", token_dtype: str = "float32",
    threads: int = 0, timeout: Optional[float] = None, repeats: int = 1,
) -> list[dict]:
    """Token engine of ``preset`` (random weights, synthetic tokens) at each T, each in a fresh process.

    Rows: T, seconds (best of ``repeats``), peak_rss_bytes (whole process), baseline_rss_bytes (before the
    tokens), token_bytes, gflop (counted by torch.utils.flop_counter up to T=1000, else the formula of
    ``token_engine_flops``, which agrees with the count to 0.1%), floor_gflops (the best 2048^3 matmul in
    the same process, before and between the runs) and floor_ratio = seconds over gflop/floor.
    """
    rows = []
    for t in frames:
        cmd = [sys.executable, "-c", _SCALE_SCRIPT, preset, str(t), device, token_dtype, str(threads), str(repeats)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            rows.append({"T": t, "token_dtype": token_dtype, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        flops = r.get("counted_flops") or token_engine_flops(preset, t)
        from vita_train.presets import preset as load_preset

        cfg = load_preset(preset)
        itemsize = torch.empty(0, dtype=getattr(torch, token_dtype)).element_size()
        rows.append({
            "T": t, "token_dtype": token_dtype, "kernel": r["kernel"], "threads": r["threads"],
            "seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"], "baseline_rss_bytes": r["baseline_rss_bytes"],
            "token_bytes": t * cfg.frame_decoder.num_queries * cfg.frame_decoder.hidden_dim * itemsize,
            "gflop": flops / 1e9, "floor_gflops": r["floor_flops"] / 1e9,
            "floor_ratio": r["seconds"] / (flops / r["floor_flops"]),
            **({"peak_device_bytes": r["peak_device_bytes"]} if "peak_device_bytes" in r else {}),
        })
    return rows


def fitted_exponents(rows: list[dict]) -> dict[str, float]:
    """Exponents p of seconds ~ T^p and of (peak RSS - baseline) ~ T^p over the rows that completed."""
    import numpy as np

    done = [r for r in rows if "seconds" in r]
    if len(done) < 2:
        return {}
    t = np.log([r["T"] for r in done])
    time_p = float(np.polyfit(t, np.log([r["seconds"] for r in done]), 1)[0])
    growth = [max(r["peak_rss_bytes"] - r["baseline_rss_bytes"], 1) for r in done]
    return {"time_exponent": time_p, "memory_exponent": float(np.polyfit(t, np.log(growth), 1)[0])}


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m benchmarks.kernels measure|scale``: print JSON (and write it with --out)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels")
    p.add_argument("what", choices=("measure", "scale"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default="vita_r50_ytvis19")
    p.add_argument("--frames", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--token-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs at each T (the best one is reported)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.what == "measure":
        report: Any = {"rows": measure(args.quick, args.device)}
    else:
        rows = token_scale(args.preset, args.frames, args.device, args.token_dtype, args.threads, repeats=args.repeats)
        report = {"preset": args.preset, "rows": rows, **fitted_exponents(rows)}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
