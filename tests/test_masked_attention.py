"""The compiled masked attention (kernels/csrc/masked_attention_cpu.cpp) against scaled_dot_product_attention
and float64, and the attention layers' choice between the two."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from kernels import native
from tests.conftest import require_native_kernels
from vita_train.modeling import transformer_layers
from vita_train.modeling.transformer_layers import MultiheadAttention


def _case(n: int, lq: int, lk: int, heads: int, d: int, seed: int, dtype=torch.float32, sharp: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, lq, heads * d, generator=g) * sharp).to(dtype)
    k = torch.randn(n, lk, heads * d, generator=g).to(dtype)
    v = torch.randn(n, lk, heads * d, generator=g).to(dtype)
    mask = torch.rand(n, lq, lk, generator=g) < 0.6  # True: blocked
    mask[:, :, 0] = False  # no query blocked everywhere (the frame decoder never sends one)
    return q, k, v, mask


def _sdpa(q, k, v, mask, heads):
    """The plain form: per-head scaled_dot_product_attention, (N, Lq, C) out."""
    n, lq, c = q.shape
    split = [t.view(n, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    allowed = None if mask is None else ~mask.unsqueeze(1)
    return F.scaled_dot_product_attention(*split, attn_mask=allowed).transpose(1, 2).reshape(n, lq, c)


@pytest.mark.parametrize("lq, lk", [(100, 3840), (7, 33), (1, 16), (5, 517)])
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("masked", [True, False])
def test_fp32_is_as_close_to_float64_as_sdpa(lq, lk, d, masked):
    """Every query count (a block of 4 and its tail), key count (a block of 16 and its tail) and head width."""
    require_native_kernels()
    q, k, v, mask = _case(2, lq, lk, 64 // d * 2, d, seed=lq + lk + d, sharp=3.0)
    mask = mask if masked else None
    heads = 64 // d * 2
    ours = native.masked_attention(q, k, v, mask, heads)
    exact = _sdpa(q.double(), k.double(), v.double(), mask, heads)
    plain = _sdpa(q, k, v, mask, heads)
    err, plain_err = (ours.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
    assert ours.shape == q.shape and ours.dtype == torch.float32
    assert err <= max(4 * plain_err, 1e-6), (err, plain_err)


def test_bf16_is_float32_inside_and_rounded_once():
    """bf16 q, k and v: the float32 kernel on the same (widened) values, rounded to bf16 at the end; as close
    to float64 as SDPA's bf16 path."""
    require_native_kernels()
    q, k, v, mask = _case(1, 100, 960, 8, 32, seed=3, dtype=torch.bfloat16)
    ours = native.masked_attention(q, k, v, mask, 8)
    assert ours.dtype == torch.bfloat16
    wide = native.masked_attention(q.float(), k.float(), v.float(), mask, 8)
    torch.testing.assert_close(ours, wide.to(torch.bfloat16), rtol=0, atol=0)
    exact = _sdpa(q.double(), k.double(), v.double(), mask, 8)
    plain = _sdpa(q, k, v, mask, 8)
    assert (ours.double() - exact).abs().max() <= (plain.double() - exact).abs().max()


def test_a_mask_shared_by_the_batch_and_a_query_with_every_key_blocked():
    require_native_kernels()
    q, k, v, mask = _case(3, 9, 40, 4, 16, seed=5)
    shared = mask[:1].clone()
    shared[0, 2] = True  # query 2: every key blocked -> zeros (no weights), not NaN
    ours = native.masked_attention(q, k, v, shared, 4)
    assert torch.equal(ours[:, 2], torch.zeros_like(ours[:, 2]))
    keep = [i for i in range(9) if i != 2]
    want = _sdpa(q, k, v, shared.expand(3, -1, -1), 4)
    torch.testing.assert_close(ours[:, keep], want[:, keep], rtol=1e-5, atol=1e-5)


def test_a_mask_read_wrongly_is_caught():
    """Negative control: the kernel's mask inverted (allowed <-> blocked) misses the bound above by far."""
    require_native_kernels()
    q, k, v, mask = _case(1, 20, 300, 8, 32, seed=7)
    mask[:, :, 1] = False
    ours = native.masked_attention(q, k, v, ~mask, 8)
    exact = _sdpa(q.double(), k.double(), v.double(), mask, 8)
    plain = _sdpa(q, k, v, mask, 8)
    assert (ours.double() - exact).abs().max() > 100 * max((plain.double() - exact).abs().max().item(), 1e-6)


def test_bad_inputs_are_refused_with_the_reason():
    require_native_kernels()
    q, k, v, mask = _case(1, 4, 20, 4, 16, seed=1)
    with pytest.raises(RuntimeError, match="all be float32 or all bfloat16"):
        native.masked_attention(q, k.double(), v, mask, 4)
    with pytest.raises(RuntimeError, match="heads of 16, 32 or 64 channels"):
        native.masked_attention(q, k, v, mask, 8)
    with pytest.raises(RuntimeError, match="boolean"):
        native.masked_attention(q, k, v, mask.float(), 4)


def _layer(seed: int = 0) -> MultiheadAttention:
    torch.manual_seed(seed)
    layer = MultiheadAttention(256, 8).eval()
    torch.nn.init.normal_(layer.in_proj_bias, std=0.1)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_takes_it_for_a_large_map_and_follows_sdpa(dtype, monkeypatch):
    """The frame decoder's masked cross-attention (100 queries over 3840 pixels): the compiled kernel runs, and
    its output is SDPA's (kernels="reference") within the dtype's noise."""
    require_native_kernels()
    layer = _layer().to(dtype)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, 100, 256, generator=g).to(dtype)
    memory = torch.randn(1, 3840, 256, generator=g).to(dtype)
    mask = (torch.rand(1, 100, 3840, generator=g) < 0.5).unsqueeze(1)
    calls = []
    real = native.masked_attention
    monkeypatch.setattr(native, "masked_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = layer(query, memory, memory, mask)
        assert calls, "the compiled kernel did not run"
        layer.kernels = "reference"
        plain = layer(query, memory, memory, mask)
    assert len(calls) == 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), plain.float(), rtol=tol, atol=tol)


def test_small_maps_float_masks_and_gradients_keep_sdpa(monkeypatch):
    require_native_kernels()
    monkeypatch.setattr(native, "masked_attention", lambda *a: pytest.fail("the compiled kernel ran"))
    layer = _layer()
    query, memory = torch.randn(1, 10, 256), torch.randn(1, transformer_layers.NATIVE_ATTENTION_MIN_KEYS, 256)
    small = memory[:, :-1]
    with torch.no_grad():
        layer(query, small, small)  # fewer keys than the threshold
        layer(query, memory, memory, torch.zeros(1, 1, 10, memory.shape[1]))  # an additive mask
        layer(query, memory, memory, torch.zeros(1, 8, 10, memory.shape[1], dtype=torch.bool))  # a mask per head
    layer(query, memory, memory).sum().backward()  # gradients: the differentiable op
    assert layer.in_proj_weight.grad is not None


def test_copies_and_old_pickles_keep_the_kernel_choice():
    layer = _layer()
    layer.kernels = "reference"
    assert copy.deepcopy(layer).kernels == "reference"
    state = layer.__dict__.copy()
    del state["kernels"]  # pickled before the compiled path existed
    old = MultiheadAttention.__new__(MultiheadAttention)
    old.__setstate__(state)
    assert old.kernels == "auto"
    assert pickle.loads(pickle.dumps(layer)).kernels == "reference"
