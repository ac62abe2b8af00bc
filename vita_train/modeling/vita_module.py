"""The VITA module: Object Encoder over frame queries, Object Decoder with video queries, and heads.

Windowed attention folds the windows into the batch. Only the windows that need a mask get one, built
at frame level and expanded to tokens for those windows alone, so memory grows linearly in T (the
official code builds a dense (windows x heads, W*Nf, W*Nf) mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transformer_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer

# The official shifted-window mask is additive -1000, not -inf: the padded query rows of the first
# window are fully masked and a finite constant keeps their softmax finite.
SHIFT_MASK_VALUE = -1000.0


@dataclass
class VitaOutput:
    """Video-level predictions of the last decoder layer (and, in training, of every layer)."""

    pred_logits: Tensor  # (B, cQ, K+1)
    pred_mask_embed: Tensor  # (B, cQ, D)
    aux: list[dict[str, Tensor]] = field(default_factory=list)  # earlier decoder layers, training only
    pred_fq_embed: Optional[Tensor] = None  # (B, T, N, C) frame-query similarity embeddings
    pred_cq_embed: Optional[Tensor] = None  # (B, cQ, C) video-query similarity embeddings


def pad_frames(tokens: Tensor, window: int) -> tuple[Tensor, int]:
    """Append all-zero frames so T is a multiple of ``window``; returns (padded, T)."""
    t = tokens.shape[1]
    pad = math.ceil(t / window) * window - t
    if pad:
        tokens = F.pad(tokens, (0, 0, 0, 0, 0, pad))
    return tokens, t


def shifted_edge_masks(num_frames: int, padded: int, window: int) -> tuple[Tensor, Tensor]:
    """Frame-level boolean masks (W, W) of the first and last shifted windows (True = blocked).

    After rolling by h = ceil(W/2), position p holds frame (p - h) mod T_pad. Both edge windows block
    pairs involving a padded frame; the first also separates the wrapped tail from the head.
    Middle windows never hold padding and need no mask.
    """
    h = math.ceil(window / 2)
    is_pad = torch.arange(padded) >= num_frames
    rolled = torch.roll(is_pad, h)
    first, last = rolled[:window], rolled[-window:]
    first_mask = first[:, None] | first[None, :]
    head = torch.arange(window) < h
    first_mask = first_mask | (head[:, None] != head[None, :])
    return first_mask, last[:, None] | last[None, :]


def window_block_bias(num_frames, padded, window: int, shifted: bool, device: torch.device) -> Tensor:
    """(Nw, W, W) additive frame-level bias of every window, built without branching on T.

    The same masks as the eager path (padded keys -inf in plain windows; -1000 for padded/wrapped
    pairs in the edge shifted windows), but as one tensor op chain so a traced graph keeps T dynamic.
    """
    nw = padded // window
    pos = torch.arange(padded, device=device)
    if not shifted:
        key_pad = (pos >= num_frames).view(nw, 1, window)
        bias = torch.zeros(key_pad.shape, device=device).masked_fill(key_pad, float("-inf"))
        return bias.expand(nw, window, window)
    h = math.ceil(window / 2)
    is_pad = ((pos - h) % padded >= num_frames).view(nw, window)  # rolled: position p holds frame p - h
    win = torch.arange(nw, device=device).view(nw, 1, 1)
    first = win == 0
    edge = first | (win == nw - 1)
    head = torch.arange(window, device=device) < h
    blocked = (edge & (is_pad[:, :, None] | is_pad[:, None, :])) | (first & (head[:, None] != head[None, :]))
    return blocked.float() * SHIFT_MASK_VALUE


def _expand(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """(W, W) frame mask -> (W*N, W*N) token mask, tokens frame-major."""
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class VitaModule(nn.Module):
    """Frame queries of T frames -> video queries: class logits and mask embeddings."""

    def __init__(
        self,
        num_classes: int,
        num_frame_queries: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        enc_layers: int = 6,
        dec_layers: int = 3,
        window: int = 6,
        enforce_input_proj: bool = True,
        conv_dim: int = 256,
        mask_dim: int = 256,
        sim_embed_frame: bool = True,
        sim_embed_clip: bool = True,
    ) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        # encode with the branch-free form (encode_blocks): what exported graphs trace
        self.export_mode = False
        self.enc_self_attn = nn.ModuleList(SelfAttentionLayer(hidden_dim, num_heads) for _ in range(enc_layers))
        self.enc_ffn = nn.ModuleList(FFNLayer(hidden_dim, ffn_dim) for _ in range(enc_layers))
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, ffn_dim) for _ in range(dec_layers))
        self.vita_mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.fq_pos = nn.Embedding(num_frame_queries, hidden_dim)
        self.input_proj_dec = nn.Linear(hidden_dim, hidden_dim) if enforce_input_proj else nn.Identity()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.sim_embed_frame = nn.Linear(hidden_dim, hidden_dim) if sim_embed_frame else None
        self.sim_embed_clip = nn.Linear(hidden_dim, hidden_dim) if sim_embed_frame and sim_embed_clip else None

    # ----- Object Encoder -------------------------------------------------------------------------
    def _layer(self, i: int, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.enc_ffn[i](self.enc_self_attn[i](x, mask=mask))

    def _window_layer(self, i: int, x: Tensor, num_frames: int, w: int) -> Tensor:
        """Attention inside consecutive windows of ``w`` frames; padded frames are masked as keys."""
        b, tp, n, c = x.shape
        nw = tp // w
        windows = x.reshape(b * nw, w * n, c)
        mask = None
        if tp > num_frames:
            key_pad = (torch.arange(tp, device=x.device) >= num_frames).view(1, nw, 1, 1, w, 1)
            mask = key_pad.expand(b, nw, 1, 1, w, n).reshape(b * nw, 1, 1, w * n)
        return self._layer(i, windows, mask).view(b, tp, n, c)

    def _shifted_window_layer(self, i: int, x: Tensor, num_frames: int, w: int) -> Tensor:
        """Attention inside windows shifted by ceil(W/2) frames, masking wrapped and padded frames."""
        b, tp, n, c = x.shape
        nw = tp // w
        h = math.ceil(w / 2)
        first_mask, last_mask = shifted_edge_masks(num_frames, tp, w)
        windows = torch.roll(x, h, dims=1).view(b, nw, w * n, c)

        def masked(win: Tensor, frame_mask: Tensor) -> Tensor:
            bias = _expand(frame_mask.to(x.device), n).to(x.dtype) * SHIFT_MASK_VALUE
            return self._layer(i, win, bias)

        parts = [masked(windows[:, 0], first_mask)]
        if nw > 2:
            parts.append(self._layer(i, windows[:, 1:-1].reshape(b * (nw - 2), w * n, c)).view(b, nw - 2, w * n, c))
        if nw > 1:
            parts.append(masked(windows[:, -1], last_mask))
        out = torch.cat([p if p.dim() == 4 else p.unsqueeze(1) for p in parts], dim=1)
        return torch.roll(out.view(b, tp, n, c), -h, dims=1)

    def _block_layer(self, i: int, x: Tensor, bias: Tensor, tokens_per_frame: int) -> Tensor:
        """Layer i over windows x (B*Nw, W*N, C) with a frame-level bias (Nw, W, W) broadcast to tokens."""
        attn = self.enc_self_attn[i].self_attn
        bn, length, c = x.shape
        heads, n = attn.num_heads, tokens_per_frame
        nw, w = bias.shape[0], bias.shape[1]
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        q = F.linear(x, w_q, b_q).view(bn, length, heads, c // heads).transpose(1, 2) * (c // heads) ** -0.5
        k = F.linear(x, w_k, b_k).view(bn, length, heads, c // heads).transpose(1, 2)
        v = F.linear(x, w_v, b_v).view(bn, length, heads, c // heads).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).view(-1, nw, heads, w, n, w, n) + bias.view(1, nw, 1, w, 1, w, 1)
        weights = scores.view(bn, heads, length, length).softmax(-1)
        out = attn.out_proj((weights @ v).transpose(1, 2).reshape(bn, length, c))
        return self.enc_ffn[i](self.enc_self_attn[i].norm(x + out))

    def encode_blocks(self, tokens: Tensor, window: Optional[int] = None) -> Tensor:
        """The inference encoder (shifted odd layers) without Python branches on T: the exportable form."""
        w = self.window if window is None else window
        b, t, n, c = tokens.shape
        if w == 0:
            return self.encode(tokens, shifted=True, window=0)
        pad = (w - t % w) % w
        x = F.pad(tokens, (0, 0, 0, 0, 0, pad))
        padded = t + pad
        h = math.ceil(w / 2)
        # the two biases depend only on T: built once, not once per layer (nor per layer in the graph)
        biases = [window_block_bias(t, padded, w, shifted, tokens.device).to(tokens.dtype) for shifted in (False, True)]
        for i in range(len(self.enc_self_attn)):
            shifted = i % 2 == 1
            bias = biases[shifted]
            if shifted:
                x = torch.roll(x, h, dims=1)
            x = self._block_layer(i, x.reshape(-1, w * n, c), bias, n).view(b, padded, n, c)
            if shifted:
                x = torch.roll(x, -h, dims=1)
        return x[:, :t]

    def encode(self, tokens: Tensor, shifted: Optional[bool] = None, window: Optional[int] = None) -> Tensor:
        """tokens (B, T, N, C) after input projection -> encoded (B, T, N, C).

        ``shifted``: use the shifted window on odd layers (the official inference); defaults to
        ``not self.training`` because the official training never shifts. ``window`` overrides W
        (0 = full attention over all frames).
        """
        if shifted is None:
            shifted = not self.training
        w = self.window if window is None else window
        b, t, n, c = tokens.shape
        if w == 0:
            x = tokens.reshape(b, t * n, c)
            for i in range(len(self.enc_self_attn)):
                x = self._layer(i, x)
            return x.view(b, t, n, c)
        x, t = pad_frames(tokens, w)
        for i in range(len(self.enc_self_attn)):
            if shifted and i % 2 == 1:
                x = self._shifted_window_layer(i, x, t, w)
            else:
                x = self._window_layer(i, x, t, w)
        return x[:, :t]

    # ----- Object Decoder ---------------------------------------------------------------------------
    def forward(
        self,
        frame_queries: Tensor,
        query_index: Optional[Tensor] = None,
        all_layers: bool = False,
        window: Optional[int] = None,
    ) -> VitaOutput:
        """frame_queries (B, T, N, C); query_index (T, N) or (B, T, N): the frame-query slot of each token
        (defaults to 0..N-1, i.e. no pruning). ``all_layers`` adds every decoder layer's heads (training).
        ``window`` overrides the encoder window W."""
        b, t, n, c = frame_queries.shape
        projected = self.input_proj_dec(frame_queries)
        tokens = self.encode_blocks(projected, window) if self.export_mode else self.encode(projected, window=window)
        fq_embed = self.sim_embed_frame(tokens) if (all_layers and self.sim_embed_frame is not None) else None
        if query_index is None:
            pos = self.fq_pos.weight[:n].view(1, 1, n, c).expand(b, t, n, c)
        else:
            pos = self.fq_pos.weight[query_index]
            pos = pos.expand(b, t, n, c) if pos.dim() == 3 else pos
        memory = tokens.reshape(b, t * n, c)
        pos = pos.reshape(b, t * n, c)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        decoded = []
        num_layers = len(self.transformer_cross_attention_layers)
        for i in range(num_layers):
            output = self.transformer_cross_attention_layers[i](output, memory, pos=query_pos, memory_pos=pos)
            output = self.transformer_self_attention_layers[i](output, pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            if all_layers or i == num_layers - 1:
                decoded.append(self.decoder_norm(output))
        heads = [self._heads(d, all_layers) for d in decoded]
        last = heads[-1]
        return VitaOutput(
            pred_logits=last["pred_logits"],
            pred_mask_embed=last["pred_mask_embed"],
            aux=heads[:-1],
            pred_fq_embed=fq_embed,
            pred_cq_embed=last.get("pred_cq_embed"),
        )

    def _heads(self, decoded: Tensor, with_sim: bool) -> dict[str, Tensor]:
        out = {"pred_logits": self.class_embed(decoded), "pred_mask_embed": self.mask_embed(decoded)}
        if with_sim and self.sim_embed_clip is not None:
            out["pred_cq_embed"] = self.sim_embed_clip(decoded)
        return out
