"""The project's own checkpoint format: config + class names + weights in our key layout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

FORMAT_NAME = "vita-toolkit-checkpoint"
FORMAT_VERSION = 1


def is_native(raw: Any) -> bool:
    """True for a dict written by save_checkpoint."""
    return isinstance(raw, Mapping) and raw.get("format") == FORMAT_NAME


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: nn.Module, extra: Optional[dict[str, Any]] = None) -> None:
    """Write ``model`` (with its ``config``) in the project's format, atomically; ``extra`` adds entries."""
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(extra or {})
    atomic_torch_save(payload, path)
