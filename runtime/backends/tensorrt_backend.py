"""The TensorRT backend: runs detector.engine and vita_tokens.engine of an export directory, without torch.

TensorRT (>= 10) and cuda-python are imported when a backend is made, so this module imports without them.
Device buffers and their pinned host staging buffers are allocated once per tensor and grown only when a
larger shape arrives (pinned: cudaMemcpyAsync from pageable memory is synchronous); outputs come back to numpy,
where the post-processing (pruning, top-k, masks) runs as in the other torch-free backends. An engine whose
recorded cache fields (TensorRT version, GPU compute capability, ONNX hash) no longer match is refused, with
the command that rebuilds it.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from vita_train.config import ModelConfig
from vita_train.export_format import DETECTOR_ENGINE, TOKENS_ENGINE
from vita_train.utils.hashing import sha256_file

from ..native_build import usable_cpus
from . import numpy_ops
from .base import Detection, Selection

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
INSTALL_HINT = "pip install 'vita-toolkit[gpu-cu12]' or '[gpu-cu13]' (TensorRT >= 10 and the cuda-python of its CUDA major)"
REBUILD_HINT = "rebuild the engines on this machine: python -m export.tensorrt {dir}"
# features come back to host memory; as for torch on CPU, keep fp32 features up to this many bytes
HOST_FEATURE_BUDGET = 1 << 30
# device buffers grow in whole MiB, so slowly growing shapes do not reallocate on every call
BUFFER_GRANULARITY = 1 << 20


# ---------------------------------------------------------------- pure logic (no TensorRT needed)


def device_index(device: str) -> int:
    """'cuda' / 'cuda:N' -> N; anything else is an error (TensorRT runs on NVIDIA GPUs only)."""
    kind, _, index = str(device).partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"the tensorrt backend runs on a CUDA device ('cuda' or 'cuda:N'), got {device!r}")
    return int(index or 0)


def detector_output_shapes(
    dims: Mapping[str, int], size_divisibility: int, batch: int, height: int, width: int
) -> dict[str, Shape]:
    """Shapes of the detector's outputs for (batch, height, width) resized frames."""
    div = max(int(size_divisibility), 1)
    stride = int(dims.get("mask_stride", 4))
    hp, wp = -(-height // div) * div, -(-width // div) * div  # padded inside the graph
    nf = int(dims["num_frame_queries"])
    return {
        "frame_queries": (batch, nf, int(dims["hidden_dim"])),
        "frame_logits": (batch, nf, int(dims["num_classes"]) + 1),
        "mask_features": (batch, int(dims["mask_dim"]), hp // stride, wp // stride),
    }


def tokens_output_shapes(dims: Mapping[str, int]) -> dict[str, Shape]:
    """Shapes of the token engine's outputs (whatever the number of frames)."""
    nv = int(dims["num_video_queries"])
    return {"pred_logits": (nv, int(dims["num_classes"]) + 1), "mask_embed": (nv, int(dims["mask_dim"]))}


def grown_capacity(capacity: int, nbytes: int, granularity: int = BUFFER_GRANULARITY) -> int:
    """A buffer's capacity after a request for ``nbytes``: unchanged when it fits, else rounded up."""
    if 0 < nbytes <= capacity:
        return capacity
    return max(granularity, -(-nbytes // granularity) * granularity)


def batch_slices(total: int, max_batch: int) -> list[slice]:
    """Consecutive slices of at most ``max_batch`` covering ``total`` items."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [slice(start, min(start + max_batch, total)) for start in range(0, total, max_batch)]


def check_in_profile(name: str, shape: Shape, lo: Shape, hi: Shape, hint: str = "") -> None:
    """ValueError unless ``shape`` lies within the engine profile's [lo, hi] in every dimension."""
    if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
        raise ValueError(
            f"{name} of shape {tuple(shape)} is outside the engine's profile (min {tuple(lo)}, max {tuple(hi)})"
            + (f": {hint}" if hint else "")
        )


def full_query_index(frames: int, tokens: int) -> np.ndarray:
    """(T, N) int64 slots 0..N-1 in every frame: the index when nothing was pruned."""
    return np.broadcast_to(np.arange(tokens, dtype=np.int64), (frames, tokens)).copy()


def cuda_majors(distributions: Iterable[tuple[str, str]]) -> tuple[Optional[int], Optional[int]]:
    """(CUDA major of the TensorRT wheel, major of cuda-python) from installed (name, version) pairs.

    NVIDIA ships TensorRT per CUDA major as ``tensorrt-cu12`` / ``tensorrt-cu13`` (python/packaging/frontend_sdist:
    ``tensorrt_cu${CUDAToolkit_VERSION_MAJOR}``, with -libs and -bindings wheels alike); cuda-python's major is
    the CUDA major it binds (``cuda-python`` or its ``cuda-bindings`` part). None where not installed.
    """
    trt_major = cuda_python = None
    for name, version in distributions:
        key = name.lower().replace("_", "-")
        m = re.fullmatch(r"tensorrt-cu(\d+)(-libs|-bindings)?", key)
        if m:
            trt_major = int(m.group(1))
        elif key in ("cuda-python", "cuda-bindings") and version.split(".")[0].isdigit():
            cuda_python = int(version.split(".")[0])
    return trt_major, cuda_python


def check_cuda_majors(trt_major: Optional[int], cuda_python: Optional[int]) -> None:
    """ImportError when cuda-python binds another CUDA major than the TensorRT wheel (it fails at the first call)."""
    if trt_major is not None and cuda_python is not None and trt_major != cuda_python:
        raise ImportError(
            f"TensorRT is built for CUDA {trt_major} but cuda-python {cuda_python}.x is installed; install the "
            f"matching one: pip install 'cuda-python>={trt_major},<{trt_major + 1}' (or vita-toolkit[gpu-cu{trt_major}])"
        )


def stale_fields(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Names of the engine cache fields whose recorded value differs from this machine's."""
    return sorted(k for k, v in current.items() if k in recorded and str(recorded[k]) != str(v))


# ---------------------------------------------------------------- TensorRT and CUDA


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"TensorRT is not installed: {INSTALL_HINT}") from e
    if int(str(trt.__version__).split(".")[0]) < 10:
        raise ImportError(f"TensorRT {trt.__version__} is too old: the tensorrt backend needs >= 10 ({INSTALL_HINT})")
    dists = ((d.metadata["Name"] or "", d.version) for d in importlib.metadata.distributions())
    check_cuda_majors(*cuda_majors(dists))
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise ImportError(f"cuda-python is not installed: {INSTALL_HINT}") from e
    return cudart


# One logger for the process: init_libnvinfer_plugins keeps a raw pointer to the logger it is given (its binding
# in pyPlugin.cpp has no keep_alive), so the logger must outlive every backend. (export.tensorrt has the same;
# the runtime does not import the export package, which needs torch.)
_PROCESS_LOGGER: dict[int, Any] = {}
_PLUGINS_READY: set[int] = set()


def _trt_logger(trt):
    """The process-wide trt.ILogger forwarding TensorRT's messages to this module's logger."""
    if id(trt) not in _PROCESS_LOGGER:
        _PROCESS_LOGGER[id(trt)] = _make_logger(trt)
    return _PROCESS_LOGGER[id(trt)]


def _init_plugins(trt) -> None:
    """Fill the plugin registry once per process (engines with plugin layers need it)."""
    if id(trt) not in _PLUGINS_READY:
        if not trt.init_libnvinfer_plugins(_trt_logger(trt), ""):
            raise RuntimeError("TensorRT's plugin library could not be initialised (init_libnvinfer_plugins)")
        _PLUGINS_READY.add(id(trt))


def _make_logger(trt):
    """A new trt.ILogger forwarding TensorRT's messages to this module's logger."""
    levels = {
        "INTERNAL_ERROR": logging.CRITICAL,
        "ERROR": logging.ERROR,
        "WARNING": logging.WARNING,
        "INFO": logging.INFO,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            level = levels.get(getattr(severity, "name", str(severity)).split(".")[-1], logging.DEBUG)
            if log.isEnabledFor(level):
                log.log(level, "TensorRT: %s", msg)

    return _Logger()


class _Cuda:
    """The few CUDA runtime calls the backend makes, with errors raised as exceptions."""

    def __init__(self, cudart, device: int) -> None:
        self.rt = cudart
        self.call(cudart.cudaSetDevice(device))

    def call(self, result: Any) -> Any:
        """Unpack a cuda-python (err, *values) tuple; RuntimeError when err is not success."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(err)
            text = text.decode() if isinstance(text, bytes) else text
            raise RuntimeError(f"CUDA error {getattr(err, 'name', err)}: {text}")
        return values[0] if len(values) == 1 else tuple(values)

    def malloc(self, nbytes: int) -> int:
        return int(self.call(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self.call(self.rt.cudaFree(ptr))

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: what lets cudaMemcpyAsync run asynchronously."""
        return int(self.call(self.rt.cudaMallocHost(nbytes)))

    def free_host(self, ptr: int) -> None:
        self.call(self.rt.cudaFreeHost(ptr))

    def compute_capability(self, device: int) -> str:
        """'major.minor' of ``device``."""
        attr = self.rt.cudaDeviceAttr
        major = self.call(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device))
        minor = self.call(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device))
        return f"{major}.{minor}"

    def to_device(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, stream))


class _DeviceBuffers:
    """One buffer per tensor name, reused across calls and grown when a larger shape arrives.

    Device memory by default; ``pinned`` host memory (page-locked) for the staging buffers of the copies.
    """

    def __init__(self, cuda: _Cuda, pinned: bool = False) -> None:
        self.cuda = cuda
        self._alloc, self._free = (cuda.malloc_host, cuda.free_host) if pinned else (cuda.malloc, cuda.free)
        self.slots: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity in bytes)

    def get(self, name: str, nbytes: int) -> int:
        """A pointer with room for ``nbytes``."""
        ptr, capacity = self.slots.get(name, (0, 0))
        wanted = grown_capacity(capacity, nbytes)
        if wanted != capacity:
            if ptr:
                self._free(ptr)
                del self.slots[name]
            ptr = self._alloc(wanted)
            self.slots[name] = (ptr, wanted)
        return ptr

    def array(self, name: str, shape: Shape, dtype: np.dtype) -> np.ndarray:
        """A numpy view of ``shape`` on the (pinned host) buffer of ``name``; valid until the buffer grows."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr = self.get(name, nbytes)
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
        return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)

    def release(self) -> None:
        """Free every buffer."""
        for ptr, _ in self.slots.values():
            self._free(ptr)
        self.slots.clear()


class _Engine:
    """One deserialized engine with its execution context and device buffers (profile 0)."""

    def __init__(self, trt, runtime, cuda: _Cuda, path: Path) -> None:
        self.cuda, self.path = cuda, path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not load {path}: engines only load with the TensorRT version "
                "and GPU they were built with (and with plugins, if built with them); rebuild it on this machine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # (min, opt, max) of each input in profile 0, the only one build_engine makes
        self.profile = {n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}
        self.buffers = _DeviceBuffers(cuda)
        self.staging = _DeviceBuffers(cuda, pinned=True)

    def _bind(self, name: str, ptr: int) -> None:
        # set_tensor_address returns False (and logs) for an unknown name or a misaligned address
        if not self.context.set_tensor_address(name, ptr):
            raise RuntimeError(f"TensorRT refused the address of {name} in {self.path.name}; its messages are logged above")

    def max_shape(self, name: str) -> Shape:
        """The largest shape input ``name`` takes."""
        return self.profile[name][2]

    def run(self, arrays: Mapping[str, np.ndarray], stream: Any, hint: str = "") -> dict[str, np.ndarray]:
        """Host inputs -> host outputs, through pinned staging buffers and one execute_async_v3 on ``stream``."""
        for name in self.inputs:
            value = np.asarray(arrays[name])
            lo, _, hi = self.profile[name]
            check_in_profile(name, value.shape, lo, hi, hint)
            if not self.context.set_input_shape(name, value.shape):
                raise ValueError(f"{self.path.name} refused {name} of shape {value.shape}")
            staged = self.staging.array(name, value.shape, self.dtypes[name])
            np.copyto(staged, value, casting="same_kind")
            ptr = self.buffers.get(name, staged.nbytes)
            self.cuda.to_device(ptr, staged, stream)
            self._bind(name, ptr)
        staged_out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            staged_out[name] = self.staging.array(name, shape, self.dtypes[name])
            self._bind(name, self.buffers.get(name, staged_out[name].nbytes))
        if not self.context.execute_async_v3(int(stream)):
            raise RuntimeError(f"TensorRT failed to run {self.path.name}; its messages are logged above")
        for name, staged in staged_out.items():
            self.cuda.to_host(staged, self.buffers.slots[name][0], stream)
        self.cuda.call(self.cuda.rt.cudaStreamSynchronize(stream))
        return {name: staged.copy() for name, staged in staged_out.items()}  # the staging buffers are reused

    def close(self) -> None:
        """Free the device and pinned buffers; the engine and context go with their references."""
        self.buffers.release()
        self.staging.release()
        self.context = None
        self.engine = None


def _check_shapes(engine: str, outputs: Mapping[str, np.ndarray], expected: Mapping[str, Shape]) -> None:
    """RuntimeError when an engine's outputs disagree with vita.json (an engine from another export)."""
    for name, shape in expected.items():
        if outputs[name].shape != shape:
            raise RuntimeError(f"{engine} gave {name} of shape {outputs[name].shape}; vita.json implies {shape}")


class StaleEngineError(RuntimeError):
    """An engine was built for another TensorRT version, GPU or graph than this machine has; rebuild it."""


class TensorRTBackend:
    """Backend over the TensorRT engines of an export directory (built by export.tensorrt.build_engines)."""

    def __init__(self, export_dir: Path, meta: dict, device: str = "cuda:0") -> None:
        export_dir = Path(export_dir)
        for name in (DETECTOR_ENGINE, TOKENS_ENGINE):
            if not (export_dir / name).is_file():
                raise FileNotFoundError(
                    f"{export_dir} has no {name}: build the engines with `python -m export --tensorrt` on this machine"
                )
        self.config = ModelConfig.from_dict(meta["model_config"])
        self.device = device
        self.dims = meta["dims"]
        self.size_divisibility = int(meta["preprocessing"]["size_divisibility"])
        self.window = int(meta["window"])
        trt = _import_tensorrt()
        self._cuda = _Cuda(_import_cudart(), device_index(device))
        self._check_fresh(export_dir, meta.get("tensorrt", {}), trt.__version__, device_index(device))
        self._stream = self._cuda.call(self._cuda.rt.cudaStreamCreate())
        _init_plugins(trt)  # engines with plugin layers need the registry filled
        self._runtime = trt.Runtime(_trt_logger(trt))
        self._detector = _Engine(trt, self._runtime, self._cuda, export_dir / DETECTOR_ENGINE)
        self._tokens = _Engine(trt, self._runtime, self._cuda, export_dir / TOKENS_ENGINE)

    def _check_fresh(self, export_dir: Path, record: Mapping[str, Any], trt_version: str, device: int) -> None:
        """StaleEngineError when an engine was built for another TensorRT, GPU or graph than it would meet here."""
        engines = record.get("engines", {})
        current = {"tensorrt": trt_version, "compute_capability": self._cuda.compute_capability(device)}
        for graph, entry in engines.items():
            fields = entry.get("cache_fields") if isinstance(entry, dict) else None
            if not fields:
                continue  # engines from before the cache key: TensorRT checks the version on load
            here = dict(current)
            onnx_path = export_dir / entry.get("onnx", "")
            if entry.get("onnx") and onnx_path.is_file():
                here["onnx_sha256"] = sha256_file(onnx_path)
            stale = stale_fields(fields, here)
            if stale:
                detail = ", ".join(f"{k} {fields[k]} -> {here[k]}" for k in stale)
                raise StaleEngineError(f"{entry.get('file', graph)} is stale ({detail}): "
                                       + REBUILD_HINT.format(dir=export_dir))

    # -- the two graphs

    def _run_detector(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"expected (B, H, W, 3) uint8 frames, got {frames.dtype} array of shape {frames.shape}")
        max_batch = self._detector.max_shape("frames")[0]
        hint = "export with a fixed --size that matches, or with a dynamic size covering it"
        parts = [
            self._detector.run({"frames": frames[s]}, self._stream, hint) for s in batch_slices(len(frames), max_batch)
        ]
        out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if len(parts) > 1 else parts[0]
        expected = detector_output_shapes(self.dims, self.size_divisibility, *frames.shape[:3])
        _check_shapes(DETECTOR_ENGINE, out, expected)
        return {name: value.astype(np.float32, copy=False) for name, value in out.items()}

    def detect(self, frames: np.ndarray, prune_ratio: float) -> Detection:
        """(B, Hr, Wr, 3) uint8 resized RGB frames -> tokens and mask features (numpy, float32)."""
        out = self._run_detector(frames)
        tokens, index = numpy_ops.prune_frame_queries(out["frame_queries"], out["frame_logits"], prune_ratio)
        return Detection(tokens, index, out["mask_features"])

    def mask_features(self, frames: np.ndarray) -> np.ndarray:
        """Mask features only; the engine computes the whole detector (there is no features-only engine)."""
        return self._run_detector(frames)["mask_features"]

    def track(
        self, tokens: Sequence[np.ndarray], query_index: Optional[Sequence[np.ndarray]], window: Optional[int],
        owned: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """All frames' tokens -> (video class logits (Nv, K+1), mask embeddings (Nv, D)), numpy float32.
        ``owned`` changes nothing here: the tokens are copied to the device either way."""
        if window is not None and window != self.window:
            raise ValueError(
                f"the token engine was exported with window {self.window}; window={window} needs the torch backend "
                "or an export of a model configured with that window"
            )
        queries = np.concatenate(list(tokens)).astype(np.float32, copy=False)
        if query_index is None:
            index = full_query_index(*queries.shape[:2])
        else:
            index = np.concatenate(list(query_index)).astype(np.int64, copy=False)
        hint = "the export's max_frames limits how many frames one video can have"
        out = self._tokens.run({"frame_queries": queries, "query_index": index}, self._stream, hint)
        _check_shapes(TOKENS_ENGINE, out, tokens_output_shapes(self.dims))
        return out["pred_logits"].astype(np.float32, copy=False), out["mask_embed"].astype(np.float32, copy=False)

    # -- post-processing, on the host

    def select(self, logits: np.ndarray, k: int) -> Selection:
        """The official top-k over (video query, class) pairs."""
        return Selection(*numpy_ops.select_topk(logits, k))

    def mask_head(self, mask_embed: np.ndarray, selection: Selection, resized, padded, orig) -> numpy_ops.MaskHead:
        """Masks of the selected queries."""
        return numpy_ops.MaskHead(mask_embed[selection.query_index], resized, padded, orig, threads=usable_cpus())

    def concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Concatenate along the first axis."""
        return np.concatenate(list(arrays))

    def to_host(self, features: np.ndarray) -> np.ndarray:
        """Features in float16 (they are already in host memory)."""
        return np.asarray(features, dtype=np.float16)

    def from_host(self, features: np.ndarray) -> np.ndarray:
        """float16 features back to float32."""
        return np.asarray(features, dtype=np.float32)

    def nbytes(self, features: np.ndarray) -> int:
        """Bytes held by ``features``."""
        return int(features.nbytes)

    def device_budget(self) -> int:
        """Features live in host memory (outputs are copied back): the fp32 host budget."""
        return HOST_FEATURE_BUDGET

    # -- lifetime

    def close(self) -> None:
        """Free device buffers and the stream; the backend cannot run afterwards."""
        for engine in (getattr(self, "_detector", None), getattr(self, "_tokens", None)):
            if engine is not None:
                engine.close()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            self._stream = None
            self._cuda.call(self._cuda.rt.cudaStreamDestroy(stream))

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
