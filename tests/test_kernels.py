"""kernels/: the CPU forms and the Triton kernels against the plain references on random inputs.

The Triton tests run on CUDA, or on the CPU under TRITON_INTERPRET=1 (small sizes: the interpreter is slow).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import kernels
from kernels import cpu, reference

W = 6
HEADS, D = 8, 32
T_CASES = [1, W - 1, W, W + 1, 37]

triton_device = None
if not kernels.triton_importable():
    _why = "triton is not importable here"
elif torch.cuda.is_available():
    triton_device, _why = "cuda", ""
elif os.environ.get("TRITON_INTERPRET") == "1":
    triton_device, _why = "cpu", ""
else:
    _why = "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
needs_triton = pytest.mark.skipif(triton_device is None, reason=_why)


def _qkv(b: int, t: int, n: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, HEADS, t * n, D, generator=g).to(device) for _ in range(3)]


def _msda_inputs(n: int, lq: int, shapes, points: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, HEADS, D, generator=g)
    # a fifth of the range lies outside [0, 1] on each side: those taps read zeros
    locations = torch.rand(n, lq, HEADS, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(n, lq, HEADS, len(shapes), points, generator=g).softmax(-1)
    return [t.to(device) for t in (value, locations, weights)]


def _official_windows(t: int, window: int, shifted: bool) -> torch.Tensor:
    """(T, T) allowed frame pairs the official way: pad, roll by ceil(W/2), mask the edge windows."""
    tp = math.ceil(t / window) * window
    h = math.ceil(window / 2) if shifted else 0
    frame_at = (torch.arange(tp) - h) % tp  # position p holds frame (p - h) mod T_pad
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for start in range(0, tp, window):
        frames = frame_at[start : start + window]
        for i, fi in enumerate(frames):
            for j, fj in enumerate(frames):
                split = shifted and start == 0 and (i < h) != (j < h)  # wrapped tail vs head
                if fi < t and fj < t and not split:
                    allowed[fi, fj] = True
    return allowed


@pytest.mark.parametrize("window", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("shifted", [False, True])
def test_frame_groups_are_the_official_rolled_windows(window, shifted):
    for t in range(1, 3 * window + 2):
        groups = reference.frame_groups(t, window, shifted)
        assert torch.equal(groups[:, None] == groups[None, :], _official_windows(t, window, shifted)), (t, window)


# the dense reference at T=37, N=100 would hold 2 x 8 x 3700^2 scores: N=100 runs up to T=W+1
CPU_WINDOW_CASES = [(t, n) for t in T_CASES for n in (1, 7, 100) if (t, n) != (37, 100)]


@pytest.mark.parametrize("t,n", CPU_WINDOW_CASES)
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_cpu_form(t, n, shifted):
    q, k, v = _qkv(2, t, n, seed=t * 1000 + n)
    ref = reference.window_attention(q, k, v, n, W, shifted)
    out = cpu.window_attention(q, k, v, n, W, shifted)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(kernels.window_attention(q, k, v, n, W, shifted, mode="reference"), ref)


def test_window_attention_full_and_chunks():
    q, k, v = _qkv(2, 13, 3, seed=1)
    ref = reference.window_attention(q, k, v, 3, 0, False)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (ref - full).abs().max() <= 1e-5
    assert (cpu.window_attention(q, k, v, 3, 0, False) - ref).abs().max() <= 1e-5
    # a chunk starting on a window boundary, with its absolute frame offset, is the same slice
    for shifted in (False, True):
        whole = reference.window_attention(q, k, v, 3, W, shifted)
        start = W - math.ceil(W / 2) if shifted else W  # first window boundary after frame 0
        lo = start * 3
        part = cpu.window_attention(q[:, :, lo:], k[:, :, lo:], v[:, :, lo:], 3, W, shifted, frame_offset=start)
        assert (part - whole[:, :, lo:]).abs().max() <= 1e-5


def test_window_attention_rejects_partial_frames():
    q, k, v = _qkv(1, 2, 5, seed=0)
    with pytest.raises(ValueError, match="whole number of frames"):
        kernels.window_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], 5, W, False)



def test_window_attention_names_mismatched_inputs():
    """q of another head size, or k of another dtype: a message naming the three inputs, not a failed reshape
    or a dtype error from inside the attention op."""
    q, k, v = _qkv(1, 2, 5, seed=0)
    with pytest.raises(ValueError, match="q, k and v must all be"):
        kernels.window_attention(q[..., :8], k, v, 5, W, False)
    with pytest.raises(ValueError, match="must share dtype and device"):
        kernels.window_attention(q.double(), k, v, 5, W, False)


SHAPES = [(6, 5), (3, 3), (2, 1)]


def test_ms_deform_attn_names_inputs_that_do_not_fit_together():
    """Levels' sizes that do not add up to the value, or locations/weights of other levels or points: a message
    giving the expected shapes, not a failed split or reshape from inside."""
    s = sum(h * w for h, w in SHAPES)
    value, locations, weights = torch.randn(1, s, 2, 8), torch.rand(1, 7, 2, 3, 4, 2), torch.rand(1, 7, 2, 3, 4)
    assert kernels.ms_deform_attn(value, SHAPES, locations, weights).shape == (1, 7, 16)
    with pytest.raises(ValueError, match="hold 46 positions, value 41"):
        kernels.ms_deform_attn(value, [(6, 5), (3, 4), (2, 2)], locations, weights)
    with pytest.raises(ValueError, match=r"locations must be \(1, 7, 2, 3, 4, 2\)"):
        kernels.ms_deform_attn(value, SHAPES, locations[:, :, :, :2], weights)
    with pytest.raises(ValueError, match="value must be"):
        kernels.ms_deform_attn(value.flatten(2), SHAPES, locations, weights)


@pytest.mark.parametrize("lq", [1, 7, 100])
def test_ms_deform_attn_cpu_form(lq):
    value, locations, weights = _msda_inputs(2, lq, SHAPES, 4, seed=lq)
    ref = reference.ms_deform_attn(value, SHAPES, locations, weights)
    assert (cpu.ms_deform_attn(value, SHAPES, locations, weights) - ref).abs().max() <= 1e-5
    with torch.no_grad():  # auto on the CPU without grad: the CPU form
        assert (kernels.ms_deform_attn(value, SHAPES, locations, weights) - ref).abs().max() <= 1e-5


def test_ms_deform_attn_cpu_form_far_outside_and_on_the_border():
    """Positions many pixels off every level, and exactly on pixel centres and edges, read what grid_sample reads."""
    value, locations, weights = _msda_inputs(2, 50, SHAPES, 4, seed=5)
    far = torch.rand(locations.shape, generator=torch.Generator().manual_seed(6)) * 6 - 3
    h_w = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32).view(1, 1, 1, len(SHAPES), 1, 2)
    grid = (torch.randint(-2, 9, locations.shape, generator=torch.Generator().manual_seed(7)) / 2) / h_w
    for loc in (far, grid):
        ref = reference.ms_deform_attn(value, SHAPES, loc, weights)
        assert (cpu.ms_deform_attn(value, SHAPES, loc, weights) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("shared_refs", [True, False])
def test_ms_deform_attn_module_cpu_path_matches_the_reference(shared_refs):
    """The module's CPU path (projections computed one column per query) against its plain reference path."""
    from vita_train.modeling.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    attn = MSDeformAttn(HEADS * D, num_levels=len(SHAPES), num_heads=HEADS, num_points=4).eval()
    for p in attn.parameters():  # away from the init, where every offset is a whole pixel
        p.data += torch.randn_like(p) * 0.05
    s = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, s, HEADS * D), torch.randn(2, s, HEADS * D)
    refs = torch.rand(1 if shared_refs else 2, s, 2)
    with torch.no_grad():
        outs = {}
        for mode in ("reference", "auto"):
            attn.kernels = mode
            outs[mode] = attn(query, refs, value, SHAPES)
    assert (outs["auto"] - outs["reference"]).abs().max() <= 1e-5
    # a control: the same path with the reference points one pixel off does not pass
    with torch.no_grad():
        moved = attn(query, refs + 1 / 6, value, SHAPES)
    assert (moved - outs["reference"]).abs().max() > 1e-2


def test_ms_deform_attn_cpu_form_gradients():
    value, locations, weights = _msda_inputs(2, 7, SHAPES, 4, seed=3)
    grad_out = torch.randn(2, 7, HEADS * D)

    def grads(fn):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        (fn(inputs[0], SHAPES, inputs[1], inputs[2]) * grad_out).sum().backward()
        return [t.grad for t in inputs]

    for ours, ref in zip(grads(cpu.ms_deform_attn), grads(reference.ms_deform_attn)):
        assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["reference", "auto"])
def test_attention_with_lse_combines_chunks_exactly(mode):
    g = torch.Generator().manual_seed(0)
    # keys and values as strided views of one packed (B, L, 2, heads, d) tensor, as the decoder gives them
    q = torch.randn(2, HEADS, 7, D, generator=g)
    kv = torch.randn(2, 37, 2, HEADS, D, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * D**-0.5
    out, lse = kernels.attention_with_lse(q, k, v, mode=mode)
    assert (out - scores.softmax(-1) @ v).abs().max() <= 1e-5
    assert (lse - scores.logsumexp(-1)).abs().max() <= 1e-5
    (o1, l1), (o2, l2) = (kernels.attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], mode=mode) for a, b in [(0, 20), (20, 37)])
    total = torch.logaddexp(l1, l2)
    combined = o1 * (l1 - total).exp().unsqueeze(-1) + o2 * (l2 - total).exp().unsqueeze(-1)
    assert (combined - out).abs().max() <= 1e-5


@pytest.mark.parametrize("rows", [5, 300])
def test_packed_linear_is_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 256, generator=g), torch.randn(384, 256, generator=g), torch.randn(384, generator=g)
    linear = cpu.MklPackedLinear()
    for _ in range(2):  # the second call reuses the pack
        assert (linear(x, w, b) - torch.nn.functional.linear(x, w, b)).abs().max() <= 1e-4
    assert (linear(x[::2], w, b) - torch.nn.functional.linear(x[::2], w, b)).abs().max() <= 1e-4


def test_unknown_mode_and_unavailable_triton():
    q, k, v = _qkv(1, 2, 3, seed=0)
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.window_attention(q, k, v, 3, W, False, mode="fast")
    if triton_device is None:
        with pytest.raises(kernels.KernelUnavailableError, match="triton"):
            kernels.window_attention(q, k, v, 3, W, False, mode="triton")


# ---- Triton (CUDA, or the CPU under TRITON_INTERPRET=1) ---------------------------------------------
# interpreted programs are slow: N=100 only at short T, the long T only at small N
TRITON_WINDOW_CASES = [(t, n) for t in T_CASES for n in (1, 7)] + [(1, 100)]


@needs_triton
@pytest.mark.parametrize("t,n", TRITON_WINDOW_CASES)
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_triton(t, n, shifted):
    q, k, v = _qkv(2, t, n, seed=t * 1000 + n, device=triton_device)
    ref = reference.window_attention(q, k, v, n, W, shifted)
    out = kernels.window_attention(q, k, v, n, W, shifted, mode="triton")
    assert (out - ref).abs().max() <= 1e-5


@needs_triton
def test_window_attention_triton_full_offset_and_grad():
    q, k, v = _qkv(2, 9, 5, seed=2, device=triton_device)
    for window, shifted, offset in [(0, False, 0), (W, True, 3), (3, False, 1)]:
        ref = reference.window_attention(q, k, v, 5, window, shifted, offset)
        assert (kernels.window_attention(q, k, v, 5, window, shifted, offset, mode="triton") - ref).abs().max() <= 1e-5
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    kernels.window_attention(*inputs, 5, W, True, mode="triton").sum().backward()
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    reference.window_attention(*ref_inputs, 5, W, True).sum().backward()
    for a, b in zip(inputs, ref_inputs):
        assert (a.grad - b.grad).abs().max() <= 1e-4


@needs_triton
@pytest.mark.parametrize("lq", [1, 7, 100])
def test_ms_deform_attn_triton_forward_and_backward(lq):
    value, locations, weights = _msda_inputs(2, lq, SHAPES, 2, seed=lq, device=triton_device)
    grad_out = torch.randn(2, lq, HEADS * D).to(triton_device)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = fn(inputs[0], SHAPES, inputs[1], inputs[2])
        (out * grad_out).sum().backward()
        return out.detach(), [t.grad for t in inputs]

    out, grads = run(lambda *a: kernels.ms_deform_attn(*a, mode="triton"))
    ref, ref_grads = run(reference.ms_deform_attn)
    assert (out - ref).abs().max() <= 1e-5
    for name, ours, theirs in zip(("value", "locations", "weights"), grads, ref_grads):
        assert (ours - theirs).abs().max() <= 1e-4, name


# ---- the model through the switch ------------------------------------------------------------------
def _vita(window: int = W, **kw):
    from vita_train.modeling.vita_module import VitaModule

    return VitaModule(num_classes=5, num_frame_queries=7, hidden_dim=32, num_queries=4, num_heads=4, ffn_dim=48,
                      enc_layers=4, dec_layers=2, window=window, conv_dim=16, mask_dim=16, **kw).eval()


@pytest.mark.parametrize("mode", ["reference", "auto"])
@pytest.mark.parametrize("t", [1, W - 1, W, W + 1, 37])
def test_encoder_chunks_match_the_official_algorithm(mode, t):
    from .test_vita_window import reference_encode

    torch.manual_seed(t)
    # 2 windows per chunk: long clips cross several chunk boundaries, in both layouts
    vita = _vita(kernels=mode, chunk_tokens=2 * W * 7)
    tokens = torch.randn(2, t, 7, 32)
    ref = reference_encode(vita, tokens)
    with torch.no_grad():
        assert (vita.encode(tokens) - ref).abs().max() <= 1e-5
    grad_path = vita.encode(tokens)  # grad enabled: chunks concatenated, not overwritten
    assert (grad_path.detach() - ref).abs().max() <= 1e-5


def test_encoder_at_gemm_sizes_matches_the_official_algorithm():
    from vita_train.modeling.vita_module import VitaModule

    from .test_vita_window import reference_encode

    # wide enough (C 128, 192 rows a window) for the packed GEMMs and FFN row blocks of the in-place path
    torch.manual_seed(0)
    vita = VitaModule(num_classes=3, num_frame_queries=32, hidden_dim=128, num_queries=4, num_heads=4, ffn_dim=256,
                      enc_layers=2, dec_layers=1, window=W, conv_dim=16, mask_dim=16, chunk_tokens=2 * W * 32).eval()
    vita.ffn_rows = 160
    tokens = torch.randn(1, 2 * W + 5, 32, 128)
    with torch.no_grad():
        assert (vita.encode(tokens) - reference_encode(vita, tokens)).abs().max() <= 1e-4


def test_chunked_decoder_overwrite_and_token_dtype_keep_the_output():
    torch.manual_seed(0)
    vita = _vita()
    tokens = torch.randn(1, 37, 7, 32)
    index = torch.stack([torch.randperm(7) for _ in range(37)])
    with torch.no_grad():
        whole = vita(tokens, index)
        vita.chunk_tokens = 3 * W * 7  # the cross-attention reads the tokens in 2 chunks
        chunked = vita(tokens, index)
        given = tokens.clone()
        overwritten = vita(given, index, overwrite_input=True)
        vita.token_dtype = torch.bfloat16
        reduced = vita(tokens, index)
    for out in (chunked, overwritten):
        assert (out.pred_logits - whole.pred_logits).abs().max() <= 1e-5
        assert (out.pred_mask_embed - whole.pred_mask_embed).abs().max() <= 1e-5
    assert not torch.equal(given, tokens), "overwrite_input let the encoder use the input as its buffer"
    # bf16 storage between layers rounds the tokens (8 bits of mantissa): close, not equal
    assert (reduced.pred_logits - whole.pred_logits).abs().max() <= 0.05


def test_official_parity_with_reference_kernels(official_case):
    from vita_train import load_model

    from .conftest import rel_err

    model = load_model(official_case.ckpt)
    model.set_kernels("reference")
    e = official_case.expected
    frames = torch.from_numpy(e["images_resized_subset"])
    with torch.no_grad():
        logits, embed = model.track(torch.from_numpy(e["frame_queries"]))
        features = model.detect(frames).mask_features
    assert rel_err(logits, e["pred_logits"]) <= 1e-4
    assert rel_err(embed, e["pred_mask_embed"]) <= 1e-4
    assert rel_err(features, e["mask_features_subset"]) <= 1e-4


def test_runtime_options_choose_kernels_and_token_dtype():
    import runtime

    from .conftest import OfficialCase

    official_case = OfficialCase("r50_tiny")
    frames = official_case.frames[:8]
    base = runtime.load(official_case.ckpt, device="cpu").segment(frames)
    ref = runtime.load(official_case.ckpt, device="cpu", kernels="reference").segment(frames)
    half = runtime.load(official_case.ckpt, device="cpu", token_dtype="bfloat16")
    assert half.backend.model.vita.token_dtype == torch.bfloat16
    reduced = half.segment(frames)
    assert [i.label for i in ref.instances] == [i.label for i in base.instances]
    assert max(abs(a.score - b.score) for a, b in zip(ref.instances, base.instances)) <= 1e-4
    # bf16 storage moves scores slightly; the strongest instance stays
    assert reduced.instances[0].label == base.instances[0].label
    assert abs(reduced.instances[0].score - base.instances[0].score) <= 0.02
    with pytest.raises(ValueError, match="token_dtype"):
        runtime.load(official_case.ckpt, device="cpu", token_dtype="int8")


@needs_triton
def test_bf16_autocast_runs_the_pixel_decoder_through_triton_close_to_fp32():
    """The CUDA bf16 policy path: autocast bf16 inference with the Triton deformable attention (a bf16 value
    table, fp32 positions and weights) against fp32 with the reference kernels."""
    from vita_train import VitaModel, preset

    torch.manual_seed(0)
    model = VitaModel(preset("vita_tiny")).eval().to(triton_device)
    frames = (torch.rand(1, 3, 64, 96) * 255).to(triton_device)
    with torch.no_grad():
        model.set_kernels("reference")
        ref = model.detect(frames).mask_features.float()
        model.set_kernels("triton")
        with torch.autocast(triton_device, dtype=torch.bfloat16):
            out = model.detect(frames).mask_features
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits: measured 0.9% of the largest feature under the interpreter
    assert (out.float() - ref).abs().max() <= 0.03 * ref.abs().max()
