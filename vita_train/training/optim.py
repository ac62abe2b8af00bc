"""AdamW with the official parameter groups, and the warm-up + step-decay learning-rate schedule."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from ..modeling.resnet import FrozenBatchNorm2d
from .config import SolverConfig

_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
    FrozenBatchNorm2d,
)
# Swin's position tables are looked up like embeddings: no weight decay (as the official build_optimizer)
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def parameter_groups(model: nn.Module, solver: SolverConfig) -> list[dict]:
    """One group per trainable parameter with its lr and weight decay (backbone lr x multiplier, no decay
    for norms, embeddings and position tables)."""
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr, wd = solver.base_lr, solver.weight_decay
            if module_name.startswith("backbone") or ".backbone." in f".{module_name}.":
                lr *= solver.backbone_lr_multiplier
            if any(k in name for k in _NO_DECAY_NAMES):
                wd = 0.0
            if isinstance(module, _NORMS):
                wd = solver.weight_decay_norm
            if isinstance(module, nn.Embedding):
                wd = solver.weight_decay_embed
            groups.append({"params": [p], "lr": lr, "weight_decay": wd, "name": f"{module_name}.{name}".lstrip(".")})
    if not groups:
        raise ValueError("the model has no trainable parameters (is every part frozen?)")
    return groups


def build_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups``."""
    return torch.optim.AdamW(parameter_groups(model, solver), lr=solver.base_lr, weight_decay=solver.weight_decay)


def lr_factor(step: int, solver: SolverConfig) -> float:
    """Multiplier of each group's base lr at ``step``: linear warm-up from warmup_factor, then gamma^k."""
    factor = solver.gamma ** bisect.bisect_right(list(solver.steps), step)
    if step < solver.warmup_iters:
        alpha = step / solver.warmup_iters
        factor *= solver.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, solver: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per iteration with ``lr_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, solver))
