"""Export a VITA checkpoint to a per-frame detector graph and a token-engine graph (ONNX, TensorRT)."""

from .exporter import ExportOptions, ExportTargetError, export_model

__all__ = ["ExportOptions", "ExportTargetError", "export_model"]
