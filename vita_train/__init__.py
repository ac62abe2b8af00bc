"""VITA in plain PyTorch: model, checkpoint formats, inference path (training lands here too).

Names are imported lazily so that torch-free parts (config, class names, preprocessing) can be used
by the runtime's torch-free backends without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "vita_train.checkpoint.errors",
    "load_model": "vita_train.checkpoint.loader",
    "save_checkpoint": "vita_train.checkpoint.native",
    "ConfigError": "vita_train.config",
    "ModelConfig": "vita_train.config",
    "VitaModel": "vita_train.modeling.vita_model",
    "PRESET_NAMES": "vita_train.presets",
    "preset": "vita_train.presets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vita_train' has no attribute {name!r}")
