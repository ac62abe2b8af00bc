"""Shape-only tensors of a dynamic-size graph computed once per input shape (runtime/backends/onnxruntime_shape_constants):
which tensors move into an If, and the session's outputs equal the plain graph's bit for bit at every size."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import onnxruntime_shape_constants as sc


def _model(height="height", width="width", op="Sin", extra_small: bool = False) -> onnx.ModelProto:
    """X (1, 4, H, W) -> Y = X + op(position / (H*W)) with the position encoding made from X's shape alone."""
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("i2", 2), ("i3", 3), ("zero", 0), ("one", 1), ("ones2", [1, 1]))]
    nodes = [
        helper.make_node("Shape", ["X"], ["s"]),
        helper.make_node("Gather", ["s", "i2"], ["h"]),
        helper.make_node("Gather", ["s", "i3"], ["w"]),
        helper.make_node("Mul", ["h", "w"], ["hw"]),
        helper.make_node("Range", ["zero", "hw", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["hw"], ["hwf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["rf", "hwf"], ["t"]),
        helper.make_node(op, ["t"], ["enc"]),
        helper.make_node("Unsqueeze", ["h", "zero"], ["h1"]),
        helper.make_node("Unsqueeze", ["w", "zero"], ["w1"]),
        helper.make_node("Concat", ["ones2", "h1", "w1"], ["shape4"], axis=0),
        helper.make_node("Reshape", ["enc", "shape4"], ["pos"]),
        helper.make_node("Add", ["X", "pos"], ["Y"]),
    ]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, height, width])]
    if extra_small:  # a scale from the shape in two nodes: too small to be worth an If
        nodes += [helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
                  helper.make_node("Sqrt", ["hf"], ["scale"]),
                  helper.make_node("Mul", ["X", "scale"], ["Z"])]
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, 4, height, width]))
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, height, width])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _hoisted(model: onnx.ModelProto):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, sc.hoist(copy)


def _x(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, h, w)).astype(np.float32)


def test_the_encoding_moves_into_an_if_and_outputs_stay_equal_at_every_size():
    model = _model()
    rewritten, hoisted = _hoisted(model)
    assert hoisted is not None and [t[0] for t in hoisted.tensors] == ["pos"] and hoisted.outputs == ("Y",)
    onnx.checker.check_model(rewritten)
    main_ops = [n.op_type for n in rewritten.graph.node]
    assert "Sin" not in main_ops and "Range" not in main_ops and main_ops.count("If") == 1
    plain, fast = _session(model), _session(rewritten)
    cache = sc.ConstantCache(hoisted)
    # a first size (computed), the same again (cached), another size, and the first once more
    for h, w, seed in ((5, 7, 0), (5, 7, 1), (9, 3, 2), (5, 7, 3)):
        x = _x(h, w, seed)
        (want,) = plain.run(None, {"X": x})
        (got,) = cache.run(fast, {"X": x}, x.shape)
        assert np.array_equal(got, want)
    assert len(cache._entries) == 2


def test_the_cached_tensor_is_what_later_calls_read():
    """Negative control: a cached encoding changed by 0.1% changes the output, so the equality above is not
    the graph recomputing it."""
    rewritten, hoisted = _hoisted(_model())
    fast, cache = _session(rewritten), sc.ConstantCache(hoisted)
    x = _x(6, 4)
    (first,) = cache.run(fast, {"X": x}, x.shape)
    cache._entries[x.shape][0] *= 1.001
    (second,) = cache.run(fast, {"X": x}, x.shape)
    assert not np.array_equal(first, second)


def test_least_recently_used_sizes_are_dropped():
    rewritten, hoisted = _hoisted(_model())
    plain, fast, cache = _session(_model()), _session(rewritten), sc.ConstantCache(hoisted, max_entries=2)
    for h in (3, 4, 5, 3, 6):
        x = _x(h, 2 * h, h)
        assert np.array_equal(cache.run(fast, {"X": x}, x.shape)[0], plain.run(None, {"X": x})[0])
    assert sorted(k[2] for k in cache._entries) == [3, 6]


def test_graphs_it_leaves_alone():
    # nothing read from a shape: ONNX Runtime folds constants itself
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, "h", "w"])
    nodes = [helper.make_node("Range", ["zero", "n", "one"], ["r"]), helper.make_node("Cast", ["r"], ["rf"], to=1),
             helper.make_node("Sin", ["rf"], ["a"]), helper.make_node("Cos", ["a"], ["b"]),
             helper.make_node("Exp", ["b"], ["c"]), helper.make_node("Neg", ["c"], ["d"]),
             helper.make_node("Add", ["X", "d"], ["Y"])]
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", 0), ("one", 1), ("n", 4))]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("Y", 1, [1, 4, "h", 4])], consts)
    assert _hoisted(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))[1] is None
    # fixed sizes (the fixed-size export): hoisted all the same, ONNX Runtime may not know the shapes
    assert _hoisted(_model(height=5, width=7))[1] is not None
    # a random draw is not a constant: only what it is drawn from is made once
    rewritten, hoisted = _hoisted(_model(op="RandomNormalLike"))
    assert [t[0] for t in hoisted.tensors] == ["t"]
    assert "RandomNormalLike" in [n.op_type for n in rewritten.graph.node]


def test_small_shape_arithmetic_stays_inline():
    rewritten, hoisted = _hoisted(_model(extra_small=True))
    assert [t[0] for t in hoisted.tensors] == ["pos"]
    assert "Sqrt" in [n.op_type for n in rewritten.graph.node]
    plain, fast, cache = _session(_model(extra_small=True)), _session(rewritten), sc.ConstantCache(hoisted)
    x = _x(4, 6)
    for want, got in zip(plain.run(None, {"X": x}), cache.run(fast, {"X": x}, x.shape)):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("twice", [False, True])
def test_hoisting_twice_changes_nothing_more(twice):
    rewritten, hoisted = _hoisted(_model())
    if twice:
        assert sc.hoist(rewritten) is None
    assert [i.name for i in rewritten.graph.input] == ["X", f"{sc.CACHED_PREFIX}pos", sc.CONDITION]
