"""Training checkpoints: our model format plus optimiser, schedule, scaler, RNG and step, written atomically."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from ..checkpoint.native import save_checkpoint
from ..utils.atomic import atomic_write

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # a text file naming the newest checkpoint of a run
CHECKPOINT_DIR = "checkpoints"


class ResumeError(RuntimeError):
    """A run cannot be resumed; the message says why and what to do."""


@dataclass
class TrainingState:
    """What a resumed run restores: the next step and the states of everything that changes."""

    step: int
    optimizer: dict
    scheduler: dict
    scaler: Optional[dict]
    rng: dict[str, Any]
    train_config: str


def checkpoint_path(output_dir: Path, step: int) -> Path:
    """Where the checkpoint taken after ``step`` steps lives."""
    return output_dir / CHECKPOINT_DIR / f"model_{step:07d}.pth"


def rng_state() -> dict[str, Any]:
    """torch RNG states (CPU and every CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(output_dir: Path, model: nn.Module, state: TrainingState) -> Path:
    """Write the model (loadable by ``load_model``) with the training state, then point last_checkpoint at it."""
    path = checkpoint_path(output_dir, state.step)
    save_checkpoint(path, model, extra={"training": state.__dict__})
    atomic_write(output_dir / LAST_CHECKPOINT, lambda f: f.write(path.name + "\n"), binary=False)
    log.info("checkpoint written: %s", path)
    return path


def last_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint of the run in ``output_dir``, or None when it has none."""
    marker = output_dir / LAST_CHECKPOINT
    if not marker.is_file():
        return None
    path = output_dir / CHECKPOINT_DIR / marker.read_text().strip()
    if not path.is_file():
        raise ResumeError(f"{marker} names {path}, which does not exist; pass --resume PATH with a checkpoint")
    return path


def load_training_checkpoint(path: Path) -> tuple[dict, TrainingState]:
    """(model state dict, training state) of a checkpoint written by ``save_training_checkpoint``."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: one message that names it
        raise ResumeError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(raw, dict) or "training" not in raw or "model" not in raw:
        raise ResumeError(
            f"{path} holds no training state (it is a model-only checkpoint); start a new run from it with "
            f"init={path} instead of resuming"
        )
    return raw["model"], TrainingState(**raw["training"])


def config_changes(saved_yaml: str, current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (checkpoint's value, current value) for every setting ``current`` changes."""
    saved = _flatten(yaml.safe_load(saved_yaml) or {})
    now = _flatten(yaml.safe_load(yaml.safe_dump(current)))  # the same YAML round trip (tuples -> lists)
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
