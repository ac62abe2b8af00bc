"""VITA in plain PyTorch: model, checkpoint formats, inference path (training lands here too)."""

from .checkpoint import CheckpointError, load_model, save_checkpoint
from .config import ConfigError, ModelConfig
from .modeling.vita_model import VitaModel
from .presets import PRESET_NAMES, preset

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "PRESET_NAMES",
    "VitaModel",
    "load_model",
    "preset",
    "save_checkpoint",
]
