"""Reading what weights cannot tell from a detectron2 ``config.yaml`` (no detectron2 needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError


def read_detectron2_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a detectron2 config, following ``_BASE_`` files relative to it (children override bases)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} is not a YAML mapping")
    base = data.pop("_BASE_", None)
    if base:
        merged = read_detectron2_yaml(path.parent / base)
        _merge(merged, data)
        data = merged
    return data


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_detectron2_config(data: dict[str, Any]) -> bool:
    """True for a detectron2 config (upper-case MODEL section)."""
    return isinstance(data.get("MODEL"), dict)


def settings_from_detectron2(cfg: dict[str, Any]) -> dict[str, Any]:
    """The dotted ModelConfig keys a detectron2 config determines (only those it sets)."""
    table = {
        "vita.window": "MODEL.VITA.ENC_WINDOW_SIZE",
        "vita.num_heads": "MODEL.VITA.NHEADS",
        "frame_decoder.num_heads": "MODEL.MASK_FORMER.NHEADS",
        "pixel_decoder.num_heads": "MODEL.MASK_FORMER.NHEADS",
        "input.min_size_test": "INPUT.MIN_SIZE_TEST",
        "input.max_size_test": "INPUT.MAX_SIZE_TEST",
        "input.pixel_mean": "MODEL.PIXEL_MEAN",
        "input.pixel_std": "MODEL.PIXEL_STD",
        "input.size_divisibility": "MODEL.MASK_FORMER.SIZE_DIVISIBILITY",
        "test.topk": "TEST.DETECTIONS_PER_IMAGE",
        "test.detector_chunk": "MODEL.VITA.TEST_RUN_CHUNK_SIZE",
        "test.mask_chunk": "MODEL.VITA.TEST_INTERPOLATE_CHUNK_SIZE",
        "resnet.stride_in_1x1": "MODEL.RESNETS.STRIDE_IN_1X1",
    }
    out: dict[str, Any] = {}
    for key, src in table.items():
        value = _get(cfg, src)
        if value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    fmt = _get(cfg, "INPUT.FORMAT")
    if fmt is not None and fmt != "RGB":
        raise ConfigError(f"INPUT.FORMAT is {fmt!r}; VITA models are trained on RGB input and only RGB is supported")
    test_sets = _get(cfg, "DATASETS.TEST")
    if isinstance(test_sets, (list, tuple)) and test_sets:
        out["dataset"] = str(test_sets[0])
    return out
