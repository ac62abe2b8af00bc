"""Configs of the released VITA models (the official YAML files, resolved), by name."""

from __future__ import annotations

from .config import (
    FrameDecoderConfig,
    InputConfig,
    ModelConfig,
    PixelDecoderConfig,
    ResNetConfig,
    SwinConfig,
    TestConfig,
    VitaConfig,
)
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


def _tiny() -> ModelConfig:
    """A small R-50-layout model (the official fixtures' widths) for demos, tests and smoke training."""
    names = DATASET_CLASSES["ytvis_2019"]
    return ModelConfig(
        name="vita_tiny",
        dataset="ytvis_2019",
        num_classes=len(names),
        class_names=names,
        backbone="resnet",
        resnet=ResNetConfig(stem_out_channels=16, res2_out_channels=64, bottleneck_channels=16),
        swin=None,
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, num_heads=4, enc_layers=2),
        frame_decoder=FrameDecoderConfig(hidden_dim=64, num_queries=20, num_heads=4, ffn_dim=128, num_layers=3),
        vita=VitaConfig(hidden_dim=64, num_queries=10, num_heads=4, ffn_dim=128, enc_layers=3, dec_layers=2),
        input=InputConfig(min_size_test=128),
    )


PRESET_NAMES: tuple[str, ...] = tuple(f"vita_{b}_{d}" for b in _BACKBONES for d in _DATASETS) + ("vita_tiny",)


def preset(name: str) -> ModelConfig:
    """The config of a released model, e.g. ``vita_r50_ytvis19`` or ``vita_swinl_ovis``."""
    if name == "vita_tiny":
        return _tiny()
    for b in _BACKBONES:
        for d in _DATASETS:
            if name == f"vita_{b}_{d}":
                return _preset(b, d)
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
