"""Random-weight models with sharp attention (like trained ones), saved in the official detectron2 key layout."""

from __future__ import annotations

from pathlib import Path

import torch

from vita_train import VitaModel, preset
from vita_train.checkpoint.official import to_official


def sharpen_attention(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale every attention's query and key in-projections by ``factor`` (packed in_proj and Swin's qkv)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("in_proj_weight") or name.endswith("in_proj_bias") or ".qkv." in name:
                p[: 2 * (p.shape[0] // 3)] *= factor
    return model


def official_checkpoint(path: Path, preset_name: str, seed: int = 0, factor: float = 4.0) -> Path:
    """Write a randomly initialised, sharpened ``preset_name`` as ``{'model': official keys, 'iteration': 0}``."""
    torch.manual_seed(seed)
    model = sharpen_attention(VitaModel(preset(preset_name)).eval(), factor)
    torch.save({"model": to_official(model.state_dict()), "iteration": 0}, path)
    return path
