"""The YouTube-VIS evaluator against the official evaluator's numbers, hand-made cases and bad inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.conftest import require_shared
from vita_train.evaluation import STAT_NAMES, EvaluationError, evaluate_ytvis
from vita_train.evaluation.video_iou import build_track, video_iou


@pytest.mark.parametrize("case", ["easy", "hard", "edge"])
def test_matches_official_fixture(case: str) -> None:
    folder = require_shared("fixtures", "ytvis_eval", case)
    expected = json.loads((folder / "expected_stats.json").read_text())
    assert tuple(expected["names"]) == STAT_NAMES
    stats = evaluate_ytvis(folder / "gt.json", folder / "results.json")
    assert tuple(stats) == STAT_NAMES
    deviations = {name: abs(stats[name] - want) for name, want in zip(STAT_NAMES, expected["stats"])}
    assert max(deviations.values()) <= 1e-9, deviations


# ---------------------------------------------------------------------------------- a tiny hand-made set


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _box(h: int, w: int, y: int, x: int, bh: int, bw: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y : y + bh, x : x + bw] = True
    return m


def _tiny() -> tuple[dict, list]:
    """Two videos, two categories, one object absent from a frame; predictions equal to the GT."""
    tracks = {  # (annotation id, video id, category id): per-frame masks
        (11, 7, 1): [_box(48, 64, 4, 2 + 6 * t, 12, 14) for t in range(4)],
        (12, 7, 2): [_box(48, 64, 30, 40 - 5 * t, 10, 16) for t in range(4)],
        (13, 3, 1): [None] + [_box(32, 32, 2 * t, 3, 9, 9) for t in range(1, 3)],
    }
    videos = [
        {"id": 7, "height": 48, "width": 64, "length": 4, "file_names": [f"7/{t}.jpg" for t in range(4)]},
        {"id": 3, "height": 32, "width": 32, "length": 3, "file_names": [f"3/{t}.jpg" for t in range(3)]},
    ]
    annotations, results = [], []
    for (ann_id, video_id, cat_id), masks in tracks.items():
        segs = [None if m is None else _rle(m) for m in masks]
        annotations.append({
            "id": ann_id, "video_id": video_id, "category_id": cat_id, "iscrowd": 0, "segmentations": segs,
            "areas": [None if m is None else int(m.sum()) for m in masks], "bboxes": [None] * len(masks),
        })  # fmt: skip
        results.append({"video_id": video_id, "category_id": cat_id, "score": 0.9, "segmentations": segs})
    gt = {"videos": videos, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": annotations}
    return gt, results


def _write(tmp_path: Path, gt: dict, results: list) -> tuple[Path, Path]:
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    return gt_path, res_path


def test_perfect_predictions(tmp_path: Path) -> None:
    gt, results = _tiny()
    stats = evaluate_ytvis(*_write(tmp_path, gt, results))
    # one TP gives precision 1 / (1 + eps), hence approx
    assert stats["AP"] == pytest.approx(1.0, abs=1e-12)
    assert stats["AR100"] == pytest.approx(1.0, abs=1e-12)
    assert stats["APs"] == pytest.approx(1.0, abs=1e-12)
    assert stats["APm"] == stats["APl"] == stats["ARm"] == stats["ARl"] == -1.0
    # already-loaded objects give the same numbers as the files, and are left as they were
    before = copy.deepcopy((gt, results))
    assert evaluate_ytvis(gt, results) == stats
    assert (gt, results) == before


def test_shifted_frames_lower_ap(tmp_path: Path) -> None:
    gt, results = _tiny()
    shifted = copy.deepcopy(results)
    segs = shifted[0]["segmentations"]
    shifted[0]["segmentations"] = [None] + segs[:-1]  # one frame late
    perfect = evaluate_ytvis(gt, results)
    worse = evaluate_ytvis(*_write(tmp_path, gt, shifted))
    assert worse["AP"] < perfect["AP"]
    assert worse["AR100"] < perfect["AR100"]


def test_empty_results_score_zero() -> None:
    gt, _ = _tiny()
    stats = evaluate_ytvis(gt, [])
    assert stats["AP"] == stats["AR100"] == stats["APs"] == 0.0
    assert stats["APm"] == -1.0


def test_uncompressed_rle_and_polygons_match_compressed() -> None:
    gt, results = _tiny()
    reference = evaluate_ytvis(gt, results)
    uncompressed = copy.deepcopy(results)
    for r in uncompressed:
        for i, seg in enumerate(r["segmentations"]):
            if seg is not None:
                flat = mask_utils.decode(seg).flatten(order="F")
                edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
                bounds = np.concatenate([[0], edges, [flat.size]])
                counts = np.diff(bounds).tolist()
                r["segmentations"][i] = {"size": seg["size"], "counts": ([0] if flat[0] else []) + counts}
    assert evaluate_ytvis(gt, uncompressed) == reference

    # a polygon GT is rasterised at the video's size, exactly as its RLE would be
    poly = [[10.0, 10.0, 30.0, 10.0, 30.0, 25.0, 10.0, 25.0]]
    poly_rle = mask_utils.merge(mask_utils.frPyObjects(poly, 48, 64))
    poly_rle = {"size": poly_rle["size"], "counts": poly_rle["counts"].decode("ascii")}
    as_poly, as_rle = copy.deepcopy(gt), copy.deepcopy(gt)
    as_poly["annotations"][0]["segmentations"][1] = poly
    as_rle["annotations"][0]["segmentations"][1] = poly_rle
    assert evaluate_ytvis(as_poly, results) == evaluate_ytvis(as_rle, results)


def test_interval_iou_matches_dense_masks() -> None:
    rng = np.random.default_rng(0)
    h, w, length = 37, 53, 3

    def random_track(ann_id: int) -> tuple:
        frames, dense = [], []
        for t in range(length):
            kind = (ann_id + t) % 5
            m = np.zeros((h, w), dtype=bool)
            if kind == 1:
                m = rng.random((h, w)) < rng.random()  # many short runs
            elif kind == 2:
                m[:] = True
            elif kind == 3:
                m = _box(h, w, int(rng.integers(0, h)), int(rng.integers(0, w)), 20, 30)
            # kind 4: a present but empty mask; kind 0: an absent frame
            frames.append(None if kind == 0 else mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"])
            dense.append(m)
        return build_track(ann_id, frames, h * w), np.stack(dense)

    for _ in range(20):
        dets = [random_track(i) for i in range(4)]
        gts = [random_track(i + 2) for i in range(3)]
        iou = video_iou([d for d, _ in dets], [g for g, _ in gts])
        for i, (det, dm) in enumerate(dets):
            assert det.pixels.tolist() == dm.reshape(length, -1).sum(axis=1).tolist()
            for j, (_, gm) in enumerate(gts):
                union = int((dm | gm).sum())
                assert iou[i, j] == (int((dm & gm).sum()) / union if union else 0.0)


# --------------------------------------------------------------------------------------------- bad inputs


def test_missing_and_non_json_files(tmp_path: Path) -> None:
    gt, results = _tiny()
    gt_path, res_path = _write(tmp_path, gt, results)
    missing = tmp_path / "nope.json"
    with pytest.raises(EvaluationError, match="nope.json"):
        evaluate_ytvis(missing, res_path)
    with pytest.raises(EvaluationError, match="nope.json"):
        evaluate_ytvis(gt_path, missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(EvaluationError, match="broken.json.*not valid JSON"):
        evaluate_ytvis(broken, res_path)
    with pytest.raises(EvaluationError, match="broken.json.*not valid JSON"):
        evaluate_ytvis(gt_path, broken)


@pytest.mark.parametrize("key", ["videos", "annotations", "categories"])
def test_gt_missing_section(tmp_path: Path, key: str) -> None:
    gt, results = _tiny()
    del gt[key]
    gt_path, res_path = _write(tmp_path, gt, results)
    with pytest.raises(EvaluationError, match=f"gt.json.*'{key}'"):
        evaluate_ytvis(gt_path, res_path)


def _bad_results(mutate) -> list:
    _, results = _tiny()
    mutate(results[1])
    return results


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda r: r.update(video_id=99), r"result #1 has video_id 99"),
        (lambda r: r.update(category_id=42), r"result #1 \(video 7\) has category_id 42"),
        (lambda r: r.pop("score"), r"result #1 \(video 7\) has no 'score'"),
        (lambda r: r["segmentations"].pop(), r"result #1 \(video 7\) has 3 per-frame segmentations .* 4 frames"),
        (lambda r: r["segmentations"][0].update(counts="0"), r"result #1 \(video 7\) has a malformed RLE \(frame 0"),
        (lambda r: r["segmentations"][0].update(size=[8, 8]), r"result #1 \(video 7\) frame 0 has mask size 8x8"),
    ],
    ids=["unknown-video", "unknown-category", "no-score", "wrong-length", "bad-rle", "wrong-size"],
)
def test_bad_result_entries(tmp_path: Path, mutate, pattern: str) -> None:
    gt, _ = _tiny()
    gt_path, res_path = _write(tmp_path, gt, _bad_results(mutate))
    with pytest.raises(EvaluationError, match=pattern) as info:
        evaluate_ytvis(gt_path, res_path)
    assert "results.json" in str(info.value)


# ------------------------------------------------------------------------------------------ the eval command


def _eval_cli(capsys, *args: str) -> tuple[int, str]:
    """``python -m vita_train eval ...`` through ``main(argv)``: (exit code, stderr)."""
    from vita_train.__main__ import main

    capsys.readouterr()
    try:
        code = main(["eval", *map(str, args)])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def test_eval_out_never_overwrites_an_input(tmp_path: Path, capsys) -> None:
    """--out naming the ground truth, the results or the model is refused before anything is read or written."""
    gt, results = _tiny()
    gt_path, res_path = _write(tmp_path, gt, results)
    model = Path(__file__).resolve().parents[1] / "vita_train" / "pretrained" / "vita_demo_synthetic.pth"
    before = {p: p.read_bytes() for p in (gt_path, res_path, model)}
    for out in (gt_path, tmp_path / "." / "gt.json", model):
        code, err = _eval_cli(capsys, "--ytvis-json", gt_path, "--model", model, "--frames", tmp_path, "--out", out)
        assert code == 2 and "--out" in err and "another path" in err, err
    code, err = _eval_cli(capsys, "--ytvis-json", gt_path, "--results", res_path, "--out", res_path)
    assert code == 2 and "--results input" in err, err
    assert all(p.read_bytes() == data for p, data in before.items())


def test_eval_bad_ground_truth_is_one_line_before_the_model_runs(tmp_path: Path, capsys) -> None:
    """A missing, COCO-format, non-integer-length or duplicate-video ground truth: exit 2 with one error line,
    checked before --model segments anything."""
    gt, results = _tiny()
    model = Path(__file__).resolve().parents[1] / "vita_train" / "pretrained" / "vita_demo_synthetic.pth"
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": [{"id": 1}]}
    bad_length = copy.deepcopy(gt)
    bad_length["videos"][0]["length"] = "ten"
    duplicate = copy.deepcopy(gt)
    duplicate["videos"].append(dict(duplicate["videos"][0]))
    cases = {"missing.json": None, "coco.json": coco, "length.json": bad_length, "duplicate.json": duplicate}
    messages = {"missing.json": "does not exist", "coco.json": "no list 'videos'",
                "length.json": "video 7 has length 'ten'", "duplicate.json": "video id 7 occurs more than once"}
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    for file, data in cases.items():
        path = tmp_path / file
        if data is not None:
            path.write_text(json.dumps(data))
        for source in (["--results", res_path], ["--model", model, "--frames", tmp_path / "no_frames_needed"]):
            code, err = _eval_cli(capsys, "--ytvis-json", path, *source)
            assert code == 2 and err.startswith("error: ") and messages[file] in err, (file, err)
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_result_video_id_of_another_type_is_shown_as_such(tmp_path: Path) -> None:
    """A results file giving video_id "7" (a string) for the ground truth's 7 says so, quoting the value."""
    gt, results = _tiny()
    results[0]["video_id"] = "7"
    with pytest.raises(EvaluationError, match=r"result #0 has video_id '7' \(str\), which is not a video"):
        evaluate_ytvis(*_write(tmp_path, gt, results))
