"""The oneDNN linear layer of CPU inference equals the plain nn.Linear it replaces (vita_train/modeling/onednn.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from vita_train.modeling import onednn
from vita_train.modeling.onednn import PackedLinear, bf16_supported, exporting, needs_plain_ops

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.fixture(params=["matmul", "conv"])
def fp32_form(request, monkeypatch) -> str:
    """Each fp32 form of the packed call, whichever this CPU takes by default (``fp32_linear_as_conv``)."""
    monkeypatch.setattr(onednn, "fp32_linear_as_conv", lambda: request.param == "conv")
    return request.param


def _layer(cin: int = 256, cout: int = 1024, bias: bool = True) -> PackedLinear:
    torch.manual_seed(0)
    layer = PackedLinear(cin, cout, bias=bias).eval()
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    return layer


def _plain(layer: PackedLinear, x: torch.Tensor, relu: bool) -> torch.Tensor:
    out = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    return out.relu() if relu else out


@needs_onednn
@pytest.mark.parametrize("shape", [(5040, 256), (1, 977, 256), (2, 33, 256), (1, 256)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_the_plain_linear(shape, relu, bias, fp32_form):
    layer = _layer(bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = layer(x, relu=relu)
        # the reference in float64: both the packed call and F.linear sit ~1e-6 from it
        want = _plain(layer, x, relu)
        plain32 = F.linear(x, layer.weight, layer.bias)
        plain32 = plain32.relu() if relu else plain32
    assert layer.pack.form == fp32_form, "the fast path did not run"
    assert got.shape == want.shape and got.dtype == torch.float32
    scale = want.abs().max().item()
    fast_err = (got.double() - want).abs().max().item() / scale
    plain_err = (plain32.double() - want).abs().max().item() / scale
    assert fast_err < max(4 * plain_err, 1e-6), (fast_err, plain_err)


@needs_onednn
def test_packed_linear_takes_strided_input_and_follows_weight_changes(fp32_form):
    layer = _layer()
    x = torch.randn(256, 40).t()  # not contiguous
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight.mul_(1.5)  # an in-place update must repack
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_stale_weight_is_caught():
    """Negative control: the comparison above fails for a weight 0.1% off."""
    layer = _layer()
    x = torch.randn(64, 256)
    with torch.no_grad():
        got = layer(x)
        wrong = F.linear(x, layer.weight * 1.001, layer.bias)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, wrong, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_copies_and_pickles_drop_the_packed_weight():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(8, 256))
    assert layer.pack.packed
    clone = copy.deepcopy(layer)
    restored = pickle.loads(pickle.dumps(layer))
    assert not clone.pack.packed and not restored.pack.packed
    x = torch.randn(8, 256)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x))
        torch.testing.assert_close(restored(x), layer(x))


def test_gradients_mixed_dtypes_and_export_take_the_plain_op():
    layer = _layer(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    out = layer(x, relu=True)
    out.sum().backward()  # the plain op: differentiable
    assert not layer.pack.packed and x.grad is not None
    assert needs_plain_ops(x) and not exporting()
    mixed = copy.deepcopy(layer)
    mixed.bias.data = mixed.bias.data.to(torch.bfloat16)
    with torch.no_grad():
        with pytest.raises(RuntimeError):  # what F.linear itself says of mixed dtypes: no packed call hides it
            mixed(torch.randn(4, 16))
    assert not mixed.pack.packed
    traced = torch.jit.trace(layer.requires_grad_(False), torch.randn(4, 16))
    assert "mkldnn" not in str(traced.graph)


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
def test_bf16_packed_linear_equals_the_plain_bf16_linear(relu):
    """bf16 on a CPU with bf16 instructions: the packed call (ReLU fused) against F.linear in bf16, and against
    float64; elsewhere the plain op runs and nothing is packed."""
    layer = copy.deepcopy(_layer(256, 1024)).to(torch.bfloat16)
    x = torch.randn(2, 977, 256).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x, relu=relu)
        plain = F.linear(x, layer.weight, layer.bias)
        plain = plain.relu() if relu else plain
    assert got.dtype == torch.bfloat16
    if not bf16_supported():
        assert not layer.pack.packed and torch.equal(got, plain)
        return
    assert layer.pack.packed
    exact = _plain(layer, x, relu)
    # both round to bf16 once from an fp32 accumulation: within a bf16 step or two of float64, like F.linear
    step = exact.abs().clamp_min(1.0) * 2.0 ** -7
    assert ((got.double() - exact).abs() <= step).all()
    assert ((plain.double() - exact).abs() <= step).all()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_is_added_inside_the_call(dtype, fp32_form):
    """forward(x, residual=r) == linear(x) + r, fused or not (a strided residual takes the separate add)."""
    if dtype == torch.bfloat16 and not bf16_supported():
        pytest.skip("this CPU has no bf16 instructions")
    layer = copy.deepcopy(_layer(1024, 256)).to(dtype)
    x, r = torch.randn(2, 300, 1024).to(dtype), torch.randn(2, 300, 256).to(dtype)
    linear = _plain(layer, x, relu=False)
    exact = linear + r.double()
    # bf16: the unfused form rounds the linear output before the add, so its step is the addends' size
    step = (linear.abs() + r.double().abs()).clamp_min(1.0) * (2.0 ** -7 if dtype == torch.bfloat16 else 1e-5)
    with torch.no_grad():
        for res in (r, r.transpose(0, 1).contiguous().transpose(0, 1)):
            got = layer(x, residual=res)
            assert got.dtype == dtype and ((got.double() - exact).abs() <= step).all()
        with pytest.raises(ValueError, match="not both"):
            layer(x, relu=True, residual=r)
    # a control: the residual of another input is told apart
    assert not ((layer(x, residual=r.roll(1, 1)).double() - exact).abs() <= step).all()
    # into_residual: the same sum, written into the residual given up where the path can (fp32 1x1 conv form)
    with torch.no_grad():
        given = r.clone()
        got = layer(x, residual=given, into_residual=True)
    assert got.dtype == dtype and ((got.double() - exact).abs() <= step).all()
    if layer.pack.form == "conv":
        assert got.data_ptr() == given.data_ptr()
    else:
        assert torch.equal(given, r)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_and_ffn_layers_on_the_packed_path_equal_their_plain_ops(dtype):
    """The decoders' attention (q/k/v slices of one packed parameter, each packed on its own), FFN (ReLU and
    residual inside the calls) and MLP in bf16 on the fast path, and in float32 on the plain ops, against the
    same layers in float64."""
    if dtype == torch.bfloat16 and not bf16_supported():
        pytest.skip("this CPU has no bf16 instructions")
    from vita_train.modeling.onednn import fp32_linear_as_conv
    from vita_train.modeling.transformer_layers import KV_CONV_MIN_ROWS, MLP, CrossAttentionLayer, FFNLayer

    torch.manual_seed(0)
    layers = [CrossAttentionLayer(64, 8), FFNLayer(64, 256), MLP(64, 64, 32, 3)]
    x, memory = torch.randn(2, 10, 64), torch.randn(2, 300, 64)
    args = [(x, memory), (x,), (x,)]
    tol = 2.0 ** -6 if dtype == torch.bfloat16 else 1e-5
    for layer, a in zip(layers, args):
        layer.eval()
        fast = copy.deepcopy(layer).to(dtype)
        with torch.no_grad():
            got = fast(*(t.to(dtype) for t in a))
            want = copy.deepcopy(fast).double()(*(t.double() for t in a))
        assert got.dtype == dtype
        packs = [m.pack for m in fast.modules() if isinstance(m, PackedLinear)]
        packs += [p for m in fast.modules() for p in getattr(m, "packs", ())]
        # bf16 takes the packed calls; float32 keeps the plain ops there (float32=False: no gain measured), but
        # for the keys and values of 600 memory rows on AVX2 (float32="conv" from KV_CONV_MIN_ROWS rows)
        kv_conv = dtype == torch.float32 and fp32_linear_as_conv() and memory.shape[0] * memory.shape[1] >= KV_CONV_MIN_ROWS
        assert packs and all(p.packed == (dtype == torch.bfloat16 or (p.float32 == "conv" and kv_conv)) for p in packs), \
            type(layer).__name__
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err < tol, (type(layer).__name__, err)


@needs_onednn
def test_packed_attention_follows_changes_to_its_projection():
    """Negative control for the slices' cache (bf16): an in-place change of the packed q/k/v parameter repacks."""
    from vita_train.modeling.transformer_layers import MultiheadAttention

    torch.manual_seed(0)
    attn = MultiheadAttention(64, 8).eval().to(torch.bfloat16)
    q, kv = torch.randn(1, 10, 64).to(torch.bfloat16), torch.randn(1, 50, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = attn(q, kv, kv)
        attn.in_proj_weight[128:].mul_(2.0)  # v only
        after = attn(q, kv, kv)
        plain = copy.deepcopy(attn).double()(q.double(), kv.double(), kv.double())
    assert all(p.packed for p in attn.packs) == bf16_supported()
    assert not torch.allclose(before.double(), plain, rtol=0.05, atol=0.05)
    torch.testing.assert_close(after.double(), plain, rtol=0.02, atol=0.02)


def test_autocast_keeps_the_plain_op():
    """Under CPU autocast the plain op runs, in autocast's dtype (a packed fp32 call would bypass it)."""
    layer = _layer(16, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 16))
    assert out.dtype == torch.bfloat16 and not layer.pack.packed


@needs_onednn
def test_fp32_forms_agree_and_the_conv_form_is_the_avx2_default(monkeypatch):
    """The 1x1-convolution form runs where the CPU's widest vectors are AVX2 (faster there), the matmul form
    elsewhere; on the encoder's shapes the two agree to float32 rounding."""
    assert onednn.fp32_linear_as_conv() == (torch.backends.cpu.get_cpu_capability() == "AVX2")
    layer, x, r = _layer(1024, 256), torch.randn(1, 4760, 1024), torch.randn(1, 4760, 256)
    got = {}
    with torch.no_grad():
        for form in ("matmul", "conv"):
            monkeypatch.setattr(onednn, "fp32_linear_as_conv", lambda f=form: f == "conv")
            got[form] = (layer(x), layer(x, relu=True), layer(x, residual=r))
            assert layer.pack.form == form  # switching forms repacks
    for a, b in zip(got["matmul"], got["conv"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_encoder_layer_leaves_its_input_alone_unless_given_up():
    """The deformable encoder layer writes its attention sum into ``src`` only with ``consume_input``; either
    way the output is the same."""
    from vita_train.modeling.pixel_decoder import DeformableEncoderLayer, reference_points

    torch.manual_seed(0)
    layer = DeformableEncoderLayer(32, 64, num_levels=2, num_heads=4, num_points=2).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    shapes = [(4, 6), (2, 3)]
    src, pos = torch.randn(1, 30, 32), torch.randn(1, 30, 32)
    refs = reference_points(shapes, src.device)
    before = src.clone()
    with torch.no_grad():
        kept = layer(src, pos, refs, shapes)
        assert torch.equal(src, before)
        given = layer(src.clone(), pos, refs, shapes, consume_input=True)
    torch.testing.assert_close(given, kept, rtol=1e-6, atol=1e-6)


@needs_onednn
def test_float32_conv_packs_only_where_the_conv_form_runs(fp32_form):
    """``float32="conv"`` (the deformable attention's offsets and weights): packed float32 as a 1x1 convolution
    where that form runs (AVX2), the plain op elsewhere; the same values either way."""
    layer = PackedLinear(256, 96, float32="conv").eval()
    x = torch.randn(1, 977, 256)
    with torch.no_grad():
        got = layer(x)
    assert layer.pack.form == ("conv" if fp32_form == "conv" else None)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_float32_keys_and_values_of_few_rows_keep_the_plain_op():
    """The conv form of the k/v projections starts at KV_CONV_MIN_ROWS rows (fewer ran faster as addmm)."""
    from vita_train.modeling.onednn import fp32_linear_as_conv
    from vita_train.modeling.transformer_layers import KV_CONV_MIN_ROWS, MultiheadAttention

    torch.manual_seed(0)
    attn = MultiheadAttention(64, 8).eval()
    q = torch.randn(1, 10, 64)
    with torch.no_grad():
        small = torch.randn(1, KV_CONV_MIN_ROWS - 1, 64)
        attn(q, small, small)
        assert not any(p.packed for p in attn.packs)
        large = torch.randn(1, KV_CONV_MIN_ROWS, 64)
        got = attn(q, large, large)
        want = copy.deepcopy(attn).double()(q.double(), large.double(), large.double())
    assert [p.packed for p in attn.packs] == [False, fp32_linear_as_conv(), fp32_linear_as_conv()]
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@needs_onednn
def test_frame_decoder_ffns_pack_float32_as_convolutions_on_avx2():
    """The frame decoder's FFNs take the 1x1-convolution form in float32 where it runs (AVX2) and equal their
    float64 selves; VITA's FFNs (another module) keep the plain op."""
    from vita_train.modeling.frame_decoder import MaskedAttentionDecoder
    from vita_train.modeling.onednn import fp32_linear_as_conv
    from vita_train.modeling.transformer_layers import FFNLayer

    torch.manual_seed(0)
    ffn = MaskedAttentionDecoder(num_classes=3, hidden_dim=64, num_queries=10, num_heads=4, ffn_dim=128,
                                 num_layers=3).transformer_ffn_layers[0].eval()
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        got = ffn(x)
        want = copy.deepcopy(ffn).double()(x.double())
    assert ffn.linear1.pack.packed == ffn.linear2.pack.packed == fp32_linear_as_conv()
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    plain = FFNLayer(64, 128).eval()
    with torch.no_grad():
        plain(x)
    assert not plain.linear1.pack.packed


@needs_onednn
def test_packed_linears_pack_each_weight_once_and_equal_the_plain_op():
    """The token engine's per-call linears (PackedLinears): each weight packed once on AVX2, results within
    float32 rounding of float64; fewer than min_rows rows run the plain op."""
    from vita_train.modeling.onednn import PackedLinears, fp32_linear_as_conv

    torch.manual_seed(0)
    linears = PackedLinears(min_rows=128)
    w1, b1, w2 = torch.randn(96, 64), torch.randn(96), torch.randn(64, 96)
    with torch.no_grad():
        for rows in (300, 300, 40):
            x = torch.randn(rows, 64)
            got = linears(linears(x, w1, b1), w2, None)
            want = F.linear(F.linear(x.double(), w1.double(), b1.double()), w2.double())
            assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    packs = [pack for _, pack in linears._packs.values()]
    assert len(packs) == 2 and all(p.packed == fp32_linear_as_conv() for p in packs)
    assert all(p.min_rows == 128 for p in packs)


@needs_onednn
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_1x1_convolution_equals_the_plain_convolution(bias, threads, fp32_form):
    """The pixel decoder's 1x1 convolutions (input projections, res2 adapter) on the packed path: the same
    output and channels-last layout as ``F.conv2d``; an NCHW input, gradients and a stale weight as controls."""
    torch.manual_seed(0)
    conv = onednn.PackedConv1x1(64, 32, bias=bias).eval()
    x = torch.randn(1, 64, 12, 20).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = conv(x)
            want = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double())
            plain32 = F.conv2d(x, conv.weight, conv.bias)
            stale = F.conv2d(x, conv.weight * 1.001, conv.bias)
    finally:
        torch.set_num_threads(before)
    assert conv.pack.form == fp32_form, "the packed path did not run"
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    scale = want.abs().max().item()
    fast_err = (got.double() - want).abs().max().item() / scale
    plain_err = (plain32.double() - want).abs().max().item() / scale
    assert fast_err < max(4 * plain_err, 1e-6), (fast_err, plain_err)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, stale, rtol=1e-5, atol=1e-5)

    plain_layout = copy.deepcopy(conv)  # the same weights, no pack
    with torch.no_grad():
        nchw = plain_layout(x.contiguous())
    assert not plain_layout.pack.packed  # an NCHW input keeps torch's own convolution
    torch.testing.assert_close(nchw, plain32, rtol=1e-5, atol=1e-5)
    out = conv(x.requires_grad_())
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("machine, avx512_bf16, amx, expected", [
    ("x86_64", False, False, False),  # AVX-512 without bf16 (Skylake to Ice Lake): oneDNN would convert in software
    ("x86_64", True, False, True),  # AVX-512-BF16 (Cooper Lake, AMD Zen 4)
    ("x86_64", False, True, True),  # AMX (Sapphire Rapids and later)
    ("aarch64", False, False, True),  # ARM: oneDNN's word stands
])
def test_bf16_means_bf16_instructions_not_only_onednn_accepting_bf16(monkeypatch, machine, avx512_bf16, amx, expected):
    """oneDNN takes bf16 on any AVX-512 CPU; the bf16 precision needs the instructions that make it fast."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(onednn.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    onednn.bf16_supported.cache_clear()
    try:
        assert onednn.bf16_supported() is expected
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        onednn.bf16_supported.cache_clear()
        assert onednn.bf16_supported() is False  # nothing without oneDNN's bf16
    finally:
        monkeypatch.undo()
        onednn.bf16_supported.cache_clear()
    if onednn.platform.machine().lower() in ("x86_64", "amd64"):  # this machine, unpatched
        assert onednn.bf16_supported() == bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
