"""Typed training configuration (model + data + solver + loss), YAML round trip and command-line overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import ConfigError, ModelConfig, config_from_dict, config_to_dict, set_dotted
from ..data.augment import AugmentConfig
from ..data.category_maps import target_class_names
from ..losses.config import LossConfig
from ..presets import PRESET_NAMES, preset

DATASET_FORMATS = ("ytvis", "coco")
CATEGORY_MAPS = ("", "coco_to_ytvis_2019", "coco_to_ytvis_2021", "coco_to_ovis")
AMP_MODES = ("off", "bf16", "fp16", "auto")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # the devices the trainer's autocast, scaler and DDP handle


@dataclass
class DatasetConfig:
    """One training dataset: a YouTube-VIS/OVIS video JSON or a COCO instance JSON (pseudo-videos)."""

    name: str = "ytvis_2019_train"
    format: str = "ytvis"
    json: str = ""
    images: str = ""
    ratio: float = 1.0  # relative probability that a batch element comes from this dataset
    category_map: str = ""  # map COCO categories onto the target classes; unmapped ones are dropped


@dataclass
class DataConfig:
    """What the loader reads and how it makes clips."""

    datasets: list[DatasetConfig] = field(default_factory=list)
    num_frames: int = 5
    frame_range: int = 20
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = 4


@dataclass
class SolverConfig:
    """AdamW, warm-up then step decay, full-model gradient clipping, mixed precision."""

    batch_size: int = 8  # clips per step over all processes
    base_lr: float = 5e-5
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_lr_multiplier: float = 0.1
    max_iter: int = 140000
    steps: tuple[int, ...] = (75000,)
    gamma: float = 0.1
    warmup_iters: int = 10
    warmup_factor: float = 1.0
    clip_grad_norm: float = 0.01  # full-model L2 norm; 0 turns clipping off
    amp: str = "auto"  # auto = fp16 on CUDA (as the official runs), off on CPU


@dataclass
class TrainConfig:
    """Everything one training run needs; ``python -m vita_train train`` reads it from a recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)  # in YAML, ``preset: NAME`` (or ``init``) starts it
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    init: str = ""  # a full checkpoint to start from (official VITA, ours, a COCO one); "" = from nothing
    backbone_init: str = ""  # ImageNet backbone weights (torchvision/timm .pth or detectron2 .pkl)
    freeze_detector: bool = False  # train only the VITA module (paper Table 7)
    output_dir: str = "output"
    checkpoint_period: int = 5000
    log_period: int = 20
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError when values are out of range or contradict each other."""
        s, d = self.solver, self.data
        if s.batch_size < 1:
            raise ConfigError(f"solver.batch_size must be >= 1, got {s.batch_size}")
        if s.max_iter < 1:
            raise ConfigError(f"solver.max_iter must be >= 1, got {s.max_iter}")
        if list(s.steps) != sorted(s.steps):
            raise ConfigError(f"solver.steps must be increasing, got {list(s.steps)}")
        if s.amp not in AMP_MODES:
            raise ConfigError(f"solver.amp must be one of {', '.join(AMP_MODES)}, got {s.amp!r}")
        for key, value in (("solver.base_lr", s.base_lr), ("solver.weight_decay", s.weight_decay),
                           ("solver.weight_decay_norm", s.weight_decay_norm),
                           ("solver.weight_decay_embed", s.weight_decay_embed),
                           ("solver.backbone_lr_multiplier", s.backbone_lr_multiplier),
                           ("solver.clip_grad_norm", s.clip_grad_norm), ("solver.warmup_iters", s.warmup_iters),
                           ("data.frame_range", d.frame_range), ("data.num_workers", d.num_workers)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if d.num_frames < 1:
            raise ConfigError(f"data.num_frames must be >= 1, got {d.num_frames}")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for i, ds in enumerate(d.datasets):
            if ds.format not in DATASET_FORMATS:
                raise ConfigError(f"data.datasets[{i}].format must be 'ytvis' or 'coco', got {ds.format!r}")
            if ds.category_map not in CATEGORY_MAPS:
                raise ConfigError(
                    f"data.datasets[{i}].category_map must be one of {CATEGORY_MAPS}, got {ds.category_map!r}"
                )
            if ds.ratio <= 0:
                raise ConfigError(f"data.datasets[{i}].ratio must be > 0, got {ds.ratio}")
            if ds.category_map:
                # labels past the model's classes only fail deep in the loss matcher, after the run wrote its files
                k = len(target_class_names(category_map_target(ds.category_map)))
                if k != self.model.num_classes:
                    raise ConfigError(
                        f"data.datasets[{i}].category_map {ds.category_map} maps onto {k} classes but "
                        f"model.num_classes={self.model.num_classes}; set model.num_classes={k} (and its class_names), "
                        "or give the category_map of the model's dataset"
                    )
        if self.checkpoint_period < 1 or self.log_period < 1:
            raise ConfigError("checkpoint_period and log_period must be >= 1")
        if not self.output_dir.strip():
            # Path("") is the current folder, where the run's files would land beside (and over) the user's own
            raise ConfigError("output_dir is empty; name the run's folder, e.g. output_dir=runs/a")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins."""
        return config_to_dict(self)

    def to_yaml(self) -> str:
        """YAML text that ``from_yaml`` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a plain dict; ``model.preset: NAME`` starts the model section from a preset."""
        data = dict(data)
        if isinstance(data.get("model"), dict) and "preset" in data["model"]:
            data["model"] = _resolve_preset(data["model"], data.get("init", ""))
        return config_from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Optional[list[str]] = None) -> "TrainConfig":
        """Read a recipe (following ``_base_`` links) and apply ``key=value`` overrides; the result is checked
        once, so an override may complete a recipe that is not valid alone (``init=`` for ``preset: init``)."""
        dotted = {}
        for item in overrides or []:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. solver.base_lr=1e-4)")
            dotted[key] = yaml.safe_load(text) if text else ""
        data = load_recipe_dict(Path(path))
        model = data.pop("model", None)
        # every key of the full config, not just those the recipe happens to spell out, takes an override
        full = _merge(config_to_dict(cls()), data)
        for key, value in dotted.items():
            if not key.startswith("model."):
                set_dotted(full, key, value)
        if isinstance(model, dict):
            if "preset" in model:  # after the overrides: init= may name the preset's source
                model = _resolve_preset(model, full["init"])
            full["model"] = _merge(full["model"], model)
        elif model is not None:
            full["model"] = model  # not a section: from_dict names what is wrong with it
        for key, value in dotted.items():
            if key.startswith("model."):
                set_dotted(full, key, value)
        return cls.from_dict(full)

    def replace(self, **dotted: Any) -> "TrainConfig":
        """A copy with dotted-key overrides applied."""
        data = self.to_dict()
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return TrainConfig.from_dict(data)


def category_map_target(category_map: str) -> str:
    """The target dataset of a ``category_map`` value (``coco_to_ytvis_2019`` -> ``ytvis_2019``)."""
    return category_map.removeprefix("coco_to_")


def load_recipe_dict(path: Path, _seen: Optional[set] = None) -> dict[str, Any]:
    """A recipe YAML as a dict, merged over its ``_base_`` (a path relative to the recipe)."""
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; give a YAML path or a packaged recipe name")
    seen: set = set() if _seen is None else _seen
    if path.resolve() in seen:
        raise ConfigError(f"recipe {path} includes itself through _base_")
    seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level")
    base = data.pop("_base_", None)
    if base:
        data = _merge(load_recipe_dict(path.parent / base, seen), data)
    return data


def _resolve_preset(model: dict[str, Any], init: str) -> dict[str, Any]:
    """The model section with its preset expanded; ``preset: init`` takes the architecture of ``init``."""
    model = dict(model)
    name = model.pop("preset")
    if name == "init":
        if not init:
            raise ConfigError("model.preset 'init' takes the architecture from 'init', but no init checkpoint is given")
        from ..checkpoint.loader import load_model

        return _merge(load_model(init).config.to_dict(), model)
    if name not in PRESET_NAMES:
        raise ConfigError(f"unknown model.preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    return _merge(preset(name).to_dict(), model)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "preset" not in v:
            out[k] = _merge(out[k], v)
        else:  # a value, a list, or a section naming a new preset replaces what the base had
            out[k] = v
    return out
