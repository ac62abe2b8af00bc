"""The onnxruntime backend's token engine as step graphs, chunk by chunk: the same numbers as torch and as the
single ``vita_tokens.onnx``, in calls that stay bounded whatever T, and older exports still loading."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import runtime
from export import ExportOptions, export_model
from export import validate as V
from kernels.reference import frame_groups
from runtime.backends.onnxruntime_backend import CPU_DISABLED_OPTIMIZERS
from vita_train import load_model
from vita_train.export_format import TOKEN_STEPS_KEY, step_file
from vita_train.token_steps import WindowLayout

from .conftest import OfficialCase, assert_imports_without, rel_err

_cache: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fp32 torch model, unvalidated export directory) of the r50_tiny fixture, exported once."""
    if "r50_tiny" not in _cache:
        case = OfficialCase("r50_tiny")
        out = export_model(case.ckpt, ExportOptions(out=tmp_path_factory.mktemp("steps") / "r50_tiny", validate=False))
        _cache["r50_tiny"] = (load_model(case.ckpt).eval(), out)
    return _cache["r50_tiny"]


def _inputs(rng, t: int, n: int, nf: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    queries = rng.standard_normal((t, n, c)).astype(np.float32)
    index = np.sort(np.stack([rng.permutation(nf)[:n] for _ in range(t)]), axis=1).astype(np.int64)
    return queries, index


@pytest.mark.parametrize("window", [0, 1, 2, 5, 6])
def test_window_layout_is_the_official_grouping(window):
    """Frames share a block of the layout exactly when kernels.reference.frame_groups puts them in one window."""
    for t in range(1, 3 * max(window, 1) + 3):
        for shifted in (False, True):
            layout = WindowLayout.of(t, window, shifted)
            block = [None] * t
            for j in range(layout.blocks):
                a, b = layout.frames(j, j + 1, t)
                assert b > a, (t, shifted, j)  # no block is all padding: no query row is fully masked
                block[a:b] = [j] * (b - a)
            groups = frame_groups(t, window, shifted)
            assert block == (groups - groups[0]).tolist(), (t, shifted)


def test_steps_match_torch_and_the_single_graph(tiny):
    """T around window and chunk boundaries, all tokens and pruned ones: steps vs torch fp32 and vita_tokens.onnx."""
    model, out = tiny
    cfg = model.config
    w, nf, c = cfg.vita.window, cfg.frame_decoder.num_queries, cfg.frame_decoder.hidden_dim
    seg = runtime.load(out, backend="onnxruntime")
    steps = seg.backend.steps
    assert steps is not None and seg.backend.tokens is None  # the single graph is not even loaded
    # chunks of two windows and of three frames, so that every T below crosses chunk boundaries too
    small = dataclasses.replace(steps, encode_chunk_tokens=2 * w * nf, attend_chunk_tokens=3 * nf)
    # with the backend's session settings: a different set of graph fusions rounds differently (~1e-5)
    single = ort.InferenceSession(str(out / "vita_tokens.onnx"), providers=["CPUExecutionProvider"],
                                  disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
    rng = np.random.default_rng(0)
    for t in (1, w - 1, w, w + 1, 2 * w + 1, 37):
        for n in (nf, nf // 2):
            queries, index = _inputs(rng, t, n, nf, c)
            pruned = n < nf
            with torch.no_grad():
                ref = [x.numpy() for x in model.track(torch.from_numpy(queries), torch.from_numpy(index) if pruned else None)]
            full_index = index if pruned else np.broadcast_to(np.arange(nf), (t, nf)).astype(np.int64)
            graph = single.run(None, {"frame_queries": queries, "query_index": full_index})
            for name, run in (("default chunks", steps), ("small chunks", small)):
                got = run(queries.copy(), index if pruned else None)
                for i, what in enumerate(("pred_logits", "mask_embed")):
                    case = f"{name} T={t} N={n} {what}"
                    # as close to torch as the single graph is (both ~1e-5: fp32 rounding, sharpened attention)
                    assert rel_err(got[i], ref[i]) <= 2 * rel_err(graph[i], ref[i]) + 2e-6, case
                    assert rel_err(got[i], graph[i]) <= 1e-5, case
    # the backend's own entry point: per-batch token arrays, as the pipeline hands them over
    queries, index = _inputs(rng, 2 * w + 1, nf // 2, nf, c)
    logits, embed = seg.backend.track([queries[:5], queries[5:]], [index[:5], index[5:]], None)
    with torch.no_grad():
        ref = model.track(torch.from_numpy(queries), torch.from_numpy(index))
    assert rel_err(logits, ref[0].numpy()) < 1e-4 and rel_err(embed, ref[1].numpy()) < 1e-4


class _Recorder:
    """A real session whose calls' input sizes are recorded."""

    def __init__(self, session, sizes: list[int]) -> None:
        self.session, self.sizes = session, sizes

    def run(self, names, feeds):
        self.sizes.append(max(v.size for v in feeds.values()))
        return self.session.run(names, feeds)


def test_calls_stay_bounded_whatever_the_length(tiny):
    """Every graph call reads at most one chunk, however many frames: the working set does not grow with T."""
    model, out = tiny
    cfg = model.config
    w, nf, c = cfg.vita.window, cfg.frame_decoder.num_queries, cfg.frame_decoder.hidden_dim
    steps = runtime.load(out, backend="onnxruntime").backend.steps
    sizes: list[int] = []
    wrap = lambda sessions: [_Recorder(s, sizes) for s in sessions]  # noqa: E731
    steps = dataclasses.replace(steps, encode=wrap(steps.encode), attend=wrap(steps.attend), decode=wrap(steps.decode))
    calls = {}
    for t in (30, 300):
        sizes.clear()
        steps(_inputs(np.random.default_rng(t), t, nf, nf, c)[0], None)
        largest = max(steps.encode_chunk_tokens + w * nf, steps.attend_chunk_tokens) * c
        assert max(sizes) <= largest, (t, max(sizes), largest)
        calls[t] = len(sizes)
    assert calls[300] > 3 * calls[30]  # the long clip ran in more calls, not larger ones


def _old_export(out: Path, dest: Path) -> Path:
    """A copy of ``out`` as exports were before the step graphs: no step files, not listed in vita.json."""
    shutil.copytree(out, dest)
    meta = json.loads((dest / "vita.json").read_text())
    for entry in meta["graphs"].pop(TOKEN_STEPS_KEY).values():
        if isinstance(entry, dict):
            for name in entry["files"]:
                (dest / name).unlink()
    (dest / "vita.json").write_text(json.dumps(meta))
    return dest


def test_older_export_runs_the_single_graph_with_a_warning(tiny, tmp_path, caplog):
    model, out = tiny
    old = _old_export(out, tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="runtime.backends.onnxruntime_backend"):
        seg = runtime.load(old, backend="onnxruntime")
    assert seg.backend.steps is None and "export the model again" in caplog.text and "grows" in caplog.text
    new = runtime.load(out, backend="onnxruntime")
    cfg = model.config
    queries, index = _inputs(np.random.default_rng(3), 13, cfg.frame_decoder.num_queries, cfg.frame_decoder.num_queries,
                             cfg.frame_decoder.hidden_dim)
    a, b = seg.backend.track([queries], None, None), new.backend.track([queries], None, None)
    assert rel_err(a[0], b[0]) < 1e-5 and rel_err(a[1], b[1]) < 1e-5


def test_a_missing_step_graph_is_a_clear_error(tiny, tmp_path):
    _, out = tiny
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / step_file("attend", 1)).unlink()
    with pytest.raises(runtime.ModelPathError, match=r"lacks vita_step\.attend1\.onnx; export the model again"):
        runtime.load(broken, backend="onnxruntime")


def test_export_lists_the_steps_and_validation_catches_a_wrong_one(tiny, tmp_path):
    """vita.json lists every step graph; a step graph with a weight scaled by 1.001 fails validation by name."""
    model, out = tiny
    entry = json.loads((out / "vita.json").read_text())["graphs"][TOKEN_STEPS_KEY]
    files = {kind: entry[kind]["files"] for kind in ("encode", "attend", "decode")}
    assert files["encode"] == [step_file("encode", i) for i in range(model.config.vita.enc_layers)]
    assert len(files["attend"]) == len(files["decode"]) == model.config.vita.dec_layers
    ref = V.float64_copy(model)
    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    graph = onnx.load(wrong / step_file("encode", 1))
    target = max((t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: np.prod(t.dims))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.001), target.name))
    onnx.save(graph, wrong / step_file("encode", 1))
    w = model.config.vita.window
    for where, expect_ok in ((out, True), (wrong, False)):
        report = V.validate_tokens(model, where / "vita_tokens.onnx", (w + 1, 2 * w + 1), reference=ref,
                                   steps_dir=where, step_files=files)
        assert {c.graph for c in report.comparisons} == {"vita_tokens", "vita_token_steps"}
        if expect_ok:
            V.judge(report)
        else:
            with pytest.raises(V.ValidationError, match="worst first") as err:
                V.judge(report)
            assert "  vita_token_steps " in str(err.value) and "  vita_tokens " not in str(err.value)


def test_the_token_steps_import_without_torch():
    assert_imports_without(["vita_train.token_steps", "runtime.backends.onnxruntime_backend"])


def test_cpu_sessions_share_one_memory_arena_and_flush_denormals(tiny):
    """The detector and every step graph draw from one arena: the token engine runs in the detector's idle
    working set instead of growing the heap (full size: 0.99 -> 0.82 GB peak at 36 frames, flat to 360); their
    pool threads flush denormals (runtime/float_env.py)."""
    _, out = tiny
    backend = runtime.load(out, backend="onnxruntime").backend
    steps = backend.steps
    sessions = [backend.detector, *steps.encode, *steps.attend, *steps.decode]
    for session in sessions:
        options = session.get_session_options()
        assert options.enable_cpu_mem_arena
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_step_graph_threads_sleep_between_calls_and_the_detectors_spin(tiny):
    """The step sessions' pools are called one after another: spinning, each competed for the cores with the
    next (full size: token engine 18-20 -> 12.5 ms/frame); the detector's one long call keeps spinning."""
    _, out = tiny
    backend = runtime.load(out, backend="onnxruntime").backend
    steps = backend.steps
    spin = "session.intra_op.allow_spinning"
    for session in [*steps.encode, *steps.attend, *steps.decode]:
        assert session.get_session_options().get_session_config_entry(spin) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # onnxruntime's default: spinning
        backend.detector.get_session_options().get_session_config_entry(spin)
