"""Training data pipeline: records, category maps, clip augmentation, clips and the resumable loader."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from vita_train.data.augment import AugmentConfig, sample_clip_transform
from vita_train.data.category_maps import COCO_TO_OVIS, COCO_TO_YTVIS_2019, COCO_TO_YTVIS_2021, coco_category_map
from vita_train.data.clips import ImageClipSource, SampleError, VideoClipSource, sample_frame_indices
from vita_train.data.loader import MixedClipDataset, StepSampler, build_train_loader, collate_clips
from vita_train.data.records import DatasetError, load_coco, load_ytvis

H, W = 96, 128
RED = (250, 20, 20)


def _square(y0: int, x0: int, size: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[max(0, y0):max(0, y0 + size), max(0, x0):max(0, x0 + size)] = 1
    return m


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = int(v), 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def _background(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(90, 140, size=(H, W, 3), dtype=np.uint8)


def _write_ytvis(root: Path) -> tuple[Path, Path]:
    """Two videos: v1 (6 PNG frames, RLE tracks, one entering late), v2 (4 JPEG frames, a polygon track)."""
    img_root = root / "frames"
    videos, anns = [], []
    for vid, (length, ext) in {1: (6, "png"), 2: (4, "jpg")}.items():
        names = []
        for t in range(length):
            img = _background(10 * vid + t)
            img[10 + 4 * t:30 + 4 * t, 20 + 5 * t:40 + 5 * t] = RED
            rel = f"v{vid}/{t:05d}.{ext}"
            (img_root / f"v{vid}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(img_root / rel)
            names.append(rel)
        videos.append({"id": vid, "file_names": names, "height": H, "width": W, "length": length})
    anns.append({"id": 11, "video_id": 1, "category_id": 1, "iscrowd": 0,
                 "segmentations": [_rle(_square(10 + 4 * t, 20 + 5 * t, 20)) for t in range(6)]})
    late = [None, None] + [_uncompressed_rle(_square(60, 80 - 3 * t, 16)) for t in range(2, 6)]
    anns.append({"id": 12, "video_id": 1, "category_id": 2, "iscrowd": 0, "segmentations": late})
    poly = [[[50.0 + t, 40.0, 90.0 + t, 40.0, 90.0 + t, 80.0, 50.0 + t, 80.0]] for t in range(4)]
    anns.append({"id": 21, "video_id": 2, "category_id": 3, "iscrowd": 0, "segmentations": poly})
    data = {"videos": videos, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    path = root / "ytvis.json"
    path.write_text(json.dumps(data))
    return path, img_root


def _write_coco(root: Path) -> tuple[Path, Path]:
    """Two images with a red square (person, RLE), a green polygon (car) and an unmapped fire hydrant."""
    img_root = root / "coco"
    img_root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for iid in (1, 2):
        img = _background(100 + iid)
        img[20:50, 30:60] = RED
        img[55:85, 80:110] = (20, 240, 20)
        img[5:15, 100:120] = (20, 20, 240)
        Image.fromarray(img).save(img_root / f"{iid:06d}.png")
        images.append({"id": iid, "file_name": f"{iid:06d}.png", "height": H, "width": W})
        anns.append({"id": 100 * iid + 1, "image_id": iid, "category_id": 1, "iscrowd": 0, "area": 900.0,
                     "segmentation": _rle(_square(20, 30, 30))})
        anns.append({"id": 100 * iid + 2, "image_id": iid, "category_id": 3, "iscrowd": 0, "area": 900.0,
                     "segmentation": [[80.0, 55.0, 110.0, 55.0, 110.0, 85.0, 80.0, 85.0]]})
        anns.append({"id": 100 * iid + 3, "image_id": iid, "category_id": 11, "iscrowd": 0, "area": 200.0,
                     "segmentation": _rle(_square(5, 100, 10))})
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 11, "name": "fire hydrant"}]
    path = root / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, img_root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_ytvis(root)
    _write_coco(root)
    return root


@pytest.fixture(scope="module")
def video_ds(data_dir):
    return load_ytvis(data_dir / "ytvis.json", data_dir / "frames", name="ytvis")


@pytest.fixture(scope="module")
def coco_ds(data_dir):
    return load_coco(data_dir / "coco.json", data_dir / "coco", name="coco",
                     category_map=coco_category_map("ytvis_2019"))


@pytest.fixture(scope="module")
def mixed(video_ds, coco_ds) -> MixedClipDataset:
    sources = [ImageClipSource(coco_ds, 3, AugmentConfig.small()),
               VideoClipSource(video_ds, 3, 2, AugmentConfig.small())]
    return MixedClipDataset(sources, [1.0, 0.75], seed=3)


def _edit_json(src: Path, dst: Path, fn) -> Path:
    data = json.loads(src.read_text())
    fn(data)
    dst.write_text(json.dumps(data))
    return dst


def _check_contract(clip: dict, num_frames: int, num_classes: int) -> None:
    images, labels, ids, masks = clip["images"], clip["labels"], clip["ids"], clip["masks"]
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[:2] == (num_frames, 3)
    h, w = images.shape[2:]
    g = labels.shape[0]
    assert labels.dtype == torch.int64 and labels.shape == (g,)
    assert ids.dtype == torch.int64 and ids.shape == (g, num_frames)
    assert masks.dtype == torch.bool and masks.shape == (g, num_frames, h, w)
    assert isinstance(clip["source"], str) and clip["source"]
    nonempty = masks.flatten(2).any(2)
    assert torch.equal(ids == -1, ~nonempty)  # -1 exactly where the mask is empty
    assert bool((ids >= 0).any(1).all())  # no instance invisible in every frame
    assert bool(((labels >= 0) & (labels < num_classes)).all())


# ------------------------------------------------------------------------------------------------
# records and category maps
# ------------------------------------------------------------------------------------------------


def test_load_records(video_ds, coco_ds):
    assert [v.video_id for v in video_ds.videos] == [1, 2]
    v1 = video_ds.videos[0]
    assert v1.length == 6 and (v1.height, v1.width) == (H, W)
    assert [i.ann_id for i in v1.instances] == [11, 12] and [i.label for i in v1.instances] == [0, 1]
    assert v1.instances[1].segmentations[:2] == (None, None)
    assert video_ds.class_names == ("a", "b", "c")
    assert video_ds.videos[1].instances[0].label == 2  # the polygon track


def test_coco_to_ytvis_mapping_drops_unmapped(coco_ds):
    for rec in coco_ds.images:
        assert [i.ann_id % 100 for i in rec.instances] == [1, 2]  # fire hydrant (11) dropped
        assert [i.label for i in rec.instances] == [0, 5]  # person -> 0, car -> sedan (id 6) -> 5
    assert len(COCO_TO_YTVIS_2019) == 21 and len(COCO_TO_YTVIS_2021) == 23 and len(COCO_TO_OVIS) == 17
    assert coco_category_map("ovis")[8] == 24 and coco_category_map("ytvis_2021_train")[1] == 25
    sub = coco_category_map("ytvis_2019", [{"id": 6}, {"id": 1}])
    assert sub == {1: 1, 3: 0}


# ------------------------------------------------------------------------------------------------
# clips
# ------------------------------------------------------------------------------------------------


def test_frame_sampling():
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = sample_frame_indices(30, 5, 3, rng)
        assert idx == sorted(idx) and len(idx) == 5 and max(idx) - min(idx) <= 6
        assert all(0 <= i < 30 for i in idx)
    assert sample_frame_indices(1, 4, 20, rng) == [0, 0, 0, 0]


def test_clip_contract(video_ds, coco_ds):
    vsrc = VideoClipSource(video_ds, 4, 3, AugmentConfig.small())
    csrc = ImageClipSource(coco_ds, 3, AugmentConfig.small())
    for seed in range(6):
        clip = vsrc.make_clip(seed % 2, np.random.default_rng(seed))
        _check_contract(clip, 4, 3)
        assert clip["source"].startswith(f"ytvis:video {seed % 2 + 1} frames [")
        clip = csrc.make_clip(seed % 2, np.random.default_rng(seed))
        _check_contract(clip, 3, 40)
        assert clip["source"] == f"coco:image {seed % 2 + 1}"
        assert set(clip["ids"].flatten().tolist()) <= {-1, 0, 1}


def test_identity_clip_matches_annotation(video_ds):
    clip = VideoClipSource(video_ds, 6, 5, AugmentConfig.identity()).make_clip(0, np.random.default_rng(1))
    assert clip["images"].shape == (6, 3, H, W)
    frames = [int(s) for s in clip["source"].split("[")[1].rstrip("]").split(",")]
    late = clip["ids"][1]  # track 12 is absent from frames 0 and 1
    for t, f in enumerate(frames):
        assert clip["ids"][0, t] == 11
        assert late[t] == (12 if f >= 2 else -1)
        assert torch.equal(clip["masks"][0, t], torch.from_numpy(_square(10 + 4 * f, 20 + 5 * f, 20).astype(bool)))


# ------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------


def test_flip_moves_image_and_mask_together():
    img = _background(5)
    img[20:50, 10:40] = RED
    mask = _square(20, 10, 30).astype(bool)[None]
    cfg = AugmentConfig.small()
    plain = sample_clip_transform(H, W, 2, replace(cfg, flip_prob=0.0), np.random.default_rng(4))
    flip = sample_clip_transform(H, W, 2, replace(cfg, flip_prob=1.0), np.random.default_rng(4))
    assert flip.flipped and not plain.flipped
    for fp, ff in zip(plain.frames, flip.frames):
        ip, if_ = fp.apply_image(img), ff.apply_image(img)
        mp, mf = fp.apply_masks(mask)[0], ff.apply_masks(mask)[0]
        np.testing.assert_array_equal(if_, ip[:, ::-1])
        w = mp.shape[1]
        cx_p, cx_f = np.nonzero(mp)[1].mean(), np.nonzero(mf)[1].mean()
        assert abs(cx_f - (w - 1 - cx_p)) < 1e-6 and cx_p < w / 2 < cx_f


def test_rotation_keeps_masks_on_content(coco_ds):
    src = ImageClipSource(coco_ds, 4, AugmentConfig.small())
    saw_rotation = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        tf = sample_clip_transform(H, W, 4, src.augment, np.random.default_rng(seed), pseudo=True)
        saw_rotation += sum(abs(f.ops[-1].angle) > 2 for f in tf.frames)
        clip = src.make_clip(0, rng)
        red_row = int((clip["labels"] == 0).nonzero()[0, 0])
        for t in range(4):
            img = clip["images"][t].permute(1, 2, 0).numpy().astype(np.int32)
            red = (np.abs(img - np.array(RED)).sum(-1) < 40)
            mask = clip["masks"][red_row, t].numpy()
            if not mask.any():
                assert not red.any()
                continue
            dil = np.zeros_like(mask)
            ero = mask.copy()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    shifted = np.roll(np.roll(mask, dy, 0), dx, 1)
                    dil |= shifted
                    ero &= shifted
            assert not (red & ~dil).any()  # every clearly red pixel lies on the (dilated) mask
            assert red[ero].mean() > 0.97  # the mask's interior is red
    assert saw_rotation > 0


# ------------------------------------------------------------------------------------------------
# loader: determinism, resume, DDP, mixing
# ------------------------------------------------------------------------------------------------


def _same_batches(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        assert [c["source"] for c in ba] == [c["source"] for c in bb]
        for ca, cb in zip(ba, bb):
            for key in ("images", "labels", "ids", "masks"):
                assert torch.equal(ca[key], cb[key]), key


def _take(loader, n: int) -> list[list[dict]]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it
    return out


def test_same_index_same_clip(mixed):
    a, b = mixed[7], mixed[7]
    _same_batches([[a]], [[b]])
    assert collate_clips([a, b]) == [a, b]


def test_worker_count_does_not_change_batches(mixed):
    ref = _take(build_train_loader(mixed, 2, num_workers=0), 3)
    par = _take(build_train_loader(mixed, 2, num_workers=2), 3)
    _same_batches(ref, par)


def test_resume_reproduces_stream(mixed):
    full = _take(build_train_loader(mixed, 2, start_step=0), 8)
    resumed = _take(build_train_loader(mixed, 2, start_step=5), 3)
    _same_batches(full[5:], resumed)


def test_ddp_ranks_disjoint():
    seen: set[int] = set()
    for rank in range(4):
        sampler = iter(StepSampler(0, 3, rank, 4))
        idx = [i for _ in range(10) for i in next(sampler)]
        assert not seen & set(idx)
        seen |= set(idx)
    assert seen == set(range(4 * 3 * 10))  # and together they cover every index once
    assert next(iter(StepSampler(5, 3, 1, 4))) == [5 * 12 + 3, 5 * 12 + 4, 5 * 12 + 5]


def test_mixing_ratio(mixed):
    picks = np.array([mixed.choose(i)[0] for i in range(4000)])
    assert abs((picks == 0).mean() - 1.0 / 1.75) < 0.03


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def test_missing_json_and_unreadable_json(tmp_path):
    with pytest.raises(DatasetError, match="nope.json"):
        load_ytvis(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json"):
        load_coco(bad, tmp_path)


def test_missing_image_file(data_dir, tmp_path):
    json_path = _edit_json(data_dir / "ytvis.json", tmp_path / "y.json",
                           lambda d: d["videos"][1]["file_names"].__setitem__(2, "v2/gone.jpg"))
    with pytest.raises(DatasetError, match=r"1 of 10 image files are missing.*v2/gone\.jpg"):
        load_ytvis(json_path, data_dir / "frames")


def test_unknown_category_and_video(data_dir, tmp_path):
    json_path = _edit_json(data_dir / "ytvis.json", tmp_path / "c.json",
                           lambda d: d["annotations"][1].__setitem__("category_id", 99))
    with pytest.raises(DatasetError, match=r"annotation 12 .*category_id 99"):
        load_ytvis(json_path, data_dir / "frames")
    json_path = _edit_json(data_dir / "ytvis.json", tmp_path / "v.json",
                           lambda d: d["annotations"][2].__setitem__("video_id", 7))
    with pytest.raises(DatasetError, match=r"annotation 21 refers to video id 7"):
        load_ytvis(json_path, data_dir / "frames")
    json_path = _edit_json(data_dir / "coco.json", tmp_path / "cc.json",
                           lambda d: d["annotations"][0].__setitem__("category_id", 5))
    with pytest.raises(DatasetError, match=r"cc\.json: annotation 101 \(image 1\) has category_id 5"):
        load_coco(json_path, data_dir / "coco")


def test_segmentation_count_mismatch(data_dir, tmp_path):
    json_path = _edit_json(data_dir / "ytvis.json", tmp_path / "n.json",
                           lambda d: d["annotations"][0]["segmentations"].pop())
    with pytest.raises(DatasetError, match=r"annotation 11 has 5 segmentations but video 1 has 6 frames"):
        load_ytvis(json_path, data_dir / "frames")


def test_empty_mask_skipped_or_strict(data_dir, tmp_path, caplog):
    def blank(d):
        d["annotations"][1]["segmentations"] = [None, None, [], None, {"size": [H, W], "counts": [H * W]}, None]

    json_path = _edit_json(data_dir / "ytvis.json", tmp_path / "e.json", blank)
    with caplog.at_level(logging.WARNING, logger="vita_train.data.records"):
        ds = load_ytvis(json_path, data_dir / "frames")
    assert [i.ann_id for i in ds.videos[0].instances] == [11]
    assert any("annotation 12" in r.getMessage() and "e.json" in r.getMessage() for r in caplog.records)
    with pytest.raises(DatasetError, match=r"annotation 12 \(video 1\) has no non-empty mask"):
        load_ytvis(json_path, data_dir / "frames", strict=True)

    json_path = _edit_json(data_dir / "coco.json", tmp_path / "ce.json",
                           lambda d: d["annotations"][3].__setitem__("segmentation", []))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vita_train.data.records"):
        ds = load_coco(json_path, data_dir / "coco")
    assert [i.ann_id for i in ds.images[1].instances] == [202, 203]
    assert any("annotation 201" in r.getMessage() for r in caplog.records)
    with pytest.raises(DatasetError, match="annotation 201"):
        load_coco(json_path, data_dir / "coco", strict=True)


def test_corrupt_frame_is_skipped_with_warning(data_dir, tmp_path, caplog):
    frames = tmp_path / "frames"
    for src in (data_dir / "frames").rglob("*.*"):
        dst = frames / src.relative_to(data_dir / "frames")
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        dst.write_bytes(data[:300] if src.parent.name == "v2" else data)  # every v2 frame truncated
    ds = load_ytvis(data_dir / "ytvis.json", frames)  # files exist: the damage shows only when decoding
    src = VideoClipSource(ds, 2, 2, AugmentConfig.small())
    with pytest.raises(SampleError, match=r"video 2 frame \d .*v2/0000\d\.jpg"):
        src.make_clip(1, np.random.default_rng(0))

    mixed = MixedClipDataset([src], seed=0)
    index = next(i for i in range(100) if mixed.choose(i)[1] == 1)
    with caplog.at_level(logging.WARNING, logger="vita_train.data.loader"):
        clip = mixed[index]
    _check_contract(clip, 2, 3)
    assert clip["source"].startswith("ytvis:video 1 ")
    assert any("v2/0000" in r.getMessage() and "video 2" in r.getMessage() for r in caplog.records)

    bad_src = VideoClipSource(replace(ds, videos=ds.videos[1:]), 2, 2, AugmentConfig.small())
    only_bad = MixedClipDataset([bad_src], seed=0, max_attempts=3)
    with pytest.raises(DatasetError, match="3 consecutive items"):
        only_bad[0]


def test_clip_with_no_instance_left_is_valid():
    """A crop can remove every instance: the clip then has G = 0 and keeps its frames."""
    from vita_train.data.clips import assemble_clip

    frames = [np.zeros((8, 10, 3), np.uint8)] * 3
    clip = assemble_clip(frames, [np.zeros((0, 8, 10), bool)] * 3, [[], [], []], [], [], "test")
    assert clip["images"].shape == (3, 3, 8, 10)
    assert clip["labels"].shape == (0,) and clip["ids"].shape == (0, 3) and clip["masks"].shape == (0, 3, 8, 10)


def test_labels_follow_category_ids_not_list_order(data_dir, tmp_path):
    """Categories listed out of id order keep label = id - 1 (results report label + 1); ids not 1..K are refused."""
    src = json.loads((data_dir / "ytvis.json").read_text())
    gt = copy.deepcopy(src)
    gt["categories"] = gt["categories"][::-1]
    (tmp_path / "reversed.json").write_text(json.dumps(gt))
    ds = load_ytvis(tmp_path / "reversed.json", data_dir / "frames")
    cat_of = {a["id"]: a["category_id"] for a in src["annotations"]}
    assert all(inst.label == cat_of[inst.ann_id] - 1 for v in ds.videos for inst in v.instances)
    assert ds.class_names == tuple(c["name"] for c in sorted(src["categories"], key=lambda c: c["id"]))

    for c in gt["categories"]:
        c["id"] += 1
    for a in gt["annotations"]:
        a["category_id"] += 1
    (tmp_path / "shifted.json").write_text(json.dumps(gt))
    with pytest.raises(DatasetError, match=r"shifted.json: category ids are \[2, 3, 4\].*must be 1..K"):
        load_ytvis(tmp_path / "shifted.json", data_dir / "frames")


def _set(*keys, value):
    """A JSON edit setting data[k0][k1]...[kn] = value."""
    def edit(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


@pytest.mark.parametrize(
    "source, edit, message",
    [
        ("ytvis", _set("videos", 0, "id", value="v1"), r"entry #0 of 'videos': 'id' must be an integer, got 'v1'"),
        ("ytvis", _set("annotations", 0, "video_id", value=1.7), r"annotation 11: 'video_id' must be an integer"),
        ("ytvis", _set("videos", 1, "length", value="four"), r"video 2: 'length' must be an integer, got 'four'"),
        ("ytvis", _set("annotations", 2, "category_id", value="c"), r"annotation 21 \(video 2\): 'category_id'"),
        ("ytvis", _set("annotations", 1, "id", value=None), r"annotation #1: 'id' must be an integer, got None"),
        ("ytvis", _set("annotations", 0, "segmentations", 2, "size", value=None),
         r"annotation 11 \(video 1\) frame 2: RLE 'size' must be \[height, width\], got None"),
        ("ytvis", _set("annotations", 2, "segmentations", 1, 0, 3, value="40"),
         r"annotation 21 \(video 2\) frame 1: 'segmentation polygon coordinate' must be a number, got '40'"),
        ("ytvis", _set("videos", 0, "file_names", 3, value=5), r"video 1: 'file_names' entries must be non-empty"),
        ("ytvis", _set("videos", 0, "height", value="tall"), r"video 1: 'height' must be an integer, got 'tall'"),
        ("coco", _set("images", 1, "id", value="2"), r"entry #1 of 'images': 'id' must be an integer, got '2'"),
        ("coco", _set("annotations", 0, "image_id", value="x"), r"annotation 101: 'image_id' must be an integer"),
        ("coco", _set("annotations", 4, "area", value="big"), r"annotation 202 \(image 2\): 'area' must be a number"),
        ("coco", _set("images", 0, "file_name", value=3), r"image 1: 'file_name' entries must be non-empty"),
        # a polygon not wrapped in its list read as no polygon at all: an empty mask, trained on silently
        ("ytvis", _set("annotations", 2, "segmentations", 1, value=[10, 10, 40, 10, 40, 40]),
         r"annotation 21 \(video 2\) frame 1: segmentation is a flat list of 6 coordinates"),
    ],
)
def test_wrong_typed_field_names_file_entry_and_field(data_dir, tmp_path, source, edit, message):
    """A field of the wrong JSON type is a DatasetError naming the file, the entry and the field."""
    json_path = _edit_json(data_dir / f"{source}.json", tmp_path / "typed.json", edit)
    load = load_ytvis if source == "ytvis" else load_coco
    with pytest.raises(DatasetError, match=r"typed\.json: " + message):
        load(json_path, data_dir / ("frames" if source == "ytvis" else "coco"))
