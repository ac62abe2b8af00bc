"""VideoResult, MaskEncoder and overlay rendering: exact RLE round trips, atomic files, decodable videos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from runtime.render import overlay_frame, pick_codec, render_overlay, save_overlay_png
from runtime.results import Instance, MaskEncoder, VideoResult

from .conftest import assert_imports_without

REPO = Path(__file__).resolve().parents[1]
T, H, W = 6, 48, 64
NAMES = ("person", "dog", "car")


def blob_masks(k: int = 3, t: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """(k, t, h, w) bool: moving discs, a noise instance, and some empty frames."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((k, t, h, w), dtype=bool)
    for i in range(k):
        for f in range(t):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, 12)
            masks[i, f] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    masks[-1] = rng.random((t, h, w)) < 0.3  # noise: many short runs
    masks[0, 1] = False  # empty frames, including a whole-chunk gap
    masks[1, 3:5] = False
    return masks


def make_result(masks: np.ndarray, chunks=(2, 1, 3), **meta) -> VideoResult:
    """A VideoResult built the way the runtime builds one: encoded chunk by chunk."""
    k, t, h, w = masks.shape
    enc = MaskEncoder(k, h, w)
    start = 0
    for n in chunks:
        enc.add(masks[:, start : start + n])
        start += n
    assert start == t
    rles, boxes = enc.finish()
    instances = [
        Instance(label=i, label_name=NAMES[i % len(NAMES)], score=0.9 - 0.1 * i, masks=rles[i], boxes=boxes[i])
        for i in range(k)
    ]
    return VideoResult(instances, height=h, width=w, num_frames=t, class_names=NAMES, **meta)


def frames(t: int = T, h: int = H, w: int = W, seed: int = 1) -> np.ndarray:
    """Random RGB frames."""
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def numpy_box(m: np.ndarray) -> list[float]:
    """[x, y, w, h] of a non-empty mask, as pycocotools computes it."""
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def read_video(path: Path) -> tuple[int, int, int, float]:
    """(frame count, height, width, fps) by decoding every frame."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        n = sum(1 for _ in c.decode(stream))
        return n, stream.height, stream.width, float(stream.average_rate or stream.guessed_rate)


def codec_of(path: Path) -> str:
    """The codec name of the video stream in ``path``."""
    with av.open(str(path)) as c:
        return c.streams.video[0].codec_context.name


# --- masks --------------------------------------------------------------------------------------


def test_mask_encoder_round_trip_is_exact():
    masks = blob_masks()
    result = make_result(masks)
    for i, inst in enumerate(result.instances):
        assert len(inst.masks) == len(inst.boxes) == T
        for t in range(T):
            np.testing.assert_array_equal(inst.mask(t), masks[i, t])
            if masks[i, t].any():
                assert isinstance(inst.masks[t]["counts"], str) and inst.masks[t]["size"] == [H, W]
                assert inst.boxes[t] == numpy_box(masks[i, t])
            else:
                assert inst.masks[t] is None and inst.boxes[t] is None
        assert inst.area() == [int(m.sum()) for m in masks[i]]


def test_mask_encoder_chunking_does_not_change_the_encoding():
    masks = blob_masks(seed=3)
    whole = make_result(masks, chunks=(T,))
    single = make_result(masks, chunks=(1,) * T)
    assert [i.masks for i in whole.instances] == [i.masks for i in single.instances]
    assert [i.boxes for i in whole.instances] == [i.boxes for i in single.instances]


def test_mask_encoder_treats_any_nonzero_as_foreground_and_rejects_bad_chunks():
    masks = blob_masks()[1:2]
    enc = MaskEncoder(1, H, W)
    enc.add(masks.astype(np.uint8) * 255)
    rles, _ = enc.finish()
    for t in range(T):
        assert (rles[0][t] is None) == (not masks[0, t].any())
    with pytest.raises(ValueError, match=r"\(num_instances, t, H, W\)"):
        enc.add(np.zeros((2, 1, H, W), dtype=bool))
    with pytest.raises(ValueError):
        enc.add(np.zeros((1, H, W), dtype=bool))
    with pytest.raises(TypeError, match="threshold"):
        enc.add(np.zeros((1, 1, H, W), dtype=np.float32))


def test_mask_encoder_with_no_instances():
    enc = MaskEncoder(0, H, W)
    enc.add(np.zeros((0, 4, H, W), dtype=bool))
    assert enc.finish() == ([], []) and enc.num_frames == 4


def test_all_empty_instance_decodes_to_zeros_through_the_result():
    masks = blob_masks()
    masks[0] = False
    result = make_result(masks)
    assert result.mask(0, 2).shape == (H, W) and not result.mask(0, 2).any()
    with pytest.raises(ValueError, match="size"):
        result.instances[0].mask(2)


def test_to_ytvis():
    result = make_result(blob_masks())
    entries = result.to_ytvis(video_id=7)
    assert len(entries) == len(result.instances)
    for inst, entry in zip(result.instances, entries):
        assert set(entry) == {"video_id", "score", "category_id", "segmentations"}
        assert entry["video_id"] == 7 and entry["category_id"] == inst.label + 1
        assert entry["score"] == pytest.approx(inst.score)
        assert len(entry["segmentations"]) == T and entry["segmentations"] == inst.masks
    json.dumps(entries)  # the YouTube-VIS evaluator reads it as JSON


# --- save / load --------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    result = make_result(blob_masks(), fps=24.0, source="clip.mp4", truncated=True)
    path = tmp_path / "out" / "result.json"
    result.save(path)
    loaded = VideoResult.load(path)
    assert loaded == result
    np.testing.assert_array_equal(loaded.instances[2].mask(4), result.instances[2].mask(4))
    assert sorted(os.listdir(path.parent)) == ["result.json"]


@pytest.mark.parametrize("content", ["[1, 2]", '{"instances": []}', "not json {", "\x00\xff"])
def test_load_refuses_other_files(tmp_path, content):
    path = tmp_path / "other.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match="not a saved VideoResult"):
        VideoResult.load(path)


def test_load_refuses_a_damaged_result(tmp_path):
    data = make_result(blob_masks()).to_dict()
    del data["instances"][0]["score"]
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="damaged"):
        VideoResult.load(path)


def test_save_failing_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("previous content")
    result = make_result(blob_masks())
    result.instances[1].label_name = object()  # json.dump fails part-way through the file
    with pytest.raises(TypeError):
        result.save(path)
    assert path.read_text() == "previous content"
    assert os.listdir(tmp_path) == ["result.json"]


def test_saved_files_get_the_umask_mode_or_keep_their_own(tmp_path, monkeypatch):
    """A new file gets 0o666 minus the umask (mkstemp's 0o600 otherwise), an existing one keeps its mode; on
    Linux the umask is read, not set to 0 and back (a moment in which other threads' files had none)."""
    before = os.umask(0o027)
    try:
        if Path("/proc/self/status").exists():
            def no_umask(mask):
                raise AssertionError("os.umask called")

            monkeypatch.setattr(os, "umask", no_umask)
        new = tmp_path / "new.json"
        make_result(blob_masks()).save(new)
        assert new.stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.json"
        kept.write_text("")
        kept.chmod(0o600)
        make_result(blob_masks()).save(kept)
        assert kept.stat().st_mode & 0o777 == 0o600
    finally:
        monkeypatch.undo()
        os.umask(before)


def test_save_to_a_folder_says_so_and_leaves_it_untouched(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(IsADirectoryError, match="is a folder; give the path of a file"):
        make_result(blob_masks()).save(tmp_path)
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_save_failing_at_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("previous content")

    def fail(*args):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk went away"):
        make_result(blob_masks()).save(path)
    assert path.read_text() == "previous content"
    assert os.listdir(tmp_path) == ["result.json"]


# --- overlays -----------------------------------------------------------------------------------


def test_overlay_changes_mask_pixels_only():
    masks = blob_masks()
    result = make_result(masks)
    video = frames()
    for t in range(T):
        out = overlay_frame(video[t], result, t, labels=False)
        assert out.shape == (H, W, 3) and out.dtype == np.uint8
        inside = masks[:, t].any(axis=0)
        assert (out[inside] != video[t][inside]).any(axis=-1).all()
        np.testing.assert_array_equal(out[~inside], video[t][~inside])


def test_overlay_colours_are_stable_per_instance_and_labels_are_drawn():
    masks = np.zeros((2, T, H, W), dtype=bool)
    masks[0, :, 5:20, 5:25] = True
    masks[1, :, 30:45, 35:60] = True
    masks[1, 2] = False
    result = make_result(masks)
    grey = np.full((H, W, 3), 100, dtype=np.uint8)
    plain = [overlay_frame(grey, result, t, labels=False, contours=False) for t in range(T)]
    assert all((p[10, 10] == plain[0][10, 10]).all() and (p[40, 50] == plain[0][40, 50]).all() for p in plain[:2])
    assert not (plain[0][10, 10] == plain[0][40, 50]).all()  # distinct colours per instance
    assert (plain[2][40, 50] == 100).all()  # no mask in frame 2: nothing drawn
    labelled = overlay_frame(grey, result, 0)
    outside = ~masks[:, 0].any(axis=0)
    assert (labelled[outside] != 100).any()  # the label tags lie partly outside the masks


def test_save_overlay_png(tmp_path):
    result = make_result(blob_masks())
    video = frames()
    path = tmp_path / "frame3.png"
    save_overlay_png(result, video[3], 3, path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), overlay_frame(video[3], result, 3))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi", ".mov"])
def test_render_writes_a_decodable_video(tmp_path, suffix):
    result = make_result(blob_masks())
    path = tmp_path / f"overlay{suffix}"
    render_overlay(result, iter(frames()), path, fps=12)
    assert read_video(path) == (T, H, W, 12.0)
    assert codec_of(path) == {"libx264": "h264", "mpeg4": "mpeg4"}[pick_codec()]
    assert os.listdir(tmp_path) == [path.name]


def test_render_pads_odd_sizes_and_defaults_fps(tmp_path):
    h, w = 47, 63
    result = make_result(blob_masks(h=h, w=w))
    render_overlay(result, frames(h=h, w=w), tmp_path / "odd.mp4")
    assert read_video(tmp_path / "odd.mp4") == (T, 48, 64, 30.0)
    result.fps = 10.0
    render_overlay(result, frames(h=h, w=w), tmp_path / "odd.mp4", codec="mpeg4")
    assert read_video(tmp_path / "odd.mp4") == (T, 48, 64, 10.0)
    assert codec_of(tmp_path / "odd.mp4") == "mpeg4"


def test_render_from_a_frame_folder_and_a_video_file(tmp_path):
    result = make_result(blob_masks())
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(frames()):
        Image.fromarray(frame).save(folder / f"{t}.png")  # 10.png would sort after 2.png
    result.render(tmp_path / "a.mkv", folder, fps=8)
    assert read_video(tmp_path / "a.mkv") == (T, H, W, 8.0)
    result.render(tmp_path / "b.mp4", tmp_path / "a.mkv")
    assert read_video(tmp_path / "b.mp4")[:3] == (T, H, W)


@pytest.mark.parametrize("n", [T - 2, T + 3])
def test_render_refuses_a_frame_count_mismatch(tmp_path, n):
    result = make_result(blob_masks())
    path = tmp_path / "overlay.mp4"
    with pytest.raises(ValueError, match=f"the video has {n} frames but the result covers {T}"):
        render_overlay(result, frames(t=n), path)
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        render_overlay(result, frames(t=n), path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["overlay.mp4"]


def test_render_refuses_a_frame_size_mismatch(tmp_path):
    result = make_result(blob_masks())
    with pytest.raises(ValueError, match=f"50x{W} \\(HxW\\) but the result is {H}x{W}"):
        render_overlay(result, frames(h=50), tmp_path / "overlay.mp4")
    with pytest.raises(ValueError, match="suffix|container"):
        render_overlay(result, frames(), tmp_path / "overlay.gif")
    assert os.listdir(tmp_path) == []


def test_truncated_result_renders_on_its_frames_only(tmp_path):
    result = make_result(blob_masks(), truncated=True)
    render_overlay(result, frames(t=T + 4), tmp_path / "overlay.mp4", fps=5)
    assert read_video(tmp_path / "overlay.mp4")[0] == T


def test_codec_is_h264_or_mpeg4():
    assert pick_codec() in ("libx264", "mpeg4")


def test_results_and_render_import_without_torch():
    assert_imports_without(["runtime.results", "runtime.render"])
