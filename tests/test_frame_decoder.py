"""The frame decoder's inference path (attention masks from resized mask features) against the official order."""

from __future__ import annotations

import copy

import torch

from vita_train.modeling.frame_decoder import MaskedAttentionDecoder


def _decoder_and_inputs(seed: int):
    torch.manual_seed(seed)
    dec = MaskedAttentionDecoder(num_classes=5, hidden_dim=64, num_queries=12, num_heads=4, ffn_dim=128,
                                 num_layers=6, mask_dim=64).eval()
    features = [torch.randn(2, 64, h, w) for h, w in [(3, 5), (6, 9), (11, 17)]]
    return dec, features, torch.randn(2, 64, 22, 34)


def _observed(dec, features, mask_features, with_masks):
    seen = []
    hook = dec.attn_mask_threshold.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        out = dec(features, mask_features, with_masks=with_masks)
    hook.remove()
    return out, seen


def test_inference_attention_masks_equal_resized_full_masks():
    """Resizing the features before the mask product (inference) or the masks after it (training, official)."""
    dec, features, mask_features = _decoder_and_inputs(0)
    fast, fast_seen = _observed(dec, features, mask_features, with_masks=False)
    full, full_seen = _observed(dec, features, mask_features, with_masks=True)
    assert fast.pred_masks == [] and len(full.pred_masks) == dec.num_layers + 1
    assert len(fast_seen) == len(full_seen) == dec.num_layers
    for (fast_logits, fast_mask), (full_logits, full_mask) in zip(fast_seen, full_seen):
        assert (fast_logits - full_logits).abs().max() <= 1e-5 * full_logits.abs().max()
        assert torch.equal(fast_mask, full_mask)
    assert (fast.frame_queries[-1] - full.frame_queries[-1]).abs().max() <= 1e-5
    assert (fast.pred_logits[-1] - full.pred_logits[-1]).abs().max() <= 1e-5


def test_projecting_the_resized_features_equals_projecting_the_full_map():
    """The detector hands the decoder the pixel decoder's map before its 1x1 mask-feature convolution (inference
    projects the resized maps): the same attention masks as projecting the full map first (the official order)."""
    dec, features, pre = _decoder_and_inputs(2)
    projection = torch.nn.Conv2d(64, 64, 1).eval()
    torch.nn.init.normal_(projection.bias, std=0.5)  # a bias that matters: it must pass through the resize
    with torch.no_grad():
        projected = projection(pre)
    official, official_seen = _observed(dec, features, projected, with_masks=True)
    seen = []
    hook = dec.attn_mask_threshold.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        fast = dec(features, pre, mask_projection=projection)
        trained = dec(features, pre, with_masks=True, mask_projection=projection)
    hook.remove()
    fast_seen = seen[: dec.num_layers]
    for (fast_logits, fast_mask), (logits, mask) in zip(fast_seen, official_seen):
        assert (fast_logits - logits).abs().max() <= 1e-5 * logits.abs().max()
        assert torch.equal(fast_mask, mask)
    assert (fast.frame_queries[-1] - official.frame_queries[-1]).abs().max() <= 1e-5
    # with masks (training), the full map is projected: the official computation exactly
    assert all(torch.equal(a, b) for a, b in zip(trained.pred_masks, official.pred_masks))
    # control: leaving the projection out changes the decisions
    _, unprojected = _observed(dec, features, pre, with_masks=False)
    assert any(not torch.equal(u[1], o[1]) for u, o in zip(unprojected, official_seen))


def test_a_wrong_resize_is_caught():
    """Control: nearest instead of bilinear resizing of the features changes the attention masks."""
    dec, features, mask_features = _decoder_and_inputs(1)
    _, full_seen = _observed(dec, features, mask_features, with_masks=True)
    wrong = {s: torch.nn.functional.interpolate(mask_features, size=s, mode="nearest") for s in [(3, 5), (6, 9), (11, 17)]}
    original = dec._resize_features
    dec._resize_features = lambda *args: wrong
    try:
        _, wrong_seen = _observed(dec, features, mask_features, with_masks=False)
    finally:
        dec._resize_features = original
    assert any(not torch.equal(w[1], f[1]) for w, f in zip(wrong_seen, full_seen))


def test_cached_position_encodings_equal_fresh_ones_per_size_and_dtype():
    """A decoder run twice, and on a second frame size, gives what it gives with the encodings recomputed."""
    from vita_train.modeling.position_encoding import SinePositionCache, sine_position_encoding

    cache = SinePositionCache(32, max_entries=2)
    small, large = torch.randn(1, 8, 5, 7), torch.randn(2, 8, 9, 4)
    for x, dtype in [(small, None), (large, None), (small, None), (small, torch.bfloat16), (large, None)]:
        fresh = sine_position_encoding(x, 32).flatten(2).transpose(1, 2)
        got = cache.tokens(x, dtype)
        assert got.shape == (1, x.shape[-2] * x.shape[-1], 64)
        assert torch.equal(got, fresh if dtype is None else fresh.to(dtype))
    assert len(cache._entries) == 2  # bounded: the oldest size is dropped
    assert cache.tokens(small.double()).dtype == torch.float64  # the float64 reference keeps float64

    dec, features, mask_features = _decoder_and_inputs(0)
    first, _ = _observed(dec, features, mask_features, with_masks=False)
    again, _ = _observed(dec, features, mask_features, with_masks=False)
    dec.position_cache.max_entries = 0  # recomputed on every call
    fresh, _ = _observed(dec, features, mask_features, with_masks=False)
    for out in (again, fresh):
        assert torch.equal(out.frame_queries[-1], first.frame_queries[-1])
        assert torch.equal(out.pred_logits[-1], first.pred_logits[-1])


def test_projection_folded_into_the_embeddings_gives_the_projected_maps_logits():
    """e . (W f + b) = (e W) . f + e . b: the attention-mask logits with the pixel decoder's 1x1 mask-feature
    convolution folded into the embeddings are the logits on the projected map, to float32 rounding (measured
    against float64); a bias off by 1% is caught."""
    from vita_train.modeling.frame_decoder import _mask_logits, _projected_mask_logits

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 24, 1)
    embed, features = torch.randn(2, 10, 24), torch.randn(2, 32, 9, 13).contiguous(memory_format=torch.channels_last)
    projection = (conv.weight.reshape(24, 32).detach(), conv.bias.detach())
    with torch.no_grad():
        want = _mask_logits(embed.double(), copy.deepcopy(conv).double()(features.double()))
        plain = _mask_logits(embed, conv(features))
        got = _projected_mask_logits(embed, projection, features)
        off = _projected_mask_logits(embed, (projection[0], projection[1] * 1.01), features)
    scale = want.abs().max()
    plain_err = ((plain.double() - want).abs().max() / scale).item()
    assert got.shape == want.shape == (2, 10, 9, 13)
    assert ((got.double() - want).abs().max() / scale).item() <= max(2 * plain_err, 1e-6)
    assert ((off.double() - want).abs().max() / scale).item() > 1e-4
