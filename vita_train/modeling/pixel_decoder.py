"""Mask2Former's multi-scale deformable-attention pixel decoder (MSDeformAttnPixelDecoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import MSDeformAttn
from .onednn import PackedConv1x1, PackedLinear, PackedWeight
from .position_encoding import SinePositionCache
from .precision import pixel_decoder_reduced
from .transformer_layers import xavier_init
from .winograd import WinogradWeight
from .winograd import usable as winograd_usable


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + ReLU FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = PackedLinear(dim, ffn_dim)
        self.linear2 = PackedLinear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]],
                consume_input: bool = False) -> Tensor:
        """src, pos (N, S, C); ``consume_input``: ``src`` is the caller's to give up, and may hold a sum."""
        # the residual sums go into buffers that are ours (the fresh norm1 output, a given-up input): each
        # avoided allocation of a (S, C) buffer is page faults saved, and oneDNN's in-place sum is faster
        src = self.norm1(self.self_attn(src + pos, reference_points, src, shapes, residual=src,
                                        into_residual=consume_input))
        return self.norm2(self.linear2(self.linear1(src, relu=True), residual=src, into_residual=True))


class DeformableEncoder(nn.Module):
    """Stack of deformable encoder layers with a learned per-level embedding."""

    def __init__(self, dim: int, ffn_dim: int, num_layers: int, num_levels: int, num_heads: int, num_points: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.zeros(num_levels, dim))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn_dim, num_levels, num_heads, num_points) for _ in range(num_layers)
        )
        # the official start: Xavier everywhere, then deformable attention's own init
        xavier_init(self.encoder)
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)


def like_weights(x: Tensor, module: nn.Module) -> Tensor:
    """``x`` in the dtype of ``module``'s weights: fp32 under autocast (which then casts per op), float64
    for the export reference, bf16 when the detector was cast (``precision.cast_detector``)."""
    return x.to(next(module.parameters()).dtype)


def reference_points(shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """(1, S, 2) pixel centres (x, y) of every level, normalised to [0, 1]."""
    refs = []
    for h, w in shapes:
        # arange + 0.5 equals linspace(0.5, n - 0.5, n) exactly and stays symbolic when traced
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    return torch.cat(refs, 0)[None]


class ConvGN(nn.Module):
    """Conv2d (no bias) + GroupNorm, optionally ReLU (detectron2 Conv2d with norm='GN')."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, relu: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_uniform_(self.weight, a=1)
        self.norm = nn.GroupNorm(groups, cout)
        self.padding = kernel // 2
        self.relu = relu
        # a 3x3 may run as Winograd (vita_train/modeling/winograd.py) unless kernels == "reference", a 1x1 as
        # oneDNN's packed call (PackedWeight.conv1x1)
        self.kernels = "auto"
        self._winograd = WinogradWeight()
        self._pack = PackedWeight()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # pickled before the Winograd and packed paths existed
        self.__dict__.setdefault("kernels", "auto")
        self.__dict__.setdefault("_winograd", WinogradWeight())
        self.__dict__.setdefault("_pack", PackedWeight())

    def forward(self, x: Tensor) -> Tensor:
        """Conv, GroupNorm, optional ReLU."""
        if winograd_usable(x, self.weight, 1, self.padding, self.kernels):
            key = (id(self.weight), self.weight._version, self.weight.device)
            x = self._winograd.conv(x, key, lambda: (self.weight, None))
        elif self.weight.shape[-1] == 1:
            x = self._pack.conv1x1(x, self.weight, None)
        else:
            x = F.conv2d(x, self.weight, None, 1, self.padding)
        x = self.norm(x)
        # in place: the norm's output is fresh, and a full-size map less at the detector's peak
        return F.relu_(x) if self.relu else x


class MSDeformAttnPixelDecoder(nn.Module):
    """res2..res5 -> (mask features /4 pre-projection, multi-scale [/32, /16, /8]).

    The deformable encoder runs over res5, res4, res3 (coarse to fine); res2 joins through one FPN step.
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        enc_layers: int = 6,
        ffn_dim: int = 1024,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.transformer_features = ["res5", "res4", "res3"][:num_levels]
        self.input_proj = nn.ModuleList(
            nn.Sequential(PackedConv1x1(in_channels[f], conv_dim), nn.GroupNorm(norm_groups, conv_dim))
            for f in self.transformer_features
        )
        self.transformer = DeformableEncoder(conv_dim, ffn_dim, enc_layers, num_levels, num_heads, num_points)
        self.adapter_1 = ConvGN(in_channels["res2"], conv_dim, 1, norm_groups, relu=False)
        self.layer_1 = ConvGN(conv_dim, conv_dim, 3, norm_groups, relu=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        self.conv_dim = conv_dim
        self.position_cache = SinePositionCache(conv_dim // 2)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Returns (out /4 before the mask-feature conv, [out /32, out /16, out /8]): float32, or bf16 where the
        policy runs it in bf16 (a cast detector, bf16 autocast inference); float64 stays."""
        if pixel_decoder_reduced(features["res2"].device.type):
            return self._forward(features)  # bf16 inference: the policy keeps only the sensitive parts fp32
        # otherwise the official opt-out: fp16's range does not hold the pixel decoder, and training follows
        # the official code
        with torch.autocast(device_type=features["res2"].device.type, enabled=False):
            return self._forward(features)

    def _forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        srcs, pos, shapes = [], [], []
        for lvl, name in enumerate(self.transformer_features):
            x = like_weights(features[name], self.input_proj[lvl])
            src = self.input_proj[lvl](x)
            shapes.append((src.shape[-2], src.shape[-1]))
            srcs.append(src.flatten(2).transpose(1, 2))
            p = self.position_cache.tokens(x)
            pos.append((p + self.transformer.level_embed[lvl].view(1, 1, -1)).to(x.dtype))
        src = torch.cat(srcs, 1)
        pos_all = torch.cat(pos, 1)
        # sampling positions stay at least fp32 (the reduced-precision policy)
        refs = reference_points(shapes, src.device, torch.promote_types(src.dtype, torch.float32))
        for layer in self.transformer.encoder.layers:
            src = layer(src, pos_all, refs, shapes, consume_input=True)  # the concatenation, then layer outputs
        n = src.shape[0]
        outs = [
            part.transpose(1, 2).reshape(n, self.conv_dim, h, w)
            for part, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        lateral = self.adapter_1(like_weights(features["res2"], self.adapter_1))
        # a fresh channels-last copy (small): on the strided view the CPU resize kernel is ten times slower,
        # even where the view counts as channels-last contiguous (a batch of one)
        finest = outs[-1].clone(memory_format=torch.channels_last)
        # into the lateral (the adapter norm's fresh output): one full-size map less at the detector's peak
        y = lateral.add_(F.interpolate(finest, size=lateral.shape[-2:], mode="bilinear", align_corners=False))
        return self.layer_1(y), outs
