"""Stage-by-stage and end-to-end parity with what the official VITA code computed (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vita_train import load_model
from vita_train.inference import predict_video, resize_frame, resized_size

from .conftest import rel_err

TOL = 1e-4


@pytest.fixture
def model_and_case(official_case):
    return load_model(official_case.ckpt), official_case


def _resized(model, case) -> np.ndarray:
    t, h, w, _ = case.frames.shape
    size = resized_size(h, w, model.config.input.min_size_test, model.config.input.max_size_test)
    return np.stack([resize_frame(f, size) for f in case.frames])


def test_resized_frames_equal(model_and_case):
    model, case = model_and_case
    e = case.expected
    resized = _resized(model, case)
    assert resized.shape[1:3] == tuple(e["image_size_resized"])
    assert (len(resized), 3, *resized.shape[1:3]) == tuple(e["images_resized_shape"])
    ours = resized[e["subset_frame_idx"]].transpose(0, 3, 1, 2)
    assert np.array_equal(ours, e["images_resized_subset"])


def test_detector_stages(model_and_case):
    model, case = model_and_case
    e = case.expected
    resized = torch.from_numpy(_resized(model, case)).permute(0, 3, 1, 2)
    queries, features = [], []
    with torch.no_grad():
        for start in range(0, len(resized), model.config.test.detector_chunk):
            out = model.detect(resized[start : start + model.config.test.detector_chunk])
            queries.append(out.frame_queries)
            features.append(out.mask_features)
    queries, features = torch.cat(queries), torch.cat(features)
    assert tuple(features.shape) == tuple(e["mask_features_shape"])
    assert rel_err(queries, e["frame_queries"]) <= TOL
    assert rel_err(features[e["subset_frame_idx"]], e["mask_features_subset"]) <= TOL
    assert rel_err(features.mean((1, 2, 3)), e["mask_features_frame_mean"]) <= TOL
    assert rel_err(features.abs().mean((1, 2, 3)), e["mask_features_frame_absmean"]) <= TOL


def test_vita_from_official_frame_queries(model_and_case):
    model, case = model_and_case
    e = case.expected
    with torch.no_grad():
        logits, embed = model.track(torch.from_numpy(e["frame_queries"]))
    assert rel_err(logits, e["pred_logits"]) <= TOL
    assert rel_err(embed, e["pred_mask_embed"]) <= TOL


def test_end_to_end_topk_scores_and_masks(model_and_case):
    model, case = model_and_case
    e = case.expected
    pred = predict_video(model, case.frames)
    k = model.config.num_classes
    ours = {int(q) * k + int(c): i for i, (q, c) in enumerate(zip(pred.query_index, pred.labels))}
    theirs = {int(f): i for i, f in enumerate(e["topk_flat_idx"])}
    assert set(ours) == set(theirs), "different (video query, class) pairs selected"
    official_masks = case.expected_masks()
    assert pred.masks.shape == official_masks.shape
    for flat, j in theirs.items():
        i = ours[flat]
        assert int(pred.labels[i]) == int(e["pred_labels"][j])
        assert abs(float(pred.scores[i]) - float(e["pred_scores"][j])) <= TOL
        a, b = pred.masks[i].numpy(), official_masks[j]
        iou = np.logical_and(a, b).sum() / np.logical_or(a, b).sum()
        assert iou >= 0.999, f"mask IoU {iou} for pair {flat}"
