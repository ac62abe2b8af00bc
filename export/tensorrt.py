"""TensorRT engines from the exported ONNX graphs (TensorRT 10 and 11 Python API).

TensorRT is imported inside the functions that need it, so this module (profiles, precision plans, cache keys)
works without it. Engines are specific to the TensorRT version and the GPU they were built on: each engine's
cache key (ONNX hash, TensorRT version, GPU compute capability, precision, profile) is recorded in vita.json, and
an engine whose key no longer matches is rebuilt, never reused.

Precision, one design for TensorRT 10 and 11: the network is strongly typed and the ONNX graph's own types carry
the mixed-precision policy (export/reduced_precision.py writes the fp16/bf16 variants). TensorRT 11.0 removed the
builder flags FP16/BF16/INT8/FP8, OBEY/PREFER_PRECISION_CONSTRAINTS and ILayer.precision / set_output_type
(python/src/infer/pyCore.cpp and pyGraph.cpp at release/11.1 no longer bind them; release/10.16 binds them
"Deprecated in TensorRT 10.12. Superseded by strong typing."), and made every network strongly typed
(NvInfer.h 11.0: kSTRONGLY_TYPED "is always enabled ... retained for API compatibility but is ignored"; its
value moved from 1 in 10.x to 0). The old weakly typed FP16/BF16 path remains only for an fp32 graph on a
TensorRT that still has the flag (10.x), so older callers keep working there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from vita_train.export_format import DETECTOR_ENGINE, DETECTOR_FILE, TOKENS_ENGINE, TOKENS_FILE
from vita_train.utils.atomic import atomic_write

from .reduced_precision import KEEP_FP32_SCOPES, PRECISIONS, precision_of, to_reduced_precision, variant_name
from .trt_compat import (  # noqa: F401 (TRT_ONNX_SUPPORTED_OPS, TRT_PLUGIN_OPS re-exported)
    MSDA_PLUGIN_OP,
    MSDA_PLUGIN_VERSIONS,
    PARSER_SOURCE,
    TRT_ONNX_SUPPORTED_OPS,
    TRT_PLUGIN_OPS,
    Finding,
    check_graph,
    raise_if_incompatible,
    unsupported_ops,
)

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max) of one input
Profiles = dict[str, Profile]  # input name -> its shapes; one optimisation profile of one graph

GRAPH_FILES = {"detector": (DETECTOR_FILE, DETECTOR_ENGINE), "vita_tokens": (TOKENS_FILE, TOKENS_ENGINE)}
MIN_TRT_MAJOR = 10
INSTALL_HINT = "pip install 'vita-toolkit[gpu-cu12]' or '[gpu-cu13]' (TensorRT >= 10; needs an NVIDIA GPU and driver)"
# beside the engines: kernel timings measured by one build are reused by the next (same TensorRT and GPU)
TIMING_CACHE_FILE = "tensorrt.timing_cache"
# the runtime's default detector batch on CUDA, and a typical clip length: what the kernels are tuned for
OPT_BATCH = 8
OPT_FRAMES = 64
# smallest resized side a dynamic-size detector accepts: one pixel at the backbone's /32 stage
MIN_FRAME_SIDE = 32
# legacy weakly typed path only (TensorRT 10 with an fp32 graph and a precision flag): the layers kept in fp32,
# by name scope. It keeps the whole pixel decoder fp32 for fp16 and bf16 alike (the graph variants of
# export/reduced_precision.py, the path TensorRT 11 leaves, run a bf16 pixel decoder with its sampling in fp32).
# Layer names are the ONNX node names, which torch.onnx.export(dynamo=False) builds from module paths.
FP32_SCOPES = KEEP_FP32_SCOPES
FP32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX"})
# the builder flag of each reduced precision in the weakly typed path (BuilderFlag.FP16/BF16: TensorRT <= 10.x)
LEGACY_PRECISION_FLAGS = {"fp16": "FP16", "bf16": "BF16"}
# MultiscaleDeformableAttnPlugin_TRT version "2" (IPluginV3) exists from TensorRT 10.11, where version "1"
# (IPluginV2DynamicExt, whose configurePlugin asserts on a shape mismatch and ends the process) became deprecated
PLUGIN_V2_SINCE = MSDA_PLUGIN_VERSIONS["2"]


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


def version_tuple(version: str) -> tuple[int, int]:
    """'10.11.0.33' -> (10, 11)."""
    parts = [int(p) if p.isdigit() else 0 for p in str(version).split(".")[:2]]
    return tuple((parts + [0, 0])[:2])  # type: ignore[return-value]


def plugin_version_for(trt_version: str) -> str:
    """The MultiscaleDeformableAttnPlugin_TRT version to use with ``trt_version``: "2" from 10.11 on, else "1"."""
    return "2" if version_tuple(trt_version) >= PLUGIN_V2_SINCE else "1"


def set_plugin_version(model: Any, version: str) -> int:
    """Point every deformable-attention plugin node of ``model`` at plugin ``version``; returns how many changed.

    Both versions take the same inputs and give the same output (plugin/multiscaleDeformableAttnPlugin), so
    only the attribute the parser's plugin lookup reads (ModelImporter.cpp, FallbackPluginImporter) changes.
    """
    from onnx import helper

    changed = 0
    for node in model.graph.node:
        if node.op_type != MSDA_PLUGIN_OP:
            continue
        attrs = [a for a in node.attribute if a.name != "plugin_version"]
        current = next((a.s.decode() for a in node.attribute if a.name == "plugin_version"), "1")
        if current != version:
            del node.attribute[:]
            node.attribute.extend([*attrs, helper.make_attribute("plugin_version", version)])
            changed += 1
    return changed


@dataclass(frozen=True)
class PrecisionPlan:
    """How build_engine gets an engine of ``precision``: decided from the graph and the installed TensorRT."""

    precision: str
    strongly_typed: bool  # the graph's types decide every layer's precision
    legacy_flag: Optional[str] = None  # BuilderFlag name of the weakly typed TensorRT 10 path, else None


def plan_precision(trt: Any, graph_precision: str, requested: Optional[str] = None) -> PrecisionPlan:
    """Strongly typed from the graph's own types; the weakly typed flag path only where this TensorRT has it.

    ``requested`` None means "what the graph is". An fp32 graph asked for fp16/bf16 needs BuilderFlag.FP16/BF16,
    which TensorRT 11.0 removed: there the answer is an EngineBuildError naming the graph variant to export.
    """
    requested = requested or graph_precision
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == graph_precision:
        return PrecisionPlan(requested, strongly_typed=True)
    if graph_precision != "fp32":
        raise ValueError(f"the graph computes in {graph_precision}; an engine of it cannot be {requested}")
    flag = LEGACY_PRECISION_FLAGS[requested]
    if not hasattr(trt.BuilderFlag, flag):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (deprecated in 10.12, removed in 11.0: networks "
            f"are strongly typed): build from the {requested} graph that `python -m export --precision {requested}` "
            f"writes ({variant_name(DETECTOR_FILE, requested)}, {variant_name(TOKENS_FILE, requested)})"
        )
    log.warning("building %s from an fp32 graph with the deprecated BuilderFlag.%s (TensorRT %s); export "
                "--precision %s for the strongly typed path", requested, flag, trt.__version__, requested)
    return PrecisionPlan(requested, strongly_typed=False, legacy_flag=flag)


def network_flags(trt: Any, strongly_typed: bool) -> int:
    """The create_network flags: strongly typed where asked (always on, and the flag ignored, in TensorRT 11)."""
    if not strongly_typed or version_tuple(trt.__version__)[0] >= 11:
        return 0
    # from the enum, never a literal: kSTRONGLY_TYPED is 1 in TensorRT 10 and 0 in 11
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def profile_json(profiles: Mapping[str, Profile]) -> dict[str, list[list[int]]]:
    """A profile as JSON-ready lists."""
    return {name: [list(map(int, s)) for s in shapes] for name, shapes in sorted(profiles.items())}


def engine_cache_fields(
    onnx_sha256: str, trt_version: str, compute_capability: str, precision: str, profiles: Mapping[str, Profile],
    plugins: bool, tf32: bool,
) -> dict[str, Any]:
    """Everything an engine depends on; a change in any of them makes a stored engine stale."""
    return {
        "onnx_sha256": onnx_sha256,
        "tensorrt": str(trt_version),
        "compute_capability": str(compute_capability),
        "precision": precision,
        "profile": profile_json(profiles),
        "plugins": bool(plugins),
        "tf32": bool(tf32),
    }


def engine_cache_key(fields: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of engine_cache_fields."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def graph_file(graph: str, precision: str, export_dir: Path) -> Path:
    """The ONNX file an engine of ``precision`` is built from: the reduced variant when it exists."""
    onnx_file = GRAPH_FILES[graph][0]
    variant = Path(export_dir) / variant_name(onnx_file, precision)
    return variant if variant.is_file() else Path(export_dir) / onnx_file


# ---------------------------------------------------------------- TensorRT


def import_tensorrt():
    """The tensorrt module, >= 10; ImportError with the install hint otherwise."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"TensorRT is not installed: {INSTALL_HINT}") from e
    major = version_tuple(trt.__version__)[0]
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
    """A new trt.ILogger that forwards TensorRT's messages to the ``logging`` logger ``name``."""
    target = logging.getLogger(name)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            level = _log_level(getattr(severity, "name", str(severity)).split(".")[-1])
            if target.isEnabledFor(level):
                target.log(level, "TensorRT: %s", msg)

    return _Logger()


# One logger for the process: init_libnvinfer_plugins keeps a raw pointer to the logger it is given (the
# binding, pyPlugin.cpp, has no keep_alive), so that logger must outlive every later plugin message.
_PROCESS_LOGGER: dict[int, Any] = {}  # id(trt module) -> logger
_PLUGINS_READY: set[int] = set()


def trt_logger(trt):
    """The process-wide logger for ``trt`` (made on first use, never released)."""
    key = id(trt)
    if key not in _PROCESS_LOGGER:
        _PROCESS_LOGGER[key] = make_logger(trt)
    return _PROCESS_LOGGER[key]


def init_plugins(trt) -> None:
    """Fill TensorRT's plugin registry once per process, with the process-wide logger."""
    if id(trt) in _PLUGINS_READY:
        return
    if not trt.init_libnvinfer_plugins(trt_logger(trt), ""):
        raise EngineBuildError("TensorRT's plugin library could not be initialised (init_libnvinfer_plugins)")
    _PLUGINS_READY.add(id(trt))


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
    """Weakly typed path (TensorRT 10): pin the layers keeps_fp32 picks, with floating outputs only, to FP32."""
    floating = (trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16))
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        # get_output gives None for an output the layer does not produce (e.g. optional outputs)
        if not outputs or any(t is None or t.dtype not in floating for t in outputs):
            continue  # shape arithmetic and integer tensors: nothing to pin
        if keeps_fp32(layer.name, layer.type.name, scopes):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            count += 1
    return count


def _attach_timing_cache(config, path: Optional[Path]):
    """Give ``config`` the timing cache stored at ``path`` (a fresh one when absent, damaged or foreign)."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: a cache from another TensorRT version or GPU is refused, not trusted
    if cache is None or not config.set_timing_cache(cache, False):
        if data:
            log.warning("timing cache %s does not fit this TensorRT/GPU: starting a fresh one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    """Write the config's timing cache (what this build measured, plus what it was given) to ``path``."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    blob = cache.serialize()
    atomic_write(path, lambda f: f.write(memoryview(blob)))


def build_engine(
    onnx_path: Union[str, Path],
    engine_path: Union[str, Path],
    profiles: Mapping[str, Profile],
    precision: Optional[str] = None,
    workspace_gb: float = 4.0,
    plugins: bool = False,
    tf32: bool = True,
    timing_cache: Optional[Union[str, Path]] = None,
    fp32_scopes: Sequence[str] = FP32_SCOPES,
) -> PrecisionPlan:
    """Parse ``onnx_path``, build one engine with one optimisation profile, write it atomically to ``engine_path``.

    ``precision`` None builds what the graph's types say (strongly typed); see plan_precision for the rest.
    ``plugins`` registers TensorRT's plugins (MultiscaleDeformableAttnPlugin_TRT nodes, pointed at the plugin
    version this TensorRT recommends). ``tf32=False`` clears BuilderFlag.TF32 (on by default: fp32 matmuls and
    convolutions then round inputs to 10-bit mantissas on Ampere and newer). ``timing_cache``: a file read
    before and written after the build. The static check (export/trt_compat.py) runs first: what it finds fails
    here, before any GPU work.
    """
    import onnx

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path}")
    check_profiles(profiles)
    trt = import_tensorrt()
    model = onnx.load(str(onnx_path), load_external_data=False)
    plan = plan_precision(trt, precision_of(model), precision)
    rewritten = plugins and set_plugin_version(model, plugin_version_for(trt.__version__)) > 0
    findings = check_graph(model, plugins, trt.__version__)
    if findings:
        raise EngineBuildError("\n".join([f"{onnx_path} cannot be built by TensorRT {trt.__version__}:",
                                          *(f"  - {f}" for f in findings)]))
    logger = trt_logger(trt)
    if plugins:
        init_plugins(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if rewritten:
        # the plugin version changed in memory; the path still locates any external weight files
        ok = parser.parse(model.SerializeToString(), str(onnx_path))
    else:
        ok = parser.parse_from_file(str(onnx_path))  # from the file: external weight files resolve relative to it
    if not ok:
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
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # exists in 10.x and 11.x
    if plan.legacy_flag:
        config.set_flag(getattr(trt.BuilderFlag, plan.legacy_flag))
        pinned = _constrain_fp32(trt, network, fp32_scopes)
        if pinned and hasattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS"):
            # "prefer": a pinned layer without an FP32 kernel falls back instead of failing the build
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("%s engine (weakly typed); %d layer(s) kept in FP32", plan.precision, pinned)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        _attach_timing_cache(config, cache_path)
    log.info("building a %s TensorRT engine from %s (this can take minutes)", plan.precision, onnx_path.name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}; its messages are logged above")
    atomic_write(engine_path, lambda f: f.write(memoryview(serialized)))
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    log.info("wrote %s (%.1f MB)", engine_path, serialized.nbytes / 2**20)
    return plan


def compute_capability(device: int = 0) -> str:
    """'major.minor' of CUDA device ``device`` (cuda-python, else torch); 'unknown' when neither can tell."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        attr = cudart.cudaDeviceAttr
        err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
        err2, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
        if err == err2 == cudart.cudaError_t.cudaSuccess:
            return f"{major}.{minor}"
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return "{}.{}".format(*torch.cuda.get_device_capability(device))
    except ImportError:
        pass
    return "unknown"


def prepare_graphs(export_dir: Union[str, Path], meta: dict, precision: str = "fp32") -> list[Finding]:
    """Before any GPU: write the ``precision`` graph variants (not for fp32) and run the static TensorRT check on
    the graphs engines are built from; records both in meta["precision"]. Raises TensorRTCompatibilityError."""
    import onnx

    export_dir = Path(export_dir)
    plugins = meta.get("msda") == "trt-plugin"
    files = {}
    for graph, (onnx_file, _) in GRAPH_FILES.items():
        if precision != "fp32":
            variant = to_reduced_precision(onnx.load(str(export_dir / onnx_file)), precision)
            data = variant.SerializeToString()
            atomic_write(export_dir / variant_name(onnx_file, precision), lambda f: f.write(data))
        files[graph] = variant_name(onnx_file, precision)
    findings = [f for name in files.values() for f in check_graph(export_dir / name, plugins)]
    raise_if_incompatible(findings)
    meta["precision"] = {
        "graphs": precision,
        "files": files,
        "policy": ("export/reduced_precision.py (normalisations, softmax, deformable sampling positions and "
                   "weights, thresholds in fp32; fp16 also the whole pixel decoder)"),
        "tensorrt_static_check": {"rules": PARSER_SOURCE, "plugins": plugins, "findings": 0},
    }
    return findings


def build_engines(
    export_dir: Union[str, Path],
    meta: dict,
    precision: str = "fp32",
    workspace_gb: float = 4.0,
    profiles: Optional[Mapping[str, Profiles]] = None,
    tf32: bool = True,
    force: bool = False,
    fp16: Optional[bool] = None,
) -> dict[str, Path]:
    """Build detector.engine and vita_tokens.engine beside the ONNX graphs; records them in meta["tensorrt"].

    Each engine comes from the ``precision`` variant of its graph when it exists (prepare_graphs writes it),
    else from the fp32 graph. An engine already there whose cache key (engine_cache_fields) is the one in
    meta["tensorrt"] is kept unless ``force``; any other is rebuilt. Kernel timings go to TIMING_CACHE_FILE
    beside the engines. Profiles default to default_profiles(meta); plugins are on when meta["msda"] is
    "trt-plugin". ``fp16=True`` is the old spelling of precision="fp16".
    """
    from vita_train.utils.hashing import sha256_file

    if fp16:
        precision = "fp16"
    trt = import_tensorrt()
    export_dir = Path(export_dir)
    profiles = profiles or default_profiles(meta)
    plugins = meta.get("msda") == "trt-plugin"
    previous = meta.get("tensorrt", {}).get("engines", {})
    capability = compute_capability()
    engines, records, plans = {}, {}, {}
    for graph, (_, engine_file) in GRAPH_FILES.items():
        onnx_path = graph_file(graph, precision, export_dir)
        fields = engine_cache_fields(sha256_file(onnx_path), trt.__version__, capability, precision, profiles[graph],
                                     plugins, tf32)
        key = engine_cache_key(fields)
        engine_path = export_dir / engine_file
        old = previous.get(graph)
        if not force and engine_path.is_file() and isinstance(old, dict) and old.get("cache_key") == key:
            log.info("%s is up to date (cache key %s...)", engine_file, key[:12])
            plans[graph] = old.get("plan", {})
        else:
            if engine_path.is_file():
                log.info("%s is stale (its cache key differs): rebuilding", engine_file)
            plan = build_engine(onnx_path, engine_path, profiles[graph], precision, workspace_gb, plugins, tf32,
                                export_dir / TIMING_CACHE_FILE)
            plans[graph] = {"strongly_typed": plan.strongly_typed, "legacy_flag": plan.legacy_flag}
        engines[graph] = engine_path
        records[graph] = {"file": engine_file, "onnx": onnx_path.name, "cache_key": key, "cache_fields": fields,
                          "plan": plans[graph]}
    meta["tensorrt"] = {
        "version": trt.__version__,
        "precision": precision,
        "tf32": tf32,
        "plugins": plugins,
        "plugin_version": plugin_version_for(trt.__version__) if plugins else None,
        "compute_capability": capability,
        "timing_cache": TIMING_CACHE_FILE,
        "engines": records,
        "profiles": {graph: profile_json(p) for graph, p in profiles.items()},
    }
    return engines


def rebuild_engines(export_dir: Union[str, Path], precision: Optional[str] = None, force: bool = False) -> dict:
    """Build the engines of an existing export directory on this machine (stale ones only unless ``force``);
    rewrites its vita.json. ``precision`` defaults to what the engines were built at, else the graphs'."""
    import json as json_

    from vita_train.export_format import METADATA_FILE, read_metadata

    export_dir = Path(export_dir)
    meta = read_metadata(export_dir)
    precision = precision or meta.get("tensorrt", {}).get("precision") or meta.get("precision", {}).get("graphs", "fp32")
    if precision != "fp32" and not (export_dir / variant_name(DETECTOR_FILE, precision)).is_file():
        prepare_graphs(export_dir, meta, precision)
    tf32 = bool(meta.get("tensorrt", {}).get("tf32", True))  # as the engines were built
    build_engines(export_dir, meta, precision=precision, tf32=tf32, force=force)
    text = json_.dumps(meta, indent=1)
    atomic_write(export_dir / METADATA_FILE, lambda f: f.write(text.encode()))
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m export.tensorrt EXPORT_DIR [--precision P] [--force]``: (re)build the engines here."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m export.tensorrt", description=rebuild_engines.__doc__)
    p.add_argument("export_dir", type=Path)
    p.add_argument("--precision", choices=PRECISIONS, help="default: what the engines or graphs were made at")
    p.add_argument("--force", action="store_true", help="rebuild engines whose cache key still matches")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = rebuild_engines(args.export_dir, args.precision, args.force)
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"engines of {args.export_dir} are up to date ({meta['tensorrt']['precision']}, TensorRT {meta['tensorrt']['version']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
