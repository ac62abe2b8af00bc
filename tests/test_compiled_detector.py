"""``compile=True``: the detector through torch.compile against the eager model it wraps."""

from __future__ import annotations

import pytest
import torch

from runtime.backends.compiled import CompiledDetector
from vita_train import VitaModel, preset


def test_compiled_detector_matches_eager_and_pads_a_short_last_batch(tmp_path, monkeypatch):
    """The compiled graph gives the eager outputs (to float rounding), and a shorter batch reuses it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = VitaModel(preset("vita_tiny")).eval()
    frames = torch.randint(0, 256, (3, 3, 64, 96), dtype=torch.uint8)
    detector = CompiledDetector(model)
    with torch.no_grad():
        full = detector(frames[:2])
        if detector.failed is not None:
            pytest.skip(f"torch.compile cannot build here: {detector.failed}")
        short = detector(frames[2:])
        compiled_fn = detector._fn
        eager_full, eager_short = model.detect(frames[:2]), model.detect(frames[2:])
    assert detector._fn is compiled_fn and detector._batch == 2  # no second graph for the short batch
    for got, want in [(full, eager_full), (short, eager_short)]:
        for name in ("frame_queries", "frame_logits", "mask_features"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.shape == b.shape, name
            assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item()), name


def test_the_detector_compiles_as_one_graph():
    """No graph breaks: the compiled deformable-attention operator has a fake kernel for the compiler (without
    it, each encoder layer broke the graph and the encoder's loop ran eagerly)."""
    from kernels import native

    if not native.available():
        pytest.skip("the compiled CPU kernels are not built here (no C++ compiler or VITA_NATIVE_KERNELS=0)")
    torch.manual_seed(0)
    model = VitaModel(preset("vita_tiny")).eval()
    frames = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    native.mark_constant_for_compilers()  # as CompiledDetector does before compiling
    with torch.no_grad():
        explained = torch._dynamo.explain(model.detect)(frames)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
