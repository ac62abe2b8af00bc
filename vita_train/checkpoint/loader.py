"""``load_model``: the one way every entry point turns a checkpoint file into a model."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import yaml
from torch import Tensor

from ..config import ConfigError, ModelConfig
from ..data.class_names import DATASET_CLASSES, dataset_key
from ..modeling.vita_model import VitaModel
from . import official
from .detectron2_config import is_detectron2_config, read_detectron2_yaml, settings_from_detectron2
from .errors import CheckpointError
from .native import FORMAT_VERSION, is_native

log = logging.getLogger(__name__)

# Keyword shorthands accepted by load_model; any other key may be given dotted with "__" (vita__window=3).
SHORT_KEYS = {
    "window": "vita.window",
    "topk": "test.topk",
    "min_size": "input.min_size_test",
    "max_size": "input.max_size_test",
    "vita_heads": "vita.num_heads",
    "pixel_mean": "input.pixel_mean",
    "pixel_std": "input.pixel_std",
    "detector_chunk": "test.detector_chunk",
    "mask_chunk": "test.mask_chunk",
}
# Classes in a checkpoint -> the dataset its released models were trained on (40 fits YTVIS 2019 and 2021).
_DATASET_BY_CLASSES = {40: "ytvis_2019", 25: "ovis", 80: "coco"}


def read_checkpoint(path: Path) -> Any:
    """torch.load with weights_only=True, turning every failure into a CheckpointError naming the cause."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    _check_format(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise CheckpointError(
                f"{path} needs unpickling of arbitrary Python objects, which could run code; refusing to load it. "
                "Re-save its weights as tensors in a trusted environment: a detectron2 model's with "
                "torch.save({'model': model.state_dict()}, path), a model of this toolkit's with "
                "vita_train.save_checkpoint(path, model)."
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({msg.splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if zipfile.is_zipfile(path) or "zip" in first.lower() or isinstance(e, EOFError):
            raise CheckpointError(f"{path} is truncated or corrupt ({first}); download or copy it again") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({first})") from None
    except Exception as e:  # the weights-only unpickler fails in many ways on arbitrary bytes
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _check_format(path: Path) -> None:
    """Refuse a file torch.save cannot have written (neither a zip archive nor a pickle) by what it is, before
    torch's weights-only unpickler reads its bytes as opcodes and calls it an unsafe pickle."""
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"PK") or head[:1] == b"\x80":  # torch.save's zip format, or its legacy pickle (protocol 2+)
        return
    if path.suffix.lower() in (".yaml", ".yml"):
        raise CheckpointError(f"{path} is a config file, not a checkpoint: pass the weights (.pth); a config.yaml "
                              "beside them is read automatically (in Python another one can be given as config=)")
    what = "a NumPy array file" if head.startswith(b"\x93NUMPY") else "not a PyTorch checkpoint"
    raise CheckpointError(f"{path} is {what}, neither a zip archive nor a pickle as torch.save writes; pass the "
                          "model's .pth checkpoint")


def _tensor_state(raw: Any, path: Path) -> dict[str, Tensor]:
    state = raw.get("model", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path} holds no state dict (expected a dict with a 'model' entry of tensors)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    return dict(state)


def _resolve_config_source(config: Any, ckpt: Path) -> tuple[Optional[ModelConfig], dict[str, Any]]:
    """(a full ModelConfig, or None) and detectron2 settings, from ``config`` or a config.yaml beside ckpt."""
    if isinstance(config, ModelConfig):
        return config, {}
    if config is None:
        beside = ckpt.parent / "config.yaml"
        if not beside.is_file():
            return None, {}
        config = beside
        log.info("reading settings the weights cannot tell from %s", beside)
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if isinstance(data, dict) and (is_detectron2_config(data) or "_BASE_" in data):
        return None, settings_from_detectron2(read_detectron2_yaml(path))
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # a training run's config.yaml
        return ModelConfig.from_dict(data["model"]), {}
    if isinstance(data, dict):
        return ModelConfig.from_dict(data), {}
    raise ConfigError(f"config {path} is neither a detectron2 config nor a model config")


def _released_defaults(backbone: str, dataset: str) -> dict[str, Any]:
    """What the released configs set but no checkpoint stores."""
    out: dict[str, Any] = {
        "vita.window": 6,
        "vita.num_heads": 8,
        "test.topk": 10,
        "input.min_size_test": 448 if backbone == "swin" else 360,
    }
    if dataset == "ovis":
        out["test.topk"] = 20
    if dataset == "coco":  # COCO pre-training configs: full attention, detectron2's test sizes
        out.update({"vita.window": 0, "test.topk": 100, "input.min_size_test": 800})
    return out


def _class_names(dataset: Optional[str], num_classes: int) -> tuple[str, tuple[str, ...]]:
    key = dataset_key(dataset) if dataset else None
    if key is None and dataset:
        log.warning("dataset %r is not one of %s; using generic class names", dataset, sorted(DATASET_CLASSES))
        return dataset, ()
    if key is None:
        key = _DATASET_BY_CLASSES.get(num_classes)
        if key is None:
            return "unknown", ()
        if key == "ytvis_2019":
            log.info("40 classes: assuming YouTube-VIS 2019 names; for the 2021 ones pass dataset='ytvis_2021' "
                     "(--dataset ytvis_2021 on the command line) or put the model's config.yaml beside it")
    names = DATASET_CLASSES[key]
    if len(names) != num_classes:
        log.warning("dataset %s has %d classes but the checkpoint %d; using generic names", key, len(names), num_classes)
        return key, ()
    return key, names


def _arch_label(arch: dict[str, Any]) -> str:
    if arch["backbone"] == "resnet":
        return f"r{arch['resnet'].depth}"
    return f"swin{arch['swin'].embed_dim}"


def _apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    dotted: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in SHORT_KEYS:
            dotted[SHORT_KEYS[key]] = value
        else:
            dotted[key.replace("__", ".")] = value
    return cfg.replace(**dotted) if dotted else cfg


def config_for_official_state(
    state: Mapping[str, Tensor], settings: Optional[dict[str, Any]] = None, overrides: Optional[dict[str, Any]] = None
) -> ModelConfig:
    """The full config of an official checkpoint: architecture from the weights (our key layout), the rest
    from detectron2 ``settings`` (dotted keys, see settings_from_detectron2), else the released defaults.
    ``overrides`` may hold ``dataset`` and ``class_names``; the ones used are removed from it."""
    settings = dict(settings or {})
    overrides = overrides if overrides is not None else {}
    arch = official.infer_config(state)
    dataset = overrides.pop("dataset", None) or settings.pop("dataset", None)
    settings.pop("dataset", None)
    if arch["backbone"] != "resnet":
        settings.pop("resnet.stride_in_1x1", None)
    key, names = _class_names(dataset, arch["num_classes"])
    if "class_names" in overrides:
        names = tuple(overrides.pop("class_names"))
    cfg = ModelConfig(dataset=key, class_names=names, name=f"vita_{_arch_label(arch)}_{key}", **arch)
    values = _released_defaults(arch["backbone"], dataset_key(key) or key)
    values.update(settings)
    return cfg.replace(**values)


def _load_weights(model: VitaModel, state: dict[str, Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not match the model built from its config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:10])}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def load_model(
    path: Union[str, Path],
    config: Union[None, str, Path, ModelConfig] = None,
    **overrides: Any,
) -> VitaModel:
    """Load an official detectron2 VITA checkpoint or one of ours, in eval mode, with ``.config`` attached.

    ``config``: a detectron2 config.yaml (default: the one beside the checkpoint, if any), one of our
    model YAMLs, or a ModelConfig. ``overrides``: window, topk, min_size, max_size, dataset,
    class_names, vita_heads, ... or any config key dotted with ``__`` (e.g. ``vita__window=3``).
    """
    path = Path(path)
    raw = read_checkpoint(path)
    # dataset=None is "not given" (callers pass their optional argument through), never "no dataset"
    overrides = {k: v for k, v in overrides.items() if not (k == "dataset" and v is None)}
    if is_native(raw):
        if raw.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} is format version {raw.get('format_version')}, this version reads {FORMAT_VERSION}; "
                "upgrade the toolkit"
            )
        state = _tensor_state(raw, path)
        given, _ = _resolve_config_source(config, path) if config is not None else (None, {})
        cfg = given or ModelConfig.from_dict(raw["config"])
        if "dataset" in overrides or "class_names" in overrides:
            dataset = overrides.pop("dataset", cfg.dataset)
            key, names = _class_names(dataset, cfg.num_classes)
            names = tuple(overrides.pop("class_names", names))
            cfg = cfg.replace(dataset=key, class_names=names)
    else:
        state = official.strip_module_prefix(_tensor_state(raw, path))
        if not official.is_official_layout(state):
            raise CheckpointError(
                f"{path} is a PyTorch checkpoint but not of a VITA/Mask2Former model "
                "(no 'sem_seg_head.*' or 'vita_module.*' keys)"
            )
        state = official.from_official(state)
        given, settings = _resolve_config_source(config, path)
        cfg = given or config_for_official_state(state, settings, overrides)
    cfg = _apply_overrides(cfg, overrides)
    model = VitaModel(cfg)
    _load_weights(model, state, path)
    return model.eval()
