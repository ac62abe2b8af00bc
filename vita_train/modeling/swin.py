"""Swin Transformer backbone, matching Mask2Former's ``D2SwinTransformer`` at inference.

Features are kept channels-last, ``(B, H, W, C)``, between modules so that the spatial
size travels with the tensor instead of being threaded through as extra arguments.
Spatial sizes are always read from tensor shapes and every padding / crop is applied
unconditionally (a zero-width pad is a no-op), so tracing records shape arithmetic
rather than baking in Python branches; that keeps ONNX export valid for dynamic H, W.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Additive penalty for token pairs from different regions of a shifted window. The
# reference uses this finite value rather than -inf; keep it for parity with the
# checkpoints trained against it.
_CROSS_REGION_PENALTY = -100.0

# Spatial sizes are Python ints in eager mode but 0-dim tensors while tracing.
Size = Union[int, Tensor]


def _pad_to_multiple(size: Size, multiple: int) -> Size:
    """Return how much ``size`` must grow to become a multiple of ``multiple``."""
    return (multiple - size % multiple) % multiple


def _window_partition(x: Tensor, ws: int) -> Tensor:
    """Split ``(B, Hp, Wp, C)`` into ``(B * nW, ws * ws, C)`` windows, both row-major."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // ws, ws, wp // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _window_merge(windows: Tensor, ws: int, hp: Size, wp: Size) -> Tensor:
    """Invert :func:`_window_partition` back to ``(B, Hp, Wp, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, hp // ws, wp // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)


def _relative_position_index(ws: int) -> Tensor:
    """Index into the bias table for every (query, key) token pair of one window."""
    token = torch.arange(ws * ws)
    ys, xs = token // ws, token % ws
    dy = ys[:, None] - ys[None, :] + ws - 1
    dx = xs[:, None] - xs[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


def shifted_window_mask(hp: Size, wp: Size, ws: int, shift: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive ``(nW, ws*ws, ws*ws)`` mask separating regions wrapped together by the roll."""

    def regions(size: Size) -> Tensor:
        # In the grid rolled by -shift, the last window row (col) holds two stripes
        # that are not neighbours in the image: [P-ws, P-shift) and the wrapped-around
        # [P-shift, P). Everything before them is a third, ordinary region.
        pos = torch.arange(size, device=device).view(-1, ws)  # (num windows, ws)
        return (pos >= size - ws).long() + (pos >= size - shift).long()

    ids = regions(hp)[:, None, :, None] * 3 + regions(wp)[None, :, None, :]
    ids = ids.reshape(-1, ws * ws)
    different = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, _CROSS_REGION_PENALTY)


class Mlp(nn.Module):
    """Token-wise feed-forward network with exact GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.scale = self.head_dim**-0.5

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent so checkpoints carry it, as the reference checkpoints do.
        self.register_buffer("relative_position_index", _relative_position_index(window_size))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> Tensor:
        """Bias of shape ``(num_heads, ws*ws, ws*ws)``."""
        tokens = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Attend within each window; ``windows`` is ``(B*nW, T, C)``, ``mask`` is ``(nW, T, T)``."""
        tokens = windows.shape[1]
        qkv = self.qkv(windows).reshape(-1, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, T, head_dim)

        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            # Windows are image-major, so a mask over nW windows repeats for every image.
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, tokens, tokens) + mask[:, None]
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = attn.softmax(dim=-1)

        out = (attn @ v).transpose(1, 2).reshape(-1, tokens, self.dim)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention followed by an MLP, both pre-norm residual."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float, qkv_bias: bool
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, {window_size}), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, shift_mask: Optional[Tensor]) -> Tensor:
        """Map ``(B, H, W, C)`` to the same shape; ``shift_mask`` is used only if this block shifts."""
        ws, shift = self.window_size, self.shift_size
        h, w = x.shape[1], x.shape[2]

        y = self.norm1(x)
        # Padding comes after the norm, so padded tokens are exact zeros that still
        # take part as keys/values; the reference does not mask them out.
        y = F.pad(y, (0, 0, 0, _pad_to_multiple(w, ws), 0, _pad_to_multiple(h, ws)))
        hp, wp = y.shape[1], y.shape[2]

        if shift > 0:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(_window_partition(y, ws), shift_mask if shift > 0 else None)
        y = _window_merge(y, ws, hp, wp)
        if shift > 0:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))

        x = x + y[:, :h, :w, :]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Halve the resolution and double the channels by concatenating 2x2 neighbourhoods."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # Registration order only affects state_dict key order; kept as in released checkpoints.
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, H, W, C)`` to ``(B, ceil(H/2), ceil(W/2), 2C)``."""
        h, w = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Order (row, col) = (0,0), (1,0), (0,1), (1,1) must match the pretrained reduction.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """A run of blocks alternating regular and shifted windows, plus an optional downsampler."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio, qkv_bias)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """Run the blocks on ``(B, H, W, C)``; downsampling is left to the caller."""
        mask = None
        if any(block.shift_size > 0 for block in self.blocks):
            ws = self.window_size
            h, w = x.shape[1], x.shape[2]
            hp, wp = h + _pad_to_multiple(h, ws), w + _pad_to_multiple(w, ws)
            mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection with right/bottom zero padding."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C_in, H, W)`` images to ``(B, H/p, W/p, C)`` channels-last tokens."""
        h, w = x.shape[2], x.shape[3]
        p = self.patch_size
        x = F.pad(x, (0, _pad_to_multiple(w, p), 0, _pad_to_multiple(h, p)))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class SwinTransformer(nn.Module):
    """Swin Transformer returning normalised ``res2``..``res5`` feature maps (NCHW)."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        in_chans: int = 3,
        qkv_bias: bool = True,
        patch_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        num_stages = len(depths)
        dims = [embed_dim * 2**s for s in range(num_stages)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.layers = nn.ModuleList(
            SwinStage(dims[s], depths[s], num_heads[s], window_size, mlp_ratio, qkv_bias, s < num_stages - 1)
            for s in range(num_stages)
        )
        # Registered as norm0..normN (not a ModuleList) to keep the checkpoint key names.
        for s in range(num_stages):
            self.add_module(f"norm{s}", nn.LayerNorm(dims[s]))

        self.out_channels: dict[str, int] = {f"res{s + 2}": dims[s] for s in range(num_stages)}
        self.out_strides: dict[str, int] = {f"res{s + 2}": patch_size * 2**s for s in range(num_stages)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Compute multi-scale features from normalised ``(B, C_in, H, W)`` images."""
        x = self.patch_embed(x)
        outputs: dict[str, Tensor] = {}
        for s, stage in enumerate(self.layers):
            features = stage(x)
            norm = getattr(self, f"norm{s}")
            outputs[f"res{s + 2}"] = norm(features).permute(0, 3, 1, 2).contiguous()
            if stage.downsample is not None:
                x = stage.downsample(features)
        return outputs
