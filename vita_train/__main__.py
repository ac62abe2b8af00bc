"""Command line: ``python -m vita_train demo`` (training and evaluation commands land here too)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from . import VitaModel, load_model, preset
from .data.synthetic import moving_shapes_clip
from .inference import VideoPrediction, predict_video
from .utils.atomic import atomic_write


def ytvis_records(pred: VideoPrediction, video_id: int) -> list[dict]:
    """Instances in the YouTube-VIS results format (category_id = label + 1, one RLE per frame)."""
    records = []
    for score, label, masks in zip(pred.scores.tolist(), pred.labels.tolist(), pred.masks.numpy()):
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        records.append({"video_id": video_id, "score": score, "category_id": label + 1, "segmentations": rles})
    return records


def _demo(args: argparse.Namespace) -> int:
    if args.model:
        model = load_model(args.model)
        note = f"model {args.model}"
    else:
        torch.manual_seed(0)
        model = VitaModel(preset(args.preset)).eval()
        note = f"preset {args.preset} with RANDOM weights (no trained demo model ships yet): the output only shows the pipeline runs"
    frames = moving_shapes_clip(args.frames, 120, 160, seed=0)
    start = time.perf_counter()
    pred = predict_video(model, frames)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    records = ytvis_records(pred, video_id=1)
    atomic_write(out, lambda f: json.dump(records, f), binary=False)
    names = model.config.label_names()
    print(f"segmented a generated {len(frames)}-frame 120x160 clip with {note}")
    print(f"{elapsed / len(frames):.3f} s/frame on {torch.get_num_threads()} threads; wrote {len(pred.scores)} instances to {out}")
    for score, label in sorted(zip(pred.scores.tolist(), pred.labels.tolist()), reverse=True)[:5]:
        print(f"  {names[label]:<16} score {score:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vita_train`` / ``vita-train``."""
    parser = argparse.ArgumentParser(prog="vita_train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="segment a generated clip with a preset (or given) model")
    demo.add_argument("--preset", default="vita_tiny", help="preset to build with random weights")
    demo.add_argument("--model", help="a checkpoint to use instead (official detectron2 or ours)")
    demo.add_argument("--frames", type=int, default=12)
    demo.add_argument("--out", default="demo_results.json", help="YouTube-VIS results JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _demo(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
