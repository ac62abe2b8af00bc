"""Configs of the released VITA models (the official YAML files, resolved), by name."""

from __future__ import annotations

from .config import FrameDecoderConfig, InputConfig, ModelConfig, ResNetConfig, SwinConfig, TestConfig
from .data.class_names import DATASET_CLASSES

_BACKBONES = {
    "r50": dict(backbone="resnet", resnet=ResNetConfig(depth=50, stage_blocks=(3, 4, 6, 3)), swin=None),
    "r101": dict(backbone="resnet", resnet=ResNetConfig(depth=101, stage_blocks=(3, 4, 23, 3)), swin=None),
    "swinl": dict(backbone="swin", resnet=None, swin=SwinConfig()),
}
# Frame queries: 100 for ResNet models, 200 for Swin-L; test min size 360 / 448.
_FRAME_QUERIES = {"r50": 100, "r101": 100, "swinl": 200}
_MIN_SIZE = {"r50": 360, "r101": 360, "swinl": 448}
# TEST.DETECTIONS_PER_IMAGE of each dataset's configs.
_DATASETS = {"ytvis19": ("ytvis_2019", 10), "ytvis21": ("ytvis_2021", 10), "ovis": ("ovis", 20)}


def _preset(backbone: str, dataset: str) -> ModelConfig:
    key, topk = _DATASETS[dataset]
    names = DATASET_CLASSES[key]
    return ModelConfig(
        name=f"vita_{backbone}_{dataset}",
        dataset=key,
        num_classes=len(names),
        class_names=names,
        frame_decoder=FrameDecoderConfig(num_queries=_FRAME_QUERIES[backbone]),
        input=InputConfig(min_size_test=_MIN_SIZE[backbone]),
        test=TestConfig(topk=topk),
        **_BACKBONES[backbone],
    )


PRESET_NAMES: tuple[str, ...] = tuple(f"vita_{b}_{d}" for b in _BACKBONES for d in _DATASETS)


def preset(name: str) -> ModelConfig:
    """The config of a released model, e.g. ``vita_r50_ytvis19`` or ``vita_swinl_ovis``."""
    for b in _BACKBONES:
        for d in _DATASETS:
            if name == f"vita_{b}_{d}":
                return _preset(b, d)
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
