"""``export_model``: a checkpoint -> an export directory (two ONNX graphs, vita.json, optional TRT engines)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import onnx
import torch

from vita_train.checkpoint.loader import load_model
from vita_train.export_format import (
    DETECTOR_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    TOKEN_STEPS_KEY,
    TOKENS_FILE,
    is_export_dir,
    step_file,
)
from vita_train.inference.preprocess import resized_size
from vita_train.utils.hashing import sha256_file

from . import onnx_io, validate
from .validate import OrtSettings
from .graphs import (
    DETECTOR_INPUTS,
    DETECTOR_OUTPUTS,
    TOKENS_INPUTS,
    TOKENS_OUTPUTS,
    AttendStepGraph,
    DecodeStepGraph,
    DetectorGraph,
    EncodeStepGraph,
    TokenGraph,
    step_io,
)

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17
MIN_OPSET = 16  # GridSample (the deformable attention's sampling) is an ONNX operator from opset 16
# aspect ratios of generated validation frames (portrait, 4:3, 16:9) when the size is dynamic
_VALIDATION_ASPECTS = ((4, 3), (3, 4), (9, 16))


@dataclass
class ExportOptions:
    """What ``python -m export`` can set."""

    out: Optional[Path] = None
    opset: int = DEFAULT_OPSET
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    size: Optional[tuple[int, int]] = None  # fixed (H, W) of resized frames; None = dynamic size
    fp16: bool = False  # the first API's spelling of precision="fp16"
    precision: Optional[str] = None  # "fp16"/"bf16": also write graph variants of that precision (TensorRT builds from them)
    validate: bool = True
    force: bool = False
    tensorrt: bool = False
    msda: str = "plain"  # "plain" (grid_sample, ONNX Runtime) or "trt-plugin" (MultiscaleDeformableAttnPlugin_TRT)
    max_batch: int = 16
    max_frames: int = 4096
    validation_frames: tuple[int, ...] = field(default=())
    validation_ort: OrtSettings = field(default_factory=OrtSettings)  # ONNX Runtime settings of the validation
    dataset: Optional[str] = None  # class names for an official checkpoint without its config.yaml (e.g. ytvis_2021)


class ExportTargetError(ValueError):
    """The output directory cannot be used (exists and is not an export, or is a file)."""


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportTargetError(f"{out} exists and is a file; choose a directory for the export")
    if out.is_dir() and any(out.iterdir()) and not is_export_dir(out) and not force:
        raise ExportTargetError(
            f"{out} exists and is not an export directory; choose another --out, or pass --force to write the "
            "export files into it (other files there are left alone)"
        )


def _validation_sizes(cfg, opts: ExportOptions, min_size: int, max_size: int) -> list[tuple[int, int]]:
    if opts.size is not None:
        return [opts.size]
    return [resized_size(100 * a, 100 * b, min_size, max_size) for a, b in _VALIDATION_ASPECTS]


def _metadata(model, ckpt: Path, opts: ExportOptions, min_size: int, max_size: int) -> dict:
    cfg = model.config
    import onnxruntime

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source_checkpoint": {"name": ckpt.name, "sha256": sha256_file(ckpt)},
        "class_names": list(cfg.label_names()),
        "model_config": cfg.replace(**{"input.min_size_test": min_size, "input.max_size_test": max_size}).to_dict(),
        "dims": {
            "num_classes": cfg.num_classes,
            "num_frame_queries": cfg.frame_decoder.num_queries,
            "hidden_dim": cfg.frame_decoder.hidden_dim,
            "num_video_queries": cfg.vita.num_queries,
            "mask_dim": cfg.pixel_decoder.mask_dim,
            "mask_stride": 4,
        },
        "window": cfg.vita.window,
        "preprocessing": {
            "min_size": min_size,
            "max_size": max_size,
            "pixel_mean": list(cfg.input.pixel_mean),
            "pixel_std": list(cfg.input.pixel_std),
            "size_divisibility": cfg.input.size_divisibility,
            "input": "uint8 RGB (B, H, W, 3), resized by the shortest edge (Pillow bilinear); normalised and padded in the graph",
            "fixed_size": list(opts.size) if opts.size else None,
        },
        "graphs": {
            "detector": {"file": DETECTOR_FILE, "inputs": DETECTOR_INPUTS, "outputs": DETECTOR_OUTPUTS},
            "vita_tokens": {"file": TOKENS_FILE, "inputs": TOKENS_INPUTS, "outputs": TOKENS_OUTPUTS},
            TOKEN_STEPS_KEY: _step_metadata(cfg),
        },
        "limits": {"max_batch": opts.max_batch, "max_frames": opts.max_frames},
        "opset": opts.opset,
        "msda": opts.msda,
        "fp16": opts.fp16,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _step_layers(cfg) -> dict[str, int]:
    """How many graphs of each step kind: one per encoder layer, two per decoder layer."""
    return {"encode": cfg.vita.enc_layers, "attend": cfg.vita.dec_layers, "decode": cfg.vita.dec_layers}


def _step_files(cfg) -> dict[str, list[str]]:
    """The step graphs' files of each kind, in layer order."""
    return {kind: [step_file(kind, i) for i in range(count)] for kind, count in _step_layers(cfg).items()}


def _step_metadata(cfg) -> dict:
    """vita.json's entry for the token step graphs: files and I/O of each kind, in layer order."""
    entry = {}
    for kind, files in _step_files(cfg).items():
        entry[kind] = {"files": files}
        entry[kind]["inputs"], entry[kind]["outputs"] = step_io(kind, 1, last=False)
    entry["decode"]["last_outputs"] = step_io("decode", 1, last=True)[1]
    entry["note"] = "layer 0's attend and decode graphs have no 'output' input (they start from the learnt queries)"
    return entry


def _export_token_steps(model, tmp: Path, opset: int) -> None:
    """The token engine as step graphs (vita_train.token_steps runs them): per encoder layer, per decoder layer."""
    cfg = model.config
    w, n, c = max(cfg.vita.window, 1), cfg.frame_decoder.num_queries, cfg.frame_decoder.hidden_dim
    nv, heads = cfg.vita.num_queries, cfg.vita.num_heads
    # example sizes all different from each other, so that no dynamic axis is traced as another's constant
    blocks, frames = torch.zeros((3, w, n, c)), torch.zeros((5, n, c))
    valid = torch.ones((3, w), dtype=torch.bool)
    index = torch.arange(n).repeat(5, 1)
    output, attended = torch.zeros((nv, c)), torch.zeros((heads, nv, c // heads))
    axes = {
        "blocks": {0: "blocks", 1: "window_frames", 2: "tokens"},
        "frame_valid": {0: "blocks", 1: "window_frames"},
        "encoded": {0: "blocks", 1: "window_frames", 2: "tokens"},
        "tokens": {0: "frames", 1: "tokens"},
        "query_index": {0: "frames", 1: "tokens"},
    }
    for kind, count in _step_layers(cfg).items():
        for i in range(count):
            inputs, outputs = step_io(kind, i, last=i == count - 1)
            previous = () if i == 0 else (output,)  # layer 0 starts from the learnt queries
            if kind == "encode":
                graph, args = EncodeStepGraph(model, i), (blocks, valid)
            elif kind == "attend":
                graph, args = AttendStepGraph(model, i), (*previous, frames, index)
            else:
                graph, args = DecodeStepGraph(model, i), (*previous, attended)
            io_axes = {name: axes[name] for name in inputs + outputs if name in axes}
            onnx_io.save(onnx_io.to_onnx(graph.eval(), args, inputs, outputs, io_axes, opset), tmp / step_file(kind, i))


def _export_graphs(model, tmp: Path, opts: ExportOptions, example_size: tuple[int, int]) -> None:
    detector = DetectorGraph(model).eval()
    layers = model.pixel_decoder.transformer.encoder.layers
    if opts.msda == "trt-plugin":
        from .trt_plugin import ms_deform_attn_sample_trt

        for layer in layers:
            layer.self_attn.sample_fn = ms_deform_attn_sample_trt
    else:  # one vita.ops::MSDeformAttn node per layer, defined by a local function (export.msda_onnx)
        from .msda_onnx import ms_deform_attn_onnx

        for layer in layers:
            layer.self_attn.from_projections_fn = ms_deform_attn_onnx
    frames = torch.zeros((1, *example_size, 3), dtype=torch.uint8)
    axes = {"frames": {0: "batch"}, "frame_queries": {0: "batch"}, "frame_logits": {0: "batch"}, "mask_features": {0: "batch"}}
    if opts.size is None:
        axes["frames"].update({1: "height", 2: "width"})
        axes["mask_features"].update({2: "feature_height", 3: "feature_width"})
    try:
        graph = onnx_io.to_onnx(detector, (frames,), DETECTOR_INPUTS, DETECTOR_OUTPUTS, axes, opts.opset)
    finally:
        from vita_train.modeling.ms_deform_attn import ms_deform_attn_sample

        for layer in layers:
            layer.self_attn.sample_fn = ms_deform_attn_sample
            layer.self_attn.from_projections_fn = None
    onnx_io.save(graph, tmp / DETECTOR_FILE)

    cfg = model.config
    t, n = 2 * max(cfg.vita.window, 1) + 1, cfg.frame_decoder.num_queries
    queries = torch.zeros((t, n, cfg.frame_decoder.hidden_dim))
    index = torch.arange(n).repeat(t, 1)
    token_axes = {"frame_queries": {0: "frames", 1: "tokens"}, "query_index": {0: "frames", 1: "tokens"}}
    graph = onnx_io.to_onnx(TokenGraph(model), (queries, index), TOKENS_INPUTS, TOKENS_OUTPUTS, token_axes, opts.opset)
    onnx_io.save(graph, tmp / TOKENS_FILE)
    _export_token_steps(model, tmp, opts.opset)


def _validate(model, tmp: Path, opts: ExportOptions, sizes: list[tuple[int, int]]) -> dict:
    """Both graphs against the float64 torch reference (decisions pinned); the summary for vita.json."""
    w = max(model.config.vita.window, 1)
    frame_counts = opts.validation_frames or tuple(sorted({1, max(1, w - 1), w, w + 1, 37}))
    log.info("validating the graphs with ONNX Runtime against a float64 torch reference")
    reference = validate.float64_copy(model)
    report = validate.validate_detector(model, tmp / DETECTOR_FILE, sizes, settings=opts.validation_ort, reference=reference)
    report.extend(validate.validate_tokens(
        model, tmp / TOKENS_FILE, frame_counts, settings=opts.validation_ort, reference=reference,
        steps_dir=tmp, step_files=_step_files(model.config),
    ))
    del reference
    validate.judge(report)
    return report.summary()


def _install(tmp: Path, out: Path) -> None:
    """Move the finished files into ``out``: one rename when it does not exist, else file by file."""
    if not out.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0o700
        os.replace(tmp, out)
        return
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _check_options(opts: ExportOptions) -> None:
    """Refuse option values the export would misread (0 taken as "the model's default") or fail on deep inside."""
    if opts.msda not in ("plain", "trt-plugin"):
        raise ValueError(f"msda must be 'plain' or 'trt-plugin', got {opts.msda!r}")
    if opts.opset < MIN_OPSET:
        raise ValueError(f"opset {opts.opset} is too old: the deformable attention's GridSample needs opset "
                         f"{MIN_OPSET} or later (default {DEFAULT_OPSET})")
    for name in ("min_size", "max_size"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (leave it unset for the model's own), got {value}")
    if opts.validation_ort.threads < 0:
        raise ValueError("validation threads must be >= 0 (0: ONNX Runtime's choice), got "
                         f"{opts.validation_ort.threads}")


def export_model(ckpt: Path, opts: Optional[ExportOptions] = None) -> Path:
    """Export ``ckpt`` (official detectron2 checkpoint or ours) to a validated export directory; returns it."""
    opts = opts or ExportOptions()
    ckpt = Path(ckpt)
    out = Path(opts.out) if opts.out else ckpt.with_name(ckpt.stem + "_export")
    _check_options(opts)
    _check_target(out, opts.force)
    model = load_model(ckpt, dataset=opts.dataset).eval()
    cfg = model.config
    min_size = opts.min_size or cfg.input.min_size_test
    max_size = opts.max_size or cfg.input.max_size_test
    sizes = _validation_sizes(cfg, opts, min_size, max_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log.info("exporting %s to ONNX (opset %d)", ckpt.name, opts.opset)
        _export_graphs(model, tmp, opts, sizes[0])
        meta = _metadata(model, ckpt, opts, min_size, max_size)
        if opts.validate and opts.msda == "plain":
            meta["validation"] = _validate(model, tmp, opts, sizes)
        precision = opts.precision or ("fp16" if opts.fp16 else "fp32")
        if opts.tensorrt or opts.msda == "trt-plugin" or precision != "fp32":
            from .tensorrt import prepare_graphs

            prepare_graphs(tmp, meta, precision)  # reduced-precision variants; the static TensorRT check
        if opts.tensorrt:
            from .tensorrt import build_engines

            build_engines(tmp, meta, precision=precision)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export written to %s", out)
    return out
