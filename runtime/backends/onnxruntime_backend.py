"""The ONNX Runtime backend: runs an export directory's graphs with no torch installed.

The token engine runs as step graphs chunk by chunk (vita_train.token_steps), in memory that does not grow
with the video beyond the tokens themselves; an export made before the step graphs existed runs its single
``vita_tokens.onnx``, whose working set grows with T (about 5 MB a frame at full size), with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vita_train.config import ModelConfig
from vita_train.export_format import DETECTOR_FILE, TOKENS_FILE, token_step_files
from vita_train.mask_projection import fold_mask_projection
from vita_train.token_steps import TokenSteps

from ..float_env import ORT_DENORMAL_AS_ZERO, denormals_flushed
from ..host_memory import keep_freed_memory
from ..native_build import usable_cpus
from . import (
    numpy_ops,
    onnxruntime_fusions,
    onnxruntime_kernels,
    onnxruntime_mask_projection,
    onnxruntime_shape_constants,
    onnxruntime_winograd,
)
from .base import Detection, Selection, chosen_detector_streams

log = logging.getLogger(__name__)
_CPU_FEATURE_BUDGET = 0
_DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def resolve_providers(device: Optional[str], providers: Optional[Sequence[str]]) -> list[str]:
    """Execution providers: given ones, else CUDA (and TensorRT) first for a cuda device, CPU last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        if device and device.startswith("cuda"):
            providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
            providers = [p for p in providers if p in available]
            if "CUDAExecutionProvider" not in providers:
                raise ValueError(
                    f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
                    f"(available: {available}); install onnxruntime-gpu or use device='cpu'"
                )
        else:
            providers = list(_DEFAULT_PROVIDERS)
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"onnxruntime providers {missing} are not available here (available: {available})")
    return list(providers)


# ONNX Runtime graph fusions left out on the CPU provider: its SkipLayerNormalization kernel (residual add +
# LayerNorm) ran slower than the two ops it replaces (full-size R-50 detector at 360x640 on a 2-core Xeon,
# interleaved over 4 rounds twice: 0.569-0.576 s instead of 0.581-0.583 s per frame)
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


# session config keys (onnxruntime_session_options_config_keys.h)
ENV_ALLOCATORS = "session.use_env_allocators"
ALLOW_SPINNING = "session.intra_op.allow_spinning"
# the detector graph's symbolic batch dimension (export/exporter.py names it)
BATCH_DIM = "batch"


def _unloadable(path: Path, e: Exception) -> ValueError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ValueError(f"{path} is not a loadable ONNX graph ({first}); export the model again")


def _session(path: Path, options: Any, providers: list[str], rewrite: Optional[Callable[[Any], bool]] = None) -> Any:
    """A session over the graph at ``path``; with ``rewrite``, over an in-memory copy that ``rewrite(model)``
    changes (returning True where it did; the file is not changed). ``rewrite`` needs the onnx package."""
    import onnxruntime as ort

    disabled = list(CPU_DISABLED_OPTIMIZERS) if providers == ["CPUExecutionProvider"] else None
    try:
        if rewrite is not None:
            import onnx

            model = onnx.load(str(path))
            if rewrite(model):
                # through a temporary file whose weights are written out one by one: serialised whole beside its
                # proto, the graph took the full-size R-50's 36-frame clip to a 1.08 GB peak RSS, this way 0.74
                with tempfile.TemporaryDirectory(prefix="vita-graph-") as tmp:
                    rewritten = Path(tmp) / path.name
                    onnx.save_model(model, str(rewritten), save_as_external_data=True, all_tensors_to_one_file=True,
                                    location=f"{path.name}.weights")
                    del model
                    return ort.InferenceSession(str(rewritten), options, providers=providers,
                                                disabled_optimizers=disabled)
            del model
        return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)
    except Exception as e:  # onnx and onnxruntime raise their own exception types for unreadable models
        raise _unloadable(path, e) from None


@functools.lru_cache(maxsize=1)
def _onnx_for_rewrites() -> bool:
    """True where the onnx package is installed; else warns once that the CPU detector runs as exported."""
    if importlib.util.find_spec("onnx") is not None:
        return True
    log.warning("the detector graph runs as exported, without its faster CPU forms (Winograd 3x3 convolutions, "
                "fused bias adds and GroupNorms, the mask projection folded into the mask head, position "
                "encodings made once per frame size): they are written with the onnx package, which is not "
                "installed (pip install onnx)")
    return False


def share_cpu_arena(options: Any) -> bool:
    """Make the sessions built with ``options`` draw from one process-wide CPU memory arena; False if this
    onnxruntime cannot (the sessions then keep arenas of their own)."""
    import onnxruntime as ort

    # One arena for the detector and every token step graph: the detector's working set, idle once the
    # frames are detected, is what the token engine then runs in. Arenas of their own would keep each of the
    # (2 x decoder + encoder layers) step sessions' working set for the process's lifetime; no arena at all
    # page-faults every call and fragments malloc's heap, which grew with the video (full-size R-50, 360x640,
    # 2-core Xeon, peak RSS 36 / 360 frames: 0.99 / 1.10-1.15 GB arena-less, 0.82 / 0.86 GB shared; same speed)
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # 0/-1: onnxruntime's defaults
        options.add_session_config_entry(ENV_ALLOCATORS, "1")
    except (AttributeError, RuntimeError) as e:  # an onnxruntime without process-wide allocators
        log.debug("onnxruntime cannot share one CPU arena between sessions (%s)", e)
        return False
    return True


def _step_options(threads: Optional[int], flush_denormals: bool, shared_arena: bool) -> Any:
    """Options for the token step sessions: ``threads`` (None: ONNX Runtime's choice), the shared arena where there
    is one (else none: each call's working set is freed after it), and pool threads that sleep when a call ends.

    Each step graph is a session with a thread pool of its own, called one after another: spinning, the pool
    that just finished competed for the cores with the next one and with the mask kernel (full-size R-50, 2-core
    Xeon, session 11: token engine 18.4-19.9 ms/frame spinning, 12.5 not). The detector keeps spinning (one long
    call; 549 vs 554 ms/frame without).
    """
    import onnxruntime as ort

    steps = ort.SessionOptions()
    if threads:
        steps.intra_op_num_threads = threads
    if shared_arena:
        steps.add_session_config_entry(ENV_ALLOCATORS, "1")
    else:
        steps.enable_cpu_mem_arena = False
    if flush_denormals:
        steps.add_session_config_entry(ORT_DENORMAL_AS_ZERO, "1")
    steps.add_session_config_entry(ALLOW_SPINNING, "0")
    return steps


class OnnxRuntimeBackend:
    """Backend over ``detector.onnx`` and the token engine's step graphs (or ``vita_tokens.onnx``); post-processing in numpy."""

    def __init__(
        self,
        export_dir: Path,
        meta: dict[str, Any],
        device: Optional[str] = None,
        providers: Optional[Sequence[str]] = None,
        threads: Optional[int] = None,
        detector_streams: Optional[int] = None,
    ) -> None:
        self.meta = meta
        self.config = ModelConfig.from_dict(meta["model_config"])
        self.providers = resolve_providers(device, providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self.fixed_size = tuple(meta["preprocessing"]["fixed_size"] or ()) or None
        self.threads = threads or usable_cpus()  # the mask kernel's threads: ONNX Runtime's own default otherwise
        self._intra_threads = threads
        self.flush_denormals = self.providers == ["CPUExecutionProvider"]
        self._shared_arena = False
        # the deformable-attention nodes run as one compiled kernel where the operator library is built
        self.fused_msda = self.flush_denormals and onnxruntime_kernels.library() is not None
        # the rewrites below change an in-memory copy of the detector graph with the onnx package
        onnx_installed = self.flush_denormals and _onnx_for_rewrites()
        # on AVX2-only CPUs, the detector's stride-1 3x3 convolutions as Winograd transforms (same library)
        self.winograd = self.fused_msda and onnx_installed and onnxruntime_winograd.applies()
        # on the CPU provider VITA's mask-feature projection leaves the graph for the mask head's fold (as the
        # torch backend's CPU path): its (weight, bias) once the detector session has split it off
        self.split_projection = self.flush_denormals and onnx_installed
        self.projection: Optional[tuple[np.ndarray, np.ndarray]] = None
        # and the token linears' bias adds fused with the Relu or residual add after them (same library)
        self.fuse_bias = self.fused_msda and onnx_installed
        # and what the graph computes from sizes alone (position encodings, reference points) made once per
        # frame shape: set by the rewrite
        self.hoist_constants = self.flush_denormals and onnx_installed
        self.shape_constants: Optional[onnxruntime_shape_constants.ConstantCache] = None
        if self.flush_denormals:
            # the numpy mask head frees tens of MB per call: keep them mapped
            keep_freed_memory()
        # On the CPU provider with two threads or more, the detector runs two frames at once, each call on its
        # own thread with half the threads (one session: ONNX Runtime runs concurrent calls; the weights are
        # shared, each call holds its own activations). A call's small operators no longer leave the other
        # thread waiting at their ends: full-size R-50 at 360x640 on 2 cores (AMD EPYC Zen 2), 636-647 instead of
        # 684 ms a frame, for 0.18 GB more peak memory (1.08 GB for a 36-frame clip).
        # (``detector_streams`` chooses otherwise: 1 runs one call at a time with all the threads).
        detector_streams = chosen_detector_streams(detector_streams, self.flush_denormals, self.threads)
        self.detector_streams = detector_streams
        detector_threads = max(1, self.threads // detector_streams) if detector_streams > 1 else self._intra_threads
        options = self._options(detector_threads)
        if self.flush_denormals:
            self._shared_arena = share_cpu_arena(options)
        # the step graphs share the detector's arena where they can, else they run without one
        step_options = _step_options(self._intra_threads, self.flush_denormals, self._shared_arena)
        self._detector_path = Path(export_dir) / DETECTOR_FILE
        # The CPU runs one frame per detector call (base.default_batch_size): a session whose batch dimension is
        # fixed at 1 plans its layouts and shapes once, at load (full-size R-50 at 360x640, 2-core Xeon, session 13,
        # interleaved: 586 vs 602 ms a frame with the dynamic-size export, 567 vs 589 with a fixed-size one; the
        # outputs equal bit for bit). Another batch size gets a session without the fixed batch when first asked for.
        self.fixed_batch: Optional[int] = 1 if self.flush_denormals else None
        if self.fixed_batch is not None:
            options.add_free_dimension_override_by_name(BATCH_DIM, self.fixed_batch)
        self.detector = _session(self._detector_path, options, self.providers, self._detector_rewrite())
        self._detector_threads = detector_threads
        self._any_batch_detector: Optional[Any] = None
        self._any_batch_lock = threading.Lock()
        self.tokens: Optional[Any] = None
        self.steps: Optional[TokenSteps] = None
        files = token_step_files(Path(export_dir), meta)
        if files is None:
            log.warning(
                "%s predates the token step graphs: its single token graph holds every window's attention at once, "
                "so memory grows with the video's length (about 5 MB a frame at full size); export the model again "
                "for memory that stays flat", export_dir,
            )
            self.tokens = _session(Path(export_dir) / TOKENS_FILE, self._options(self._intra_threads), self.providers)
        else:
            self.steps = TokenSteps.open(export_dir, files, meta["window"], lambda p: _session(p, step_options, self.providers))

    def _options(self, threads: Optional[int]) -> Any:
        """Session options for the detector (and an old export's single token graph): ``threads`` (None: ONNX
        Runtime's choice), and on the CPU provider flushed denormals, the compiled deformable-attention operator and
        the shared arena once set up."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if self.flush_denormals:
            # masked attention's softmax over -inf keys ran several times slower on denormals
            # (runtime/float_env.py): flushed on the pool threads here, on the calling thread around each call
            options.add_session_config_entry(ORT_DENORMAL_AS_ZERO, "1")
            # the deformable-attention nodes as one compiled kernel (else their standard-op function body)
            onnxruntime_kernels.register(options)
            if self._shared_arena:
                options.add_session_config_entry(ENV_ALLOCATORS, "1")
        return options

    def _detector_rewrite(self) -> Optional[Callable[[Any], bool]]:
        """What changes the detector graph in memory before its session is made: Winograd convolutions, fused
        bias adds, the projection split off, the shape-only tensors made once per size (None: the graph as
        exported)."""
        if not (self.winograd or self.split_projection or self.hoist_constants):
            return None

        def rewrite(model: Any) -> bool:
            changed = bool(self.winograd and onnxruntime_winograd.rewrite(model))
            changed = bool(self.fuse_bias and onnxruntime_fusions.fuse(model)) or changed
            if self.split_projection:
                projection = onnxruntime_mask_projection.split(model)
                if projection is not None:
                    self.projection, changed = projection, True
            # last: it moves subgraphs into If branches, which the rewrites above do not look into
            hoisted = onnxruntime_shape_constants.hoist(model) if self.hoist_constants else None
            if hoisted is not None:
                # every session of this backend is made by this rewrite: the same graph, one cache
                if self.shape_constants is None or self.shape_constants.hoisted != hoisted:
                    self.shape_constants = onnxruntime_shape_constants.ConstantCache(hoisted)
                changed = True
            return changed

        return rewrite

    def _detector_for(self, batch: int) -> Any:
        """The detector session that takes ``batch`` frames: the fixed-batch one, else one built on first use."""
        if self.fixed_batch is None or batch == self.fixed_batch:
            return self.detector
        with self._any_batch_lock:  # detector calls may run on several threads at once (detector_streams)
            if self._any_batch_detector is None:
                log.info("building a detector session for batches of %d frames (the loaded one takes %d)", batch,
                         self.fixed_batch)
                self._any_batch_detector = _session(self._detector_path, self._options(self._detector_threads),
                                                    self.providers, self._detector_rewrite())
        return self._any_batch_detector

    def _run_detector(self, frames: np.ndarray) -> list[np.ndarray]:
        if self.fixed_size and tuple(frames.shape[1:3]) != self.fixed_size:
            raise ValueError(
                f"this export takes {self.fixed_size[0]}x{self.fixed_size[1]} frames but the video resizes to "
                f"{frames.shape[1]}x{frames.shape[2]}; export again with --dynamic-size or --size "
                f"{frames.shape[1]}x{frames.shape[2]}"
            )
        feeds = {"frames": np.ascontiguousarray(frames)}
        with self._float_env():
            session = self._detector_for(len(frames))
            if self.shape_constants is not None:
                return self.shape_constants.run(session, feeds, frames.shape)
            return session.run(None, feeds)

    def _float_env(self) -> Any:
        """The calling thread's float settings for a graph call: denormals flushed on the CPU provider."""
        return denormals_flushed() if self.flush_denormals else contextlib.nullcontext()

    def detect(self, frames: np.ndarray, prune_ratio: float) -> Detection:
        queries, logits, features = self._run_detector(frames)
        kept, index = numpy_ops.prune_frame_queries(queries, logits, prune_ratio)
        return Detection(kept, index, features)

    def mask_features(self, frames: np.ndarray) -> np.ndarray:
        return self._run_detector(frames)[2]

    def track(self, tokens: Sequence[np.ndarray], query_index: Optional[Sequence[np.ndarray]], window: Optional[int],
              owned: bool = False):
        if window is not None and window != self.meta["window"]:
            raise ValueError(f"this export's window is fixed at {self.meta['window']}; export again to change it")
        # a new array, or the given-up one: the steps overwrite it
        given = owned and len(tokens) == 1
        queries = (tokens[0] if given else np.concatenate(list(tokens))).astype(np.float32, copy=False)
        if self.steps is not None:
            index = None if query_index is None else np.concatenate(list(query_index))
            with self._float_env():
                return self.steps(queries, index)
        if query_index is None:
            index = np.broadcast_to(np.arange(queries.shape[1], dtype=np.int64), queries.shape[:2])
        else:
            index = np.concatenate(list(query_index)).astype(np.int64, copy=False)
        with self._float_env():
            logits, embed = self.tokens.run(None, {"frame_queries": queries, "query_index": np.ascontiguousarray(index)})
        return logits, embed

    def select(self, logits: np.ndarray, k: int) -> Selection:
        return Selection(*numpy_ops.select_topk(logits, k))

    def mask_head(self, mask_embed, selection: Selection, resized, padded, orig) -> numpy_ops.MaskHead:
        embed, bias = mask_embed[selection.query_index], None
        if self.projection is not None:  # the features are the unprojected maps (onnxruntime_mask_projection)
            embed, bias = fold_mask_projection(embed, *self.projection)
        return numpy_ops.MaskHead(embed, resized, padded, orig, threads=self.threads, bias=bias)

    def concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(arrays))

    def to_host(self, features: np.ndarray) -> np.ndarray:
        # CPU outputs are host memory already: kept exact; a GPU provider's copy is halved
        return features if self.device == "cpu" else features.astype(np.float16)

    def from_host(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float32, copy=False)

    def nbytes(self, features: np.ndarray) -> int:
        return int(features.nbytes)

    def device_budget(self) -> int:
        return _CPU_FEATURE_BUDGET
