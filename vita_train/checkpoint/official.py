"""The official detectron2 checkpoint layout: key mapping and reading the architecture off tensor shapes.

Works on shapes only, so it accepts meta tensors (no weights materialised).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from torch import Tensor

from ..config import (
    FrameDecoderConfig,
    ModelConfig,
    PixelDecoderConfig,
    ResNetConfig,
    SwinConfig,
    VitaConfig,
)
from .errors import CheckpointError

# official prefix -> ours
PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.", "backbone."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.", "frame_decoder."),
    ("vita_module.", "vita."),
)
# Loss buffers (class weights with the no-object weight) that inference ignores.
IGNORED_KEYS = ("criterion.empty_weight", "vita_criterion.empty_weight")
# The deformable attention's points per head and level are fixed in the official code.
MSDA_POINTS = 4


def strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a DataParallel ``module.`` prefix and rename legacy ``static_query`` keys."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        out[key.replace("static_query", "query_feat")] = value
    return out


def is_official_layout(state: Mapping[str, Any]) -> bool:
    """True when keys look like detectron2's Mask2Former/VITA model."""
    return any(k.startswith(("sem_seg_head.", "vita_module.")) for k in state)


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def from_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official keys -> our keys; ignored loss buffers dropped; unknown prefixes kept (reported later)."""
    return {_rename(k, PREFIXES): v for k, v in state.items() if k not in IGNORED_KEYS}


def to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> official keys (the inverse of from_official, without the loss buffers)."""
    return {_rename(k, tuple((b, a) for a, b in PREFIXES)): v for k, v in state.items()}


def _indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return sorted(found)


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"checkpoint lacks {key!r}, which every VITA model has; is it a VITA checkpoint?")
    return tuple(state[key].shape)


def _count(state: Mapping[str, Tensor], pattern: str, what: str) -> int:
    idx = _indices(state, pattern)
    if not idx or idx != list(range(len(idx))):
        raise CheckpointError(f"cannot count {what}: found indices {idx}")
    return len(idx)


def infer_backbone(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Backbone kind and its config from our-layout keys."""
    if "backbone.stem.conv1.weight" in state:
        blocks = tuple(
            _count(state, rf"backbone\.res{s}\.(\d+)\.conv1\.weight", f"res{s} blocks") for s in (2, 3, 4, 5)
        )
        if "backbone.res2.0.conv3.weight" not in state:
            raise CheckpointError("ResNet without bottleneck blocks (conv3) is not used by VITA and not supported")
        resnet = ResNetConfig(
            depth=3 * sum(blocks) + 2,
            stage_blocks=blocks,
            stem_out_channels=_shape(state, "backbone.stem.conv1.weight")[0],
            res2_out_channels=_shape(state, "backbone.res2.0.conv3.weight")[0],
            bottleneck_channels=_shape(state, "backbone.res2.0.conv1.weight")[0],
        )
        return dict(backbone="resnet", resnet=resnet, swin=None)
    if "backbone.patch_embed.proj.weight" in state:
        if "backbone.absolute_pos_embed" in state:
            raise CheckpointError("Swin with an absolute position embedding (APE) is not supported")
        proj = _shape(state, "backbone.patch_embed.proj.weight")
        embed = proj[0]
        num_stages = _count(state, r"backbone\.layers\.(\d+)\.blocks\.0\.norm1\.weight", "Swin stages")
        depths = tuple(
            _count(state, rf"backbone\.layers\.{s}\.blocks\.(\d+)\.norm1\.weight", f"Swin stage {s} blocks")
            for s in range(num_stages)
        )
        tables = [_shape(state, f"backbone.layers.{s}.blocks.0.attn.relative_position_bias_table") for s in range(num_stages)]
        side = math.isqrt(tables[0][0])
        if side * side != tables[0][0] or side % 2 == 0:
            raise CheckpointError(f"Swin relative position table has {tables[0][0]} rows, not (2*ws-1)^2")
        fc1 = _shape(state, "backbone.layers.0.blocks.0.mlp.fc1.weight")
        swin = SwinConfig(
            embed_dim=embed,
            depths=depths,
            num_heads=tuple(t[1] for t in tables),
            window_size=(side + 1) // 2,
            mlp_ratio=fc1[0] / embed,
            patch_size=proj[-1],
            patch_norm="backbone.patch_embed.norm.weight" in state,
        )
        return dict(backbone="swin", resnet=None, swin=swin)
    raise CheckpointError(
        "cannot tell the backbone: neither ResNet (backbone.stem.*) nor Swin (backbone.patch_embed.*) keys found"
    )


def infer_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Everything the weights tell, as ModelConfig keyword arguments (our-layout keys expected)."""
    if not any(k.startswith("vita.") for k in state):
        if any(k.startswith("frame_decoder.") for k in state):
            raise CheckpointError(
                "this is a Mask2Former image checkpoint without the VITA module (no 'vita_module.*' keys); "
                "VITA needs a video checkpoint such as vita_r50_ytvis19.pth"
            )
        raise CheckpointError("no VITA module ('vita_module.*' keys) found: this is not a VITA checkpoint")
    kwargs = infer_backbone(state)

    pd = "pixel_decoder."
    num_levels = _count(state, rf"{pd}input_proj\.(\d+)\.0\.weight", "pixel decoder levels")
    attn_rows = _shape(state, f"{pd}transformer.encoder.layers.0.self_attn.attention_weights.weight")[0]
    if attn_rows % (MSDA_POINTS * num_levels):
        raise CheckpointError(f"deformable attention weights have {attn_rows} rows, not heads*levels*{MSDA_POINTS}")
    msda_heads = attn_rows // (MSDA_POINTS * num_levels)
    pixel = PixelDecoderConfig(
        conv_dim=_shape(state, f"{pd}input_proj.0.0.weight")[0],
        mask_dim=_shape(state, f"{pd}mask_features.weight")[0],
        num_heads=msda_heads,
        num_levels=num_levels,
        num_points=MSDA_POINTS,
        enc_layers=_count(state, rf"{pd}transformer\.encoder\.layers\.(\d+)\.norm1\.weight", "pixel encoder layers"),
        ffn_dim=_shape(state, f"{pd}transformer.encoder.layers.0.linear1.weight")[0],
    )

    fd = "frame_decoder."
    qf = _shape(state, f"{fd}query_feat.weight")
    frame = FrameDecoderConfig(
        hidden_dim=qf[1],
        num_queries=qf[0],
        num_heads=msda_heads,  # MASK_FORMER.NHEADS is shared with the pixel decoder
        ffn_dim=_shape(state, f"{fd}transformer_ffn_layers.0.linear1.weight")[0],
        num_layers=_count(state, rf"{fd}transformer_self_attention_layers\.(\d+)\.norm\.weight", "decoder layers"),
    )
    num_classes = _shape(state, f"{fd}class_embed.weight")[0] - 1

    vq = _shape(state, "vita.query_feat.weight")
    fq_pos = _shape(state, "vita.fq_pos.weight")
    if fq_pos[0] != frame.num_queries:
        raise CheckpointError(f"vita fq_pos has {fq_pos[0]} rows but the frame decoder has {frame.num_queries} queries")
    vita_classes = _shape(state, "vita.class_embed.weight")[0] - 1
    if vita_classes != num_classes:
        raise CheckpointError(f"frame decoder predicts {num_classes} classes but VITA {vita_classes}")
    vita = VitaConfig(
        hidden_dim=vq[1],
        num_queries=vq[0],
        num_heads=8,  # not in the weights; MODEL.VITA.NHEADS of every released config
        ffn_dim=_shape(state, "vita.transformer_ffn_layers.0.linear1.weight")[0],
        enc_layers=len(_indices(state, r"vita\.enc_self_attn\.(\d+)\.norm\.weight")),
        dec_layers=_count(state, r"vita\.transformer_cross_attention_layers\.(\d+)\.norm\.weight", "VITA decoder layers"),
        enforce_input_proj="vita.input_proj_dec.weight" in state,
        sim_embed_frame="vita.sim_embed_frame.weight" in state,
        sim_embed_clip="vita.sim_embed_clip.weight" in state,
    )
    kwargs.update(num_classes=num_classes, pixel_decoder=pixel, frame_decoder=frame, vita=vita)
    return kwargs


def config_from_state(state: Mapping[str, Tensor], **fields: Any) -> ModelConfig:
    """A ModelConfig with the architecture read off ``state`` (our layout) and the other fields given."""
    kwargs = infer_config(state)
    kwargs.update(fields)
    return ModelConfig(**kwargs)
