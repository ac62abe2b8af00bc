"""kernels.native: the compiled CPU deformable attention against its plain reference, and its fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import native, reference
from tests.conftest import require_native_kernels
from vita_train.modeling.ms_deform_attn import MSDeformAttn
from vita_train.modeling.pixel_decoder import reference_points

SHAPES = [(6, 5), (3, 3), (2, 1)]
HEADS, LEVELS, POINTS = 8, 3, 4
ROOT = Path(__file__).resolve().parents[1]


def _inputs(n: int, lq: int, d: int, shared_refs: bool, seed: int, dtype=torch.float32, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(n, s, HEADS, d, generator=g).to(dtype)
    # reference points partly outside [0, 1]; offsets of a few pixels: taps on, across and off every border
    refs = torch.rand(1 if shared_refs else n, lq, 2, generator=g) * 1.4 - 0.2
    offsets = (torch.randn(n, lq, HEADS * LEVELS * POINTS * 2, generator=g) * scale).to(dtype)
    logits = torch.randn(n, lq, HEADS * LEVELS * POINTS, generator=g).to(dtype)
    return value, refs, offsets, logits


def _both(value, refs, offsets, logits):
    ours = native.ms_deform_attn_from_projections(value, SHAPES, refs, offsets, logits, LEVELS, POINTS)
    # the reference in float64 from the very same (possibly bf16-rounded) inputs
    exact = reference.ms_deform_attn_from_projections(
        value.double(), SHAPES, refs.double(), offsets.double(), logits.double(), LEVELS, POINTS)
    return ours, exact


@pytest.mark.parametrize("d", [32, 16])  # 32: the compiled fixed-width path; others the general one
@pytest.mark.parametrize("shared_refs", [True, False])
@pytest.mark.parametrize("lq", [1, 39])
def test_fp32_matches_the_reference_as_closely_as_the_reference_itself(d, shared_refs, lq):
    require_native_kernels()
    value, refs, offsets, logits = _inputs(2, lq, d, shared_refs, seed=lq * 10 + d)
    ours, exact = _both(value, refs, offsets, logits)
    plain = reference.ms_deform_attn_from_projections(value, SHAPES, refs, offsets, logits, LEVELS, POINTS)
    assert ours.dtype == torch.float32 and ours.shape == (2, lq, HEADS * d)
    budget = max(3 * (plain.double() - exact).abs().max().item(), 1e-6)
    assert (ours.double() - exact).abs().max().item() <= budget
    # a control: the reference points moved by half a pixel of the finest level are told apart
    moved = native.ms_deform_attn_from_projections(value, SHAPES, refs + 0.5 / 6, offsets, logits, LEVELS, POINTS)
    assert (moved.double() - exact).abs().max().item() > 100 * budget


def test_far_outside_positions_read_zeros_and_nan_positions_are_skipped():
    require_native_kernels()
    value, refs, offsets, logits = _inputs(1, 20, 32, True, seed=3)
    for shift in (50.0, 1e30, float("inf"), float("-inf")):  # positions are clamped before integer conversion
        far = native.ms_deform_attn_from_projections(value, SHAPES, refs + shift, offsets, logits, LEVELS, POINTS)
        assert torch.equal(far, torch.zeros_like(far)), shift
    nan_refs = refs.clone()
    nan_refs[0, 0] = float("nan")
    out = native.ms_deform_attn_from_projections(value, SHAPES, nan_refs, offsets, logits, LEVELS, POINTS)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])) and torch.isfinite(out).all()


def test_a_level_too_wide_for_the_position_math_is_refused():
    """Level sides must be exact as floats (< 2^24): a wider one is an error that says so, not wrong taps."""
    require_native_kernels()
    side = 2**24 + 1
    value = torch.zeros(1, side, 1, 1)
    args = (torch.rand(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, 1), 1, 1)
    with pytest.raises(RuntimeError, match="over 2\\^24 pixels high or wide"):
        native.ms_deform_attn_from_projections(value, [(1, side)], *args)


def test_bf16_is_the_reference_rounded_once():
    require_native_kernels()
    value, refs, offsets, logits = _inputs(2, 39, 32, False, seed=4, dtype=torch.bfloat16)
    ours, exact = _both(value, refs, offsets, logits)
    assert ours.dtype == torch.bfloat16
    # fp32 accumulation inside, one rounding to bf16 at the end: within one bf16 step of the exact value
    step = exact.abs().clamp_min(2.0 ** -8) * 2.0 ** -7
    assert ((ours.double() - exact).abs() <= step).all()


@pytest.mark.parametrize("d", [32, 16])  # 32: bf16 rows read two channels per 32-bit word; 16: the general path
def test_bf16_is_exactly_the_fp32_kernel_on_the_same_values_rounded_once(d):
    """Every bf16 input is exact in float32 and the kernel computes in float32: its bf16 result is the float32
    kernel's on the upcast inputs, rounded to bf16, bit for bit (the same taps, multiply-adds and order)."""
    require_native_kernels()
    value, refs, offsets, logits = _inputs(2, 39, d, False, seed=7, dtype=torch.bfloat16)
    ours = native.ms_deform_attn_from_projections(value, SHAPES, refs, offsets, logits, LEVELS, POINTS)
    fp32 = native.ms_deform_attn_from_projections(value.float(), SHAPES, refs, offsets.float(), logits.float(),
                                                  LEVELS, POINTS)
    assert torch.equal(ours, fp32.to(torch.bfloat16))
    # a control: channels swapped pairwise within each head (even <-> odd) are told apart
    swapped = value.view(*value.shape[:-1], d // 2, 2).flip(-1).reshape(value.shape)
    other = native.ms_deform_attn_from_projections(swapped, SHAPES, refs, offsets, logits, LEVELS, POINTS)
    assert not torch.equal(other, ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_fast_path_equals_its_reference_path(dtype, monkeypatch):
    """MSDeformAttn on the CPU: native, the torch-op form (VITA_NATIVE_KERNELS=0) and the reference path agree."""
    require_native_kernels()
    torch.manual_seed(0)
    attn = MSDeformAttn(HEADS * 32, num_levels=LEVELS, num_heads=HEADS, num_points=POINTS).eval()
    for p in attn.parameters():  # away from the init, where every offset is a whole pixel
        p.data += torch.randn_like(p) * 0.05
    attn.to(dtype)
    s = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, s, HEADS * 32).to(dtype), torch.randn(2, s, HEADS * 32).to(dtype)
    refs = reference_points(SHAPES, torch.device("cpu"))
    outs = {}
    with torch.no_grad():
        for name, mode, native_on in [("native", "auto", "1"), ("ops", "auto", "0"), ("reference", "reference", "1")]:
            monkeypatch.setenv("VITA_NATIVE_KERNELS", native_on)
            attn.kernels = mode
            outs[name] = attn(query, refs, value, SHAPES).float()
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (outs["native"] - outs["reference"]).abs().max() <= tol
    assert (outs["ops"] - outs["reference"]).abs().max() <= tol


def test_gradients_take_the_differentiable_path():
    require_native_kernels()
    torch.manual_seed(1)
    attn = MSDeformAttn(HEADS * 32, num_levels=LEVELS, num_heads=HEADS, num_points=POINTS)
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(1, s, HEADS * 32, requires_grad=True)
    attn(query, reference_points(SHAPES, torch.device("cpu")), torch.randn(1, s, HEADS * 32), SHAPES).sum().backward()
    assert query.grad is not None and attn.sampling_offsets.weight.grad is not None


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    """No working compiler (CXX points at /bin/false, a fresh build folder): a warning, available() False,
    and the module still runs through the torch-op form."""
    code = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from kernels import native\n"
        "from vita_train.modeling.ms_deform_attn import MSDeformAttn\n"
        "assert not native.available() and not native.available()\n"
        "m = MSDeformAttn(64, 2, 2, 2).eval()\n"
        "with torch.no_grad(): out = m(torch.randn(1, 5, 64), torch.rand(1, 5, 2), torch.randn(1, 5, 64), [(1, 2), (1, 3)])\n"
        "assert out.shape == (1, 5, 64)\n"
        "print('ok')\n"
    )
    res = _python(code, {"CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path), "VITA_NATIVE_KERNELS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")
    assert res.stderr.count("native CPU kernels could not be built") == 1


def test_loading_on_a_gpu_less_host_with_a_cuda_toolkit_says_nothing_of_cuda(tmp_path):
    """torch's extension module warns "No CUDA runtime is found" at import where a CUDA toolkit lies on a host
    without a GPU; the kernels are CPU-only, so every CLI run would have shown a misleading line."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA runtime is present: torch does not warn")
    env = {"CUDA_HOME": str(tmp_path), "VITA_NATIVE_KERNELS": "1"}
    res = _python("import logging; logging.basicConfig()\nfrom kernels import native; print(native.available())", env)
    assert res.returncode == 0, res.stderr
    assert "No CUDA runtime" not in res.stderr, res.stderr
    # control: importing torch's module directly in the same environment does warn
    res = _python("import logging; logging.basicConfig()\nimport torch.utils.cpp_extension", env)
    assert "No CUDA runtime" in res.stderr, res.stderr


def test_turned_off_by_the_environment():
    res = _python("from kernels import native; print(native.available())", {"VITA_NATIVE_KERNELS": "0"})
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_eager_inference_never_imports_the_compiler(tmp_path):
    """Loading a checkpoint and detecting on the CPU with the compiled kernels leaves torch._dynamo unimported
    (150 MB of resident memory); the control: marking ``available`` for torch.compile imports it."""
    from vita_train import save_checkpoint
    from vita_train.modeling.vita_model import VitaModel
    from vita_train.presets import preset

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(ckpt, VitaModel(preset("vita_tiny")).eval())
    code = (
        "import sys, numpy as np, runtime\n"
        "from kernels import native\n"
        f"seg = runtime.load({str(ckpt)!r}, backend='torch', device='cpu')\n"
        "seg.backend.detect(np.zeros((1, 64, 96, 3), np.uint8), 1.0)\n"
        "print(native.available(), 'torch._dynamo' in sys.modules)\n"
        "native.mark_constant_for_compilers()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    res = _python(code, {})
    assert res.returncode == 0, res.stderr
    eager, marked = res.stdout.split("\n")[:2]
    assert eager.split()[1] == "False", eager
    assert marked == "True"
