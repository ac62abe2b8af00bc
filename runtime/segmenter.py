"""``load`` a model for the runtime and ``segment`` videos with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from .options import SegmentOptions
from .results import VideoResult

BACKENDS = ("torch", "onnxruntime", "tensorrt")
EXPORT_METADATA = "vita.json"


class ModelPathError(ValueError):
    """The model path is missing or not a checkpoint / export directory."""


class Segmenter:
    """A loaded model plus default options; ``segment(video)`` runs the streaming loop."""

    def __init__(self, backend: Any, options: Optional[SegmentOptions] = None) -> None:
        self.backend = backend
        self.options = options or SegmentOptions()

    @property
    def config(self) -> Any:
        """The model's config (class names, sizes, window, ...)."""
        return self.backend.config

    def segment(self, video: Any, **options: Any) -> VideoResult:
        """Segment ``video`` (path, frame folder, uint8 T x H x W x 3 array or iterable of frames)."""
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
    **options: Any,
) -> Segmenter:
    """Load ``path`` (official detectron2 checkpoint, one of ours, or an export directory) for segmenting.

    The backend follows from what ``path`` is unless named. ``config`` is passed to
    vita_train.load_model for checkpoints; ``options`` become the Segmenter's default SegmentOptions.
    """
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist")
    opts = SegmentOptions().updated(**options)
    kind = _backend_for(path, backend)
    if path.is_dir():
        meta = path / EXPORT_METADATA
        if not meta.is_file():
            raise ModelPathError(
                f"{path} is a directory without {EXPORT_METADATA}: give a checkpoint file or an export directory "
                "made by `python -m export`"
            )
        try:
            json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelPathError(f"{meta} is not valid JSON ({e}); export the model again") from None
        raise ModelPathError(f"{path} is an export directory; the {kind} backend for exports is not available yet")
    if kind != "torch":
        raise ModelPathError(f"{path} is a checkpoint file; the {kind} backend runs export directories")
    from vita_train.checkpoint.errors import CheckpointError
    from vita_train.checkpoint.loader import load_model

    from .backends.torch_backend import TorchBackend

    try:
        model = load_model(path, config=config)
    except CheckpointError as e:
        raise ModelPathError(f"cannot use {path} as a model: {e}") from None
    return Segmenter(TorchBackend(model, device=device, dtype=dtype), opts)


def segment(video: Any, model: Union[str, Path, Segmenter], **options: Any) -> VideoResult:
    """Segment ``video`` with ``model`` (a path or a Segmenter); see SegmentOptions for ``options``."""
    if not isinstance(model, Segmenter):
        model = load(model)
    return model.segment(video, **options)
