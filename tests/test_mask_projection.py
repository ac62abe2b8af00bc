"""VITA's mask-feature projection folded into the mask embeddings (both CPU backends) against projecting the maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.backends import numpy_ops
from vita_train.inference.postprocess import MaskScorer
from vita_train.mask_projection import fold_mask_projection

from .conftest import OfficialCase, assert_imports_without

SIZES = dict(resized_size=(96, 150), padded_size=(96, 160), orig_size=(90, 140))


def _case(seed: int, k: int = 6, c: int = 32, d: int = 24, t: int = 3):
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(k, d, generator=g)
    conv = torch.nn.Conv2d(c, d, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(d, c, 1, 1, generator=g) / c**0.5)
        conv.bias.copy_(torch.randn(d, generator=g) * 0.1)
    features = torch.randn(t, c, 24, 40, generator=g).contiguous(memory_format=torch.channels_last)
    return embed, conv, features


def _logits64(embed: torch.Tensor, conv: torch.nn.Conv2d, features: torch.Tensor) -> np.ndarray:
    """The projected mask logits in float64: the yardstick for both orders of the float32 arithmetic."""
    with torch.no_grad():
        projected = F.conv2d(features.double(), conv.weight.double(), conv.bias.double())
        return torch.einsum("qc,tchw->qthw", embed.double(), projected).numpy()


def test_folded_logits_are_as_accurate_as_the_projected_ones():
    embed, conv, features = _case(0)
    exact = _logits64(embed, conv, features)
    with torch.no_grad():
        projected = torch.einsum("qc,tchw->qthw", embed, conv(features)).numpy()
    e, b = fold_mask_projection(embed.numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy())
    assert e.dtype == b.dtype == np.float32 and e.shape == (6, 32) and b.shape == (6,)
    folded = np.einsum("qc,tchw->qthw", e, features.numpy()) + b[:, None, None, None]
    scale = np.abs(exact).max()
    reference_error = np.abs(projected - exact).max() / scale
    assert reference_error < 1e-5
    assert np.abs(folded - exact).max() / scale <= max(2 * reference_error, 1e-6)
    # negative control: a bias 0.1% off is far outside that
    off = np.einsum("qc,tchw->qthw", e, features.numpy()) + 1.001 * b[:, None, None, None]
    assert np.abs(off - exact).max() / scale > 10 * reference_error


def test_the_model_fold_is_the_numpy_fold():
    from vita_train.modeling.vita_module import VitaModule

    module = VitaModule(num_classes=3, num_frame_queries=5, hidden_dim=32, num_queries=4, num_heads=4, ffn_dim=64,
                        enc_layers=1, dec_layers=1, conv_dim=32, mask_dim=24)
    embed, _, _ = _case(1)
    e, b = module.fold_mask_projection(embed)
    conv = module.vita_mask_features
    ne, nb = fold_mask_projection(embed.numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy())
    assert np.array_equal(e.numpy(), ne) and np.array_equal(b.numpy(), nb)


def test_folding_checks_the_widths():
    with pytest.raises(ValueError, match="do not match a projection to 24 channels"):
        fold_mask_projection(np.zeros((3, 16)), np.zeros((24, 32, 1, 1)), np.zeros(24))


def test_mask_head_with_a_folded_projection_matches_the_mask_scorer_on_projected_maps():
    embed, conv, features = _case(2)
    with torch.no_grad():
        projected = conv(features)
    theirs = MaskScorer(embed, SIZES["resized_size"], SIZES["padded_size"], SIZES["orig_size"])
    ref = theirs.masks(projected).numpy()
    e, b = fold_mask_projection(embed.numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy())
    ours = numpy_ops.MaskHead(e, SIZES["resized_size"], SIZES["padded_size"], SIZES["orig_size"], bias=b)
    mask = ours.masks(features.numpy())
    assert mask.shape == ref.shape and (mask != ref).mean() < 1e-4
    np.testing.assert_allclose(ours.mask_quality(), theirs.mask_quality().numpy(), rtol=0, atol=1e-5)
    # without the bias the masks are visibly different: the bias is used
    plain = numpy_ops.MaskHead(e, SIZES["resized_size"], SIZES["padded_size"], SIZES["orig_size"])
    assert (plain.masks(features.numpy()) != ref).mean() > 1e-3


def test_torch_cpu_backend_keeps_the_maps_unprojected_and_folds():
    """The torch backend on the CPU: unprojected /4 maps out of detect and mask_features, and masks equal to
    the plain path's (projected maps, MaskScorer) but for pixels whose logit sits on 0."""
    from runtime.backends.torch_backend import TorchBackend
    from vita_train.checkpoint.loader import load_model

    model = load_model(OfficialCase("r50_tiny").ckpt)
    # one call at a time with this thread's two threads: bit for bit comparable with model.detect called here
    backend = TorchBackend(model, device="cpu", detector_streams=1)
    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 96, 3), dtype=np.uint8)
    det = backend.detect(frames, 1.0)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2)
    with torch.no_grad():
        plain = model.detect(images)
        unprojected = model.detect(images, project_mask_features=False).mask_features
    conv = model.vita.vita_mask_features
    assert det.mask_features.shape[1] == conv.in_channels
    torch.testing.assert_close(det.mask_features, unprojected, rtol=0, atol=0)
    torch.testing.assert_close(backend.mask_features(frames), unprojected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(conv(unprojected), plain.mask_features, rtol=1e-5, atol=1e-5)
    logits, embed = backend.track([det.tokens], None, None)
    selection = backend.select(logits, 5)
    sizes = ((64, 96), (64, 96), (64, 96))
    head = backend.mask_head(embed, selection, *sizes)
    masks = head.masks(backend.from_host(backend.to_host(det.mask_features)))
    scorer = MaskScorer(embed[torch.from_numpy(selection.query_index)], *sizes)
    ref = scorer.masks(plain.mask_features).numpy()
    assert masks.shape == ref.shape and (masks != ref).mean() < 1e-4
    np.testing.assert_allclose(head.mask_quality(), scorer.mask_quality().numpy(), rtol=0, atol=1e-5)


def _graph(kernel: int = 1, with_bias: bool = True):
    """x -> Relu -> Conv(kernel) -> mask_features, the Relu's output also read by a second node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((24, 16, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")] + ([numpy_helper.from_array(bias, "b")] if with_bias else [])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Conv", ["r", "w"] + (["b"] if with_bias else []), ["mask_features"],
                         pads=[kernel // 2] * 4),
        helper.make_node("ReduceMean", ["r"], ["other"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 6, 10])],
        [helper.make_tensor_value_info("other", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("mask_features", TensorProto.FLOAT, [1, 24, 6, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, weight, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_onnx_split_gives_the_map_and_the_projection(with_bias):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from runtime.backends import onnxruntime_mask_projection

    model, weight, bias = _graph(with_bias=with_bias)
    x = np.random.default_rng(4).standard_normal((1, 16, 6, 10)).astype(np.float32)
    _, projected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    split = onnxruntime_mask_projection.split(model)
    assert split is not None
    w, b = split
    np.testing.assert_array_equal(w, weight.reshape(24, 16))
    np.testing.assert_array_equal(b, bias if with_bias else np.zeros(24, np.float32))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["other", "r"]
    assert [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim] == [1, 16, 6, 10]
    assert not any(n.op_type == "Conv" for n in model.graph.node) and {t.name for t in model.graph.initializer} == set()
    _, unprojected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(unprojected, np.maximum(x, 0))
    again = np.einsum("dc,bchw->bdhw", w, unprojected) + b[:, None, None]
    np.testing.assert_allclose(again, projected, rtol=1e-5, atol=1e-5)


def test_onnx_split_leaves_other_graphs_alone():
    pytest.importorskip("onnx")
    from runtime.backends import onnxruntime_mask_projection

    model, _, _ = _graph(kernel=3)
    before = model.SerializeToString()
    assert onnxruntime_mask_projection.split(model) is None
    assert model.SerializeToString() == before


def test_the_fold_imports_without_torch():
    assert_imports_without(["vita_train.mask_projection", "runtime.backends.onnxruntime_mask_projection"])
