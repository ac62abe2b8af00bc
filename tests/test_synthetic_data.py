"""Synthetic VIS data: YouTube-VIS and COCO files on disk, their consistency, determinism, argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from vita_train.data.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticDatasetPaths,
    SyntheticTargetError,
    moving_shapes_clip,
    write_synthetic_dataset,
)

SMALL = {"num_videos": 6, "num_frames": 8, "height": 48, "width": 64, "coco_images": 8}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> SyntheticDatasetPaths:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), seed=3, **SMALL)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _check_image(path: Path, height: int, width: int) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "JPEG"
        assert im.size == (width, height) and im.mode == "RGB"
        im.load()


def test_ytvis_files_consistent(dataset):
    gt = json.loads(dataset.ytvis_json.read_text())
    assert [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])] == list(SYNTHETIC_CLASSES)
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3, 4]
    videos = {v["id"]: v for v in gt["videos"]}
    assert sorted(videos) == list(range(1, SMALL["num_videos"] + 1))
    for v in videos.values():
        assert (v["height"], v["width"], v["length"]) == (SMALL["height"], SMALL["width"], SMALL["num_frames"])
        assert len(v["file_names"]) == v["length"]
        for name in v["file_names"]:
            _check_image(dataset.ytvis_frames / name, v["height"], v["width"])

    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"]) > 0
    absent = 0
    union: dict[tuple[int, int], np.ndarray] = {}
    for a in gt["annotations"]:
        v = videos[a["video_id"]]
        h, w, length = v["height"], v["width"], v["length"]
        assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 4
        assert (a["height"], a["width"], a["length"]) == (h, w, length)
        assert len(a["segmentations"]) == len(a["areas"]) == len(a["bboxes"]) == length
        assert any(s is not None for s in a["segmentations"])
        for t, (seg, area, box) in enumerate(zip(a["segmentations"], a["areas"], a["bboxes"])):
            if seg is None:
                assert area is None and box is None
                absent += 1
                continue
            assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
            mask = mask_util.decode(seg).astype(bool)
            assert mask.shape == (h, w)
            assert isinstance(area, int) and area == mask.sum() > 0
            assert box == _bbox(mask)
            seen = union.setdefault((a["video_id"], t), np.zeros((h, w), dtype=bool))
            assert not (seen & mask).any(), "visible masks of two instances overlap"
            seen |= mask
    assert absent > 0, "no instance appears late, leaves early or is fully hidden anywhere"


def test_coco_files_consistent(dataset):
    coco = json.loads(dataset.coco_json.read_text())
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CLASSES)
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == SMALL["coco_images"]
    for im in images.values():
        _check_image(dataset.coco_images / im["file_name"], im["height"], im["width"])
    kinds = {"polygon": 0, "rle": 0}
    union: dict[int, np.ndarray] = {}
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        h, w = im["height"], im["width"]
        assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 4
        seg = a["segmentation"]
        if isinstance(seg, list):
            kinds["polygon"] += 1
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in seg)
            rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
        else:
            kinds["rle"] += 1
            assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
            rle = seg
        mask = mask_util.decode(rle).astype(bool)
        assert mask.shape == (h, w)
        assert a["area"] == mask.sum() > 0
        assert a["bbox"] == _bbox(mask)
        seen = union.setdefault(a["image_id"], np.zeros((h, w), dtype=bool))
        assert not (seen & mask).any()
        seen |= mask
    assert kinds["polygon"] > 0 and kinds["rle"] > 0, kinds


def test_deterministic_and_split_dependent(tmp_path):
    args = {"num_videos": 3, "num_frames": 4, "height": 32, "width": 40, "coco_images": 2}
    a = write_synthetic_dataset(tmp_path / "a", seed=7, **args)
    b = write_synthetic_dataset(tmp_path / "b", seed=7, **args)
    val = write_synthetic_dataset(tmp_path / "a", seed=7, split="val", **args)
    assert a.ytvis_json.read_bytes() == b.ytvis_json.read_bytes()
    assert a.coco_json.read_bytes() == b.coco_json.read_bytes()
    frame = "video_00001/00000.jpg"
    assert (a.ytvis_frames / frame).read_bytes() == (b.ytvis_frames / frame).read_bytes()
    assert json.loads(a.ytvis_json.read_text())["annotations"] != json.loads(val.ytvis_json.read_text())["annotations"]
    assert (a.ytvis_frames / frame).read_bytes() != (val.ytvis_frames / frame).read_bytes()
    assert val.ytvis_json == tmp_path / "a" / "val" / "instances.json"


def test_no_coco_by_default(tmp_path):
    paths = write_synthetic_dataset(tmp_path, num_videos=1, num_frames=1, height=32, width=32)
    assert paths.coco_json is None and paths.coco_images is None
    assert not (tmp_path / "train" / "coco").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_videos": 0}, "num_videos"),
        ({"height": 16}, "height"),
        ({"width": 31}, "width"),
        ({"seed": -1}, "seed"),
        ({"coco_images": -2}, "coco_images"),
        ({"num_frames": 2.5}, "num_frames must be an integer"),
        ({"split": "../x"}, "split"),
        ({"split": ""}, "split"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written before the arguments are checked"


def test_moving_shapes_clip_shape():
    clip = moving_shapes_clip(5, 40, 56, seed=1)
    assert clip.shape == (5, 40, 56, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, moving_shapes_clip(5, 40, 56, seed=1))
    assert moving_shapes_clip(1, 8, 8).shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match="frame"):
        moving_shapes_clip(0, 40, 56)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--videos", "0"], "error: --videos must be >= 1, got 0"),
        (["--split", "a/b"], "error: --split must be a plain directory name"),
        (["--coco-images", "-1"], "error: --coco-images must be >= 0"),
    ],
)
def test_cli_bad_flag_is_named(tmp_path, capsys, args, message):
    """``synth`` with a flag out of range exits 2 naming the flag, not the Python parameter, and writes nothing."""
    from vita_train.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--out", str(tmp_path / "ds"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "ds").exists()


def test_synth_never_writes_over_a_dataset_it_did_not_write(tmp_path, capsys):
    """A split folder holding the user's own dataset (another instances.json, other frame folders, other files)
    is refused with one error naming them, every file left as it was; a synthetic split written before is
    rewritten alike (the same files for the same arguments), also after an interrupted run left frames only."""
    from vita_train.__main__ import main

    args = {"num_videos": 2, "num_frames": 2, "height": 32, "width": 40}
    first = write_synthetic_dataset(tmp_path / "ds", seed=3, **args).ytvis_json.read_bytes()
    assert write_synthetic_dataset(tmp_path / "ds", seed=3, **args).ytvis_json.read_bytes() == first
    (tmp_path / "ds" / "train" / "instances.json").unlink()  # as an interrupted run leaves it: frames, no json
    assert write_synthetic_dataset(tmp_path / "ds", seed=3, **args).ytvis_json.read_bytes() == first

    theirs = tmp_path / "mine" / "train"
    (theirs / "JPEGImages" / "0a1b2c").mkdir(parents=True)
    (theirs / "JPEGImages" / "0a1b2c" / "00000.jpg").write_bytes(b"a frame of mine")
    own = json.dumps({"videos": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]})
    (theirs / "instances.json").write_text(own)
    with pytest.raises(SyntheticTargetError, match=r"instances.json.*nothing was written"):
        write_synthetic_dataset(tmp_path / "mine", **args)
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--out", str(tmp_path / "mine"), "--videos", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "did not write (JPEGImages/0a1b2c, instances.json)" in err, err
    assert "Traceback" not in err
    assert (theirs / "instances.json").read_text() == own
    assert sorted(p.name for p in (theirs / "JPEGImages").iterdir()) == ["0a1b2c"]
    (theirs / "notes.txt").write_text("x")
    (theirs / "instances.json").unlink()
    with pytest.raises(SyntheticTargetError, match="JPEGImages/0a1b2c, notes.txt"):
        write_synthetic_dataset(tmp_path / "mine", **args)
