"""The linear-memory windowed Object Encoder against a dense reference written as the official code is."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vita_train.modeling.vita_module import VitaModule


def _mha(layer, heads: int) -> nn.MultiheadAttention:
    c = layer.self_attn.out_proj.in_features
    mha = nn.MultiheadAttention(c, heads)
    mha.load_state_dict(layer.self_attn.state_dict())
    return mha.eval()


def reference_encode(vita: VitaModule, tokens: torch.Tensor, shifted: bool = True) -> torch.Tensor:
    """Official algorithm: seq-first, dense (windows*heads, W*N, W*N) shift mask of -1000, key padding mask."""
    b, t, n, c = tokens.shape
    w, heads = vita.window, vita.num_heads
    x = tokens.permute(1, 2, 0, 3)  # T, N, B, C
    pad = math.ceil(t / w) * w - t
    x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad))
    tp = t + pad
    nw, h = tp // w, math.ceil(w / 2)
    frame_pad = torch.ones(b, tp, dtype=torch.bool)
    frame_pad[:, :t] = False
    key_mask = frame_pad.view(b * nw, w)[..., None].repeat(1, 1, n).flatten(1)
    m = torch.roll(frame_pad, h, 1).view(b, nw, w)[..., None].repeat(1, 1, 1, w)
    m[:, 0] = m[:, 0] | m[:, 0].transpose(-2, -1)
    m[:, -1] = m[:, -1] | m[:, -1].transpose(-2, -1)
    m[:, 0, :h, h:] = True
    m[:, 0, h:, :h] = True
    m = m.view(b * nw, 1, w, 1, w, 1).repeat(1, heads, 1, n, 1, n).view(b * nw * heads, w * n, w * n)
    shift_mask = m.float() * -1000

    def layer(i, seq, **kw):
        attn = vita.enc_self_attn[i]
        seq = attn.norm(seq + _mha(attn, heads)(seq, seq, seq, need_weights=False, **kw)[0])
        return vita.enc_ffn[i](seq)

    for i in range(len(vita.enc_self_attn)):
        use_shift = shifted and i % 2 == 1
        if use_shift:
            x = torch.roll(x, h, 0)
        seq = x.reshape(nw, w, n, b, c).permute(1, 2, 3, 0, 4).reshape(w * n, b * nw, c)
        seq = layer(i, seq, attn_mask=shift_mask) if use_shift else layer(i, seq, key_padding_mask=key_mask)
        x = seq.reshape(w, n, b, nw, c).permute(3, 0, 1, 2, 4).reshape(tp, n, b, c)
        if use_shift:
            x = torch.roll(x, -h, 0)
    return x[:t].permute(2, 0, 1, 3)


@pytest.mark.parametrize("window", [3, 5, 6])
@pytest.mark.parametrize("extra", [-2, -1, 0, 1, 7])
def test_window_encoder_matches_dense_reference(window, extra):
    torch.manual_seed(window * 100 + extra)
    t = max(1, window + extra) if extra != 7 else 4 * window + 1
    vita = VitaModule(num_classes=5, num_frame_queries=7, hidden_dim=32, num_queries=4, num_heads=4,
                      ffn_dim=48, enc_layers=4, dec_layers=1, window=window, conv_dim=16, mask_dim=16).eval()
    tokens = torch.randn(2, t, 7, 32)
    with torch.no_grad():
        ours = vita.encode(tokens)
        ref = reference_encode(vita, tokens)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        # training never shifts: the even-layer rule applies everywhere
        torch.testing.assert_close(vita.encode(tokens, shifted=False), reference_encode(vita, tokens, shifted=False),
                                   rtol=1e-5, atol=1e-5)


def test_shift_matters_and_full_attention_window_zero():
    torch.manual_seed(0)
    vita = VitaModule(num_classes=5, num_frame_queries=7, hidden_dim=32, num_queries=4, num_heads=4,
                      ffn_dim=48, enc_layers=2, dec_layers=1, window=3, conv_dim=16, mask_dim=16).eval()
    tokens = torch.randn(1, 8, 7, 32)
    with torch.no_grad():
        assert not torch.allclose(vita.encode(tokens, shifted=True), vita.encode(tokens, shifted=False))
        vita.window = 0
        full = vita.encode(tokens)
        seq = tokens.reshape(1, 56, 32)
        for i in range(2):
            seq = vita.enc_ffn[i](vita.enc_self_attn[i](seq))
        torch.testing.assert_close(full, seq.view(1, 8, 7, 32))


@pytest.mark.parametrize("window", [3, 6])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 6, 7, 13, 37])
def test_branch_free_encoder_matches_eager(window, t):
    torch.manual_seed(t)
    vita = VitaModule(num_classes=5, num_frame_queries=7, hidden_dim=32, num_queries=4, num_heads=4,
                      ffn_dim=48, enc_layers=4, dec_layers=1, window=window, conv_dim=16, mask_dim=16).eval()
    tokens = torch.randn(1, t, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(vita.encode_blocks(tokens), vita.encode(tokens), rtol=1e-5, atol=1e-5)
