"""torch -> ONNX: trace, check, infer shapes, simplify (constant folding, dead nodes), write atomically."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from vita_train.utils.atomic import atomic_write

from . import msda_onnx

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """Export failed; the message says at which step and why."""


def to_onnx(
    module: nn.Module,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> onnx.ModelProto:
    """Trace ``module`` to a checked, shape-inferred, simplified ONNX model."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter; correctness is checked by validation instead
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model = msda_onnx.attach_function(simplify(model))  # after simplify: its optimizer would inline the body
    check(model)
    return onnx.shape_inference.infer_shapes(model)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal (onnxscript's optimizer), keeping dynamic dimensions."""
    try:
        import onnxscript.optimizer
    except ImportError:
        log.warning("onnxscript is not installed: graphs are written without further simplification")
        return model
    # the optimizer logs every folded or skipped constant at INFO: too chatty for a user's log
    noisy = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        return onnxscript.optimizer.optimize(model)
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)


def check(model: onnx.ModelProto) -> None:
    """onnx.checker with full shape checking; raises ExportError naming the problem."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph does not pass onnx.checker: {e}") from None


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write an ONNX model atomically."""
    data = model.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
