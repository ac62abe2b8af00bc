"""The VITA module: Object Encoder over frame queries, Object Decoder with video queries, and heads.

The encoder runs each layer over bounded chunks of whole windows through ``kernels.window_attention``
(no padding frames, no roll, no mask tensor); at inference it overwrites one token buffer in place, so
memory is the tokens themselves plus one chunk's working set (the official code builds a dense
(windows x heads, W*Nf, W*Nf) mask and runs every token through each layer at once). The decoder's
cross-attention reads the tokens in the same chunks, combined by their log-sum-exp (online softmax).
``encode_blocks`` is the branch-free form that exported graphs trace (plain ops; TensorRT fuses
attention itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import attention_with_lse, check_mode, window_attention
from kernels.cpu import MklPackedLinear

from ..mask_projection import fold_mask_projection
from .onednn import PackedLinears, fp32_linear_as_conv
from .transformer_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer

if TYPE_CHECKING:
    from ..config import ModelConfig

DEFAULT_CHUNK_TOKENS = 2400
DEFAULT_FFN_ROWS = 600

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
        kernels: str = "auto",
        token_dtype: torch.dtype = torch.float32,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        # encode with the branch-free form (encode_blocks): what exported graphs trace
        self.export_mode = False
        # "auto" | "reference" | "triton": the window-attention implementation (kernels package)
        self.kernels = check_mode(kernels)
        # dtype of the tokens stored between layers at inference (compute stays fp32)
        self.token_dtype = token_dtype
        # tokens per encoder/decoder chunk: bounds the working set; a few windows keep a layer's
        # intermediates near the cache (measured: 1200-2400 tokens beat 8192 by ~10% on a 2-core Xeon)
        self.chunk_tokens = chunk_tokens
        # rows per FFN block inside a chunk: its (rows, ffn_dim) hidden stays in cache (512-1024 measured best)
        self.ffn_rows = DEFAULT_FFN_ROWS
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

    @classmethod
    def from_config(cls, config: "ModelConfig") -> "VitaModule":
        """The VITA module of a model config (widths, window, token_dtype, kernels)."""
        pd, fd, vc = config.pixel_decoder, config.frame_decoder, config.vita
        return cls(
            config.num_classes,
            num_frame_queries=fd.num_queries,
            hidden_dim=vc.hidden_dim,
            num_queries=vc.num_queries,
            num_heads=vc.num_heads,
            ffn_dim=vc.ffn_dim,
            enc_layers=vc.enc_layers,
            dec_layers=vc.dec_layers,
            window=vc.window,
            enforce_input_proj=vc.enforce_input_proj,
            conv_dim=pd.conv_dim,
            mask_dim=pd.mask_dim,
            sim_embed_frame=vc.sim_embed_frame,
            sim_embed_clip=vc.sim_embed_clip,
            kernels=config.kernels,
            token_dtype=getattr(torch, config.test.token_dtype),
        )

    def project_mask_features(self, features: Tensor) -> Tensor:
        """The pixel decoder's /4 map (B, C, h, w) -> VITA's mask features (B, D, h, w), in the projection's dtype."""
        return self.vita_mask_features(features.to(self.vita_mask_features.weight.dtype))

    def fold_mask_projection(self, mask_embed: Tensor) -> tuple[Tensor, Tensor]:
        """Mask embeddings e (k, D) -> (e W (k, C), e b (k,)) float32: mask logits straight from the unprojected
        /4 map (vita_train/mask_projection.py)."""
        conv = self.vita_mask_features
        bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.weight.shape[0])
        embed, folded_bias = fold_mask_projection(*(t.detach().float().cpu().numpy() for t in (mask_embed, conv.weight, bias)))
        return torch.from_numpy(embed).to(mask_embed.device), torch.from_numpy(folded_bias).to(mask_embed.device)

    # ----- Object Encoder -------------------------------------------------------------------------
    def _dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(compute, storage) dtypes: the weights' (at least fp32; float64 for a float64 reference copy),
        and ``token_dtype`` when reduced storage was asked for."""
        compute = torch.promote_types(self.query_feat.weight.dtype, torch.float32)
        return compute, (compute if self.token_dtype == torch.float32 else self.token_dtype)

    def _chunks(self, num_frames: int, tokens_per_frame: int, w: int, shifted: bool) -> list[tuple[int, int]]:
        """Frame ranges [a, b) that hold whole (shifted) windows and about ``chunk_tokens`` tokens each."""
        if w == 0:
            return [(0, num_frames)]
        # the reference kernel builds a dense mask over its input: give it one window run at a time
        per = w if self.kernels == "reference" else max(1, self.chunk_tokens // (w * tokens_per_frame)) * w
        head = (w - math.ceil(w / 2)) % w if shifted else 0  # frames before the first shifted boundary
        edges = [0, *range(head + per, num_frames, per), num_frames]
        return list(zip(edges[:-1], edges[1:]))

    def _encoder_chunk(self, i: int, x: Tensor, first_frame: int, w: int, shifted: bool) -> Tensor:
        """Encoder layer i on the whole windows of frames [first_frame, first_frame + F): x (B, F, N, C)."""
        layer, ffn = self.enc_self_attn[i], self.enc_ffn[i]
        attn = layer.self_attn
        b, f, n, c = x.shape
        heads = attn.num_heads
        seq = x.reshape(b, f * n, c).to(self._dtypes()[0])
        qkv = F.linear(seq, attn.in_proj_weight, attn.in_proj_bias).view(b, f * n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, F*N, d)
        out = window_attention(q, k, v, n, w, shifted, first_frame, mode=self.kernels)
        out = attn.out_proj(out.transpose(1, 2).reshape(b, f * n, c))
        return ffn(layer.norm(seq + out)).view(b, f, n, c)

    def _encoder_chunk_into(
        self, i: int, rows: Tensor, n: int, first_frame: int, w: int, shifted: bool,
        linear: Union[MklPackedLinear, PackedLinears],
    ) -> None:
        """Encoder layer i overwriting ``rows`` (F*N, C), N tokens a frame: the whole windows of frames [first_frame, ...).

        The same math as ``_encoder_chunk`` with little but the matmuls and attention at full size: one
        packed q/k/v product whose strided views go to the attention as they are, residual adds and layer
        norms on blocks small enough to stay in cache, and the FFN in row blocks (its hidden is the
        layer's largest temporary).
        """
        layer, ffn = self.enc_self_attn[i], self.enc_ffn[i]
        attn, c = layer.self_attn, rows.shape[1]
        heads = attn.num_heads
        y = rows if rows.dtype == self._dtypes()[0] else rows.to(self._dtypes()[0])
        qkv = linear(y, attn.in_proj_weight, attn.in_proj_bias).view(1, -1, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (1, heads, F*N, d), strided views
        out = window_attention(q, k, v, n, w, shifted, first_frame, mode=self.kernels)
        y += linear(out.transpose(1, 2).reshape(-1, c), attn.out_proj.weight, attn.out_proj.bias)
        norm1, norm2 = layer.norm, ffn.norm
        h = F.layer_norm(y, (c,), norm1.weight, norm1.bias, norm1.eps)
        step = self.ffn_rows
        for s in range(0, h.shape[0], step):
            hs = h[s : s + step]
            hs += linear(F.relu_(linear(hs, ffn.linear1.weight, ffn.linear1.bias)), ffn.linear2.weight, ffn.linear2.bias)
            rows[s : s + step] = F.layer_norm(hs, (c,), norm2.weight, norm2.bias, norm2.eps)

    def _encode_into(self, x: Tensor, shifted: bool, w: int) -> Tensor:
        """Every encoder layer over ``x`` (B, T, N, C) in place, chunk by chunk (windows are independent)."""
        t, n, c = x.shape[1], x.shape[2], x.shape[3]
        for i in range(len(self.enc_self_attn)):
            layer_shifted = shifted and i % 2 == 1
            chunks = self._chunks(t, n, w, layer_shifted)
            # this layer's weights packed: as 1x1 convolutions where that form runs (AVX2), else MKL's packs for
            # a full chunk and an FFN block (edge chunks run plain GEMMs)
            linear = (PackedLinears() if x.dtype == torch.float32 and fp32_linear_as_conv()
                      else MklPackedLinear(rows={max(b - a for a, b in chunks) * n, self.ffn_rows}))
            for a, b in chunks:
                for item in x:  # (T, N, C), contiguous: its frames [a, b) are contiguous rows
                    self._encoder_chunk_into(i, item[a:b].view(-1, c), n, a, w, layer_shifted, linear)
        return x

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
        (0 = full attention over all frames). With grad enabled the chunks are concatenated (autograd);
        without, a copy in ``token_dtype`` is overwritten in place.
        """
        if shifted is None:
            shifted = not self.training
        w = self.window if window is None else window
        if not torch.is_grad_enabled():
            return self._encode_into(tokens.to(self._dtypes()[1], copy=True), shifted, w)
        x = tokens
        t, n = x.shape[1], x.shape[2]
        for i in range(len(self.enc_self_attn)):
            layer_shifted = shifted and i % 2 == 1
            x = torch.cat([self._encoder_chunk(i, x[:, a:b], a, w, layer_shifted)
                           for a, b in self._chunks(t, n, w, layer_shifted)], dim=1)
        return x

    def _project(self, frame_queries: Tensor, overwrite_input: bool) -> Tensor:
        """input_proj_dec of every token into a ``token_dtype`` buffer (the input itself if it may be overwritten)."""
        b, t, n, c = frame_queries.shape
        compute, store = self._dtypes()
        if overwrite_input and frame_queries.dtype == store and frame_queries.is_contiguous():
            x = frame_queries
        else:
            x = torch.empty(b, t, n, c, dtype=store, device=frame_queries.device)
        per = max(1, self.chunk_tokens // n)
        for a in range(0, t, per):
            x[:, a : a + per] = self.input_proj_dec(frame_queries[:, a : a + per].to(compute)).to(store)
        return x

    # ----- Object Decoder ---------------------------------------------------------------------------
    def _token_pos(self, query_index: Optional[Tensor], a: int, b: int, batch: int, n: int) -> Tensor:
        """Positional embedding (B, b - a, N, C) of the tokens of frames [a, b)."""
        c = self.fq_pos.embedding_dim
        if query_index is None:
            return self.fq_pos.weight[:n].view(1, 1, n, c).expand(batch, b - a, n, c)
        index = query_index[a:b] if query_index.dim() == 2 else query_index[:, a:b]
        pos = self.fq_pos.weight[index]
        return pos.expand(batch, b - a, n, c) if pos.dim() == 3 else pos

    def forward(
        self,
        frame_queries: Tensor,
        query_index: Optional[Tensor] = None,
        all_layers: bool = False,
        window: Optional[int] = None,
        overwrite_input: bool = False,
    ) -> VitaOutput:
        """frame_queries (B, T, N, C); query_index (T, N) or (B, T, N): the frame-query slot of each token
        (defaults to 0..N-1, i.e. no pruning). ``all_layers`` adds every decoder layer's heads (training).
        ``window`` overrides the encoder window W. ``overwrite_input``: at inference the encoder may
        reuse ``frame_queries`` (when it is contiguous and in ``token_dtype``) as its buffer, holding no
        second copy of the tokens; the caller must not use it afterwards."""
        if self.export_mode:
            return self._forward_export(frame_queries, query_index, window)
        b, t, n, c = frame_queries.shape
        if torch.is_grad_enabled():
            tokens = self.encode(self.input_proj_dec(frame_queries), window=window)
        else:
            tokens = self._project(frame_queries, overwrite_input)
            self._encode_into(tokens, not self.training, self.window if window is None else window)
        compute = self._dtypes()[0]
        fq_embed = self.sim_embed_frame(tokens.to(compute)) if (all_layers and self.sim_embed_frame is not None) else None
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        if not torch.is_grad_enabled():
            return self._output(self._decode_chunks(tokens, query_index, output, query_pos, all_layers), all_layers, fq_embed)
        memory = tokens.reshape(b, t * n, c)
        pos = self._token_pos(query_index, 0, t, b, n).reshape(b, t * n, c)
        decoded = []
        num_layers = len(self.transformer_cross_attention_layers)
        for i in range(num_layers):
            output = self.transformer_cross_attention_layers[i](output, memory, pos=query_pos, memory_pos=pos)
            output = self.transformer_self_attention_layers[i](output, pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            if all_layers or i == num_layers - 1:
                decoded.append(self.decoder_norm(output))
        return self._output(decoded, all_layers, fq_embed)

    def _decode_chunks(
        self, tokens: Tensor, query_index: Optional[Tensor], output: Tensor, query_pos: Tensor, all_layers: bool
    ) -> list[Tensor]:
        """The Object Decoder at inference, reading ``tokens`` (B, T, N, C) in chunks: the last (or every) layer's output.

        Keys are (token + pos) W_k + b_k = token W_k + (pos W_k + b_k): the second term depends only on the
        frame-query slot, so it is one (slots, C) table per layer and each chunk costs one GEMM for keys and
        values together. The value bias is added after the softmax (its weights sum to 1). Chunks combine
        by their log-sum-exp (online softmax), so one chunk's keys and values exist at a time.
        """
        b, t, n, c = tokens.shape
        compute = self._dtypes()[0]
        per = max(1, self.chunk_tokens // n)
        decoded = []
        for i, cross in enumerate(self.transformer_cross_attention_layers):
            attn = cross.multihead_attn
            heads, d = attn.num_heads, c // attn.num_heads
            w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
            b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
            slot_keys = torch.addmm(b_k, self.fq_pos.weight, w_k.t())  # (slots, C)
            w_kv = attn.in_proj_weight[c:].t()  # (C, 2C): keys then values
            q = F.linear(output + query_pos, w_q, b_q).view(b, -1, heads, d).transpose(1, 2)
            acc = lse = None
            for a in range(0, t, per):
                e = min(a + per, t)
                kv = torch.mm(tokens[:, a:e].reshape(-1, c).to(compute), w_kv).view(b, e - a, n, 2 * c)
                if query_index is None:
                    kv[..., :c] += slot_keys[:n]
                else:
                    index = query_index[a:e] if query_index.dim() == 2 else query_index[:, a:e]
                    kv[..., :c] += slot_keys[index]
                kv = kv.view(b, -1, 2, heads, d)
                out, chunk_lse = attention_with_lse(
                    q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), mode=self.kernels
                )
                if acc is None:
                    acc, lse = out, chunk_lse
                else:
                    new_lse = torch.logaddexp(lse, chunk_lse)
                    acc = acc * (lse - new_lse).exp_().unsqueeze(-1) + out * (chunk_lse - new_lse).exp_().unsqueeze(-1)
                    lse = new_lse
            mixed = acc.transpose(1, 2).reshape(b, -1, c) + b_v
            output = cross.norm(output + attn.out_proj(mixed))
            output = self.transformer_self_attention_layers[i](output, pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            if all_layers or i == len(self.transformer_cross_attention_layers) - 1:
                decoded.append(self.decoder_norm(output))
        return decoded

    def _forward_export(self, frame_queries: Tensor, query_index: Optional[Tensor], window: Optional[int]) -> VitaOutput:
        """The traced form: branch-free encoder and one dense cross-attention, plain ops only."""
        b, t, n, c = frame_queries.shape
        tokens = self.encode_blocks(self.input_proj_dec(frame_queries), window)
        if query_index is None:
            pos = self.fq_pos.weight[:n].view(1, 1, n, c).expand(b, t, n, c)
        else:
            pos = self.fq_pos.weight[query_index]
            pos = pos.expand(b, t, n, c) if pos.dim() == 3 else pos
        memory = tokens.reshape(b, t * n, c)
        pos = pos.reshape(b, t * n, c)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        num_layers = len(self.transformer_cross_attention_layers)
        for i in range(num_layers):
            output = self.transformer_cross_attention_layers[i](output, memory, pos=query_pos, memory_pos=pos)
            output = self.transformer_self_attention_layers[i](output, pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
        return self._output([self.decoder_norm(output)], False, None)

    # ----- Step forms: one encoder layer / one decoder cross-attention chunk per exported graph -------
    def encode_window_step(self, i: int, blocks: Tensor, frame_valid: Tensor) -> Tensor:
        """Encoder layer i over whole windows: blocks (Nw, Wb, N, C), frame_valid (Nw, Wb) False on padding slots.

        Layer 0 applies ``input_proj_dec`` first, so its blocks hold the detector's frame queries. The caller
        lays the frames out in windows (``vita_train.token_steps``), which is what makes the step exportable
        with T, the chunk and the window layout all outside the graph. Padding slots are masked as keys
        (-inf; every block holds a real frame, so no row is fully masked) and their outputs are discarded.
        """
        nw, wb, n, c = blocks.shape
        x = self.input_proj_dec(blocks) if i == 0 else blocks
        key_bias = torch.zeros(frame_valid.shape, dtype=x.dtype, device=x.device).masked_fill(~frame_valid, float("-inf"))
        bias = key_bias.unsqueeze(1).expand(nw, wb, wb)
        return self._block_layer(i, x.reshape(nw, wb * n, c), bias, n).view(nw, wb, n, c)

    def attend_step(self, i: int, output: Optional[Tensor], tokens: Tensor, query_index: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder layer i's cross-attention over one chunk of encoded tokens (F, N, C) with their slots (F, N).

        ``output`` (Nv, C) is the previous layer's (None for layer 0: the learnt queries). Returns the
        attention of the chunk alone (heads, Nv, d), value bias included, and each query's log-sum-exp of
        its scaled scores (heads, Nv): chunks combine exactly by their log-sum-exp (online softmax).
        """
        cross = self.transformer_cross_attention_layers[i]
        attn = cross.multihead_attn
        c = tokens.shape[-1]
        heads, d = attn.num_heads, c // attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        queries = self.query_feat.weight if output is None else output
        memory = tokens.reshape(-1, c)
        q = F.linear(queries + self.query_embed.weight, w_q, b_q).view(-1, heads, d).transpose(0, 1) * d**-0.5
        k = F.linear(memory + self.fq_pos.weight[query_index.reshape(-1)], w_k, b_k).view(-1, heads, d).transpose(0, 1)
        v = F.linear(memory, w_v, b_v).view(-1, heads, d).transpose(0, 1)
        scores = q @ k.transpose(-1, -2)  # (heads, Nv, F*N)
        peak = scores.amax(-1, keepdim=True)
        weights = (scores - peak).exp()
        total = weights.sum(-1, keepdim=True)
        return (weights / total) @ v, (peak + total.log()).squeeze(-1)

    def decode_step(self, i: int, output: Optional[Tensor], attended: Tensor) -> tuple[Tensor, ...]:
        """The rest of decoder layer i once its cross-attention over all tokens is combined: attended (heads, Nv, d).

        Returns the layer's output (Nv, C), or for the last layer the heads: pred_logits (Nv, K+1), mask_embed (Nv, D).
        """
        cross = self.transformer_cross_attention_layers[i]
        queries = self.query_feat.weight if output is None else output
        mixed = attended.transpose(0, 1).reshape(queries.shape)
        out = cross.norm(queries + cross.multihead_attn.out_proj(mixed)).unsqueeze(0)
        out = self.transformer_self_attention_layers[i](out, pos=self.query_embed.weight.unsqueeze(0))
        out = self.transformer_ffn_layers[i](out)
        if i < len(self.transformer_cross_attention_layers) - 1:
            return (out[0],)
        heads = self._heads(self.decoder_norm(out[0]), False)
        return heads["pred_logits"], heads["pred_mask_embed"]

    def _output(self, decoded: list[Tensor], all_layers: bool, fq_embed: Optional[Tensor]) -> VitaOutput:
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
