"""``load`` a model for the runtime and ``segment`` videos with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from .host_memory import keep_freed_memory
from .openmp_team import on_short_lived_thread
from .options import SegmentOptions
from .results import VideoResult

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class ModelPathError(ValueError):
    """The model path is missing or not a checkpoint / export directory."""


class Segmenter:
    """A loaded model plus default options; ``segment(video)`` runs the streaming loop."""

    def __init__(self, backend: Any, options: Optional[SegmentOptions] = None, source: Optional[str] = None) -> None:
        self.backend = backend
        self.options = options or SegmentOptions()
        # what was loaded (path, size and time of the weights, backend, dtype): resumable runs check their
        # earlier parts against it; None for a Segmenter built by hand
        self.source = source

    @property
    def config(self) -> Any:
        """The model's config (class names, sizes, window, ...)."""
        return self.backend.config

    def segment(self, video: Any, mode: str = "offline", **options: Any) -> VideoResult:
        """Segment ``video`` (path, frame folder, uint8 T x H x W x 3 array or iterable of frames).

        ``mode="clips"`` runs it clip-wise as ``runtime.stream`` does (clip_len, overlap, association, ...).
        """
        if mode == "clips":
            from .streaming.whole_video import segment_clips

            return segment_clips(self, video, **options)
        if mode != "offline":
            raise ValueError(f"mode must be 'offline' or 'clips', got {mode!r}")
        from .pipeline import run

        return run(self.backend, video, self.options.updated(**options))


def _backend_for(path: Path, backend: Optional[str]) -> str:
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return backend
    return "onnxruntime" if path.is_dir() else "torch"


def load(
    path: Union[str, Path],
    backend: Optional[str] = None,
    device: Optional[str] = None,
    dtype: str = "float32",
    config: Any = None,
    providers: Optional[list[str]] = None,
    dataset: Optional[str] = None,
    **options: Any,
) -> Segmenter:
    """Load ``path`` (official detectron2 checkpoint, one of ours, or an export directory) for segmenting.

    The backend follows from what ``path`` is unless named. ``config`` and ``dataset`` (whose class names,
    e.g. "ytvis_2021" for a 40-class official checkpoint without its config.yaml) are passed to
    vita_train.load_model for checkpoints; ``providers`` are onnxruntime execution providers for export
    directories; ``options`` become the Segmenter's default SegmentOptions.
    """
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist")
    opts = SegmentOptions().updated(**options)
    kind = _backend_for(path, backend)
    on_cpu = kind != "tensorrt" and not (device or "cpu").startswith("cuda")
    if on_cpu:
        # before any model is built and any worker thread allocates: malloc's settings (one arena among them)
        # hold for every block from then on (runtime/host_memory.py)
        keep_freed_memory()
    if path.is_dir():
        if dataset is not None:
            raise ModelPathError(f"{path} is an export directory, which keeps the class names it was exported with; "
                                 "dataset= applies to checkpoints (re-export with python -m export --dataset)")
        return Segmenter(_graph_backend(path, kind, device, providers), opts, _source(path, kind, dtype))
    if kind != "torch":
        raise ModelPathError(f"{path} is a checkpoint file; the {kind} backend runs export directories")
    from vita_train.checkpoint.errors import CheckpointError
    from vita_train.checkpoint.loader import load_model

    from .backends.torch_backend import TorchBackend

    def build() -> Segmenter:
        try:
            model = load_model(path, config=config, dataset=dataset)
        except CheckpointError as e:
            raise ModelPathError(f"cannot use {path} as a model: {e}") from None
        backend = TorchBackend(model, device=device, dtype=dtype, kernels=opts.kernels,
                               token_dtype=opts.token_dtype, compile=opts.compile)
        return Segmenter(backend, opts, _source(path, kind, dtype))

    if not on_cpu:
        return build()
    # on the CPU the load's parallel work leaves the caller's thread no OpenMP team (runtime/openmp_team.py)
    return on_short_lived_thread(build)


def _source(path: Path, kind: str, dtype: str) -> str:
    """What identifies the loaded model: the resolved path with the size and time of its weights (an export
    directory's vita.json, which records its checkpoint's hash), the backend and the dtype."""
    weights = path / "vita.json" if path.is_dir() else path
    st = weights.stat()
    return f"{path.resolve()} ({st.st_size} bytes, modified {st.st_mtime_ns} ns) {kind} {dtype}"


def _graph_backend(path: Path, kind: str, device: Optional[str], providers: Optional[list[str]]) -> Any:
    """The onnxruntime or tensorrt backend of an export directory (no torch needed)."""
    from vita_train.export_format import ExportFormatError, read_metadata

    try:
        meta = read_metadata(path)
    except ExportFormatError as e:
        raise ModelPathError(str(e)) from None
    if kind == "torch":
        raise ModelPathError(f"{path} is an export directory; the torch backend runs checkpoint files")
    if kind == "tensorrt":
        from .backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, meta, device=device or "cuda:0")
    from .backends.onnxruntime_backend import OnnxRuntimeBackend

    try:
        return OnnxRuntimeBackend(path, meta, device=device, providers=providers)
    except ValueError as e:
        raise ModelPathError(f"cannot use {path}: {e}") from None


def segment(video: Any, model: Union[str, Path, Segmenter], **options: Any) -> VideoResult:
    """Segment ``video`` with ``model`` (a path or a Segmenter); see SegmentOptions for ``options``."""
    if not isinstance(model, Segmenter):
        model = load(model)
    return model.segment(video, **options)
