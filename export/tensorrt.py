"""TensorRT engines from the exported ONNX graphs (TensorRT >= 10 Python API).

TensorRT is imported inside the functions that need it, so this module (profiles, the operator check) works
without it. Engines are specific to the TensorRT version and the GPU they were built on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from vita_train.export_format import DETECTOR_ENGINE, DETECTOR_FILE, TOKENS_ENGINE, TOKENS_FILE
from vita_train.utils.atomic import atomic_write

from .trt_compat import TRT_ONNX_SUPPORTED_OPS, TRT_PLUGIN_OPS, unsupported_ops  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max) of one input
Profiles = dict[str, Profile]  # input name -> its shapes; one optimisation profile of one graph

GRAPH_FILES = {"detector": (DETECTOR_FILE, DETECTOR_ENGINE), "vita_tokens": (TOKENS_FILE, TOKENS_ENGINE)}
MIN_TRT_MAJOR = 10
INSTALL_HINT = "pip install 'tensorrt>=10' (needs an NVIDIA GPU and driver)"
# the runtime's default detector batch on CUDA, and a typical clip length: what the kernels are tuned for
OPT_BATCH = 8
OPT_FRAMES = 64
# smallest resized side a dynamic-size detector accepts: one pixel at the backbone's /32 stage
MIN_FRAME_SIDE = 32
# kept in FP32 in FP16 engines: the official pixel decoder opts out of mixed precision (deformable sampling
# is precision-sensitive), and TensorRT warns that FP16 layer norms overflow. Layer names are the ONNX node
# names, which torch.onnx.export(dynamo=False) builds from module paths ("/.../pixel_decoder/...").
FP32_SCOPES = ("/pixel_decoder/",)
FP32_LAYER_TYPES = frozenset({"NORMALIZATION"})

class EngineBuildError(RuntimeError):
    """TensorRT could not parse a graph or build an engine; the message says which and why."""


# ---------------------------------------------------------------- pure logic (no TensorRT needed)


def _frame_size_range(pre: Mapping[str, Any]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(min, opt, max) resized (H, W) the detector takes, from vita.json's ``preprocessing``."""
    fixed = pre.get("fixed_size")
    if fixed:
        size = (int(fixed[0]), int(fixed[1]))
        return size, size, size
    short, cap = int(pre["min_size"]), int(pre["max_size"])
    # a landscape 16:9 frame is what most videos are; resized as preprocess.resized_size does
    long = min(cap, int(short * 16 / 9 + 0.5))
    opt = (min(short, cap), long)
    # any aspect ratio: either side may reach the longest-edge cap
    return (MIN_FRAME_SIDE, MIN_FRAME_SIDE), opt, (cap, cap)


def default_profiles(meta: Mapping[str, Any]) -> dict[str, Profiles]:
    """Optimisation profiles of both graphs from vita.json: {"detector": {...}, "vita_tokens": {...}}.

    detector ``frames`` (B, H, W, 3): B in 1..max_batch, (H, W) fixed or from the test-time sizes;
    vita_tokens ``frame_queries`` (T, N, C) and ``query_index`` (T, N): T in 1..max_frames, N in
    1..num_frame_queries (pruning keeps at least one token a frame).
    """
    dims, limits = meta["dims"], meta["limits"]
    max_batch, max_frames = int(limits["max_batch"]), int(limits["max_frames"])
    nf, c = int(dims["num_frame_queries"]), int(dims["hidden_dim"])
    lo, opt, hi = _frame_size_range(meta["preprocessing"])
    opt_batch, opt_frames = min(OPT_BATCH, max_batch), min(OPT_FRAMES, max_frames)
    return {
        "detector": {"frames": ((1, *lo, 3), (opt_batch, *opt, 3), (max_batch, *hi, 3))},
        "vita_tokens": {
            "frame_queries": ((1, 1, c), (opt_frames, nf, c), (max_frames, nf, c)),
            "query_index": ((1, 1), (opt_frames, nf), (max_frames, nf)),
        },
    }


def check_profiles(profiles: Mapping[str, Profile], inputs: Optional[Mapping[str, Shape]] = None) -> None:
    """Raise ValueError unless every profile is min <= opt <= max of one rank and fits ``inputs``.

    ``inputs``: the network's input shapes (-1 = dynamic); each needs a profile when it has a dynamic
    dimension, and fixed dimensions must be what the profile says.
    """
    for name, shapes in profiles.items():
        if len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
            raise ValueError(f"profile of {name!r} must be (min, opt, max) shapes of one rank, got {shapes}")
        lo, opt, hi = shapes
        if not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError(f"profile of {name!r} needs 1 <= min <= opt <= max in every dimension, got {shapes}")
    if inputs is None:
        return
    unknown = sorted(set(profiles) - set(inputs))
    if unknown:
        raise ValueError(f"profiles name {unknown}, which are not inputs of the network (inputs: {sorted(inputs)})")
    for name, shape in inputs.items():
        if name not in profiles:
            if any(d < 0 for d in shape):
                raise ValueError(f"input {name!r} has dynamic shape {tuple(shape)} but no profile")
            continue
        lo, opt, hi = profiles[name]
        if len(shape) != len(lo):
            raise ValueError(f"input {name!r} has rank {len(shape)}, its profile rank {len(lo)}")
        for axis, d in enumerate(shape):
            if d >= 0 and not lo[axis] == opt[axis] == hi[axis] == d:
                raise ValueError(f"input {name!r} is fixed to {d} on axis {axis}; its profile says {profiles[name]}")


def keeps_fp32(layer_name: str, layer_type: str, scopes: Sequence[str] = FP32_SCOPES) -> bool:
    """Whether a layer stays FP32 in an FP16 engine: inside one of ``scopes``, or a normalisation layer."""
    return layer_type in FP32_LAYER_TYPES or any(scope in layer_name for scope in scopes)


@dataclass
class ParserErrorInfo:
    """One ONNX parser error, as plain data."""

    node: int  # index of the node in the graph, -1 when the error is not about a node
    name: str
    op: str
    code: str
    desc: str


def describe_parse_failure(onnx_path: Path, errors: Sequence[ParserErrorInfo], unsupported: Sequence[str]) -> str:
    """One message naming every parser error (node, op, message) and what to do."""
    lines = [f"TensorRT's ONNX parser rejected {onnx_path} with {len(errors)} error(s):"]
    for e in errors:
        where = f"node {e.node} {e.name!r} ({e.op})" if e.node >= 0 else "the graph"
        lines.append(f"  - {where}: {e.desc} [{e.code}]")
    if unsupported:
        lines.append(f"op types TensorRT 10 does not list as supported: {', '.join(unsupported)}")
    if "MultiscaleDeformableAttnPlugin_TRT" in {e.op for e in errors}:
        lines.append("the deformable-attention plugin needs plugins=True (init_libnvinfer_plugins)")
    return "\n".join(lines)


# ---------------------------------------------------------------- TensorRT


def import_tensorrt():
    """The tensorrt module, >= 10; ImportError with the install hint otherwise."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"TensorRT is not installed: {INSTALL_HINT}") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TRT_MAJOR:
        raise ImportError(f"TensorRT {trt.__version__} is too old: this needs >= {MIN_TRT_MAJOR} ({INSTALL_HINT})")
    return trt


def _log_level(severity_name: str) -> int:
    """TensorRT severity name -> logging level."""
    return {
        "INTERNAL_ERROR": logging.CRITICAL,
        "ERROR": logging.ERROR,
        "WARNING": logging.WARNING,
        "INFO": logging.INFO,
    }.get(severity_name, logging.DEBUG)


def make_logger(trt, name: str = __name__):
    """A trt.ILogger that forwards TensorRT's messages to the ``logging`` logger ``name``."""
    target = logging.getLogger(name)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            level = _log_level(getattr(severity, "name", str(severity)).split(".")[-1])
            if target.isEnabledFor(level):
                target.log(level, "TensorRT: %s", msg)

    return _Logger()


def _parser_errors(parser) -> list[ParserErrorInfo]:
    """The parser's errors as plain data (node_name/node_operator exist from TensorRT 8.6 on)."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name = e.node_name() if hasattr(e, "node_name") else ""
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        out.append(ParserErrorInfo(int(e.node()), name, op, str(e.code()), e.desc()))
    return out


def _network_inputs(network) -> dict[str, Shape]:
    """Input name -> shape (-1 for dynamic dimensions)."""
    return {
        network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)
    }


def _constrain_fp32(trt, network, scopes: Sequence[str]) -> int:
    """Pin the layers keeps_fp32 picks (with floating outputs only) to FP32; returns how many."""
    floating = (trt.float32, trt.float16)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(t.dtype not in floating for t in outputs):
            continue  # shape arithmetic and integer tensors: nothing to pin
        if keeps_fp32(layer.name, layer.type.name, scopes):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            count += 1
    return count


def build_engine(
    onnx_path: Union[str, Path],
    engine_path: Union[str, Path],
    profiles: Mapping[str, Profile],
    fp16: bool = False,
    workspace_gb: float = 4.0,
    plugins: bool = False,
    fp32_scopes: Sequence[str] = FP32_SCOPES,
) -> None:
    """Parse ``onnx_path``, build one engine with one optimisation profile, write it atomically to ``engine_path``.

    ``fp16`` enables FP16 kernels, keeping layers that keeps_fp32(fp32_scopes) picks in FP32 where TensorRT
    can; ``plugins`` registers TensorRT's plugins (for MultiscaleDeformableAttnPlugin_TRT nodes).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")
    check_profiles(profiles)
    trt = import_tensorrt()
    logger = make_logger(trt)
    if plugins and not trt.init_libnvinfer_plugins(logger, ""):
        raise EngineBuildError("TensorRT's plugin library could not be initialised (init_libnvinfer_plugins)")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # from the file, not from bytes: external weight files resolve relative to it
    if not parser.parse_from_file(str(onnx_path)):
        message = describe_parse_failure(onnx_path, _parser_errors(parser), unsupported_ops(onnx_path, plugins))
        raise EngineBuildError(message)
    try:
        check_profiles(profiles, _network_inputs(network))
    except ValueError as e:
        raise EngineBuildError(f"{onnx_path}: {e}") from None
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _constrain_fp32(trt, network, fp32_scopes)
        if pinned:
            # "prefer": a pinned layer without an FP32 kernel falls back instead of failing the build
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("FP16 engine; %d layer(s) kept in FP32", pinned)
    log.info("building a TensorRT engine from %s (this can take minutes)", onnx_path.name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}; its messages are logged above")
    atomic_write(engine_path, lambda f: f.write(memoryview(serialized)))
    log.info("wrote %s (%.1f MB)", engine_path, serialized.nbytes / 2**20)


def build_engines(
    export_dir: Union[str, Path],
    meta: dict,
    fp16: bool = False,
    workspace_gb: float = 4.0,
    profiles: Optional[Mapping[str, Profiles]] = None,
) -> dict[str, Path]:
    """Build detector.engine and vita_tokens.engine beside the ONNX graphs; records them in meta["tensorrt"].

    Profiles default to default_profiles(meta); plugins are on when meta["msda"] is "trt-plugin".
    """
    trt = import_tensorrt()
    export_dir = Path(export_dir)
    profiles = profiles or default_profiles(meta)
    plugins = meta.get("msda") == "trt-plugin"
    engines = {}
    for graph, (onnx_file, engine_file) in GRAPH_FILES.items():
        onnx_path = export_dir / onnx_file
        missing = unsupported_ops(onnx_path, plugins)
        if missing:
            # the table lags the parser at times: let the parser decide, but say what is likely to fail
            log.warning("%s has op types TensorRT 10 does not list as supported: %s", onnx_file, ", ".join(missing))
        build_engine(onnx_path, export_dir / engine_file, profiles[graph], fp16, workspace_gb, plugins)
        engines[graph] = export_dir / engine_file
    meta["tensorrt"] = {
        "version": trt.__version__,
        "fp16": fp16,
        "plugins": plugins,
        "engines": {graph: path.name for graph, path in engines.items()},
        "profiles": {graph: {k: [list(s) for s in v] for k, v in p.items()} for graph, p in profiles.items()},
    }
    return engines
