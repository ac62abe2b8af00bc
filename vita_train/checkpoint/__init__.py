"""Checkpoint formats: the official detectron2 one and the project's own, and the one loader for both."""

from .errors import CheckpointError
from .loader import load_model
from .native import save_checkpoint

__all__ = ["CheckpointError", "load_model", "save_checkpoint"]
