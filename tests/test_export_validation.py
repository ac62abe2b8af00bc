"""Export validation: right graphs pass on every CPU and ONNX Runtime setting, near-threshold decisions are
not called errors, and wrong graphs (a weight scaled by 1.01, a changed LayerNorm epsilon) still fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import runtime
from export import ExportOptions, export_model
from export import validate as V
from export.exporter import _validation_sizes
from export.graphs import DetectorGraph
from vita_train import load_model, save_checkpoint
from vita_train.modeling.frame_decoder import AttentionMaskThreshold

from .conftest import OFFICIAL_CASES, TIE_MARGIN, OfficialCase, flip_decisions_within, match_official

_models: dict[str, tuple] = {}


def _fixture(name: str, tmp_root: Path):
    """(fp32 model, float64 reference, validation sizes, unvalidated export dir) of an official fixture, once."""
    if name not in _models:
        case = OfficialCase(name)
        model = load_model(case.ckpt).eval()
        cfg = model.config
        sizes = _validation_sizes(cfg, ExportOptions(), cfg.input.min_size_test, cfg.input.max_size_test)
        out = export_model(case.ckpt, ExportOptions(out=tmp_root / name, validate=False))
        _models[name] = (model, V.float64_copy(model), sizes, out)
    return _models[name]


@pytest.fixture(scope="module")
def fixture_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    return lambda name: _fixture(name, root)


def _validate(model, ref, sizes, det: Path, tok: Path, settings=None) -> V.ValidationReport:
    w = max(model.config.vita.window, 1)
    report = V.validate_detector(model, det, sizes, settings=settings, reference=ref)
    report.extend(V.validate_tokens(model, tok, (1, w + 1), settings=settings, reference=ref))
    return report


@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_fixture_exports_pass_at_every_thread_count_and_optimisation_level(fixture_export, name):
    model, ref, sizes, out = fixture_export(name)
    for threads in (1, 2, 4):
        for level in ("basic", "all"):
            report = _validate(model, ref, sizes, out / "detector.onnx", out / "vita_tokens.onnx", V.OrtSettings(threads, level))
            V.judge(report)  # raises with the worst tensors when it fails
            summary = report.summary()
            assert summary["onnxruntime"] == {"threads": threads, "optimization": level}
            assert summary["decisions"]["checked"] > 0 and summary["redrawn_inputs"] == 0


def _scaled(graph: onnx.ModelProto, factor: float) -> tuple[onnx.ModelProto, str]:
    """A copy with the largest float weight tensor multiplied by ``factor``."""
    out = onnx.ModelProto()
    out.CopyFrom(graph)
    target = max((t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: np.prod(t.dims))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(factor), target.name))
    return out, target.name


def _layernorm_epsilon(graph: onnx.ModelProto, epsilon: float) -> onnx.ModelProto:
    """A copy whose first LayerNormalization uses another epsilon."""
    out = onnx.ModelProto()
    out.CopyFrom(graph)
    node = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    next(a for a in node.attribute if a.name == "epsilon").f = epsilon
    return out


def test_wrong_graphs_fail_with_the_worst_tensors_listed(fixture_export, tmp_path):
    """Negative controls: the same check that passes the right graphs fails each near miss."""
    model, ref, sizes, out = fixture_export("r50_tiny")
    det, tok = onnx.load(out / "detector.onnx"), onnx.load(out / "vita_tokens.onnx")
    wrong = {
        "detector weight x1.01": (_scaled(det, 1.01)[0], tok),
        "detector weight x1.001": (_scaled(det, 1.001)[0], tok),
        "detector LayerNorm eps 1e-5 -> 3e-3": (_layernorm_epsilon(det, 3e-3), tok),
        "token weight x1.01": (det, _scaled(tok, 1.01)[0]),
        "token weight x1.001": (det, _scaled(tok, 1.001)[0]),
        "token LayerNorm eps 1e-5 -> 1e-4": (det, _layernorm_epsilon(tok, 1e-4)),
    }
    for what, (d, t) in wrong.items():
        onnx.save(d, tmp_path / "detector.onnx")
        onnx.save(t, tmp_path / "vita_tokens.onnx")
        report = _validate(model, ref, sizes, tmp_path / "detector.onnx", tmp_path / "vita_tokens.onnx")
        with pytest.raises(V.ValidationError, match="worst first") as err:
            V.judge(report)
        graph = "detector" if what.startswith("detector") else "vita_tokens"
        assert f"  {graph} " in str(err.value), what


def _near_threshold_model(pairs: int = 16):
    """The r50_tiny model with its mask-feature bias moved so that ``pairs`` first-layer mask logits of the
    validation's first input sit within float32 rounding of the masked-attention threshold."""
    case = OfficialCase("r50_tiny")
    model = load_model(case.ckpt).eval()
    cfg = model.config
    batch, h, w = V.detector_cases(_validation_sizes(cfg, ExportOptions(), cfg.input.min_size_test, cfg.input.max_size_test))[0]
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8))

    def first_logits(m) -> np.ndarray:
        seen = []
        threshold = next(x for x in m.modules() if isinstance(x, AttentionMaskThreshold))
        handle = threshold.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].double().numpy()))
        with torch.no_grad():
            DetectorGraph(V.float64_copy(m))(frames)
        handle.remove()
        return seen[0]  # (B, Nf, HW) before the first decoder layer

    logits = first_logits(model)
    dec = model.frame_decoder
    with torch.no_grad():
        ref = V.float64_copy(model).frame_decoder
        embed = ref.mask_embed(ref.decoder_norm(ref.query_feat.weight)).numpy()  # (Nf, D): the first masks' embeddings
    rng = np.random.default_rng(1)
    queries = rng.permutation(embed.shape[0])[:pairs]
    pixels = rng.integers(0, logits.shape[-1], pairs)
    values = logits[batch - 1, queries, pixels]
    rows = embed[queries]
    # adding b to the mask-feature bias adds embed[q] . b to every logit of query q: solve for the chosen pairs
    shift = -rows.T @ np.linalg.solve(rows @ rows.T, values)
    with torch.no_grad():
        model.pixel_decoder.mask_features.bias += torch.from_numpy(shift).float()
    moved = first_logits(model)[batch - 1, queries, pixels]
    assert dec is model.frame_decoder
    return model, moved


def test_decisions_at_the_threshold_are_not_called_errors(tmp_path):
    """The flip class of failure on purpose: 16 mask logits within 1e-6 of the threshold, then export."""
    model, moved = _near_threshold_model()
    assert np.abs(moved).max() < 1e-6, moved  # the inputs really sit on the threshold
    ckpt = tmp_path / "near_threshold.pth"
    save_checkpoint(ckpt, model)
    out = export_model(ckpt, ExportOptions(out=tmp_path / "export", validation_frames=(1,)))
    decisions = json.loads((out / "vita.json").read_text())["validation"]["decisions"]
    # onnxruntime and float64 disagree on some of them, all within float32 noise of the threshold
    assert decisions["flipped"] >= 1 and decisions["max_flip_margin"] < 1e-6, decisions


def test_vita_json_records_what_was_compared(fixture_export, tmp_path):
    out = export_model(OfficialCase("swin_tiny").ckpt, ExportOptions(out=tmp_path / "e", validation_frames=(1, 4)))
    v = json.loads((out / "vita.json").read_text())["validation"]
    assert v["reference"].startswith("torch float64") and v["redrawn_inputs"] == 0
    assert set(v["outputs"]) == {
        "detector/frame_queries", "detector/frame_logits", "detector/mask_features",
        "vita_tokens/pred_logits", "vita_tokens/mask_embed",
        "vita_token_steps/pred_logits", "vita_token_steps/mask_embed",
    }
    for row in v["outputs"].values():
        assert 0 <= row["max_rel_error"] <= row["tolerance"] and row["tolerance"] >= v["rtol_floor"]
    assert any(c.startswith("detector B=2") for c in v["cases"]) and "vita_tokens T=4 N=30" in " ".join(v["cases"])


@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_official_parity_survives_any_backend_choice_at_the_threshold(name):
    """The fixtures' frames do hold decisions within float32 noise of the threshold, which any backend may take
    either way: flipping all of them at once (the worst case) must keep the result within the ONNX Runtime
    parity test's tolerances (conftest.match_official), so that test cannot turn red on another CPU."""
    case = OfficialCase(name)
    seg = runtime.load(case.ckpt, backend="torch", device="cpu")
    threshold = next(m for m in seg.backend.model.modules() if isinstance(m, AttentionMaskThreshold))
    hook = flip_decisions_within(TIE_MARGIN)
    handle = threshold.register_forward_hook(hook)
    try:
        result = runtime.segment(case.frames, seg)
    finally:
        handle.remove()
    assert hook.flipped > 0  # the fixtures' frames do sit on the threshold
    match_official(result, case)
    # negative control: decisions flipped far from the threshold (a wrong backend) do fail the same check
    handle = threshold.register_forward_hook(flip_decisions_within(1.0))
    try:
        result = runtime.segment(case.frames, seg)
    finally:
        handle.remove()
    with pytest.raises(AssertionError):
        match_official(result, case)
