"""The model, its exports and the test clip of one benchmark process, made once and shared by the benchmarks.

Random-init presets are the default (torch seed 0): the weights do not change speed or memory, and no
download is needed. ``--model`` takes a checkpoint or an export directory instead.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vita_train.utils.hashing import sha256_file

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class BackendSpec:
    """One way to run the model: backend name and precision."""

    backend: str
    precision: str = "fp32"
    kernels: Optional[str] = None  # torch only: "reference" = the plain PyTorch forms; None = the model's (auto)
    compiled: bool = False  # torch only: the detector through torch.compile
    streams: Optional[int] = None  # CPU torch / onnxruntime: detector calls at once; None = the backend's choice

    @property
    def label(self) -> str:
        """e.g. ``torch fp32``, ``torch fp32 (reference kernels)``, ``torch bf16 (compiled)`` or
        ``onnxruntime fp32 (1 detector call at a time)``."""
        calls = {None: "", 1: " (1 detector call at a time)"}.get(self.streams, f" ({self.streams} detector calls at once)")
        return (f"{self.backend} {self.precision}" + (f" ({self.kernels} kernels)" if self.kernels else "")
                + (" (compiled)" if self.compiled else "") + calls)

    @property
    def kernels_label(self) -> str:
        """What runs the attention kernels: the graph for exported backends, else the torch mode (+ compiled)."""
        if self.backend == "onnxruntime":
            from runtime.backends import onnxruntime_kernels

            # on the CPU provider the deformable-attention nodes run as the compiled operator where it builds
            return "graph + compiled op" if onnxruntime_kernels.library() is not None else "graph"
        if self.backend != "torch":
            return "graph"
        return (self.kernels or "auto") + (", compiled" if self.compiled else "")


# The plain fp32 PyTorch path every fast path is measured against.
REFERENCE = BackendSpec("torch", "fp32", "reference")
TORCH = BackendSpec("torch", "fp32")


class Workspace:
    """Checkpoint, exports (cached by size and engine options) and clips of one run, under a temporary folder."""

    def __init__(self, preset: str, model_path: Optional[Path], device: str, threads: int) -> None:
        self.preset, self.device, self.threads = preset, device, threads
        self.model_path = Path(model_path) if model_path else None
        self._tmp = tempfile.TemporaryDirectory(prefix="vita-bench-")
        self.root = Path(self._tmp.name)
        self._exports: dict[tuple, Path] = {}
        self._clips: dict[tuple, Any] = {}
        self._checkpoint: Optional[Path] = None
        self._config: Any = None
        self._info: Optional[dict[str, Any]] = None
        if self.model_path is not None and not self.model_path.exists():
            raise FileNotFoundError(f"--model {self.model_path} does not exist; give a checkpoint or an export directory")

    def close(self) -> None:
        """Remove the temporary folder."""
        self._tmp.cleanup()

    # ----- the model --------------------------------------------------------------------------------
    @property
    def is_export(self) -> bool:
        """True when --model is an export directory (only graph backends can run it)."""
        return self.model_path is not None and self.model_path.is_dir()

    def checkpoint(self) -> Path:
        """A checkpoint file: --model, or the preset with random weights saved once."""
        if self.is_export:
            raise ValueError(f"{self.model_path} is an export directory; the torch backend needs a checkpoint (--model FILE)")
        if self._checkpoint is None:
            if self.model_path is not None:
                self._checkpoint = self.model_path
            else:
                import torch

                from vita_train import VitaModel, save_checkpoint
                from vita_train.presets import preset

                torch.manual_seed(0)
                model = VitaModel(preset(self.preset)).eval()
                self._checkpoint = self.root / f"{self.preset}_random.pth"
                save_checkpoint(self._checkpoint, model)
        return self._checkpoint

    def model_info(self) -> dict[str, Any]:
        """Preset, where the weights come from and their hash (what every table states); made once, which loads
        the model (the loaders' errors say what is wrong with --model)."""
        if self._info is None:
            if self.is_export:
                from vita_train.export_format import read_metadata

                meta = read_metadata(self.model_path)
                self._info = {"preset": meta["model_config"].get("name"),
                              "weights": f"export directory {self.model_path}",
                              "sha256": meta["source_checkpoint"]["sha256"]}
            else:
                ckpt = self.checkpoint()
                weights = f"checkpoint {self.model_path}" if self.model_path else "random init (torch seed 0), not trained"
                self._info = {"preset": self.config.name, "weights": weights, "sha256": sha256_file(ckpt)}
        return dict(self._info)

    @property
    def config(self) -> Any:
        """The model's ModelConfig."""
        if self._config is None:
            if self.is_export:
                from vita_train.config import ModelConfig
                from vita_train.export_format import read_metadata

                self._config = ModelConfig.from_dict(read_metadata(self.model_path)["model_config"])
            elif self.model_path is None:
                from vita_train.presets import preset

                self._config = preset(self.preset)
            else:
                self._config = self.torch_model().config
        return self._config

    def torch_model(self) -> Any:
        """A fresh VitaModel (eval) on the benchmark device."""
        from vita_train import load_model

        return load_model(self.checkpoint()).eval().to(self.device)

    # ----- exports ----------------------------------------------------------------------------------
    def export(self, size: Optional[tuple[int, int]], tensorrt: bool = False, precision: str = "fp32") -> Path:
        """An export directory for frames of ``size`` (None = dynamic), made once per process; TensorRT
        engines of ``precision`` when asked for."""
        if self.is_export:
            return self.model_path
        key = (size, tensorrt, precision)
        if key not in self._exports:
            from export import ExportOptions, export_model

            name = "export_" + ("dynamic" if size is None else f"{size[0]}x{size[1]}") + ("_trt" if tensorrt else "")
            name += "" if precision == "fp32" else "_" + precision
            log.info("exporting %s (%s) for the benchmark", self.preset, name)
            opts = ExportOptions(out=self.root / name, size=size, validate=False, tensorrt=tensorrt,
                                 precision=None if precision == "fp32" else precision)
            self._exports[key] = export_model(self.checkpoint(), opts)
        return self._exports[key]

    # ----- backends ---------------------------------------------------------------------------------
    def backend(self, spec: BackendSpec, size: Optional[tuple[int, int]], one_call_at_a_time: bool = False) -> Any:
        """A runtime backend for ``spec``; graph backends get an export for frames of ``size``. With
        ``one_call_at_a_time`` a CPU detector (torch or onnxruntime) takes every thread for each call instead of
        running two calls at once (what ``segment`` does), so that a call's latency is measured."""
        if spec.backend == "torch":
            from runtime.backends.torch_backend import TorchBackend

            return TorchBackend(self.torch_model(), device=self.device, dtype=PRECISIONS[spec.precision],
                                kernels=spec.kernels, compile=spec.compiled,
                                detector_streams=1 if one_call_at_a_time else spec.streams)
        if spec.backend == "onnxruntime":
            if spec.precision != "fp32":
                raise ValueError("the onnxruntime backend runs the fp32 graphs; use --precision fp32")
            from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
            from vita_train.export_format import read_metadata

            path = self.export(size)
            return OnnxRuntimeBackend(path, read_metadata(path), device=self.device, threads=self.threads,
                                      detector_streams=1 if one_call_at_a_time else spec.streams)
        if spec.backend == "tensorrt":
            from runtime.backends.tensorrt_backend import TensorRTBackend
            from vita_train.export_format import read_metadata

            path = self.export(size, tensorrt=True, precision=spec.precision)
            return TensorRTBackend(path, read_metadata(path), device=self.device)
        raise ValueError(f"unknown backend {spec.backend!r}; known: torch, onnxruntime, tensorrt")

    def segmenter(self, spec: BackendSpec, size: Optional[tuple[int, int]]) -> Any:
        """A runtime.Segmenter over ``self.backend(spec, size)``."""
        from runtime import Segmenter

        return Segmenter(self.backend(spec, size))

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The size the runtime resizes ``height x width`` frames to for this model."""
        from vita_train.inference.preprocess import resized_size

        cfg = self.config
        return resized_size(height, width, cfg.input.min_size_test, cfg.input.max_size_test)

    # ----- clips ------------------------------------------------------------------------------------
    def clip_frames(self, frames: int, height: int, width: int) -> np.ndarray:
        """(T, H, W, 3) uint8 synthetic moving shapes (seed 0)."""
        key = ("frames", frames, height, width)
        if key not in self._clips:
            from vita_train.data.synthetic import moving_shapes_clip

            self._clips[key] = moving_shapes_clip(frames, height, width, seed=0)
        return self._clips[key]

    def clip_file(self, frames: int, height: int, width: int) -> Path:
        """The synthetic clip encoded as an MP4 (H.264 where this FFmpeg has it, else MPEG-4 part 2)."""
        key = ("file", frames, height, width)
        if key not in self._clips:
            import av

            path = self.root / f"clip_{frames}x{height}x{width}.mp4"
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=24)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for frame in self.clip_frames(frames, height, width):
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
            self._clips[key] = path
        return self._clips[key]


def available_specs(device: str) -> tuple[list[BackendSpec], dict[str, str]]:
    """Backend/precision pairs this machine can run, and why each other one cannot run here."""
    import importlib.util

    cuda = str(device).startswith("cuda")
    specs = [REFERENCE, TORCH]
    missing: dict[str, str] = {}
    if cuda:
        specs += [BackendSpec("torch", "fp16"), BackendSpec("torch", "bf16")]
    else:
        from vita_train.modeling.precision import bf16_supported

        missing["torch fp16"] = "the torch backend runs fp16 only on CUDA"
        if bf16_supported():
            specs.append(BackendSpec("torch", "bf16"))
        else:
            missing["torch bf16"] = "this CPU has neither AVX-512-BF16 nor AMX"
    if importlib.util.find_spec("onnxruntime") is None:
        missing["onnxruntime fp32"] = "onnxruntime is not installed (pip install vita-toolkit[onnx])"
    else:
        import onnxruntime

        if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            missing["onnxruntime fp32"] = "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
        else:
            specs.append(BackendSpec("onnxruntime", "fp32"))
    for precision in ("fp16", "bf16"):
        missing[f"onnxruntime {precision}"] = (
            "the benchmarks run onnxruntime graphs in fp32: ONNX Runtime's CPU provider has no bf16 or fp16 "
            "Conv / MatMul kernels, and the reduced-precision graphs of `python -m export --precision` are built "
            "for TensorRT")
    if not cuda:
        missing["tensorrt"] = "TensorRT needs a CUDA device (--device cuda)"
    elif importlib.util.find_spec("tensorrt") is None:
        missing["tensorrt"] = "tensorrt is not importable (pip install vita-toolkit[gpu])"
    else:
        specs += [BackendSpec("tensorrt", p) for p in ("fp32", "fp16", "bf16")]
    return specs, missing


def unavailable_reason(spec: BackendSpec, missing: dict[str, str]) -> str:
    """Why this machine cannot run ``spec`` (``missing`` from available_specs)."""
    return missing.get(f"{spec.backend} {spec.precision}") or missing.get(spec.backend) or "; ".join(missing.values())


def skipped_note(spec: BackendSpec, missing: dict[str, str]) -> str:
    """The note for a requested row this machine cannot run: why, for that backend and precision."""
    return f"{spec.label} skipped: not available on this machine ({unavailable_reason(spec, missing)})"
