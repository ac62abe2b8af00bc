"""Tensors a dynamic-size detector graph computes from shapes alone, computed once per frame size (ONNX Runtime).

A graph exported with a symbolic frame size recomputes, on every call, what depends only on the sizes of its
feature maps: the sine position encodings of the pixel decoder and of the frame decoder, the deformable
encoder's reference points, the queries' first mask embeddings. ONNX Runtime cannot fold them (the sizes are
not constants), and on the full-size R-50 at 360x640 they took 26 ms of a 704 ms detector call (2-core AMD EPYC
Zen 2, ONNX Runtime's profiler). The torch backend caches the same encodings (SinePositionCache).

``hoist`` rewrites the in-memory graph so that each such float tensor comes out of an ``If`` on a new boolean
input: its then-branch holds the tensor's own subgraph (which reads the feature maps' Shape nodes, still in the
main graph), its else-branch passes through a new graph input that carries the tensor from an earlier call.
The tensor is also a graph output. ``ConstantCache.run`` computes the tensors on the first call for a frame
shape and passes them back in on every later call with that shape: the same values, so the outputs are equal
bit for bit. A fixed-size export gains as much: the compiled operators' outputs have no inferred shapes, so
ONNX Runtime cannot fold the Shape nodes after them there either (26 ms of 692 on the same machine).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .onnxruntime_fusions import standard, without_weights

log = logging.getLogger(__name__)

CONDITION = "vita.compute_shape_constants"
CACHED_PREFIX = "vita.shape_constant:"
# ops that read only their input's shape: where a size enters the shape-only subgraph
_SHAPE_READERS = ("Shape", "Size")
# a tensor is worth an If when this many nodes make it; smaller ones (scale factors, shape arguments) stay inline
MIN_NODES = 6
# a fill or broadcast of a small value is as quick to make as the cached copy would be to pass through
_CHEAP_PRODUCERS = ("ConstantOfShape", "Expand", "Tile")
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FLOAT_TYPES = (1, 10, 11)  # FLOAT, FLOAT16, DOUBLE


@dataclass(frozen=True)
class Hoisted:
    """What ``hoist`` changed: the graph's own outputs, and per hoisted tensor (its output name, its cache input,
    its onnx element type, its rank)."""

    outputs: tuple[str, ...]
    tensors: tuple[tuple[str, str, int, int], ...]


def _has_subgraph(node: Any) -> bool:
    return any(a.type in (5, 10) for a in node.attribute)  # GRAPH, GRAPHS


def _types(model: Any) -> dict[str, tuple[int, int]]:
    """Every value's (element type, rank), where onnx's shape inference gives both."""
    import onnx


    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model))
    except Exception:  # noqa: BLE001 - nothing typed: nothing is hoisted
        return {}
    infos = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in infos
            if v.type.tensor_type.elem_type and v.type.tensor_type.HasField("shape")}


def _cone(target: str, producers: dict[str, Any], data: set[str]) -> list[Any]:
    """The shape-only nodes that ``target`` is computed from; the Shape readers of data (the feature maps) stay
    outside, those of shape-only tensors come along."""
    seen: set[int] = set()
    stack = [target]
    found: list[Any] = []
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen or (node.op_type in _SHAPE_READERS and node.input[0] in data):
            continue
        seen.add(id(node))
        found.append(node)
        stack.extend(node.input)
    return found


def _branch(nodes: Sequence[Any], target: str, elem_type: int, dims: list[str], tag: str) -> Any:
    """A graph of copies of ``nodes`` (in graph order) whose own values are renamed, with ``target`` as output."""
    from onnx import helper

    own = {o for n in nodes for o in n.output if o}
    rename = {name: f"{tag}/{name}" for name in own}
    copies = []
    for n in nodes:
        c = helper.make_node(n.op_type, [rename.get(i, i) for i in n.input], [rename.get(o, o) for o in n.output],
                             name=f"{tag}/{n.name or n.output[0]}", domain=n.domain)
        c.attribute.extend(n.attribute)
        copies.append(c)
    out = helper.make_tensor_value_info(rename[target], elem_type, dims)
    return helper.make_graph(copies, f"{tag}/compute", [], [out])


def hoist(model: Any) -> Optional[Hoisted]:
    """Rewrite ``model`` (an onnx.ModelProto) in place as the module docstring says; None (unchanged) where no
    tensor qualifies."""
    from onnx import TensorProto, helper

    graph = model.graph
    if any(i.name == CONDITION for i in graph.input):
        return None
    # one list of the nodes, held: protobuf may hand out a fresh wrapper (and id) on each access
    nodes = list(graph.node)
    data = {i.name for i in graph.input}
    for node in nodes:  # graph order is topological
        if node.op_type in _SHAPE_READERS and standard(node):
            continue
        if (any(name in data for name in node.input) or not standard(node) or _has_subgraph(node)
                or node.op_type in _RANDOM):
            data.update(node.output)
    shape_only = {id(n) for n in nodes if not any(o in data for o in n.output)}
    producers = {o: n for n in nodes for o in n.output if o}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    frontier = [o for n in nodes if id(n) in shape_only for o in n.output
                if o and any(id(c) not in shape_only for c in consumers[o])]
    types: Optional[dict[str, tuple[int, int]]] = None
    chosen: list[tuple[str, list[Any]]] = []
    for name in frontier:
        cone = _cone(name, producers, data)
        reads_shape = any(producers.get(i) is not None and producers[i].op_type in _SHAPE_READERS
                          and producers[i].input[0] in data for n in cone for i in n.input)
        if (not reads_shape or producers[name].op_type in _CHEAP_PRODUCERS
                or sum(n.op_type != "Constant" for n in cone) < MIN_NODES):
            continue
        if types is None:
            types = _types(model)
        if types.get(name, (0, 0))[0] in _FLOAT_TYPES:
            chosen.append((name, cone))
    if not chosen:
        return None
    outputs = tuple(o.name for o in graph.output)
    order = {id(n): i for i, n in enumerate(nodes)}
    ifs: dict[int, Any] = {}  # id(the tensor's producer) -> the If that replaces it as the tensor's source
    hoisted = []
    for k, (name, cone) in enumerate(chosen):
        elem, rank = types[name]
        cached = f"{CACHED_PREFIX}{name}"
        tag = f"vita.shape_constant{k}"
        dims = [f"{tag}_{axis}" for axis in range(rank)]
        then_branch = _branch(sorted(cone, key=lambda n: order[id(n)]), name, elem, dims, tag)
        pass_through = helper.make_node("Identity", [cached], [f"{tag}/cached"])
        else_branch = helper.make_graph([pass_through], f"{tag}/cached", [],
                                        [helper.make_tensor_value_info(pass_through.output[0], elem, dims)])
        ifs[id(producers[name])] = helper.make_node(
            "If", [CONDITION], [name], name=f"{tag}/If", then_branch=then_branch, else_branch=else_branch)
        graph.input.append(helper.make_tensor_value_info(cached, elem, dims))
        graph.output.append(helper.make_tensor_value_info(name, elem, dims))
        hoisted.append((name, cached, elem, rank))
    graph.input.append(helper.make_tensor_value_info(CONDITION, TensorProto.BOOL, []))
    # the If takes its tensor's producer's place (after everything its branch reads); a producer with other
    # outputs stays in front of it, with the hoisted output renamed away
    rewritten = []
    for node in nodes:
        rewritten.append(node)
        replacement = ifs.get(id(node))
        if replacement is not None:
            for i, o in enumerate(node.output):
                if o == replacement.output[0]:
                    node.output[i] = f"{o}/unused"
            rewritten.append(replacement)
    rewritten = _live(rewritten, graph)
    del graph.node[:]
    graph.node.extend(rewritten)
    log.info("%d shape-only tensors computed once per frame size", len(hoisted))
    return Hoisted(outputs, tuple(hoisted))


def _live(nodes: list[Any], graph: Any) -> list[Any]:
    """``nodes`` less those whose outputs nothing reads (a branch's reads of the outer graph count)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if not any(o in needed for o in node.output if o):
            continue
        kept.append(node)
        needed.update(node.input)
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == 5 else list(attr.graphs) if attr.type == 10 else []):
                needed.update(i for n in g.node for i in n.input)
    return kept[::-1]


_NUMPY = {1: np.float32, 10: np.float16, 11: np.float64}


class ConstantCache:
    """Runs a hoisted graph's session: the shape-only tensors computed on a frame shape's first call, passed in
    after (the most recent ``max_entries`` shapes kept)."""

    def __init__(self, hoisted: Hoisted, max_entries: int = 4) -> None:
        self.hoisted = hoisted
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # calls may come from several threads at once; the sessions run unlocked

    def run(self, session: Any, feeds: dict[str, np.ndarray], key: tuple) -> list[np.ndarray]:
        """``session.run`` of the graph's own outputs for ``feeds``; ``key`` (the input shapes) picks the cache entry."""
        names = [t[0] for t in self.hoisted.tensors]
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
        if hit is not None:
            cached = {t[1]: v for t, v in zip(self.hoisted.tensors, hit)}
            return session.run(list(self.hoisted.outputs), {**feeds, **cached, CONDITION: np.array(False)})
        # the else-branches are not run: any value of the right type and rank will do
        empty = {c: np.zeros((0,) * rank, _NUMPY[elem]) for _, c, elem, rank in self.hoisted.tensors}
        outs = session.run(list(self.hoisted.outputs) + names, {**feeds, **empty, CONDITION: np.array(True)})
        n = len(self.hoisted.outputs)
        with self._lock:  # two first calls of a shape at once both compute it: either result serves
            self._entries[key] = outs[n:]
            self._entries.move_to_end(key)
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return outs[:n]
