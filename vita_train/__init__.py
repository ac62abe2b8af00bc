"""VITA in plain PyTorch: model, checkpoint formats, inference path (training lands here too).

Names are imported lazily so that torch-free parts (config, class names, preprocessing) can be used
by the runtime's torch-free backends without importing torch.
"""

from __future__ import annotations

from vita_train.utils.lazy import lazy_getattr

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


__getattr__ = lazy_getattr("vita_train", _EXPORTS)
