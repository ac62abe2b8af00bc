"""Training losses: targets, Hungarian matching, frame/video criteria and the similarity loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from vita_train.losses import (
    FrameCriterion,
    HungarianMatcher,
    LossConfig,
    VitaLoss,
    point_sample,
    prepare_targets,
    similarity_loss,
    uncertain_point_coords,
)

B, T, NF, CQ, K, L, C = 2, 3, 6, 4, 3, 3, 8
H = W = 16  # predicted mask size
HP = WP = 64  # padded input size
N_FRAME_LAYERS = 4  # frame decoder layers: 4 aux + 1 final prediction
N_VITA_LAYERS = 3


def small_cfg(**kw) -> LossConfig:
    return LossConfig(num_points=64, **kw)


def blob(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """A random axis-aligned box of 4x4 blocks, never empty."""
    y0 = int(torch.randint(0, h // 4 - 1, (1,), generator=gen)) * 4
    x0 = int(torch.randint(0, w // 4 - 1, (1,), generator=gen)) * 4
    y1 = y0 + 4 * int(torch.randint(1, (h - y0) // 4 + 1, (1,), generator=gen))
    x1 = x0 + 4 * int(torch.randint(1, (w - x0) // 4 + 1, (1,), generator=gen))
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def make_clips(num_instances=(3, 2), sizes=((64, 64), (48, 56)), seed=0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    clips = []
    for g, (h, w) in zip(num_instances, sizes):
        masks = torch.stack([torch.stack([blob(h, w, gen) for _ in range(T)]) for _ in range(g)]) if g else \
            torch.zeros(0, T, h, w, dtype=torch.bool)
        ids = torch.arange(g)[:, None].repeat(1, T) + 7
        labels = torch.randint(0, K, (g,), generator=gen)
        if g >= 2:  # instance 1 leaves the clip in its last frame
            masks[1, -1] = False
        clips.append({"labels": labels, "ids": ids, "masks": masks})
    return clips


def leaf(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).requires_grad_(True)


def random_outputs(dtype=torch.float32, with_clip_sim=True):
    frame = {"pred_logits": leaf(B * T, NF, K + 1, dtype=dtype), "pred_masks": leaf(B * T, NF, H, W, dtype=dtype)}
    frame["aux_outputs"] = [
        {"pred_logits": leaf(B * T, NF, K + 1, dtype=dtype), "pred_masks": leaf(B * T, NF, H, W, dtype=dtype)}
        for _ in range(N_FRAME_LAYERS)
    ]
    vita = {
        "pred_logits": leaf(L, B, CQ, K + 1, dtype=dtype),
        "pred_masks": leaf(L, B, CQ, T, H, W, dtype=dtype),
        "pred_fq_embed": leaf(L, B, T, NF, C, dtype=dtype),
        "pred_cq_embed": leaf(L, B, CQ, C, dtype=dtype) if with_clip_sim else None,
    }
    vita["aux_outputs"] = [
        {"pred_logits": leaf(L, B, CQ, K + 1, dtype=dtype), "pred_masks": leaf(L, B, CQ, T, H, W, dtype=dtype)}
        for _ in range(N_VITA_LAYERS - 1)
    ]
    return frame, vita


def all_leaves(frame, vita) -> dict[str, torch.Tensor]:
    out = {"frame.logits": frame["pred_logits"], "frame.masks": frame["pred_masks"]}
    for i, a in enumerate(frame["aux_outputs"]):
        out[f"frame.aux{i}.logits"] = a["pred_logits"]
        out[f"frame.aux{i}.masks"] = a["pred_masks"]
    for k in ("pred_logits", "pred_masks", "pred_fq_embed", "pred_cq_embed"):
        if vita[k] is not None:
            out[f"vita.{k}"] = vita[k]
    for i, a in enumerate(vita["aux_outputs"]):
        out[f"vita.aux{i}.logits"] = a["pred_logits"]
        out[f"vita.aux{i}.masks"] = a["pred_masks"]
    return out


def test_loss_config_defaults_round_trip_yaml():
    cfg = LossConfig()
    assert (cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.sim_weight) == (2.0, 5.0, 5.0, 0.5)
    assert (cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert LossConfig(**yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))) == cfg


# ---------------------------------------------------------------- targets


def test_prepare_targets_ids_padding_and_dropping():
    gen = torch.Generator().manual_seed(1)
    m0 = torch.stack([torch.stack([blob(64, 64, gen) for _ in range(T)]) for _ in range(4)])
    m0[1, 0] = False  # empty in frame 0 -> id -1 there
    m0[2] = False  # visible nowhere -> dropped
    ids0 = torch.tensor([[5, 5, 5], [6, 6, 6], [7, 7, 7], [-1, 9, 9]])
    labels0 = torch.tensor([0, 1, 2, 1])
    m1 = torch.zeros(1, T, 40, 24, dtype=torch.bool)
    m1[0, :, 30:40, 20:24] = True
    clips = [
        {"labels": labels0, "ids": ids0, "masks": m0},
        {"labels": torch.tensor([2]), "ids": torch.tensor([[3, 3, 3]]), "masks": m1},
    ]
    frames, clip_t = prepare_targets(clips, (HP, WP))
    assert len(frames) == B * T and len(clip_t) == B

    c0 = clip_t[0]
    assert c0["labels"].tolist() == [0, 1, 1]
    # ids shifted by the smallest valid id (5); -1 where the mask is empty or the id was -1
    assert c0["ids"].tolist() == [[0, 0, 0], [-1, 1, 1], [-1, 4, 4]]
    assert c0["masks"].shape == (3, T, HP, WP) and c0["masks"].dtype == torch.float32
    assert [len(frames[t]["labels"]) for t in range(T)] == [1, 3, 3]
    assert frames[0]["ids"].tolist() == [0]
    assert frames[1]["ids"].tolist() == [0, 1, 4]
    assert frames[1]["labels"].tolist() == [0, 1, 1]
    assert torch.equal(frames[1]["masks"], c0["masks"][:, 1])

    c1 = clip_t[1]
    assert c1["ids"].tolist() == [[0, 0, 0]]
    assert c1["masks"].shape == (1, T, HP, WP)
    # padded at the top-left: the original pixels keep their coordinates, the rest is zero
    assert c1["masks"][0, 0, 30:40, 20:24].all() and c1["masks"][0, 0].sum() == 40
    assert [len(frames[T + t]["labels"]) for t in range(T)] == [1, 1, 1]


def test_prepare_targets_empty_clip():
    clips = make_clips(num_instances=(0, 2))
    frames, clip_t = prepare_targets(clips, (HP, WP))
    assert clip_t[0]["masks"].shape == (0, T, HP, WP) and clip_t[0]["ids"].shape == (0, T)
    assert all(len(f["labels"]) == 0 for f in frames[:T])


# ---------------------------------------------------------------- point sampling


def test_point_sample_reads_pixel_centres_and_importance_sampling():
    img = torch.arange(12.0).view(1, 1, 3, 4)
    # the centre of pixel (row 1, col 2) is at ((2 + 0.5) / 4, (1 + 0.5) / 3) in (x, y)
    out = point_sample(img, torch.tensor([[[2.5 / 4, 1.5 / 3]]]))
    assert out.shape == (1, 1, 1) and out.item() == pytest.approx(6.0)

    # logits ramp through 0 at x = 0.5: the least certain candidates lie near that line
    x = (torch.arange(64.0) + 0.5) / 64
    logits = (20.0 * (x - 0.5)).expand(2, 1, 64, 64)
    torch.manual_seed(0)
    coords = uncertain_point_coords(logits, 40, 3.0, 0.75)
    assert coords.shape == (2, 40, 2)
    near = ((coords[:, :30, 0] - 0.5).abs() < 0.2).float().mean()
    assert near > 0.9
    # the last 10 are uniform, wherever the logits are confident
    assert ((coords[:, 30:, 0] - 0.5).abs() >= 0.2).any()


# ---------------------------------------------------------------- matcher


def _perfect_masks(tgt_masks: torch.Tensor, order: torch.Tensor, q: int, size: tuple[int, int]) -> torch.Tensor:
    """(q, ..., h, w) logits: +/-20 of GT g in query order[g], -20 elsewhere, at resolution `size`."""
    lead = tgt_masks.shape[1:-2]
    small = F.interpolate(tgt_masks.reshape(-1, 1, *tgt_masks.shape[-2:]).float(), size=size, mode="area")
    small = small.view(tgt_masks.shape[0], *lead, *size)
    out = torch.full((q, *lead, *size), -20.0)
    out[order] = 40.0 * (small > 0.5).float() - 20.0
    return out


def _perfect_logits(labels: torch.Tensor, order: torch.Tensor, q: int) -> torch.Tensor:
    logits = torch.zeros(q, K + 1)
    logits[:, K] = 20.0
    logits[order, K] = 0.0
    logits[order, labels] = 20.0
    return logits


def test_frame_matcher_recovers_permutation_and_handles_empty():
    frames, _ = prepare_targets(make_clips(), (HP, WP))
    matcher = HungarianMatcher(num_points=256)
    gen = torch.Generator().manual_seed(3)
    logits, masks, orders = [], [], []
    for f in frames:
        g = len(f["labels"])
        order = torch.randperm(NF, generator=gen)[:g]
        orders.append(order)
        logits.append(_perfect_logits(f["labels"], order, NF))
        masks.append(_perfect_masks(f["masks"], order, NF, (H, W)))
    frames.append({"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, HP, WP)})
    logits.append(torch.randn(NF, K + 1))
    masks.append(torch.randn(NF, H, W))
    torch.manual_seed(0)
    indices = matcher.match_frames(torch.stack(logits), torch.stack(masks), frames)
    for (rows, cols), order in zip(indices[:-1], orders):
        got = dict(zip(cols.tolist(), rows.tolist()))
        assert got == {g: int(order[g]) for g in range(len(order))}
        assert rows.dtype == torch.int64 and torch.all(rows[1:] > rows[:-1])
    assert indices[-1][0].numel() == 0 and indices[-1][1].numel() == 0


def test_video_matcher_recovers_permutation_per_layer_and_clip():
    clips = make_clips(num_instances=(3, 0))
    _, clip_t = prepare_targets(clips, (HP, WP))
    matcher = HungarianMatcher(num_points=128)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(L, B, CQ, K + 1)
    masks = torch.randn(L, B, CQ, T, H, W)
    orders = {}
    for li in range(L):
        c = clip_t[0]
        order = torch.randperm(CQ, generator=gen)[: len(c["labels"])]
        orders[li] = order
        logits[li, 0] = _perfect_logits(c["labels"], order, CQ)
        masks[li, 0] = _perfect_masks(c["masks"], order, CQ, (H, W))
    indices = matcher.match_videos(logits, masks, clip_t)
    assert len(indices) == L * B
    for li in range(L):
        rows, cols = indices[li * B + 0]
        assert dict(zip(cols.tolist(), rows.tolist())) == {g: int(orders[li][g]) for g in range(3)}
        assert indices[li * B + 1][0].numel() == 0


def test_video_cost_matrix_equals_per_pair_loop():
    torch.manual_seed(5)
    _, clip_t = prepare_targets(make_clips(num_instances=(3, 2)), (HP, WP))
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=50)
    logits = torch.randn(L, B, CQ, K + 1) * 3
    masks = torch.randn(L, B, CQ, T, H, W) * 3
    coords = torch.rand(L, B, 50, 2)
    costs = matcher.video_costs(logits, masks, clip_t, coords)
    for li in range(L):
        for b in range(B):
            tgt = clip_t[b]
            ref = torch.zeros(CQ, len(tgt["labels"]), dtype=torch.float64)
            for q in range(CQ):
                prob = logits[li, b, q].double().softmax(-1)
                for g in range(len(tgt["labels"])):
                    x = torch.cat([point_sample(masks[li, b, q, t][None, None], coords[li, b][None])[0, 0]
                                   for t in range(T)]).double()
                    y = torch.cat([point_sample(tgt["masks"][g, t][None, None], coords[li, b][None])[0, 0]
                                   for t in range(T)]).double()
                    bce = F.binary_cross_entropy_with_logits(x, y)
                    s = x.sigmoid()
                    dice = 1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)
                    ref[q, g] = 5 * bce + 2 * -prob[tgt["labels"][g]] + 5 * dice
            got = costs[li * B + b]
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- criteria


def expected_keys(deep: bool = True, sim: bool = True) -> set[str]:
    keys = {"loss_ce", "loss_mask", "loss_dice", "loss_video_ce", "loss_video_mask", "loss_video_dice"}
    if deep:
        keys |= {f"loss_{n}_{i}" for n in ("ce", "mask", "dice") for i in range(N_FRAME_LAYERS)}
        keys |= {f"loss_video_{n}_{i}" for n in ("ce", "mask", "dice") for i in range(N_VITA_LAYERS - 1)}
    if sim:
        keys.add("loss_sim")
    return keys


def test_losses_finite_keys_and_gradients():
    torch.manual_seed(0)
    frame, vita = random_outputs()
    crit = VitaLoss(K, small_cfg())
    losses = crit(frame, vita, make_clips(), (HP, WP))
    assert set(losses) == expected_keys()
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, t in all_leaves(frame, vita).items():
        assert t.grad is not None, name
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


def test_no_deep_supervision_and_no_clip_sim():
    torch.manual_seed(0)
    frame, vita = random_outputs(with_clip_sim=False)
    losses = VitaLoss(K, small_cfg(deep_supervision=False))(frame, vita, make_clips(), (HP, WP))
    assert set(losses) == expected_keys(deep=False)
    losses = VitaLoss(K, small_cfg(sim_weight=0.0))(frame, vita, make_clips(), (HP, WP))
    assert set(losses) == expected_keys(sim=False)


def test_empty_clip_and_half_precision_inputs():
    torch.manual_seed(0)
    frame, vita = random_outputs(dtype=torch.bfloat16)
    losses = VitaLoss(K, small_cfg())(frame, vita, make_clips(num_instances=(0, 2)), (HP, WP))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert frame["pred_masks"].grad is not None and vita["pred_masks"].grad is not None

    frame, vita = random_outputs()
    losses = VitaLoss(K, small_cfg())(frame, vita, make_clips(num_instances=(0, 0)), (HP, WP))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0 and losses["loss_video_dice"] == 0 and losses["loss_sim"] == 0
    sum(losses.values()).backward()  # the graph stays connected with nothing matched


def _perfect_outputs(clips):
    frames, clip_t = prepare_targets(clips, (HP, WP))
    frame_logits = torch.zeros(B * T, NF, K + 1)
    frame_masks = torch.zeros(B * T, NF, H, W)
    # identities as simplex vertices: equal ids have a large dot product, different ones a large negative one
    num_ids = 1 + max(int(c["ids"].max()) for c in clip_t if c["ids"].numel())
    simplex = (torch.eye(C)[:num_ids] - 1.0 / num_ids * torch.ones(num_ids, num_ids) @ torch.eye(C)[:num_ids]) * 6
    fq = torch.zeros(L, B, T, NF, C)
    for i, f in enumerate(frames):
        order = torch.arange(len(f["labels"])) + 1
        frame_logits[i] = _perfect_logits(f["labels"], order, NF)
        frame_masks[i] = _perfect_masks(f["masks"], order, NF, (H, W))
        fq[:, i // T, i % T, order] = simplex[f["ids"]]
    vita_logits = torch.zeros(L, B, CQ, K + 1)
    vita_masks = torch.zeros(L, B, CQ, T, H, W)
    cq = torch.zeros(L, B, CQ, C)
    for b, c in enumerate(clip_t):
        order = torch.arange(len(c["labels"]))
        vita_logits[:, b] = _perfect_logits(c["labels"], order, CQ)
        vita_masks[:, b] = _perfect_masks(c["masks"], order, CQ, (H, W))
        cq[:, b, order] = simplex[c["ids"].amax(1)]
    frame = {"pred_logits": frame_logits, "pred_masks": frame_masks,
             "aux_outputs": [{"pred_logits": frame_logits, "pred_masks": frame_masks}] * N_FRAME_LAYERS}
    vita = {"pred_logits": vita_logits, "pred_masks": vita_masks, "pred_fq_embed": fq, "pred_cq_embed": cq,
            "aux_outputs": [{"pred_logits": vita_logits, "pred_masks": vita_masks}] * (N_VITA_LAYERS - 1)}
    return frame, vita


def test_perfect_predictions_score_far_below_random():
    clips = make_clips()
    crit = VitaLoss(K, small_cfg())
    torch.manual_seed(0)
    perfect = crit(*_perfect_outputs(clips), clips, (HP, WP))
    torch.manual_seed(0)
    rand = crit(*random_outputs(), clips, (HP, WP))
    for group in ("loss_ce", "loss_mask", "loss_dice", "loss_video_ce", "loss_video_mask", "loss_video_dice",
                  "loss_sim"):
        assert perfect[group] < 0.2 * rand[group], (group, perfect[group], rand[group])
    assert sum(perfect.values()) < 0.1 * sum(rand.values())


def test_frame_criterion_returns_matchings_of_last_layers():
    clips = make_clips()
    frames, _ = prepare_targets(clips, (HP, WP))
    preds = []
    gen = torch.Generator().manual_seed(9)
    orders_per_pred = []
    for _ in range(N_FRAME_LAYERS + 1):
        logits = torch.zeros(B * T, NF, K + 1)
        masks = torch.zeros(B * T, NF, H, W)
        orders = []
        for i, f in enumerate(frames):
            order = torch.randperm(NF, generator=gen)[: len(f["labels"])]
            orders.append(order)
            logits[i] = _perfect_logits(f["labels"], order, NF)
            masks[i] = _perfect_masks(f["masks"], order, NF, (H, W))
        preds.append({"pred_logits": logits, "pred_masks": masks})
        orders_per_pred.append(orders)
    outputs = {**preds[-1], "aux_outputs": preds[:-1]}
    for deep in (True, False):
        _, fg = FrameCriterion(K, small_cfg(deep_supervision=deep))(outputs, frames)
        assert len(fg) == L
        for li in range(L):
            orders = orders_per_pred[N_FRAME_LAYERS + 1 - L + li]
            for (rows, cols), order in zip(fg[li], orders):
                assert dict(zip(cols.tolist(), rows.tolist())) == {g: int(order[g]) for g in range(len(order))}


def _bce(x: float, y: float) -> float:
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def test_similarity_loss_hand_computed():
    # L=1, B=1, T=2 frames, 2 frame queries, 2 clip queries, 2-d embeddings
    fq = torch.tensor([[[[[1.0, 0.0], [0.0, 2.0]],      # frame 0: q0, q1
                         [[0.5, 0.5], [-1.0, 1.0]]]]])  # frame 1: q0, q1
    cq = torch.tensor([[[[1.0, 1.0], [3.0, -1.0]]]])
    frame_targets = [{"ids": torch.tensor([4, 2])}, {"ids": torch.tensor([2])}]
    clip_targets = [{"ids": torch.tensor([[4, -1], [2, 2]])}]
    t = torch.tensor
    frame_indices = [[(t([0, 1]), t([0, 1])), (t([1]), t([0]))]]  # f0: q0->id4, q1->id2; f1: q1->id2
    clip_indices = [(t([1]), t([1]))]                                 # clip q1 -> GT1 (id 2)
    got = similarity_loss(fq, cq, frame_targets, clip_targets, frame_indices, clip_indices)
    embeds = [(1.0, 0.0), (0.0, 2.0), (-1.0, 1.0), (3.0, -1.0)]
    ids = [4, 2, 2, 2]
    total = sum(_bce(a[0] * b[0] + a[1] * b[1], float(ia == ib)) for a, ia in zip(embeds, ids)
                for b, ib in zip(embeds, ids))
    assert got.item() == pytest.approx(total / (16 + 1e-6), rel=1e-6)

    # a second clip (B=2): pairs across clips are ignored; the clip id is the max over frames
    fq2 = torch.cat([fq, fq.flip(-1)], dim=1)
    cq2 = torch.cat([cq, cq], dim=1)
    ft2 = frame_targets + [{"ids": torch.tensor([2])}, {"ids": torch.tensor([2])}]
    ct2 = clip_targets + [{"ids": torch.tensor([[2, 2]])}]
    fi2 = [frame_indices[0] + [(t([0]), t([0])), (t([0]), t([0]))]]
    ci2 = clip_indices + [(t([0]), t([0]))]
    got2 = similarity_loss(fq2, cq2, ft2, ct2, fi2, ci2)
    embeds_b = [(0.0, 1.0), (0.5, 0.5), (1.0, 1.0)]
    total_b = sum(_bce(a[0] * b[0] + a[1] * b[1], 1.0) for a in embeds_b for b in embeds_b)
    assert got2.item() == pytest.approx((total + total_b) / (16 + 9 + 1e-6), rel=1e-6)


def test_deterministic_under_manual_seed():
    clips = make_clips()
    crit = VitaLoss(K, small_cfg())
    torch.manual_seed(1)
    frame, vita = random_outputs()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append({k: v.item() for k, v in crit(frame, vita, clips, (HP, WP)).items()})
    assert runs[0] == runs[1]
    torch.manual_seed(124)
    other = {k: v.item() for k, v in crit(frame, vita, clips, (HP, WP)).items()}
    assert other["loss_mask"] != runs[0]["loss_mask"]


def _slice_clip(frame, vita, b):
    def fr(d):
        return {"pred_logits": d["pred_logits"][b * T:(b + 1) * T], "pred_masks": d["pred_masks"][b * T:(b + 1) * T]}

    def vi(d):
        return {k: (v[:, b:b + 1] if v is not None else None) for k, v in d.items() if k != "aux_outputs"}

    return ({**fr(frame), "aux_outputs": [fr(a) for a in frame["aux_outputs"]]},
            {**vi(vita), "aux_outputs": [vi(a) for a in vita["aux_outputs"]]})


def test_per_clip_generators_make_points_independent_of_the_batch():
    clips = make_clips()
    frames, clip_t = prepare_targets(clips, (HP, WP))
    torch.manual_seed(2)
    frame, vita = random_outputs()
    crit = VitaLoss(K, small_cfg())

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = crit(frame, vita, clips, (HP, WP), generators=gens([10, 11]))
    single = [crit(*_slice_clip(frame, vita, b), [clips[b]], (HP, WP), generators=gens([10 + b])) for b in range(B)]
    n_frame = [sum(len(f["labels"]) for f in frames[b * T:(b + 1) * T]) for b in range(B)]
    n_video = [len(c["labels"]) * L for c in clip_t]
    for key, n in (("loss_mask", n_frame), ("loss_dice_1", n_frame), ("loss_video_mask", n_video),
                   ("loss_video_dice_0", n_video)):
        expected = sum(s[key] * k for s, k in zip(single, n)) / sum(n)
        assert torch.allclose(both[key], expected, rtol=1e-5), key
    again = crit(frame, vita, clips, (HP, WP), generators=gens([10, 11]))
    assert all(torch.equal(again[k], both[k]) for k in both)
