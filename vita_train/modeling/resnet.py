"""ResNet backbone as detectron2 builds it for Mask2Former: frozen batch norm, outputs res2..res5."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .onednn import bf16_supported, needs_plain_ops, pack_threads
from .winograd import WinogradWeight
from .winograd import usable as winograd_usable


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all stored as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        """y = (x - mean) / sqrt(var + eps) * weight + bias."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class ConvNorm(nn.Module):
    """Conv2d without bias followed by FrozenBN (detectron2's Conv2d with ``norm``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.stride, self.padding = stride, padding
        self.norm = FrozenBatchNorm2d(cout)

        # the folded convolution, cached until a weight or statistic changes: (key, weight, bias); on a CPU at
        # inference the weight is held only in oneDNN's packed layout (one copy beside the parameters)
        self._folded: Optional[tuple[tuple, Tensor, Optional[Tensor]]] = None
        self._packed: Optional[tuple[tuple, Tensor, Optional[Tensor]]] = None
        # a stride-1 3x3 may run as Winograd (vita_train/modeling/winograd.py) unless kernels == "reference"
        self.kernels = "auto"
        self._winograd = WinogradWeight()

    def __getstate__(self) -> dict:
        # copies and pickles leave the caches behind: a packed oneDNN weight has no storage to copy
        state = self.__dict__.copy()
        state["_folded"] = state["_packed"] = None  # (WinogradWeight drops its own packed weight)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # pickled before the Winograd path existed
        self.__dict__.setdefault("kernels", "auto")
        self.__dict__.setdefault("_winograd", WinogradWeight())

    def _key(self, dtype: torch.dtype) -> tuple:
        n = self.norm
        key = tuple((id(t), t._version) for t in (self.weight, n.weight, n.bias, n.running_mean, n.running_var))
        return key + (dtype, self.weight.device)

    def _fold(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        n = self.norm
        # computed in at least float32 and then cast: a bf16 weight times a bf16 scale would round twice
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        scale = n.weight.to(compute) * (n.running_var.to(compute) + n.eps).rsqrt()
        weight = (self.weight.to(compute) * scale.view(-1, 1, 1, 1)).to(dtype)
        bias = (n.bias.to(compute) - n.running_mean.to(compute) * scale).to(dtype)
        # oneDNN reorders an NCHW weight for channels-last input on every call: store it channels-last
        return weight.contiguous(memory_format=torch.channels_last), bias

    def folded(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the convolution with the frozen normalisation folded in, cached until either changes."""
        key = self._key(dtype)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, *self._fold(dtype))
        return self._folded[1], self._folded[2]

    def _plain(self, x: Tensor) -> bool:
        # compilers (Inductor's freezing, torch.export) fold it themselves and must not trace the cache
        return torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))

    def forward(self, x: Tensor) -> Tensor:
        """Convolution then frozen normalisation (folded into one convolution when no gradient is needed)."""
        if self._plain(x):
            return self.norm(F.conv2d(x, self.weight, None, self.stride, self.padding))
        weight, bias = self.folded(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding)

    def forward_fused(
        self, x: Tensor, relu: bool = True, residual: Optional[Tensor] = None, into_residual: bool = False
    ) -> Tensor:
        """forward(x) [+ residual] [then relu], in one oneDNN call on a CPU at inference.

        No separate add and relu passes over the activations, and the folded weight prepacked once in oneDNN's
        layout (not reordered per call). The plain ops run elsewhere (GPU, gradients, compilers, export).
        ``into_residual``: the caller gives ``residual`` up, and on that path the result is written into it
        (oneDNN's in-place sum; a new output took up to 50% longer: 4.25 vs 2.8 ms for ResNet-50's res2
        1x1 at 96x160, AMD EPYC Zen 2, 2 threads).
        """
        if needs_plain_ops(x, self.weight) or not (
                x.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and bf16_supported()))):
            out = self(x)
            out = out if residual is None else out.add_(residual)
            return F.relu_(out) if relu else out
        key = self._key(x.dtype)
        if residual is None and winograd_usable(x, self.weight, self.stride, self.padding, self.kernels):
            # folded in float32 and not rounded: the Winograd domain is float32 for bf16 activations too
            return self._winograd.conv(x, key, lambda: self._fold(torch.float32), relu)
        pad, stride = [self.padding] * 2, [self.stride] * 2
        # oneDNN picks the packed layout for the input's size: a pack made for another image size (the last
        # video's) was reordered on every call (a batch size change does not repack)
        key = (*key, pack_threads(), tuple(x.shape[2:]))
        if self._packed is None or self._packed[0] != key:
            weight, bias = self._fold(x.dtype)
            packed = torch.ops.mkldnn._reorder_convolution_weight(weight, pad, stride, [1, 1], 1, list(x.shape))
            self._packed = (key, packed, bias)
        _, packed, bias = self._packed
        act = "relu" if relu else "none"
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, pad, stride, [1, 1], 1, act, [], "")
        if into_residual and residual.dtype == x.dtype and residual.is_contiguous(memory_format=torch.channels_last):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, packed, bias, pad, stride, [1, 1], 1, "add", 1.0, act, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, packed, bias, pad, stride, [1, 1], 1, "add", 1.0, act, [], "")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided unless stride_in_1x1) -> 1x1 with a projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, width: int, stride: int, stride_in_1x1: bool = False) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = ConvNorm(cin, cout, 1, stride) if cin != cout else None
        self.conv1 = ConvNorm(cin, width, 1, s1)
        self.conv2 = ConvNorm(width, width, 3, s3, 1)
        self.conv3 = ConvNorm(width, cout, 1)

    def forward(self, x: Tensor, consume_input: bool = False) -> Tensor:
        """Residual bottleneck; ``consume_input``: ``x`` is the caller's to give up, and may hold the output."""
        out = self.conv2.forward_fused(self.conv1.forward_fused(x))
        shortcut = x if self.shortcut is None else self.shortcut.forward_fused(x, relu=False)
        # the sum goes into the shortcut where it is ours: the projection's fresh output, or a given-up input
        own = self.shortcut is not None or consume_input
        return self.conv3.forward_fused(out, residual=shortcut, into_residual=own)


class Stem(nn.Module):
    """7x7/2 conv + FrozenBN + ReLU + 3x3/2 max pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(cin, cout, 7, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        """Stride-4 stem features."""
        return F.max_pool2d(self.conv1.forward_fused(x), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """Bottleneck ResNet returning {"res2": stride 4, ..., "res5": stride 32} NCHW features."""

    def __init__(
        self,
        stage_blocks: Sequence[int] = (3, 4, 6, 3),
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        bottleneck_channels: int = 64,
        stride_in_1x1: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.stem = Stem(in_chans, stem_out_channels)
        cin, cout, width = stem_out_channels, res2_out_channels, bottleneck_channels
        self.out_channels: dict[str, int] = {}
        self.out_strides: dict[str, int] = {}
        self.stage_names = []
        for s, n in enumerate(stage_blocks):
            name = f"res{s + 2}"
            blocks = []
            for i in range(n):
                stride = 2 if (i == 0 and s > 0) else 1
                blocks.append(Bottleneck(cin, cout, width, stride, stride_in_1x1))
                cin = cout
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.out_channels[name] = cout
            self.out_strides[name] = 4 * 2**s
            cout, width = cout * 2, width * 2

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) normalised, padded to /32."""
        x = self.stem(x)
        out = {}
        for name in self.stage_names:
            # a block's input after the first is the previous block's output, which nothing else holds
            for i, block in enumerate(getattr(self, name)):
                x = block(x, consume_input=i > 0)
            out[name] = x
        return out
