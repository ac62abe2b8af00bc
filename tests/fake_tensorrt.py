"""A stand-in ``tensorrt`` module shaped like the real bindings of one release, recording the calls made to it.

Shaped after NVIDIA/TensorRT python/src/infer/pyCore.cpp and pyGraph.cpp: ``release/10.x`` binds BuilderFlag.FP16,
BF16, OBEY/PREFER_PRECISION_CONSTRAINTS and ILayer.precision / set_output_type, with
NetworkDefinitionCreationFlag.STRONGLY_TYPED = 1; ``release/11.1`` binds none of those and has STRONGLY_TYPED = 0
(deprecated, ignored). The parser builds one layer per ONNX node from the real graph file, so what the builder
is asked to do with a real exported graph can be checked without a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

_LEGACY_FLAGS = ("FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")
_LAYER_TYPES = {"LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY",
                "Conv": "CONVOLUTION", "Cast": "CAST"}


class DType(enum.Enum):
    float32 = 1
    float16 = 10
    bfloat16 = 16
    int64 = 7
    int32 = 6
    bool = 9
    uint8 = 2


class FakeTensor:
    def __init__(self, name: str, dtype: DType, shape=()) -> None:
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


class FakeLayer:
    """One network layer; ``legacy`` layers have the precision API TensorRT 11 removed."""

    def __init__(self, name: str, op: str, outputs: list[Optional[FakeTensor]], legacy: bool, calls: list) -> None:
        self.name, self.type = name, types.SimpleNamespace(name=_LAYER_TYPES.get(op, "ELEMENTWISE"))
        self._outputs, self._calls = outputs, calls
        self.num_outputs = len(outputs)
        if legacy:
            self.set_output_type = self._set_output_type

    def get_output(self, i: int) -> Optional[FakeTensor]:
        return self._outputs[i]

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "precision":
            if not getattr(self, "_legacy", True):
                raise AttributeError("'ILayer' object has no attribute 'precision'")
            self._calls.append(("layer.precision", self.name, value))
        object.__setattr__(self, key, value)

    def _set_output_type(self, index: int, dtype: DType) -> None:
        self._calls.append(("layer.set_output_type", self.name, index, dtype))


class FakeNetwork:
    def __init__(self, flags: int, legacy: bool, calls: list) -> None:
        self.flags, self.legacy, self.calls = flags, legacy, calls
        self.inputs: list[FakeTensor] = []
        self.layers: list[FakeLayer] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]


class FakeParser:
    def __init__(self, network: FakeNetwork, logger: Any, module: "FakeTensorRT") -> None:
        self.network, self.module = network, module
        self.num_errors = 0

    def _load(self, model: onnx.ModelProto) -> bool:
        g = onnx.shape_inference.infer_shapes(model).graph
        types_ = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
        for v in g.input:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            self.network.inputs.append(FakeTensor(v.name, DType(v.type.tensor_type.elem_type), dims))
        for node in g.node:
            outs = [FakeTensor(o, DType(types_.get(o, 1))) for o in node.output]
            if node.op_type == "Dropout":
                outs.append(None)  # an optional output the layer does not produce: get_output gives None
            layer = FakeLayer(node.name, node.op_type, outs, self.network.legacy, self.network.calls)
            object.__setattr__(layer, "_legacy", self.network.legacy)
            self.network.layers.append(layer)
        self.module.parsed.append(model)
        return True

    def parse_from_file(self, path: str) -> bool:
        self.module.calls.append(("parser.parse_from_file", Path(path).name))
        return self._load(onnx.load(path))

    def parse(self, data: bytes, path: Optional[str] = None) -> bool:
        self.module.calls.append(("parser.parse", Path(path).name if path else None))
        return self._load(onnx.load_from_string(data))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> np.ndarray:
        return np.frombuffer(self.data + b"|timed", dtype=np.uint8)


class FakeConfig:
    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.cache: Optional[FakeTimingCache] = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.calls.append(("config.set_memory_pool_limit", size))

    def add_optimization_profile(self, profile: Any) -> int:
        self.calls.append(("config.add_optimization_profile", dict(profile.shapes)))
        return 0

    def set_flag(self, flag: Any) -> None:
        self.calls.append(("config.set_flag", flag.name))

    def clear_flag(self, flag: Any) -> None:
        self.calls.append(("config.clear_flag", flag.name))

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        self.calls.append(("config.create_timing_cache", bytes(data)))
        return FakeTimingCache(data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        ok = not cache.data.startswith(b"foreign")  # a cache of another GPU/version is refused
        if ok:
            self.cache = cache
        return ok

    def get_timing_cache(self) -> Optional[FakeTimingCache]:
        return self.cache


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeBuilder:
    def __init__(self, logger: Any, module: "FakeTensorRT") -> None:
        self.module = module
        module.calls.append(("Builder", logger))

    def create_network(self, flags: int) -> FakeNetwork:
        self.module.calls.append(("builder.create_network", flags))
        return FakeNetwork(flags, self.module.legacy, self.module.calls)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig(self.module.calls)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> np.ndarray:
        self.module.calls.append(("builder.build_serialized_network", network.flags))
        return np.frombuffer(b"engine:" + self.module.__version__.encode(), dtype=np.uint8)


class FakeTensorRT(types.ModuleType):
    """``tensorrt`` of one release: ``legacy`` = the 10.x precision API is there."""

    def __init__(self, version: str) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.legacy = int(version.split(".")[0]) < 11
        self.calls: list = []
        self.parsed: list[onnx.ModelProto] = []
        self.plugin_inits: list = []
        flags = ["TF32", "DEBUG", "REFIT", "DISABLE_TIMING_CACHE"] + (list(_LEGACY_FLAGS) if self.legacy else [])
        self.BuilderFlag = enum.Enum("BuilderFlag", flags)
        self.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1 if self.legacy else 0})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.float32, self.float16, self.bfloat16 = DType.float32, DType.float16, DType.bfloat16
        module = self

        class ILogger:
            def __init__(self) -> None:
                pass

        self.ILogger = ILogger
        self.Builder = lambda logger: FakeBuilder(logger, module)
        self.OnnxParser = lambda network, logger: FakeParser(network, logger, module)

    def init_libnvinfer_plugins(self, logger: Any, namespace: str) -> bool:
        self.plugin_inits.append(logger)
        return True

    def named(self, prefix: str) -> list:
        """The recorded calls whose name starts with ``prefix``."""
        return [c for c in self.calls if c[0].startswith(prefix)]


class FakeCudart:
    """cuda-python's runtime module on host memory: "device" and pinned blocks are ctypes buffers, copies memmove.

    Records every copy with whether its host side was page-locked (allocated by cudaMallocHost).
    """

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaDeviceAttr(enum.Enum):
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    def __init__(self, capability: tuple[int, int] = (9, 0), devices: int = 1) -> None:
        self.capability, self.devices = capability, devices
        self.blocks: dict[int, tuple[Any, str]] = {}
        self.copies: list[tuple[str, bool]] = []
        self.allocations = 0

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def _alloc(self, nbytes: int, kind: str):
        buf = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(buf)] = (buf, kind)
        self.allocations += 1
        return self._ok(ctypes.addressof(buf))

    def cudaMalloc(self, nbytes: int):
        return self._alloc(nbytes, "device")

    def cudaMallocHost(self, nbytes: int):
        return self._alloc(nbytes, "pinned")

    def cudaFree(self, ptr: int):
        assert self.blocks.pop(ptr)[1] == "device"
        return self._ok()

    def cudaFreeHost(self, ptr: int):
        assert self.blocks.pop(ptr)[1] == "pinned"
        return self._ok()

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind, stream):
        host = src if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        self.copies.append((kind.name, self.blocks.get(host, (None, ""))[1] == "pinned"))
        ctypes.memmove(dst, src, nbytes)
        return self._ok()

    def cudaSetDevice(self, device: int):
        return self._ok()

    def cudaGetDeviceCount(self):
        return self._ok(self.devices)

    def cudaStreamCreate(self):
        return self._ok(7)

    def cudaStreamSynchronize(self, stream):
        return self._ok()

    def cudaStreamDestroy(self, stream):
        return self._ok()

    def cudaGetErrorString(self, err):
        return self._ok(b"fake error")

    def cudaDeviceGetAttribute(self, attr, device: int):
        major = attr == self.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor
        return self._ok(self.capability[0] if major else self.capability[1])


class FakeContext:
    """An execution context of a one-input engine computing ``y = 2 * x`` on the fake device memory."""

    def __init__(self, refuse: set) -> None:
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.refuse = refuse

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return self.shapes["x"]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name in self.refuse:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        n = int(np.prod(self.shapes["x"]))
        x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["x"]))
        y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["y"]))
        y[:] = 2 * x
        return True


class FakeEngine:
    """A deserialised engine with input ``x`` (float32, (1..8, 4)) and output ``y``."""

    def __init__(self, trt: "FakeTensorRT", refuse: set) -> None:
        self.trt, self.refuse = trt, refuse
        self.num_io_tensors = 2

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self.refuse)

    def get_tensor_name(self, i: int) -> str:
        return ["x", "y"][i]

    def get_tensor_mode(self, name: str):
        return self.trt.TensorIOMode.INPUT if name == "x" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return DType.float32

    def get_tensor_profile_shape(self, name: str, profile: int):
        return [(1, 4), (2, 4), (8, 4)]


def add_runtime(trt: FakeTensorRT, refuse: Optional[set] = None) -> FakeTensorRT:
    """Give the fake module what the backend uses to load and run engines."""
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    trt.nptype = lambda dtype: {DType.float32: np.float32, DType.int64: np.int64, DType.uint8: np.uint8}[dtype]
    refuse = refuse if refuse is not None else set()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Optional[FakeEngine]:
            return FakeEngine(trt, refuse) if data.startswith(b"engine") else None

    trt.Runtime = Runtime
    return trt
