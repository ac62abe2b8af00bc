"""Command line of the training package.

  python -m vita_train train --config RECIPE [key=value ...] [--resume [CKPT]]
  python -m vita_train eval --ytvis-json GT --results results.json
  python -m vita_train eval --ytvis-json GT --model PATH --frames ROOT [--out results.json]
  python -m vita_train synth --out DIR [--videos N] [--frames T] [--split train|val] [--coco-images N]
  python -m vita_train recipes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional

RECIPE_DIR = Path(__file__).with_name("recipes")


def recipe_path(name_or_path: str) -> Path:
    """A recipe YAML path, or the packaged recipe of that name (``vita_r50_ytvis19``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    packaged = RECIPE_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    from .config import ConfigError

    raise ConfigError(f"no recipe {name_or_path!r}: give a YAML path or one of: {', '.join(recipe_names())}")


def recipe_names() -> list[str]:
    """Names of the packaged recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vita_train train", description="Train VITA from a recipe.")
    p.add_argument("--config", required=True, help="recipe YAML path or packaged recipe name (see: recipes)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. solver.base_lr=1e-4 output_dir=runs/a")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the run in output_dir, or from CKPT (a key=value after --resume is an override)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_intermixed_args(argv)  # overrides may come on both sides of --resume / --no-progress
    if (isinstance(args.resume, str) and "=" in args.resume and "--resume" in argv
            and not Path(args.resume).is_file()):
        # argparse gave the override after a bare --resume to it as CKPT; --resume=PATH is always a path
        at = argv.index("--resume")
        args.overrides.insert(sum(1 for a in argv[:at] if a in args.overrides), args.resume)
        args.resume = True
    from .training.config import TrainConfig
    from .training.trainer import train

    recipe = recipe_path(args.config)
    cfg = TrainConfig.from_yaml(recipe, args.overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress, recipe=recipe)
    logging.getLogger("vita_train").info("final checkpoint: %s", result.final_checkpoint)
    sys.stdout.write(f"final checkpoint: {result.final_checkpoint}\n")
    return 0


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vita_train eval", description="YouTube-VIS AP/AR of a results file.")
    p.add_argument("--ytvis-json", required=True, help="ground truth in YouTube-VIS format")
    p.add_argument("--results", help="results JSON to score")
    p.add_argument("--model", help="checkpoint or export directory: segment every video first")
    p.add_argument("--frames", help="with --model: the frame root the JSON's file_names are relative to")
    p.add_argument("--out", help="with --model: also keep the results JSON here (default: a temporary file)")
    p.add_argument("--json", action="store_true", help="print the 12 numbers as JSON")
    args = p.parse_args(argv)
    from .evaluation import STAT_NAMES, check_ground_truth, evaluate_ytvis

    if bool(args.results) == bool(args.model):
        p.error("give exactly one of --results or --model")
    if args.model and not args.frames:
        p.error("--model needs --frames ROOT")
    if args.out:
        from .training.paths import is_within

        for flag, given in (("--ytvis-json", args.ytvis_json), ("--results", args.results), ("--model", args.model)):
            if given and is_within(Path(args.out), Path(given)):
                p.error(f"--out {args.out} is the {flag} input {given}; writing the results there would destroy it, "
                        "so give --out another path")
    with tempfile.TemporaryDirectory(prefix="vita_eval_") as tmp:
        results = args.results
        if args.model:
            check_ground_truth(args.ytvis_json)  # before the model spends minutes on every video
            results = Path(args.out) if args.out else Path(tmp) / "results.json"
            _segment_for_eval(args.model, Path(args.ytvis_json), Path(args.frames), results)
        stats = evaluate_ytvis(args.ytvis_json, results)
    if args.json:
        sys.stdout.write(json.dumps(stats, indent=1) + "\n")
    else:
        sys.stdout.write("".join(f"{name:>6s} {stats[name]:.4f}\n" for name in STAT_NAMES))
    return 0


def _segment_for_eval(model: str, gt: Path, frames: Path, out: Path) -> None:
    import runtime
    from runtime.dataset import run_dataset

    run_dataset(runtime.load(model), gt, frames, out)


def _synth(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vita_train synth", description="Write a synthetic VIS dataset.")
    p.add_argument("--out", required=True, help="dataset root")
    p.add_argument("--videos", type=int, default=20)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--split", default="train")
    p.add_argument("--coco-images", type=int, default=0, help="also write this many COCO-format still images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from .data.synthetic import SyntheticArgumentError, SyntheticTargetError, write_synthetic_dataset

    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; give the folder the dataset goes in")
    try:
        paths = write_synthetic_dataset(
            args.out, args.videos, args.frames, args.height, args.width, args.seed, args.split, args.coco_images
        )
    except SyntheticArgumentError as e:
        flags = {"num_videos": "--videos", "num_frames": "--frames", "coco_images": "--coco-images"}
        p.error(f"{flags.get(e.parameter, '--' + e.parameter)} {e.problem}")
    except SyntheticTargetError as e:
        p.error(str(e))
    sys.stdout.write(f"{paths.ytvis_json}\n" + (f"{paths.coco_json}\n" if paths.coco_json else ""))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m vita_train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"train": _train, "eval": _eval, "synth": _synth}
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ or "")
        return 0 if argv else 2
    if argv[0] == "recipes":
        sys.stdout.write("".join(f"{n}\n" for n in recipe_names()))
        return 0
    if argv[0] not in commands:
        sys.stderr.write(f"unknown command {argv[0]!r}; use one of: train, eval, synth, recipes\n")
        return 2
    from .checkpoint.errors import CheckpointError
    from .config import ConfigError

    known: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError)
    try:
        from .data.records import DatasetError
        from .evaluation import EvaluationError
        from .training.state import ResumeError
        from .training.trainer import TrainingError

        known += (DatasetError, EvaluationError, ResumeError, TrainingError)
        from runtime.dataset import DatasetRunError
        from runtime.segmenter import ModelPathError
        from runtime.video_io import VideoInputError

        known += (DatasetRunError, ModelPathError, VideoInputError)
    except ImportError:
        pass
    try:
        return commands[argv[0]](argv[1:])
    except known as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
