"""Full-size exports (R-50 and Swin-L, random weights with sharpened attention, official key layout) pass
validation at their default sizes, and the same graphs with their largest weight scaled by 1.01 fail.

Slow: minutes and several GB each; ``python -m pytest -q -m slow tests/test_export_fullsize.py``.
"""

from __future__ import annotations

import json

import onnx
import pytest

from export import ExportOptions, export_model
from export import validate as V
from export.exporter import _validation_sizes
from vita_train import load_model

from .sharpened import official_checkpoint
from .test_export_validation import _scaled


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", ["vita_r50_ytvis19", "vita_swinl_ytvis19"])
def test_full_size_export_passes_and_a_scaled_weight_fails(tmp_path, preset_name):
    ckpt = official_checkpoint(tmp_path / f"{preset_name}.pth", preset_name)
    out = export_model(ckpt, ExportOptions(out=tmp_path / "export"))
    validation = json.loads((out / "vita.json").read_text())["validation"]
    assert validation["max_rel_error"] <= max(row["tolerance"] for row in validation["outputs"].values())

    model = load_model(ckpt).eval()
    cfg = model.config
    sizes = _validation_sizes(cfg, ExportOptions(), cfg.input.min_size_test, cfg.input.max_size_test)[:1]
    reference = V.float64_copy(model)
    for graph in ("vita_tokens", "detector"):
        wrong, _ = _scaled(onnx.load(out / f"{graph}.onnx"), 1.01)
        onnx.save(wrong, tmp_path / f"{graph}.onnx")
    report = V.validate_detector(model, tmp_path / "detector.onnx", sizes, reference=reference)
    with pytest.raises(V.ValidationError, match="  detector "):
        V.judge(report)
    report = V.validate_tokens(model, tmp_path / "vita_tokens.onnx", (1, 7, 37), reference=reference)
    with pytest.raises(V.ValidationError, match="  vita_tokens "):
        V.judge(report)
