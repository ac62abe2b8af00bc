"""Winograd 3x3 convolutions (vita_train/modeling/winograd.py) equal the direct convolution they replace."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import require_native_kernels
from vita_train.modeling import winograd
from vita_train.modeling.pixel_decoder import ConvGN
from vita_train.modeling.resnet import ConvNorm

SHAPES = [(2, 16, 7, 9), (1, 64, 13, 5), (1, 32, 8, 8), (1, 16, 1, 1)]


@pytest.fixture
def winograd_here(monkeypatch):
    """The Winograd path taken wherever it applies, on every CPU kind (by default x86 with AVX2 or AVX-512)."""
    require_native_kernels()
    monkeypatch.setattr(winograd, "winograd_cpu", lambda: True)


def _case(shape, cout: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, c, 3, 3, generator=g, dtype=torch.float64) / (3 * c**0.5)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    return x, weight, bias


def _errors(got: torch.Tensor, x, weight, bias, relu: bool) -> tuple[float, float]:
    """(got's, the direct float32 convolution's) largest error against float64, relative to the output's scale."""
    want = F.conv2d(x, weight, bias, padding=1)
    direct = F.conv2d(x.float(), weight.float(), bias.float(), padding=1).double()
    if relu:
        want, direct = want.relu(), direct.relu()
    scale = want.abs().max().item()
    return (got.double() - want).abs().max().item() / scale, (direct - want).abs().max().item() / scale


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_reference_transforms_are_exact_in_float64(tile, shape):
    x, weight, bias = _case(shape, 32)
    got = winograd.reference_conv(x, weight, bias, tile)
    torch.testing.assert_close(got, F.conv2d(x, weight, bias, padding=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("band_bytes", [1, 1 << 30], ids=["row-bands", "whole"])
def test_the_kernels_are_as_accurate_as_the_direct_convolution(tile, shape, relu, band_bytes, monkeypatch):
    """Against float64: F(2x2) within 2x the direct float32 convolution's error (or 1e-6 of the output's scale),
    F(4x4) within 10x (or 1e-5: its larger transform coefficients cost about one decimal digit)."""
    require_native_kernels()
    monkeypatch.setattr(winograd, "tile_for", lambda cin, cout: tile)
    monkeypatch.setattr(winograd, "_BAND_BYTES", band_bytes)  # 1: a band per row of tiles
    x, weight, bias = _case(shape, 48)
    conv = winograd.WinogradWeight()
    with torch.no_grad():
        got = conv.conv(x.float().contiguous(memory_format=torch.channels_last), ("k",),
                        lambda: (weight.float(), bias.float()), relu=relu)
    assert conv.tile == tile
    assert got.shape == (shape[0], 48, *shape[2:]) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    err, direct_err = _errors(got, x, weight, bias, relu)
    factor, floor = {2: (2, 1e-6), 4: (10, 1e-5)}[tile]
    assert err <= max(factor * direct_err, floor), (err, direct_err)
    # and the kernels are the reference's transforms: float32 reference within float32 noise of them
    ref = winograd.reference_conv(x.float(), weight.float(), bias.float(), tile)
    torch.testing.assert_close(got, ref.relu() if relu else ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (1, 128, 13, 10)])
@pytest.mark.parametrize("relu", [False, True])
def test_bf16_activations_are_as_accurate_as_the_direct_bf16_convolution(tile, shape, relu, monkeypatch):
    """bf16 in and out, float32 Winograd domain: against float64 on the same bf16 input and weight, within 1.1x
    the direct bf16 convolution's error (both are mostly the output's one rounding to bf16)."""
    require_native_kernels()
    monkeypatch.setattr(winograd, "tile_for", lambda cin, cout: tile)
    x, weight, bias = _case(shape, 32)
    xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    conv = winograd.WinogradWeight()
    with torch.no_grad():
        got = conv.conv(xb.contiguous(memory_format=torch.channels_last), ("k",), lambda: (wb, bias.float()), relu=relu)
    assert conv.tile == tile and got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    want = F.conv2d(xb.double(), wb.double(), bias, padding=1)
    direct = F.conv2d(xb, wb, bias.to(torch.bfloat16), padding=1).double()
    if relu:
        want, direct = want.relu(), direct.relu()
    scale = want.abs().max().item()
    err, direct_err = ((got.double() - want).abs().max().item() / scale, (direct - want).abs().max().item() / scale)
    assert err <= 1.1 * direct_err, (err, direct_err)
    if tile == 4 and shape[1] >= 128:
        # negative control: F(4x4) with bf16 tiles and products (the reference transforms run in bf16) fails it
        bf16_domain = winograd.reference_conv(xb, wb, bias.to(torch.bfloat16), 4)
        bf16_domain = bf16_domain.relu() if relu else bf16_domain
        assert (bf16_domain.double() - want).abs().max().item() / scale > 1.1 * direct_err
    # the same tiles as the float32 kernels: the float32 result on the same input, rounded once
    same = conv.conv(xb.float().contiguous(memory_format=torch.channels_last), ("k",), lambda: (wb, bias.float()),
                     relu=relu)
    torch.testing.assert_close(got, same.to(torch.bfloat16), rtol=0, atol=0)


def test_a_wrong_transform_is_caught(monkeypatch):
    """Negative control: the accuracy bound above fails for one Winograd point's weights 0.1% off."""
    require_native_kernels()
    real = winograd.transform_weight

    def off(weight, tile):
        u = real(weight, tile).clone()
        n = u.shape[0] // (tile + 2) ** 2
        u[5 * n : 6 * n] *= 1.001
        return u

    monkeypatch.setattr(winograd, "transform_weight", off)
    x, weight, bias = _case((1, 32, 12, 12), 32)
    with torch.no_grad():
        got = winograd.WinogradWeight().conv(x.float().contiguous(memory_format=torch.channels_last), ("k",),
                                              lambda: (weight.float(), bias.float()))
    err, direct_err = _errors(got, x, weight, bias, False)
    assert err > max(10 * direct_err, 1e-5), (err, direct_err)


def _conv_norm(cin: int = 64, cout: int = 64, stride: int = 1, kernel: int = 3) -> ConvNorm:
    torch.manual_seed(0)
    conv = ConvNorm(cin, cout, kernel, stride, kernel // 2).eval()
    n = conv.norm
    n.weight.uniform_(0.5, 1.5), n.bias.normal_(), n.running_mean.normal_(), n.running_var.uniform_(0.5, 2)
    return conv


def test_resnet_convolutions_take_it_and_follow_weight_changes(winograd_here):
    conv = _conv_norm()
    x = torch.randn(1, 64, 20, 30).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = F.relu(conv(x))  # the plain folded convolution
        got = conv.forward_fused(x)
        assert conv._winograd.tile == 4, "the Winograd path did not run"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        conv.norm.weight.mul_(2)  # a changed statistic must repack
        torch.testing.assert_close(conv.forward_fused(x), F.relu(conv(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2], ids=["winograd", "direct"])
def test_a_new_image_size_repacks_and_a_new_batch_size_does_not(winograd_here, stride):
    """oneDNN packs a weight for the input's size: a pack kept from another image size (the last video's) was
    reordered on every call. A ResNet convolution, Winograd (stride 1) or direct (stride 2), repacks once for a
    new size and keeps its pack for a new batch size; its output equals the plain convolution's throughout."""
    conv = _conv_norm(stride=stride)
    folds = []
    fold = conv._fold

    def counted(dtype):  # the fused path folds the norm only when it (re)packs
        folds.append(dtype)
        return fold(dtype)

    sizes = [(1, 24, 32), (2, 24, 32), (1, 24, 32), (1, 16, 48), (1, 16, 48), (1, 24, 32)]
    with torch.no_grad():
        for n, h, w in sizes:
            x = torch.randn(n, 64, h, w).contiguous(memory_format=torch.channels_last)
            want = F.relu(conv(x))
            conv._fold = counted
            torch.testing.assert_close(conv.forward_fused(x), want, rtol=1e-4, atol=1e-4)
            del conv._fold
    assert len(folds) == 3  # 24x32, 16x48, 24x32 again


def test_bf16_keeps_the_direct_convolution_on_amx_cpus(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    winograd.bf16_winograd_cpu.cache_clear()
    try:
        assert not winograd.bf16_winograd_cpu()
    finally:
        monkeypatch.undo()
        winograd.bf16_winograd_cpu.cache_clear()


def test_a_bf16_resnet_convolution_takes_it_with_the_norm_folded_in_float32(winograd_here, monkeypatch):
    """A bf16 detector's stride-1 3x3 (bf16 weight, float32 frozen norm): the Winograd path, nearer to the
    float32 fold on the same bf16 input than oneDNN's direct bf16 convolution of the bf16-rounded fold."""
    monkeypatch.setattr(winograd, "bf16_winograd_cpu", lambda: True)
    conv = _conv_norm(cin=128, cout=128)
    conv.weight.data = conv.weight.data.to(torch.bfloat16)  # as precision.cast_detector leaves it
    x = torch.randn(1, 128, 10, 14).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = conv.forward_fused(x)
        assert conv._winograd.tile is not None and got.dtype == torch.bfloat16
        weight, bias = conv.folded(torch.float32)
        want = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), padding=1))
        direct = F.relu(F.conv2d(x, weight.to(torch.bfloat16), bias.to(torch.bfloat16), padding=1)).double()
    assert (got.double() - want).abs().max() <= (direct - want).abs().max()


def test_reference_kernels_gradients_and_other_shapes_keep_the_direct_convolution(winograd_here):
    x = torch.randn(1, 64, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for conv in (_conv_norm(stride=2), _conv_norm(kernel=1), _conv_norm(cin=24, cout=24)):
            conv.forward_fused(x[:, : conv.weight.shape[1]])
            assert conv._winograd.tile is None, conv.weight.shape
        ref = _conv_norm()
        ref.kernels = "reference"
        ref.forward_fused(x)
        assert ref._winograd.tile is None
        # bf16 activations below BF16_MIN_CHANNELS keep oneDNN's direct bf16 convolution (faster there)
        assert not winograd.usable(x.to(torch.bfloat16), ref.weight.to(torch.bfloat16), 1, 1, "auto")
        wide = torch.zeros(1, winograd.BF16_MIN_CHANNELS, 4, 4, dtype=torch.bfloat16)
        weight = torch.zeros(16, winograd.BF16_MIN_CHANNELS, 3, 3, dtype=torch.bfloat16)
        assert winograd.usable(wide, weight, 1, 1, "auto") == winograd.bf16_winograd_cpu()
        assert not winograd.usable(wide, weight.float(), 1, 1, "auto")  # mixed dtypes: the plain op
    trained = _conv_norm().train()
    trained.forward_fused(x.requires_grad_()).sum().backward()
    assert trained._winograd.tile is None and x.grad is not None


def test_the_pixel_decoder_convolution_takes_it_and_set_kernels_turns_it_off(winograd_here):
    from vita_train.modeling.vita_model import VitaModel  # noqa: F401  (set_kernels is VitaModel's)

    torch.manual_seed(0)
    layer = ConvGN(32, 32, 3, 8, relu=True).eval()
    x = torch.randn(2, 32, 17, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = layer(x)
        assert layer._winograd.tile == 4
        want = F.relu(layer.norm(F.conv2d(x, layer.weight, None, 1, 1)))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        layer.kernels = "reference"
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


def test_copies_and_pickles_leave_the_packed_weight_behind(winograd_here):
    torch.manual_seed(0)
    x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    for module, run in ((_conv_norm(), ConvNorm.forward_fused), (ConvGN(64, 64, 3, 8, relu=True).eval(), ConvGN.forward)):
        with torch.no_grad():
            want = run(module, x)
            assert module._winograd.tile == 4
            for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
                assert other._winograd.tile is None
                torch.testing.assert_close(run(other, x), want, rtol=0, atol=0)


def test_the_detector_follows_the_plain_convolutions(winograd_here):
    """A whole R-50 detector: Winograd against kernels="reference" (direct convolutions), mask features and
    frame logits within float32 noise."""
    from vita_train.config import ModelConfig
    from vita_train.modeling.vita_model import VitaModel

    cfg = ModelConfig()
    cfg.backbone = "resnet"
    torch.manual_seed(0)
    model = VitaModel(cfg).eval()
    images = torch.randint(0, 256, (1, 3, 128, 160), dtype=torch.uint8)
    with torch.no_grad():
        fast = model.detect(images)
        tiles = {m._winograd.tile for m in model.modules() if isinstance(m, (ConvNorm, ConvGN))}
        model.set_kernels("reference")
        plain = model.detect(images)
    assert {2, 4} <= tiles, tiles
    torch.testing.assert_close(fast.mask_features, plain.mask_features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.frame_logits, plain.frame_logits, rtol=1e-3, atol=1e-3)
