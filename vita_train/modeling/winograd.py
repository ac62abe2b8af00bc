"""3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering, for float32 and bfloat16 CPU inference.

F(m x m, 3x3) computes each m x m output tile from its (m+2) x (m+2) input window as
``A^T [(G g G^T) * (B^T d B)] A``: the channel sums become (m+2)^2 independent matrix products of the
transformed tiles by the transformed weights, 4x (m = 4) or 2.25x (m = 2) fewer multiplications than the
direct convolution. The transforms are compiled kernels (``kernels/csrc/winograd_cpu.cpp``), the products one
grouped 1x1 oneDNN convolution with the transformed weights packed once.

The result equals the direct convolution up to float rounding. Against a float64 convolution, F(2x2) was
more accurate than oneDNN's direct float32 convolution and F(4x4) about twice as far off (the detector's mask
features: 5.0e-6 and 1.3e-5 against 6.6e-6, full-size R-50 at 360x640); ``tests/test_winograd.py`` holds the
bounds. ``kernels="reference"`` (``VitaModel.set_kernels``) turns it off with the other fast kernels.

bfloat16 activations (a bf16 detector, ``vita_train.modeling.precision``) are widened as the tiles are
transformed: the Winograd domain, the weights (transformed from the bf16 weight, or from the float32 fold of a
frozen batch norm) and the products are float32, and the output is rounded to bf16 once. That is nearer to a
float64 convolution than oneDNN's direct bf16 convolution (bf16 tiles and products were not: F(4x4) 9x as far
off, F(2x2) 1.7x), and on an AMD EPYC Zen 4 (AVX-512-BF16, one thread) the pixel decoder's 256-channel 3x3 at
96x160 took 58 ms as float32 Winograd against 78-81 ms as the direct bf16 convolution.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

import kernels as kernels_lib

from .. import winograd_transforms
from ..winograd_transforms import AT, BT, tile_for
from .onednn import needs_plain_ops, pack_threads

# the Winograd-domain tiles of one band of output rows: transformed, multiplied and transformed back while
# they sit in the caches. AMD EPYC Zen 2, 2 threads, with runtime.load's allocator settings, in ms for the whole
# map at once / 4 MB bands / direct: 256 channels at 180x320 174 / 137 / 337, 64 at 180x320 20.2 / 13.4 / 21.2,
# 256 at 96x160 36.5 / 40.9 / 89. Peak memory decides between 4 and 16 MB (16: 36.5 -> 38.8 at 96x160, but the
# 36-frame 360x640 clip's peak RSS 1.40 -> 1.49 GB, against 1.30 with direct convolutions)
_BAND_BYTES = 4 << 20
# bf16 activations take it from this many input channels: below, widening the tiles costs more than it saves
# (AMD EPYC Zen 4, one thread, direct bf16 / Winograd ms: 64 channels at 96x160 4.96 / 5.62, 128 at 48x80
# 4.94 / 4.43, 256 at 24x40 5.04 / 3.83, 512 at 12x20 6.3 / 5.34 (another run 5.48 / 5.55: even), 256 at
# 96x160 78 / 58; `python -m benchmarks kernels` has these rows)
BF16_MIN_CHANNELS = 128


@functools.lru_cache(maxsize=1)
def bf16_winograd_cpu() -> bool:
    """True where bf16 activations take the (float32-domain) Winograd path: CPUs without AMX. With AMX,
    oneDNN's direct bf16 convolution runs on the tile unit (a 2048^3 bf16 matmul at 5x the float32 rate on the
    2-core Xeon), faster than float32 products on a quarter of the multiplications (not measured there)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return not (amx is not None and amx())


@functools.lru_cache(maxsize=1)
def winograd_cpu() -> bool:
    """True where 3x3 convolutions run as Winograd: x86 CPUs with AVX2 or AVX-512.

    AMD EPYC Zen 2 (AVX2, 2 threads): oneDNN's direct convolution ran at ~200 GFLOP/s and the pixel decoder's
    256-channel 3x3 at 1/4 scale took 89 ms, as Winograd 37-41; ResNet's stride-1 3x3s went 5.7-6.9 -> 2.1-4.3 ms.
    AMD EPYC Zen 4 (AVX-512, one thread): that 3x3 158 ms direct, 58 as Winograd; ResNet's 10.0-12.5 -> 3.5-5.6.
    Not measured on an Intel AVX-512 / AMX Xeon (``python -m benchmarks kernels`` has the rows that decide it).
    """
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def band_rows(w: int, channels: int, tile: int) -> int:
    """Output rows of one image transformed and multiplied at a time: the widest band whose Winograd-domain
    tiles stay within ``_BAND_BYTES`` (at least one row of tiles)."""
    per_tile_row = -(-w // tile) * (tile + 2) ** 2 * channels * 4
    return tile * max(1, _BAND_BYTES // per_tile_row)


def usable(x: Tensor, weight: Tensor, stride: int, padding: int, kernels: str) -> bool:
    """True where ``conv2d(x, weight, stride=stride, padding=padding)`` may run as Winograd here."""
    if kernels == "reference" or needs_plain_ops(x, weight) or torch.is_autocast_enabled("cpu"):
        return False
    return (weight.shape[-2:] == (3, 3) and stride == 1 and padding == 1 and x.dim() == 4
            and x.device.type == "cpu" and weight.dtype == x.dtype
            and (x.dtype == torch.float32
                 or (x.dtype == torch.bfloat16 and x.shape[1] >= BF16_MIN_CHANNELS and bf16_winograd_cpu()))
            and x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0 and x.shape[1] == weight.shape[1]
            and x.numel() > 0 and winograd_cpu() and torch.backends.mkldnn.is_available()
            and kernels_lib.native.available())


def transform_weight(weight: Tensor, tile: int) -> Tensor:
    """(Cout, Cin, 3, 3) -> ((tile+2)^2 * Cout, Cin, 1, 1): G g G^T per filter, grouped by Winograd point, in the
    weight's dtype and device (``vita_train.winograd_transforms.transform_weight``, which ONNX Runtime's rewrite
    uses too)."""
    u = winograd_transforms.transform_weight(weight.detach().cpu().double().numpy(), tile, np.float64)
    return torch.from_numpy(u).reshape(-1, weight.shape[1], 1, 1).to(weight.device, weight.dtype)


def reference_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], tile: int) -> Tensor:
    """Winograd F(tile x tile, 3x3) written with torch ops, in ``x``'s dtype: the kernels' plain reference."""
    n, c, h, w = x.shape
    k = tile + 2
    th, tw = -(-h // tile), -(-w // tile)
    bt = torch.tensor(BT[tile], dtype=x.dtype, device=x.device)
    at = torch.tensor(AT[tile], dtype=x.dtype, device=x.device)
    padded = torch.nn.functional.pad(x, (1, tw * tile + 1 - w, 1, th * tile + 1 - h))
    windows = padded.unfold(2, k, tile).unfold(3, k, tile)  # (N, C, th, tw, k, k)
    v = torch.einsum("ai,ncyxij,bj->nyxabc", bt, windows, bt)
    u = transform_weight(weight, tile).to(x.dtype).view(k, k, weight.shape[0], c)
    m = torch.einsum("nyxabc,aboc->nyxabo", v, u)
    y = torch.einsum("ia,nyxabo,jb->noyixj", at, m, at).reshape(n, -1, th * tile, tw * tile)[..., :h, :w]
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class WinogradWeight:
    """One 3x3 convolution's weight in the Winograd domain, packed for oneDNN on first use and again when it changes."""

    def __init__(self) -> None:
        # (key, tile, output channels, packed transformed weight, bias)
        self._packed: Optional[tuple[tuple, int, int, Tensor, Optional[Tensor]]] = None

    def __getstate__(self) -> dict:
        # a packed oneDNN weight has no storage: copies and pickles leave the cache behind
        return {"_packed": None}

    @property
    def tile(self) -> Optional[int]:
        """The tile of the packed weight held (2 or 4), or None."""
        return None if self._packed is None else self._packed[1]

    def conv(self, x: Tensor, key: tuple, weights: Callable[[], tuple[Tensor, Optional[Tensor]]],
             relu: bool = False) -> Tensor:
        """conv2d(x, weight, bias, padding=1), then ReLU when ``relu``, where ``usable``; channels-last out, in
        ``x``'s dtype (the Winograd domain float32 for either).

        ``weights()`` gives (weight, bias), in any floating dtype, and is called only when ``key`` differs from
        the packed one's.
        """
        n, cin, h, w = x.shape
        # the pack is made for one image's band of tiles, which the image size decides: another size (the next
        # video of a dataset) ran on a pack made for the last one, oneDNN reordering it on every call (this and
        # ResNet's direct convolutions: the R-50 detector at 384x512 after 384x640 0.896-0.904 s a frame instead
        # of 0.862, one thread, AMD EPYC Zen 4; repacking every convolution for a new size takes ~0.2 s once)
        key = (*key, pack_threads(), h, w)
        if self._packed is None or self._packed[0] != key:
            weight, bias = weights()
            tile, cout = tile_for(cin, weight.shape[0]), weight.shape[0]
            points = (tile + 2) ** 2
            u = transform_weight(weight.float(), tile).contiguous(memory_format=torch.channels_last)
            # packed for one image's band of tiles: with a made-up shape oneDNN picked a layout it then
            # reordered on every call (3-30x slower); smaller bands run with this layout at full speed, but a
            # batch's larger ones did not (a batch of 2 ran ResNet's res4 10x slower): images go one at a time
            tiles = -(-min(band_rows(w, max(cin, cout), tile), h) // tile) * -(-w // tile)
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                u, [0, 0], [1, 1], [1, 1], points, [1, points * cin, tiles, 1])
            self._packed = (key, tile, cout, packed, None if bias is None else bias.detach().float().contiguous())
        _, tile, cout, packed, bias = self._packed
        points = (tile + 2) ** 2
        x = x.contiguous(memory_format=torch.channels_last)
        out = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        band = band_rows(w, max(cin, cout), tile)
        for i, r0 in itertools.product(range(n), range(0, h, band)):
            rows = (r0, min(r0 + band, h))
            v = kernels_lib.native.winograd_input(x[i : i + 1], tile, rows)
            tiles = v.shape[0]
            # the tiles are the pixels of a channels-last (1, points * Cin, tiles, 1) image: one grouped 1x1
            # convolution, a group per Winograd point, multiplies them all without a copy
            image = v.view(1, tiles, 1, points * cin).permute(0, 3, 1, 2)
            products = torch.ops.mkldnn._convolution_pointwise(
                image, packed, None, [0, 0], [1, 1], [1, 1], points, "none", [], "")
            kernels_lib.native.winograd_output(products.permute(0, 2, 3, 1).reshape(tiles, points, cout), bias,
                                               relu, out[i : i + 1], rows, tile)
        return out
