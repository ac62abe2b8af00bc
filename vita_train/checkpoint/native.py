"""The project's own checkpoint format: config + class names + weights in our key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..utils.atomic import atomic_write

FORMAT_NAME = "vita-toolkit-checkpoint"
FORMAT_VERSION = 1


def is_native(raw: Any) -> bool:
    """True for a dict written by save_checkpoint."""
    return isinstance(raw, Mapping) and raw.get("format") == FORMAT_NAME


def save_checkpoint(path: str | Path, model: nn.Module, extra: Optional[dict[str, Any]] = None) -> None:
    """Write ``model`` (with its ``config``) in the project's format, atomically; ``extra`` adds entries."""
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(extra or {})
    atomic_write(path, lambda f: torch.save(payload, f))
