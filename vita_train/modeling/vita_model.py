"""The whole VITA model: per-frame detector (backbone, pixel decoder, frame decoder) and the VITA module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import check_mode

from ..config import ModelConfig
from .frame_decoder import MaskedAttentionDecoder
from .ms_deform_attn import MSDeformAttn
from .pixel_decoder import ConvGN, MSDeformAttnPixelDecoder
from .precision import detector_dtype
from .resnet import ConvNorm, ResNet
from .swin import SwinTransformer
from .transformer_layers import MultiheadAttention
from .vita_module import VitaModule, VitaOutput


@dataclass
class DetectorOutput:
    """Per-frame outputs of the detector for a batch of B frames."""

    frame_queries: Tensor  # (B, Nf, C) last decoder layer, after decoder_norm
    frame_logits: Tensor  # (B, Nf, K+1), no-object in the last column
    # (B, D, Hp/4, Wp/4): VITA's mask features (vita_mask_features applied), or with project_mask_features=False
    # the pixel decoder's /4 map it applies to (VitaModule.fold_mask_projection then folds it into the embeddings)
    mask_features: Tensor


def build_backbone(config: ModelConfig) -> nn.Module:
    """ResNet or Swin, from the config."""
    if config.backbone == "resnet":
        r = config.resnet
        return ResNet(r.stage_blocks, r.stem_out_channels, r.res2_out_channels, r.bottleneck_channels, r.stride_in_1x1)
    s = config.swin
    return SwinTransformer(
        embed_dim=s.embed_dim,
        depths=s.depths,
        num_heads=s.num_heads,
        window_size=s.window_size,
        mlp_ratio=s.mlp_ratio,
        patch_size=s.patch_size,
        patch_norm=s.patch_norm,
    )


class VitaModel(nn.Module):
    """VITA on Mask2Former. ``detect`` runs per frame, ``track`` once over all frames' queries."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        pd, fd, vc = config.pixel_decoder, config.frame_decoder, config.vita
        self.backbone = build_backbone(config)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            self.backbone.out_channels,
            conv_dim=pd.conv_dim,
            mask_dim=pd.mask_dim,
            num_heads=pd.num_heads,
            num_levels=pd.num_levels,
            num_points=pd.num_points,
            enc_layers=pd.enc_layers,
            ffn_dim=pd.ffn_dim,
            norm_groups=pd.norm_groups,
        )
        self.frame_decoder = MaskedAttentionDecoder(
            config.num_classes,
            hidden_dim=fd.hidden_dim,
            num_queries=fd.num_queries,
            num_heads=fd.num_heads,
            ffn_dim=fd.ffn_dim,
            num_layers=fd.num_layers,
            mask_dim=pd.mask_dim,
            num_levels=pd.num_levels,
        )
        self.vita = VitaModule.from_config(config)
        self.set_kernels(config.kernels)
        inp = config.input
        self.register_buffer("pixel_mean", torch.tensor(inp.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(inp.pixel_std).view(1, -1, 1, 1), persistent=False)

    def set_kernels(self, mode: str) -> None:
        """Run every attention and convolution that has a fast form with kernels ``mode``: "auto" | "reference" |
        "triton" ("reference": the plain PyTorch ops, e.g. direct instead of Winograd convolutions)."""
        for module in self.modules():
            if isinstance(module, (MSDeformAttn, VitaModule, ConvNorm, ConvGN, MultiheadAttention)):
                module.kernels = check_mode(mode)

    def normalize_and_pad(self, images: Tensor) -> Tensor:
        """(B, 3, Hr, Wr) RGB in 0..255 (uint8 or float) -> normalised, zero-padded to the size divisibility."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        d = self.config.input.size_divisibility
        h, w = x.shape[-2:]
        if d > 1:
            x = F.pad(x, (0, (-w) % d, 0, (-h) % d))  # after normalisation, as detectron2's ImageList
        x = x.to(detector_dtype(self))
        if self.config.backbone == "resnet":
            # channels-last: oneDNN's convolutions run on it without reordering (ResNet's weights follow)
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def detect(self, images: Tensor, num_query_layers: int = 1, project_mask_features: bool = True) -> DetectorOutput:
        """Frames already resized (B, 3, Hr, Wr) -> frame queries, frame logits and mask features.

        ``project_mask_features=False`` leaves VITA's 1x1 mask-feature convolution out (see DetectorOutput)."""
        x = self.normalize_and_pad(images)
        out4, multi_scale = self.pixel_decoder(self.backbone(x))
        # each stage computes in its own weights' dtype (the reduced-precision policy may differ per stage)
        fd = next(self.frame_decoder.parameters()).dtype
        # the frame decoder's mask features are needed only resized to its attention sizes: it projects there
        decoded = self.frame_decoder([f.to(fd) for f in multi_scale], out4, num_query_layers=num_query_layers,
                                     mask_projection=self.pixel_decoder.mask_features)
        return DetectorOutput(
            frame_queries=decoded.frame_queries[-1],
            frame_logits=decoded.pred_logits[-1],
            mask_features=self.vita.project_mask_features(out4) if project_mask_features else out4,
        )

    def batch_clips(self, clips: list[Tensor]) -> Tensor:
        """Clips of uint8 frames (T, 3, h_i, w_i) -> one normalised batch (B*T, 3, Hp, Wp), zero-padded.

        Each clip is normalised before padding, as detectron2's ImageList pads normalised images with 0."""
        d = max(self.config.input.size_divisibility, 1)
        hp = -(-max(c.shape[-2] for c in clips) // d) * d
        wp = -(-max(c.shape[-1] for c in clips) // d) * d
        t = clips[0].shape[0]
        out = self.pixel_mean.new_zeros(len(clips) * t, 3, hp, wp)
        for i, c in enumerate(clips):
            if c.shape[0] != t:
                raise ValueError(f"all clips of a batch need the same number of frames, got {c.shape[0]} and {t}")
            x = (c.to(out.device, out.dtype) - self.pixel_mean) / self.pixel_std
            out[i * t : (i + 1) * t, :, : c.shape[-2], : c.shape[-1]] = x
        return out

    def forward_train(self, clips: list[Tensor], num_query_layers: int = 3) -> tuple[dict, dict]:
        """Training forward over B clips of T frames -> (frame_outputs, vita_outputs) in the official layout.

        frame_outputs: pred_logits (B*T, Nf, K+1), pred_masks (B*T, Nf, h, w), aux_outputs (earlier predictions).
        vita_outputs: pred_logits (L, B, cQ, K+1), pred_masks (L, B, cQ, T, h, w), pred_fq_embed (L, B, T, Nf, C),
        pred_cq_embed (L, B, cQ, C), aux_outputs; L = ``num_query_layers`` frame-decoder layers feed VITA,
        each as its own batch element.
        """
        b, t = len(clips), clips[0].shape[0]
        x = self.batch_clips(clips)
        out4, multi_scale = self.pixel_decoder(self.backbone(x))
        decoded = self.frame_decoder(
            multi_scale, self.pixel_decoder.mask_features(out4), num_query_layers=num_query_layers, with_masks=True
        )
        frame_outputs = {
            "pred_logits": decoded.pred_logits[-1],
            "pred_masks": decoded.pred_masks[-1],
            "aux_outputs": [
                {"pred_logits": lg, "pred_masks": m} for lg, m in zip(decoded.pred_logits[:-1], decoded.pred_masks[:-1])
            ],
        }
        queries = torch.stack(decoded.frame_queries)  # (L, B*T, Nf, C)
        nl, _, nf, c = queries.shape
        vita_out: VitaOutput = self.vita(queries.reshape(nl * b, t, nf, c), all_layers=True)
        vita_mask_features = self.vita.vita_mask_features(out4)
        vita_mask_features = vita_mask_features.view(b, t, *vita_mask_features.shape[-3:])

        def video_heads(logits: Tensor, mask_embed: Tensor) -> dict[str, Tensor]:
            logits = logits.view(nl, b, *logits.shape[1:])
            mask_embed = mask_embed.view(nl, b, *mask_embed.shape[1:])
            masks = torch.einsum("lbqc,btchw->lbqthw", mask_embed, vita_mask_features)
            return {"pred_logits": logits, "pred_mask_embed": mask_embed, "pred_masks": masks}

        vita_outputs = video_heads(vita_out.pred_logits, vita_out.pred_mask_embed)
        vita_outputs["aux_outputs"] = [video_heads(a["pred_logits"], a["pred_mask_embed"]) for a in vita_out.aux]
        fq, cq = vita_out.pred_fq_embed, vita_out.pred_cq_embed
        vita_outputs["pred_fq_embed"] = None if fq is None else fq.view(nl, b, *fq.shape[1:])
        vita_outputs["pred_cq_embed"] = None if cq is None else cq.view(nl, b, *cq.shape[1:])
        return frame_outputs, vita_outputs

    def mask_features(self, images: Tensor, project: bool = True) -> Tensor:
        """VITA's mask features only (B, D, Hp/4, Wp/4): the frame decoder is skipped (second-pass recompute).

        ``project=False``: the map before VITA's mask-feature convolution, as ``detect`` gives it then."""
        out4, _ = self.pixel_decoder(self.backbone(self.normalize_and_pad(images)))
        return self.vita.project_mask_features(out4) if project else out4

    def track(
        self,
        frame_queries: Tensor,
        query_index: Optional[Tensor] = None,
        window: Optional[int] = None,
        overwrite_input: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """All T frames' queries (T, N, C) -> video class logits (cQ, K+1) and mask embeddings (cQ, D).

        ``query_index`` (T, N): each token's frame-query slot (after pruning); ``window`` overrides W;
        ``overwrite_input``: the encoder may use ``frame_queries`` as its buffer (VitaModule.forward)."""
        out: VitaOutput = self.vita(
            frame_queries.unsqueeze(0), query_index, window=window, overwrite_input=overwrite_input
        )
        return out.pred_logits[0], out.pred_mask_embed[0]
