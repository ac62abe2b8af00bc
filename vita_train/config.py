"""Typed model configuration: dataclasses that round-trip through YAML."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


TOKEN_DTYPES = ("float32", "float16", "bfloat16")
KERNEL_MODES = ("auto", "reference", "triton")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and what to do."""


@dataclass
class ResNetConfig:
    """detectron2 ResNet as Mask2Former builds it (FrozenBN, stride in the 3x3 conv)."""

    depth: int = 50
    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    bottleneck_channels: int = 64
    stride_in_1x1: bool = False


@dataclass
class SwinConfig:
    """Swin Transformer as Mask2Former's D2SwinTransformer."""

    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 4
    patch_norm: bool = True


@dataclass
class PixelDecoderConfig:
    """Multi-scale deformable-attention pixel decoder."""

    conv_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    num_levels: int = 3
    num_points: int = 4
    enc_layers: int = 6
    ffn_dim: int = 1024
    norm_groups: int = 32


@dataclass
class FrameDecoderConfig:
    """Mask2Former masked-attention decoder that yields the frame queries."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 9


@dataclass
class VitaConfig:
    """The VITA module: Object Encoder (windowed), Object Decoder and heads."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    enc_layers: int = 6
    dec_layers: int = 3
    window: int = 6
    enforce_input_proj: bool = True
    sim_embed_frame: bool = True
    sim_embed_clip: bool = True


@dataclass
class InputConfig:
    """Test-time preprocessing (detectron2 ResizeShortestEdge + normalisation + padding)."""

    min_size_test: int = 360
    max_size_test: int = 1333
    pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32


@dataclass
class TestConfig:
    """Inference settings that do not change the weights."""

    topk: int = 10
    detector_chunk: int = 18
    mask_chunk: int = 5  # frames per mask-head call on a GPU (the CPU runtime takes one frame at a time)
    token_dtype: str = "float32"  # tokens stored between VITA stages: float32 | float16 | bfloat16


@dataclass
class ModelConfig:
    """Everything needed to build a VITA model and run it as the official code does."""

    name: str = "vita_r50_ytvis19"
    dataset: str = "ytvis_2019"
    num_classes: int = 40
    class_names: tuple[str, ...] = ()
    backbone: str = "resnet"
    resnet: Optional[ResNetConfig] = field(default_factory=ResNetConfig)
    swin: Optional[SwinConfig] = None
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    frame_decoder: FrameDecoderConfig = field(default_factory=FrameDecoderConfig)
    vita: VitaConfig = field(default_factory=VitaConfig)
    input: InputConfig = field(default_factory=InputConfig)
    test: TestConfig = field(default_factory=TestConfig)
    kernels: str = "auto"  # fast kernels (attention, Winograd convolutions): auto | reference | triton (see the kernels package)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError when values contradict each other."""
        if self.backbone not in ("resnet", "swin"):
            raise ConfigError(f"backbone must be 'resnet' or 'swin', got {self.backbone!r}")
        if self.backbone == "resnet" and self.resnet is None:
            raise ConfigError("backbone is 'resnet' but the 'resnet' section is missing")
        if self.backbone == "swin" and self.swin is None:
            raise ConfigError("backbone is 'swin' but the 'swin' section is missing")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes; "
                "give one name per class or none"
            )
        if self.vita.window < 0:
            raise ConfigError(f"vita.window must be >= 0 (0 = full attention), got {self.vita.window}")
        if self.test.topk < 1:
            raise ConfigError(f"test.topk must be >= 1, got {self.test.topk}")
        for key in ("input.min_size_test", "input.max_size_test", "test.detector_chunk", "test.mask_chunk"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(getattr(self, section), name)}")
        if self.test.token_dtype not in TOKEN_DTYPES:
            raise ConfigError(f"test.token_dtype must be one of {TOKEN_DTYPES}, got {self.test.token_dtype!r}")
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(f"kernels must be one of {KERNEL_MODES}, got {self.kernels!r}")

    def label_names(self) -> tuple[str, ...]:
        """Class names, or generic ones when the dataset is unknown."""
        return self.class_names or tuple(f"class_{k}" for k in range(self.num_classes))

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with dotted-key overrides applied, e.g. replace(**{'vita.window': 3})."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return ModelConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (tuples become lists)."""
        return _to_builtin(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict; unknown keys are an error."""
        return _from_dict(cls, data, "")

    def to_yaml(self) -> str:
        """YAML text of this config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "ModelConfig":
        """Parse YAML text or a path to a YAML file."""
        if isinstance(text_or_path, Path) or (
            isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith((".yaml", ".yml"))
        ):
            text = Path(text_or_path).read_text()
        else:
            text = str(text_or_path)
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError("a model config YAML must be a mapping at the top level")
        return cls.from_dict(data)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Any config dataclass -> plain dict of builtins (tuples become lists)."""
    return _to_builtin(dataclasses.asdict(config))


def config_from_dict(cls: type, data: Any) -> Any:
    """Build config dataclass ``cls`` from a plain dict; unknown keys and wrong types are ConfigErrors."""
    return _from_dict(cls, data, "")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; a key that does not exist is a ConfigError."""
    _set_dotted(data, key, value)


def _to_builtin(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {key!r} (no section {part!r})")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}; keys there: {', '.join(sorted(node))}")
    node[parts[-1]] = value


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; known keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where + ".")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where} must be a list, got {value!r}")
        items = [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where} must be a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"config key {where} must be {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"config key {where} must be int, got {value!r}")
    return value
