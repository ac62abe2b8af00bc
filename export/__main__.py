"""``python -m export --ckpt vita_swinl.pth [--out DIR] ...`` (console script ``vita-export``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from vita_train.data.class_names import DATASET_CLASSES


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 360x640 (height x width), got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"--size must be at least 32x32, got {text!r}")
    return h, w


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m export", description="Export a VITA checkpoint to ONNX (and TensorRT).")
    p.add_argument("--ckpt", required=True, type=Path, help="official detectron2 checkpoint or one of ours")
    p.add_argument("--out", type=Path, help="export directory (default: <ckpt>_export beside the checkpoint)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--min-size", type=int, help="test-time shortest edge (default: the model's)")
    p.add_argument("--max-size", type=int, help="test-time longest-edge cap (default: the model's)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--dynamic-size", action="store_true", help="dynamic frame height and width (the default)")
    size.add_argument("--size", type=_size, help="fixed resized frame size HxW, e.g. 360x640")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="also write fp16/bf16 graph variants (mixed-precision policy in their types); with "
                        "--tensorrt the engines are built from them, strongly typed (default fp32)")
    p.add_argument("--fp16", action="store_true", help="same as --precision fp16")
    p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                   help="check the graphs against the torch model with ONNX Runtime (default on)")
    p.add_argument("--validation-threads", type=int, default=0, metavar="N",
                   help="ONNX Runtime intra-op threads while validating (default 0: ONNX Runtime's choice)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs TensorRT >= 10 and a GPU)")
    p.add_argument("--msda", choices=["plain", "trt-plugin"], default="plain",
                   help="deformable attention as grid_sample (ONNX Runtime) or TensorRT's plugin node")
    p.add_argument("--force", action="store_true", help="write into an existing directory that is not an export")
    p.add_argument("--dataset", choices=sorted(DATASET_CLASSES),
                   help="the class names of an official checkpoint that has no config.yaml beside it (40 classes "
                        "are taken as ytvis_2019 unless this says ytvis_2021)")
    args = p.parse_args(argv)
    if args.fp16 and args.precision not in (None, "fp16"):
        p.error(f"--fp16 contradicts --precision {args.precision}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from vita_train.checkpoint.errors import CheckpointError
    from vita_train.config import ConfigError

    from .exporter import ExportOptions, export_model
    from .onnx_io import ExportError
    from .validate import OrtSettings, ValidationError

    opts = ExportOptions(
        out=args.out, opset=args.opset, min_size=args.min_size, max_size=args.max_size, size=args.size,
        precision=args.precision or ("fp16" if args.fp16 else None), validate=args.validate, force=args.force, tensorrt=args.tensorrt, msda=args.msda,
        validation_ort=OrtSettings(threads=args.validation_threads), dataset=args.dataset,
    )
    try:
        out = export_model(args.ckpt, opts)
    except (CheckpointError, ConfigError, ExportError, ValidationError, ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
