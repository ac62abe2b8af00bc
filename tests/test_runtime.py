"""runtime.segment: official parity from every input kind, pruning, memory policies, bad input, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
from runtime import pipeline
from runtime.backends.base import mask_chunk_size
from runtime.results import VideoResult
from runtime.__main__ import main as cli
from vita_train.inference.pruning import prune_frame_queries

from .media import encode

TOL = 1e-4


@pytest.fixture(scope="module")
def segmenters():
    return {}


def _segmenter(case, cache):
    if case.name not in cache:
        cache[case.name] = runtime.load(case.ckpt, device="cpu")
    return cache[case.name]


def _check_official(result: runtime.VideoResult, case) -> None:
    e = case.expected
    official = case.expected_masks()
    assert (result.num_frames, result.height, result.width) == official.shape[1:]
    assert len(result.instances) == len(e["pred_scores"])
    unmatched = list(range(len(e["pred_scores"])))
    for inst in result.instances:
        j = next(j for j in unmatched
                 if int(e["pred_labels"][j]) == inst.label and abs(float(e["pred_scores"][j]) - inst.score) <= TOL)
        unmatched.remove(j)
        ours = np.stack([result.mask(result.instances.index(inst), t) for t in range(result.num_frames)])
        iou = np.logical_and(ours, official[j]).sum() / np.logical_or(ours, official[j]).sum()
        assert iou >= 0.999
    assert not unmatched


@pytest.mark.parametrize("kind", ["array", "folder", "video_file"])
def test_segment_matches_official(official_case, segmenters, tmp_path, kind):
    frames = official_case.frames
    if kind == "array":
        video = frames
    elif kind == "folder":
        video = tmp_path / "frames"
        video.mkdir()
        for t, f in enumerate(frames):
            Image.fromarray(f).save(video / f"{t:05d}.png")
    else:
        video = encode(tmp_path / "clip.mkv", frames, "ffv1", "bgr0")  # lossless
    result = runtime.segment(video, _segmenter(official_case, segmenters))
    _check_official(result, official_case)
    assert result.class_names == tuple(_segmenter(official_case, segmenters).config.label_names())


@pytest.mark.parametrize("policy", ["host", "disk", "recompute"])
def test_feature_policies_match_official(official_case, segmenters, policy):
    result = _segmenter(official_case, segmenters).segment(
        iter(list(official_case.frames)), feature_policy=policy, batch_size=3
    )
    _check_official(result, official_case)


@pytest.mark.parametrize("policy", ["host", "disk"])
def test_cpu_mask_head_frame_by_frame_equals_the_configured_chunks(official_case, segmenters, monkeypatch, policy):
    """On the CPU the mask head takes one frame at a time (less memory in flight): the same masks and scores,
    bit for bit, as chunks of the config's mask_chunk frames."""
    seg = _segmenter(official_case, segmenters)
    chunk = seg.config.test.mask_chunk
    assert mask_chunk_size(seg.backend) == 1 and 1 < chunk < len(official_case.frames)
    per_frame = seg.segment(official_case.frames, feature_policy=policy)
    monkeypatch.setattr(pipeline, "mask_chunk_size", lambda backend: chunk)
    assert seg.segment(official_case.frames, feature_policy=policy).to_dict() == per_frame.to_dict()


def test_auto_policy_spools_features_past_the_budgets(official_case, segmenters, caplog):
    """With no memory budget left, auto keeps the features in a temporary file: same result, no file left."""
    import tempfile
    from pathlib import Path

    before = set(Path(tempfile.gettempdir()).glob("vita-features-*"))
    with caplog.at_level("INFO", logger="runtime.feature_store"):
        result = _segmenter(official_case, segmenters).segment(
            official_case.frames, device_budget_mb=0, host_budget_mb=0, batch_size=3
        )
    assert "spooling them to a temporary file" in caplog.text
    _check_official(result, official_case)
    assert set(Path(tempfile.gettempdir()).glob("vita-features-*")) == before


def test_frame_tokens_past_their_memory_budget_give_the_same_result(official_case, segmenters, caplog):
    """token_memory_mb=0: every frame's tokens wait in a temporary file until the token engine; the result
    equals the default run's, and no file is left behind. A negative budget is refused."""
    import tempfile
    from pathlib import Path

    seg = _segmenter(official_case, segmenters)
    before = set(Path(tempfile.gettempdir()).glob("vita-tokens-*"))
    with caplog.at_level("INFO", logger="runtime.token_store"):
        spilled = seg.segment(official_case.frames, token_memory_mb=0, batch_size=2)
    assert "wait in a temporary file" in caplog.text
    assert spilled.to_dict() == seg.segment(official_case.frames, batch_size=2).to_dict()
    _check_official(spilled, official_case)
    assert set(Path(tempfile.gettempdir()).glob("vita-tokens-*")) == before
    with pytest.raises(ValueError, match="token_memory_mb"):
        seg.segment(official_case.frames, token_memory_mb=-1)


def test_given_up_tokens_are_worked_in_place_with_the_same_result(official_case, segmenters):
    """track(..., owned=True), as segment calls it: the one array is the token engine's buffer (no second copy
    of a long video's tokens), the result that of the plain call on the same tokens in two parts; without
    ``owned`` the caller's tokens are left as they were."""
    backend = _segmenter(official_case, segmenters).backend
    det = backend.detect(official_case.frames[:1], 1.0)
    tokens = torch.randn(6, *det.tokens.shape[1:], generator=torch.Generator().manual_seed(0))
    kept = tokens.clone()
    logits, embed = backend.track([kept[:2], kept[2:]], None, None)
    assert torch.equal(kept, tokens)
    given = tokens.clone()
    owned_logits, owned_embed = backend.track([given], None, None, owned=True)
    np.testing.assert_array_equal(owned_logits, logits)
    assert torch.equal(owned_embed, embed)
    assert not torch.equal(given, tokens)  # the engine wrote into it: it made no copy


def test_prune_ratio_one_is_bit_identical(official_case, segmenters):
    seg = _segmenter(official_case, segmenters)
    assert seg.segment(official_case.frames, prune_ratio=1.0).to_dict() == seg.segment(official_case.frames).to_dict()
    q, logits = torch.randn(3, 20, 8), torch.randn(3, 20, 5)
    kept, index = prune_frame_queries(q, logits, 1.0)
    assert kept is q and index is None


def test_pruning_keeps_lowest_no_object_queries_with_their_slots(official_case, segmenters):
    seg = _segmenter(official_case, segmenters)
    model = seg.backend.model
    images = torch.from_numpy(official_case.frames[:2]).permute(0, 3, 1, 2)
    with torch.no_grad():
        det = model.detect(images[..., :128, :128])
    kept, index = prune_frame_queries(det.frame_queries, det.frame_logits, 0.5)
    n = det.frame_queries.shape[1]
    assert kept.shape[1] == math.ceil(0.5 * n)
    no_object = det.frame_logits.softmax(-1)[..., -1]
    for b in range(2):
        expected = set(no_object[b].argsort()[: kept.shape[1]].tolist())
        assert set(index[b].tolist()) == expected
        assert torch.equal(kept[b], det.frame_queries[b, index[b]])
    # the decoder must take each token's positional embedding from its original slot: shuffling the
    # tokens of every frame together with their slots gives the same video queries, without slots it does not
    with torch.no_grad():
        ref = model.track(kept, index)
        perm = torch.randperm(kept.shape[1])
        same = model.track(kept[:, perm], index[:, perm])
        wrong = model.track(kept[:, perm], None)
    torch.testing.assert_close(same[0], ref[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(wrong[0], ref[0], atol=1e-3)
    result = seg.segment(official_case.frames, prune_ratio=0.5)
    assert len(result.instances) == model.config.test.topk


def test_options_window_topk_min_size(official_case, segmenters):
    seg = _segmenter(official_case, segmenters)
    frames = official_case.frames[:7]
    a = seg.segment(frames, topk=3)
    assert len(a.instances) == 3
    assert seg.segment(frames, window=0).to_dict() != seg.segment(frames).to_dict()
    assert seg.segment(frames, min_size=64).height == frames.shape[1]  # masks always at the input size
    with pytest.raises(TypeError, match="unknown segment option"):
        seg.segment(frames, prune=0.5)
    with pytest.raises(ValueError, match="prune_ratio"):
        seg.segment(frames, prune_ratio=0.0)


def test_save_and_render(official_case, segmenters, tmp_path):
    result = _segmenter(official_case, segmenters).segment(official_case.frames)
    result.save(tmp_path / "r.json")
    assert runtime.VideoResult.load(tmp_path / "r.json").to_dict() == result.to_dict()
    records = result.to_ytvis(7)
    assert {r["video_id"] for r in records} == {7} and all(len(r["segmentations"]) == result.num_frames for r in records)
    result.render(tmp_path / "o.mp4", official_case.frames)
    assert (tmp_path / "o.mp4").stat().st_size > 0


# ----- bad input --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50(official_cases=None):
    from .conftest import OfficialCase

    return OfficialCase("r50_tiny")


def _cli_fails(args, out: Path, capsys, fragment: str) -> None:
    assert cli(args) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_give_clear_errors_and_no_output(r50, tmp_path, capsys):
    out = tmp_path / "out" / "results.json"
    out.parent.mkdir()
    model = str(r50.ckpt)
    _cli_fails([str(tmp_path / "missing.mp4"), "--model", model, "--out", str(out)], out, capsys, "does not exist")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 10)
    _cli_fails([str(text), "--model", model, "--out", str(out)], out, capsys, "not a video")
    empty = encode(tmp_path / "empty.mkv", r50.frames[:4], "ffv1", "bgr0")
    data = empty.read_bytes()
    cluster = data.find(bytes.fromhex("1f43b675"))  # keep the header, zero every frame
    empty.write_bytes(data[: cluster + 8] + bytes(len(data) - cluster - 8))
    _cli_fails([str(empty), "--model", model, "--out", str(out)], out, capsys, "decod")
    _cli_fails([str(r50.dir), "--model", str(text), "--out", str(out)], out, capsys, "cannot use")
    _cli_fails([str(r50.dir), "--model", str(tmp_path), "--out", str(out)], out, capsys, "has no vita.json")
    seg = runtime.load(r50.ckpt)
    with pytest.raises(runtime.VideoInputError, match="zero"):
        seg.segment(np.zeros((0, 48, 64, 3), np.uint8))
    with pytest.raises(runtime.VideoInputError, match="float32"):
        seg.segment(np.zeros((4, 48, 64, 3), np.float32))
    with pytest.raises(runtime.VideoInputError, match="size"):
        seg.segment(iter([np.zeros((48, 64, 3), np.uint8), np.zeros((50, 64, 3), np.uint8)]))


def test_truncated_video_is_segmented_and_marked(r50, tmp_path):
    path = encode(tmp_path / "full.mkv", np.repeat(r50.frames, 2, axis=0), "ffv1", "bgr0")
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning):
        result = runtime.segment(cut, runtime.load(r50.ckpt))
    assert result.truncated and 0 < result.num_frames < 2 * len(r50.frames)


def test_cli_writes_results_and_overlay(r50, tmp_path):
    video = encode(tmp_path / "clip.mkv", r50.frames[:6], "ffv1", "bgr0")
    out, overlay = tmp_path / "r.json", tmp_path / "o.mp4"
    assert cli([str(video), "--model", str(r50.ckpt), "--out", str(out), "--render", str(overlay), "--prune-ratio", "0.5"]) == 0
    assert json.loads(out.read_text())["format"] == "vita-video-result"
    assert overlay.stat().st_size > 0
    # an output path that is one of the inputs is refused before anything runs
    with pytest.raises(SystemExit):
        cli([str(video), "--model", str(r50.ckpt), "--out", str(video)])
    assert video.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # still the Matroska file


def test_an_official_checkpoint_alone_gets_the_class_names_of_the_dataset_named(r50, tmp_path):
    """40 classes fit YouTube-VIS 2019 and 2021; an official checkpoint without its config.yaml is read as 2019
    unless the dataset is named: in Python (dataset=) and on every command line that loads a model."""
    from vita_train.data.class_names import YTVIS_2019, YTVIS_2021

    alone = tmp_path / "alone" / "model_final.pth"
    alone.parent.mkdir()
    alone.write_bytes(r50.ckpt.read_bytes())
    assert runtime.load(alone).config.label_names() == YTVIS_2019
    assert runtime.load(alone, dataset="ytvis_2021").config.label_names() == YTVIS_2021
    # dataset=None is "not given": a model of ours keeps its own names (None once meant "names from the class count")
    from vita_train.pretrained import DEMO_CHECKPOINT

    assert runtime.load(DEMO_CHECKPOINT, dataset=None).config.label_names() == ("disc", "square", "triangle", "ring")
    video = encode(tmp_path / "clip.mkv", r50.frames[:4], "ffv1", "bgr0")
    out = tmp_path / "r.json"
    assert cli([str(video), "--model", str(alone), "--out", str(out), "--dataset", "ytvis_2021"]) == 0
    found = VideoResult.load(out).instances
    assert found and all(i.label_name == YTVIS_2021[i.label] for i in found)
    assert any(YTVIS_2019[i.label] != YTVIS_2021[i.label] for i in found)  # control: the two lists differ here
    # an export directory keeps the names it was exported with: naming a dataset there is refused, not ignored
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "vita.json").write_text("{}")
    with pytest.raises(runtime.ModelPathError, match="export directory, which keeps the class names"):
        runtime.load(export_dir, dataset="ytvis_2021")
    with pytest.raises(SystemExit):  # not a dataset the toolkit knows
        cli([str(video), "--model", str(alone), "--out", str(out), "--dataset", "ytvis_2022"])


def test_cli_refuses_outputs_it_cannot_write_before_any_work(tmp_path):
    """An overlay of an unknown container, an --out that is a folder or lies in a folder that cannot be written:
    a usage error before the model is even loaded (the model path here does not exist), not after segmenting."""
    import os
    import stat

    video = encode(tmp_path / "clip.mkv", np.zeros((2, 32, 32, 3), np.uint8), "ffv1", "bgr0")
    model = str(tmp_path / "not_loaded.pth")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cases = [
        ["--out", str(tmp_path / "r.json"), "--render", str(tmp_path / "o.xyz")],
        ["--out", str(tmp_path)],
        ["--out", str(tmp_path / "r.json"), "--render", str(tmp_path)],
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append(["--out", str(locked / "sub" / "r.json")])
    for args in cases:
        with pytest.raises(SystemExit) as stop:
            cli([str(video), "--model", model, *args])
        assert stop.value.code == 2, args
        with pytest.raises(SystemExit):
            cli(["stream", str(video), "--model", model, *args])
    with pytest.raises(SystemExit):
        cli(["dataset", "--ytvis-json", str(video), "--frames", str(tmp_path), "--model", model, "--out", str(tmp_path)])
    # control: with writable outputs the same command gets as far as loading the model, which is missing
    assert cli([str(video), "--model", model, "--out", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()


def test_demo_writes_both_files(tmp_path):
    assert cli(["--demo", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "demo_results.json").stat().st_size > 0
    assert (tmp_path / "demo_overlay.mp4").stat().st_size > 0
    # the shipped demo model is trained: it finds the generated shapes and names them
    found = VideoResult.load(tmp_path / "demo_results.json").instances
    assert any(i.score > 0.5 for i in found), [i.score for i in found]
    assert {i.label_name for i in found} <= {"disc", "square", "triangle", "ring"}


def test_dataset_mode_sharded_and_resumable(r50, tmp_path):
    root = tmp_path / "JPEGImages"
    videos = []
    for vid, (start, n) in enumerate([(0, 5), (5, 7), (12, 4)], start=11):
        names = []
        for t in range(n):
            name = f"v{vid}/{t:05d}.png"
            (root / f"v{vid}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(r50.frames[start + t]).save(root / name)
            names.append(name)
        videos.append({"id": vid, "file_names": names, "length": n, "height": 120, "width": 200})
    spec = tmp_path / "valid.json"
    spec.write_text(json.dumps({"videos": videos, "categories": []}))
    out = tmp_path / "results.json"
    from runtime.dataset import run_dataset

    seg = runtime.load(r50.ckpt)
    import os

    for rank in (1, 0):  # what two torchrun ranks do; rank 0 merges once every part exists
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")
        try:
            done = run_dataset(seg, spec, root, out, wait_s=5)
        finally:
            del os.environ["RANK"], os.environ["WORLD_SIZE"]
        assert done == (1 if rank == 1 else 2)
    records = json.loads(out.read_text())
    assert sorted({r["video_id"] for r in records}) == [11, 12, 13] and len(records) == 30
    # after a crash, finished videos are skipped
    (out.with_name("results.json.parts") / "12.json").unlink()
    assert run_dataset(seg, spec, root, out) == 1
    assert json.loads(out.read_text()) == records


def test_dataset_mode_never_merges_the_parts_of_another_model_json_or_options(r50, tmp_path):
    """A rerun into the same --out skips the videos already done only when they came from the same model, json and
    result-changing options; otherwise the old parts were merged as this run's (another model's AP)."""
    import shutil

    from runtime.dataset import run_dataset

    (tmp_path / "v").mkdir()
    Image.fromarray(r50.frames[0]).save(tmp_path / "v" / "0.png")
    spec = tmp_path / "valid.json"
    spec.write_text(json.dumps({"videos": [{"id": 1, "file_names": ["v/0.png"]}], "categories": []}))
    out = tmp_path / "results.json"
    seg = runtime.load(r50.ckpt)
    assert run_dataset(seg, spec, tmp_path, out) == 1
    assert run_dataset(seg, spec, tmp_path, out, batch_size=2) == 0  # same results: skipped, batching aside
    other = tmp_path / "other" / "model_final.pth"
    other.parent.mkdir()
    shutil.copy(r50.ckpt, other)
    with pytest.raises(ValueError, match="earlier run made with a different model"):
        run_dataset(runtime.load(other), spec, tmp_path, out)
    with pytest.raises(ValueError, match="earlier run made with a different set of options"):
        run_dataset(seg, spec, tmp_path, out, prune_ratio=0.5)
    spec.write_text(json.dumps({"videos": [{"id": 1, "file_names": ["v/0.png", "v/0.png"]}], "categories": []}))
    with pytest.raises(ValueError, match="earlier run made with a different ground-truth json"):
        run_dataset(seg, spec, tmp_path, out)
    # parts without a record of what made them (an older version's) are refused too
    (out.with_name("results.json.parts") / "run.json").unlink()
    with pytest.raises(ValueError, match="do not say which model"):
        run_dataset(seg, spec, tmp_path, out)


def test_dataset_mode_warns_when_the_json_names_other_classes_than_the_model(r50, tmp_path, caplog):
    """A 2019-named model on a json with YouTube-VIS 2021's categories is warned of; the 2019 json is not."""
    from runtime.dataset import run_dataset
    from vita_train.data.class_names import YTVIS_2019, YTVIS_2021

    (tmp_path / "v").mkdir()
    Image.fromarray(r50.frames[0]).save(tmp_path / "v" / "0.png")
    seg = runtime.load(r50.ckpt)
    assert seg.config.label_names() == YTVIS_2019
    for year, names in (("2019", YTVIS_2019), ("2021", YTVIS_2021)):
        spec = tmp_path / f"valid{year}.json"
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        spec.write_text(json.dumps({"videos": [{"id": 1, "file_names": ["v/0.png"]}], "categories": cats}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="runtime.dataset"):
            run_dataset(seg, spec, tmp_path, tmp_path / f"results{year}.json")
        warned = [r.getMessage() for r in caplog.records if "categories" in r.getMessage()]
        if year == "2019":
            assert not warned
        else:
            assert len(warned) == 1 and "--dataset" in warned[0], warned


def test_in_order_runs_calls_at_once_and_hands_results_back_in_order():
    """The streaming loop's detector calls, several at once: results come back in the items' order even when a later
    call ends first, an error reaches the consumer, and one worker means the caller's own thread."""
    import threading
    import time

    from runtime.prefetch import in_order

    both_running = threading.Barrier(2, timeout=10)

    def slow_first(i: int) -> int:
        if i < 2:
            both_running.wait()  # only passes when two calls are in flight together
        if i == 0:
            time.sleep(0.05)  # the second call ends first
        return i * 10

    assert list(in_order(slow_first, range(5), workers=2)) == [0, 10, 20, 30, 40]

    def fails_on_three(i: int) -> int:
        if i == 3:
            raise ValueError("frame 3 is broken")
        return i

    with pytest.raises(ValueError, match="frame 3 is broken"):
        list(in_order(fails_on_three, range(6), workers=2))
    caller = threading.get_ident()
    assert list(in_order(lambda i: threading.get_ident() == caller, range(3), workers=1)) == [True] * 3
    # a control: with one worker the two first calls never overlap, and the barrier breaks
    with pytest.raises(threading.BrokenBarrierError):
        list(in_order(lambda i: threading.Barrier(2, timeout=0.2).wait() if i < 2 else i, range(3), workers=1))


def test_cpu_torch_detector_runs_two_frames_at_once_with_one_thread_each(monkeypatch):
    """With two threads the torch CPU backend runs two frames' detector calls at once, each with one thread (its
    weights packed for that count), the caller's two threads back after; the result is the one-call-at-a-time
    result up to float rounding (labels, scores within 1e-6, masks but for pixels at the threshold). The control:
    ``detector_streams=1`` never overlaps."""
    from runtime import Segmenter
    from runtime.backends.torch_backend import TorchBackend
    from vita_train import load_model

    from .conftest import OFFICIAL_CASES, CallsAtOnce, OfficialCase

    case = OfficialCase(OFFICIAL_CASES[0])
    model = load_model(case.ckpt)
    default = TorchBackend(model, device="cpu")
    assert torch.get_num_threads() == 2 and default.detector_streams == 2
    results, overlap, threads = {}, {}, {}
    for streams in (2, 1):
        backend = default if streams == 2 else TorchBackend(model, device="cpu", detector_streams=1)
        calls = CallsAtOnce(monkeypatch, backend, "_detect")
        results[streams] = runtime.segment(case.frames, Segmenter(backend))
        overlap[streams], threads[streams] = calls.most, calls.threads
        # the backbone's weights were packed for the calls' thread count (a pack for another count is reordered
        # by oneDNN on every call); the key ends with the thread count and the image size
        assert model.backbone.stem.conv1._packed[0][-2] == (1 if streams == 2 else 2)
    assert overlap == {2: 2, 1: 1} and threads == {2: {1}, 1: {2}}
    assert torch.get_num_threads() == 2
    one, two = results[1], results[2]
    assert [i.label for i in two.instances] == [i.label for i in one.instances]
    assert [i.score for i in two.instances] == pytest.approx([i.score for i in one.instances], abs=1e-6)
    # one thread sums in another order than two (1e-6 of the features): a pixel whose logit sits at the
    # threshold may flip (4 of 4.8 million here)
    for a, b in zip(one.instances, two.instances):
        differ = sum(int((a.mask(t) != b.mask(t)).sum()) for t in range(one.num_frames))
        assert differ <= 1e-5 * one.num_frames * one.height * one.width
    with pytest.raises(ValueError, match="detector_streams must be 1 or more"):
        TorchBackend(model, device="cpu", detector_streams=0)
