"""Export to ONNX: official parity through the onnxruntime backend, a torch-free runtime, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

import runtime
from export import ExportOptions, ExportTargetError, export_model
from export.__main__ import main as export_cli
from vita_train import CheckpointError

from .conftest import OFFICIAL_CASES, REPO, CallsAtOnce, OfficialCase, match_official
from .media import encode

_exports: dict[str, Path] = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each official fixture exported once (validated by default) for this module."""

    def get(case: OfficialCase) -> Path:
        if case.name not in _exports:
            out = tmp_path_factory.mktemp("exports") / case.name
            _exports[case.name] = export_model(case.ckpt, ExportOptions(out=out, validation_frames=(1, 5, 7)))
        return _exports[case.name]

    return get


def test_onnxruntime_backend_matches_official(official_case, exported):
    export_dir = exported(official_case)
    meta = json.loads((export_dir / "vita.json").read_text())
    assert meta["format_version"] == 1 and meta["validation"]["max_rel_error"] <= 1e-4
    assert len(meta["source_checkpoint"]["sha256"]) == 64
    seg = runtime.load(export_dir)
    assert type(seg.backend).__name__ == "OnnxRuntimeBackend"
    result = runtime.segment(official_case.frames, seg)
    match_official(result, official_case)


def test_cpu_detector_fixed_at_one_frame_still_takes_any_batch(exported):
    """The CPU session is specialised to the default one frame per call; other batch sizes give the same result."""
    case = OfficialCase(OFFICIAL_CASES[0])
    seg = runtime.load(exported(case))
    assert seg.backend.fixed_batch == 1
    one = runtime.segment(case.frames, seg)
    # 3 frames a call, and a shorter last call when the frame count is not a multiple of 3
    three = runtime.segment(case.frames, seg, batch_size=3)
    assert len(case.frames) % 3
    assert [i.label for i in three.instances] == [i.label for i in one.instances]
    assert [i.score for i in three.instances] == pytest.approx([i.score for i in one.instances], abs=1e-6)
    for a, b in zip(one.instances, three.instances):
        assert all(np.array_equal(a.mask(t), b.mask(t)) for t in range(one.num_frames))


def test_onnxruntime_token_engine_takes_given_up_tokens_with_the_same_result(exported):
    """track(..., owned=True), as segment calls it: the one array given up goes to the token steps as it is;
    the result is the plain call's on the same tokens in two parts, which are left as they were."""
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    case = OfficialCase(OFFICIAL_CASES[0])
    export_dir = exported(case)
    backend = OnnxRuntimeBackend(export_dir, json.loads((export_dir / "vita.json").read_text()), threads=2)
    shape = backend.detect(case.frames[:1], 1.0).tokens.shape[1:]
    tokens = np.random.default_rng(0).standard_normal((6, *shape)).astype(np.float32)
    kept = tokens.copy()
    logits, embed = backend.track([kept[:2], kept[2:]], None, None)
    np.testing.assert_array_equal(kept, tokens)
    owned_logits, owned_embed = backend.track([tokens.copy()], None, None, owned=True)
    np.testing.assert_array_equal(owned_logits, logits)
    np.testing.assert_array_equal(owned_embed, embed)


def test_cpu_detector_runs_two_frames_at_once_with_the_same_results(exported, monkeypatch):
    """With two threads the CPU backend runs two frames' detector calls at once, one thread each: they overlap, and
    the result is the one-call-at-a-time result (labels, scores within 1e-6, masks equal)."""
    from runtime import Segmenter
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    case = OfficialCase(OFFICIAL_CASES[0])
    export_dir = exported(case)
    meta = json.loads((export_dir / "vita.json").read_text())
    default = OnnxRuntimeBackend(export_dir, meta, threads=2)
    assert default.detector_streams == 2
    results, overlap = {}, {}
    for streams in (2, 1):
        backend = default if streams == 2 else OnnxRuntimeBackend(export_dir, meta, threads=2, detector_streams=1)
        calls = CallsAtOnce(monkeypatch, backend, "_run_detector")
        results[streams] = runtime.segment(case.frames, Segmenter(backend))
        overlap[streams] = calls.most
    assert overlap == {2: 2, 1: 1}
    one, two = results[1], results[2]
    assert [i.label for i in two.instances] == [i.label for i in one.instances]
    assert [i.score for i in two.instances] == pytest.approx([i.score for i in one.instances], abs=1e-6)
    for a, b in zip(one.instances, two.instances):
        assert all(np.array_equal(a.mask(t), b.mask(t)) for t in range(one.num_frames))
    # the second pass of the recompute policy runs its calls two at a time too, with the same masks
    again = runtime.segment(case.frames, Segmenter(default), feature_policy="recompute")
    assert [i.label for i in again.instances] == [i.label for i in two.instances]
    for a, b in zip(two.instances, again.instances):
        assert all(np.array_equal(a.mask(t), b.mask(t)) for t in range(two.num_frames))
    with pytest.raises(ValueError, match="detector_streams must be 1 or more"):
        OnnxRuntimeBackend(export_dir, meta, threads=2, detector_streams=0)


def test_winograd_detector_session_matches_the_plain_graph(exported, monkeypatch):
    """On any CPU: the detector session with its 3x3 convolutions rewritten (what AVX2-only CPUs run) gives the
    plain graph's outputs up to Winograd's rounding, and leaves the file on disk unchanged."""
    from runtime.backends import onnxruntime_winograd
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    import onnx

    export_dir = exported(OfficialCase(OFFICIAL_CASES[0]))
    meta = json.loads((export_dir / "vita.json").read_text())
    before = (export_dir / "detector.onnx").read_bytes()
    assert onnxruntime_winograd.rewrite(onnx.load(export_dir / "detector.onnx")) == 14  # ResNet-50's 13 stride-1 3x3s and layer_1
    backends = {}
    for on in (True, False):
        monkeypatch.setattr(onnxruntime_winograd, "applies", lambda on=on: on)
        backends[on] = OnnxRuntimeBackend(export_dir, meta, threads=2)
        assert backends[on].winograd is on
    assert (export_dir / "detector.onnx").read_bytes() == before
    case = OfficialCase(OFFICIAL_CASES[0])
    frames = np.stack([np.asarray(f) for f in case.frames[:2]])[..., ::-1]  # any two frames, as RGB
    fast, plain = (backends[on]._run_detector(np.ascontiguousarray(frames[:1])) for on in (True, False))
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_shape_constants_made_once_per_frame_size_give_the_plain_outputs(exported, monkeypatch):
    """The CPU detector session computes the position encodings and reference points once per frame size: its
    outputs equal the session without that rewrite bit for bit, at a first size, again, at a second and back."""
    from runtime.backends import onnxruntime_shape_constants
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    export_dir = exported(OfficialCase(OFFICIAL_CASES[0]))
    meta = json.loads((export_dir / "vita.json").read_text())
    fast = OnnxRuntimeBackend(export_dir, meta, threads=2)
    hoisted = fast.shape_constants.hoisted
    # the pixel decoder's position encodings and reference points, the frame decoder's three encodings
    assert len(hoisted.tensors) >= 5 and hoisted.outputs[:2] == ("frame_queries", "frame_logits")
    monkeypatch.setattr(onnxruntime_shape_constants, "hoist", lambda model: None)
    plain = OnnxRuntimeBackend(export_dir, meta, threads=2)
    assert plain.shape_constants is None
    case = OfficialCase(OFFICIAL_CASES[0])
    frames = np.stack([np.asarray(f) for f in case.frames[:3]])[..., ::-1]
    sizes = [frames[:1], frames[1:2], frames[:1, :, : frames.shape[2] - 64], frames[2:3]]
    for f in sizes:
        f = np.ascontiguousarray(f)
        for a, b in zip(fast._run_detector(f), plain._run_detector(f)):
            assert np.array_equal(a, b)
    assert len(fast.shape_constants._entries) == 2


def test_without_onnx_the_cpu_detector_runs_as_exported_with_one_warning(exported, monkeypatch, caplog):
    """An edge install without the onnx package: no graph rewrite is made, one warning says what is missing and
    how to add it, and the result still matches the official one."""
    import importlib.util

    from runtime.backends import onnxruntime_backend

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "onnx" else real_find_spec(name, *a, **k))
    onnxruntime_backend._onnx_for_rewrites.cache_clear()
    try:
        case = OfficialCase(OFFICIAL_CASES[0])
        with caplog.at_level("WARNING", logger=onnxruntime_backend.__name__):
            segs = [runtime.load(exported(case), backend="onnxruntime") for _ in range(2)]
        warnings = [r.getMessage() for r in caplog.records if "onnx package" in r.getMessage()]
        assert len(warnings) == 1 and "pip install onnx" in warnings[0]
        backend = segs[0].backend
        assert not (backend.winograd or backend.fuse_bias or backend.split_projection or backend.hoist_constants)
        match_official(runtime.segment(case.frames, segs[0]), case)
        assert backend.projection is None and backend.shape_constants is None
    finally:
        onnxruntime_backend._onnx_for_rewrites.cache_clear()


def test_graph_inputs_outputs_and_dynamic_axes(exported):
    import onnx

    export_dir = exported(OfficialCase(OFFICIAL_CASES[0]))
    det = onnx.load(export_dir / "detector.onnx")
    frames = det.graph.input[0]
    assert frames.name == "frames" and frames.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in frames.type.tensor_type.shape.dim]
    assert dims[0] == "batch" and isinstance(dims[1], str) and isinstance(dims[2], str) and dims[3] == 3
    assert [o.name for o in det.graph.output] == ["frame_queries", "frame_logits", "mask_features"]
    tok = onnx.load(export_dir / "vita_tokens.onnx")
    assert [i.name for i in tok.graph.input] == ["frame_queries", "query_index"]
    assert [d.dim_param for d in tok.graph.input[0].type.tensor_type.shape.dim][:2] == ["frames", "tokens"]


_TORCH_FREE = r"""
import sys
sys.modules["torch"] = None  # make sure: any import of torch fails
import numpy as np, runtime
try:
    import torch  # noqa: F401
    raise SystemExit("torch imported")
except ImportError:
    pass
result = runtime.segment(sys.argv[1], model=sys.argv[2], prune_ratio=0.5)
result.save(sys.argv[3])
result.render(sys.argv[4], sys.argv[1])
print(len(result.instances), result.num_frames)
"""


def _torch_free_venv(root: Path) -> Path:
    env_dir = root / "venv-no-torch"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pkgs = ["numpy", "av", "pycocotools", "onnxruntime", "pillow", "pyyaml", "tqdm"]
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], check=True, capture_output=True, timeout=900)
    return py


def test_segment_video_in_a_venv_without_torch(exported, tmp_path):
    case = OfficialCase("r50_tiny")
    export_dir = exported(case)
    video = encode(tmp_path / "clip.mkv", case.frames[:8], "ffv1", "bgr0")
    py = _torch_free_venv(tmp_path)
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0
    out = subprocess.run(
        [str(py), "-c", _TORCH_FREE, str(video), str(export_dir), str(tmp_path / "r.json"), str(tmp_path / "o.mp4")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "8"
    assert (tmp_path / "r.json").stat().st_size > 0 and (tmp_path / "o.mp4").stat().st_size > 0


# ----- bad input --------------------------------------------------------------------------------------


def test_not_a_vita_checkpoint(tmp_path, capsys):
    import torch

    ckpt = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 3, 3)}}, ckpt)
    assert export_cli(["--ckpt", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "not of a VITA/Mask2Former model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError):
        export_model(ckpt, ExportOptions(out=tmp_path / "y"))


def test_existing_directory_that_is_not_an_export(tmp_path):
    case = OfficialCase("r50_tiny")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportTargetError, match="not an export directory"):
        export_model(case.ckpt, ExportOptions(out=out, validate=False))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_model(case.ckpt, ExportOptions(out=out, validate=False, force=True))
    assert (out / "notes.txt").read_text() == "keep me" and (out / "vita.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--opset", "9"], "opset 9 is too old"),  # was a dump of torch's IR graph from deep inside the exporter
    (["--min-size", "0"], "min_size must be >= 1"),  # was taken as "the model's own"
    (["--max-size", "-3"], "max_size must be >= 1"),
    (["--validation-threads", "-1"], "validation threads must be >= 0"),
])
def test_export_refuses_option_values_it_would_misread(args, message, tmp_path, capsys):
    out = tmp_path / "x"
    assert export_cli(["--ckpt", str(OfficialCase("r50_tiny").ckpt), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_names_the_classes_of_the_dataset_given(tmp_path):
    """An official 40-class checkpoint without its config.yaml: --dataset ytvis_2021 puts the 2021 names in
    vita.json, which the onnxruntime runtime then reports."""
    from vita_train.data.class_names import YTVIS_2021

    alone = tmp_path / "model_final.pth"
    shutil.copy(OfficialCase("r50_tiny").ckpt, alone)
    out = tmp_path / "export"
    assert export_cli(["--ckpt", str(alone), "--out", str(out), "--no-validate", "--dataset", "ytvis_2021"]) == 0
    assert tuple(json.loads((out / "vita.json").read_text())["class_names"]) == YTVIS_2021
    assert runtime.load(out).config.label_names() == YTVIS_2021


def test_unknown_format_version_and_corrupt_graph(exported, tmp_path):
    src = exported(OfficialCase("r50_tiny"))
    bad = tmp_path / "future"
    shutil.copytree(src, bad)
    meta = json.loads((bad / "vita.json").read_text())
    meta["format_version"] = 99
    (bad / "vita.json").write_text(json.dumps(meta))
    with pytest.raises(runtime.ModelPathError, match="format version 99"):
        runtime.load(bad)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    data = (corrupt / "detector.onnx").read_bytes()
    (corrupt / "detector.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(runtime.ModelPathError, match="detector.onnx is not a loadable ONNX graph"):
        runtime.load(corrupt)


def test_exported_ops_are_all_parsed_by_tensorrt(exported, tmp_path):
    """Every op type of both graphs is in TensorRT's ONNX parser support list (export.tensorrt, with its source)."""
    import onnx

    from export.tensorrt import unsupported_ops

    for name in OFFICIAL_CASES:
        export_dir = exported(OfficialCase(name))
        for graph in ("detector.onnx", "vita_tokens.onnx"):
            assert unsupported_ops(export_dir / graph) == [], f"{name}/{graph}"
    # the plugin form replaces GridSample by TensorRT's deformable-attention plugin node
    plugin_dir = export_model(OfficialCase("r50_tiny").ckpt, ExportOptions(out=tmp_path / "p", msda="trt-plugin"))
    ops = {n.op_type for n in onnx.load(plugin_dir / "detector.onnx").graph.node}
    assert "MultiscaleDeformableAttnPlugin_TRT" in ops and "GridSample" not in ops
    assert unsupported_ops(plugin_dir / "detector.onnx", plugins=True) == []
    assert json.loads((plugin_dir / "vita.json").read_text())["msda"] == "trt-plugin"


def test_failed_validation_lists_worst_tensors_and_leaves_nothing(tmp_path, monkeypatch):
    import export.validate as validate

    # no float32 graph is within 1e-12 of float64: validation must fail
    monkeypatch.setattr(validate, "RTOL", 1e-12)
    monkeypatch.setattr(validate, "FP32_FACTOR", 0.0)
    out = tmp_path / "strict"
    with pytest.raises(validate.ValidationError, match=r"relative error") as err:
        export_model(OfficialCase("r50_tiny").ckpt, ExportOptions(out=out, validation_frames=(1,)))
    # the eight worst of all graphs' outputs: the token graphs' (their fp32 error is the largest)
    assert "worst first" in str(err.value) and "  vita_token" in str(err.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]
