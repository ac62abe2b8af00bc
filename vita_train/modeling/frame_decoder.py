"""Mask2Former's masked-attention transformer decoder, run per frame; yields VITA's frame queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .onednn import PackedLinear
from .position_encoding import SinePositionCache
from .transformer_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer


@dataclass
class FrameDecoderOutput:
    """Per-frame outputs: queries of the requested layers (decoder_norm applied), and per layer logits/masks."""

    frame_queries: list[Tensor]  # each (B, Nf, C), oldest first, the last is the final layer
    pred_logits: list[Tensor]  # each (B, Nf, K+1), one per prediction (initial + every layer)
    pred_masks: list[Tensor]  # each (B, Nf, H/4, W/4); empty at inference unless asked for


def _mask_logits(embed: Tensor, features: Tensor) -> Tensor:
    """(B, Q, C) x (B, C, H, W) -> (B, Q, H, W): einsum "bqc,bchw->bqhw" as one batched matmul.

    A MatMul in the exported graph (onnxruntime's Einsum is slower); channels-last features are read
    through a strided view, without a copy. (Multiplying them as (HW, C) rows, the product's transpose a view,
    was faster for the product alone but slower for the decoder: the attention masks came out transposed.)
    """
    b, c, h, w = features.shape
    return torch.matmul(embed, features.reshape(b, c, h * w)).view(b, embed.shape[1], h, w)


def _projected_mask_logits(embed: Tensor, projection: tuple[Tensor, Tensor], features: Tensor) -> Tensor:
    """``_mask_logits(embed, conv(features))`` for a 1x1 ``conv`` given as (weight (D, C), bias (D,)), with the
    convolution folded into the embeddings: e . (W f + b) = (e W) . f + e . b. The Q embeddings are folded
    instead of projecting every pixel of the map (the full-size R-50's 48x80 attention size: 100x256x256
    instead of 3840x256x256 multiply-adds a prediction)."""
    weight, bias = projection
    b, c, h, w = features.shape
    folded = torch.matmul(embed, weight)
    offset = torch.matmul(embed, bias.unsqueeze(-1))  # (B, Q, 1)
    return torch.baddbmm(offset, folded, features.reshape(b, c, h * w)).view(b, embed.shape[1], h, w)


class AttentionMaskThreshold(nn.Module):
    """Mask logits -> blocked positions: the decoder's one hard decision.

    A module of its own so that export validation can observe it and pin it with a forward hook.
    The official rule is sigmoid < 0.5, not the sign: the two differ for logits within float rounding of 0.
    """

    def forward(self, logits: Tensor) -> Tensor:
        """True where attention is blocked."""
        return logits.sigmoid() < 0.5


class MaskedAttentionDecoder(nn.Module):
    """Queries attend to one feature level per layer (coarse to fine, cycling), masked by the previous masks."""

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        mask_dim: int = 256,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_layers, self.num_levels = num_heads, num_layers, num_levels
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads) for _ in range(num_layers)
        )
        # float32 FFNs as oneDNN 1x1 convolutions on AVX2: 100 rows of 256 -> 2048 -> 256 took 0.68 and 0.66 ms
        # instead of addmm's 0.81 and 0.83 (frame decoder 113.8 -> 110.5 ms, AMD EPYC Zen 2), for a packed copy
        # of their weights (38 MB at full size)
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, ffn_dim, float32="conv") for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.class_embed = PackedLinear(hidden_dim, num_classes + 1, float32=False)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.hidden_dim = hidden_dim
        self.attn_mask_threshold = AttentionMaskThreshold()
        self.position_cache = SinePositionCache(hidden_dim // 2)

    def _heads(
        self, output: Tensor, mask_features: Tensor, size: tuple[int, int] | None, want_mask: bool,
        resized_features: dict[tuple[int, int], Tensor], projection: Optional[tuple[Tensor, Tensor]] = None,
    ):
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        if size is None and not want_mask:
            return decoded, logits, None, None
        embed = self.mask_embed(decoded)
        masks = _mask_logits(embed, mask_features) if want_mask else None
        attn_mask = None
        if size is not None:
            if masks is not None:  # training: the full masks exist for the losses, resize them (official order)
                resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
            elif projection is not None:  # resize the features, not 100 full-size masks; project the embeddings
                resized = _projected_mask_logits(embed, projection, resized_features[size])
            else:  # bilinear resizing is linear per channel: resize the features, not 100 full-size masks
                resized = _mask_logits(embed, resized_features[size])
            attn_mask = self.attn_mask_threshold(resized.flatten(2)).detach()
        return decoded, logits, masks, attn_mask

    @staticmethod
    def _resize_features(
        mask_features: Tensor, sizes: list[tuple[int, int]], dtype: Optional[torch.dtype] = None,
    ) -> dict[tuple[int, int], Tensor]:
        """The mask features bilinearly resized to every attention size (inference's mask logits at that size),
        in ``dtype`` where given."""
        # channels-last: the CPU resize kernel is an order of magnitude slower on NCHW
        x = mask_features.contiguous(memory_format=torch.channels_last)
        resized = {}
        for size in set(sizes):
            r = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            resized[size] = r if dtype is None else r.to(dtype)
        return resized

    def forward(
        self, features: list[Tensor], mask_features: Tensor, num_query_layers: int = 1, with_masks: bool = False,
        mask_projection: Optional[nn.Module] = None,
    ) -> FrameDecoderOutput:
        """features: [/32, /16, /8] (B, C, h, w); mask_features (B, D, H/4, W/4).

        ``num_query_layers``: how many final layers' queries to return (1 at inference, 3 to train VITA).
        ``with_masks``: also return every prediction's masks (training). Inference computes no full-size
        masks: each attention mask comes from the mask features resized to that layer's size, which equals
        resizing the masks (both steps are linear) up to float rounding.
        ``mask_projection``: the pixel decoder's 1x1 mask-feature convolution, when ``mask_features`` is its
        input. Inference then resizes the unprojected map (a 1x1 convolution with a bias commutes with a
        bilinear resize, whose weights sum to 1) and folds the convolution into each prediction's embeddings
        (``_projected_mask_logits``); with masks, the full map is projected first, as in the official code.
        """
        fd = self.query_feat.weight.dtype
        if mask_projection is not None and with_masks:
            mask_features, mask_projection = mask_projection(mask_features), None
        if mask_projection is None:
            mask_features = mask_features.to(fd)
        srcs, poss, sizes = [], [], []
        for i, x in enumerate(features):
            sizes.append((x.shape[-2], x.shape[-1]))
            poss.append(self.position_cache.tokens(x, x.dtype))
            srcs.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1))
        b = features[0].shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)

        queries, logits_all, masks_all = [], [], []
        resized_features = {} if with_masks else self._resize_features(mask_features, sizes, fd)
        projection = None
        if mask_projection is not None:
            weight = mask_projection.weight.reshape(mask_projection.weight.shape[0], -1)
            bias = mask_projection.bias if mask_projection.bias is not None else weight.new_zeros(weight.shape[0])
            projection = (weight.to(fd), bias.to(fd))
        _, logits, masks, attn_mask = self._heads(output, mask_features, sizes[0], with_masks, resized_features,
                                                  projection)
        logits_all.append(logits)
        if with_masks:
            masks_all.append(masks)
        keys: list[Optional[Tensor]] = [None] * self.num_levels
        for i in range(self.num_layers):
            level = i % self.num_levels
            # a query whose mask blocks everything attends everywhere instead
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            if keys[level] is None:  # each level's keys are made once: three layers attend to it
                keys[level] = srcs[level] + poss[level]
            output = self.transformer_cross_attention_layers[i](
                output, srcs[level], pos=query_pos, mask=attn_mask.unsqueeze(1), memory_key=keys[level]
            )
            output = self.transformer_self_attention_layers[i](output, pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            next_size = None if last else sizes[(i + 1) % self.num_levels]
            decoded, logits, masks, attn_mask = self._heads(
                output, mask_features, next_size, with_masks, resized_features, projection
            )
            logits_all.append(logits)
            if with_masks:
                masks_all.append(masks)
            if i >= self.num_layers - num_query_layers:
                queries.append(decoded)
        return FrameDecoderOutput(queries, logits_all, masks_all)
