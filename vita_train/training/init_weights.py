"""Where training starts: a full checkpoint (official, ours, COCO-pretrained) or ImageNet backbone weights."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint.errors import CheckpointError
from ..checkpoint.loader import load_model

log = logging.getLogger(__name__)


def copy_matching(model: nn.Module, state: dict[str, Tensor], source: str) -> list[str]:
    """Copy every tensor whose name and shape match; log what was skipped (as detectron2's checkpointer does).

    Returns the names that were loaded."""
    own = model.state_dict()
    loaded, mismatched = [], []
    for k, v in state.items():
        if k not in own:
            continue
        if tuple(v.shape) != tuple(own[k].shape):
            mismatched.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
            continue
        own[k] = v.to(own[k].dtype)
        loaded.append(k)
    if not loaded:
        raise CheckpointError(f"{source}: no tensor matches this model by name and shape; is it the right file?")
    model.load_state_dict(own)
    missing = sorted(set(own) - set(loaded))
    if mismatched:
        log.warning("%s: %d tensors skipped for shape (e.g. class heads): %s", source, len(mismatched), "; ".join(mismatched[:8]))
    if missing:
        log.info("%s: %d tensors keep their fresh initialisation (e.g. %s)", source, len(missing), ", ".join(missing[:5]))
    log.info("%s: loaded %d of %d tensors", source, len(loaded), len(own))
    return loaded


def init_from_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Start from a full VITA/Mask2Former checkpoint in the official format or ours (any number of classes)."""
    source = load_model(path)
    return copy_matching(model, source.state_dict(), str(path))


def init_backbone(model: nn.Module, path: str | Path) -> list[str]:
    """Load ImageNet weights into ``model.backbone``: torchvision/timm ``.pth`` or a detectron2 ``.pkl``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights {path} do not exist")
    raw = _read_pickle_of_arrays(path) if path.suffix == ".pkl" else _read_torch(path)
    state = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, Tensor) else v for k, v in raw.items()}
    state = backbone_keys(state)
    prefixed = {f"backbone.{k}": v for k, v in state.items()}
    return copy_matching(model, prefixed, str(path))


def backbone_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename torchvision ResNet / detectron2 / Swin checkpoint keys to ours (backbone-relative)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^(module\.|backbone\.|model\.)+", "", k)
        if k.startswith(("fc.", "head.", "norm.")):  # classifier heads and Swin's final norm are unused
            continue
        k = _torchvision_resnet_key(k)
        out[k] = v
    return out


def _torchvision_resnet_key(k: str) -> str:
    if k.startswith("conv1."):
        return "stem.conv1." + k[len("conv1.") :]
    if k.startswith("bn1."):
        return "stem.conv1.norm." + k[len("bn1.") :]
    m = re.match(r"layer(\d)\.(\d+)\.(.*)", k)
    if not m:
        return k
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def _read_torch(path: Path) -> dict:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # one message naming the file, whatever the cause
        raise CheckpointError(f"cannot read backbone weights {path}: {e}") from None
    for key in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a dict of tensors")
    return raw


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays only (detectron2 .pkl files), refusing anything that could run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_pickle_of_arrays(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as a detectron2 weights pickle: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a dict of arrays")
    return raw


def freeze_detector(model: nn.Module) -> int:
    """Freeze everything but the VITA module (its mask-feature projection included); returns #frozen tensors."""
    n = 0
    for name, p in model.named_parameters():
        if not name.startswith("vita."):
            p.requires_grad_(False)
            n += 1
    return n
