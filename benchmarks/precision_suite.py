"""``precision``: how far bf16 lands from fp32, beside how far fp32 lands from itself under a tiny change.

For each model (the benchmark's checkpoint on its clip, each official fixture's checkpoint on its frames
where ``../shared`` is beside the repository, and the shipped demo model, trained, on generated clips) the torch
backend segments the video in fp32, then:

- in bf16 (CUDA autocast on a GPU; on a CPU its bf16 instructions, or where it has none the same policy on
  PyTorch's plain ops, ``TorchBackend(emulate_bf16=True)``: slow, but the same roundings): the precision
  policy's distance from fp32;
- in fp32 with the backbone's weights scaled by ``1 + eps * N(0, 1)`` (eps 1e-5, and 1e-3, a little under the
  1.7e-3 rms of rounding a weight to bf16; seeds 0, 1, 2): how far the fp32 result itself moves under such a
  change (bf16 also rounds every other weight and every activation).

Each is matched to the fp32 result instance by instance (``benchmarks.agreement``: mean and minimum video
mask IoU, labels that differ, score differences). Where the perturbed fp32 rows already disagree about as much
as bf16, the model's top-k sits on near-ties that no reduced precision can hold.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .agreement import agreement
from .clip import benchmark_clip
from .progress import bar
from .record import Column, Record
from .settings import Settings
from .workspace import PRECISIONS, BackendSpec, Workspace, available_specs, skipped_note

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "official"
PERTURBATIONS = (1e-5, 1e-3)
SEEDS = (0, 1, 2)
DEMO_CLIPS = ((24, 96, 128, 0), (36, 192, 256, 1))


def _models(s: Settings, ws: Workspace) -> list[tuple[str, Path, Any]]:
    """(label, checkpoint, video) for the benchmark's own model and clip, then every official fixture here, then
    the shipped demo model (the one trained model at hand) on generated clips."""
    clip = benchmark_clip(s, ws)
    weights = "its checkpoint" if ws.model_path else "random weights"
    models = [(f"{ws.config.name}, {weights}, {clip.description}", ws.checkpoint(), str(clip.video))]
    if s.model is None and not s.quick:
        if FIXTURES.is_dir():
            for case in sorted(p for p in FIXTURES.iterdir() if (p / "model_final.pth").is_file()):
                frames = np.load(case / "frames.npy")
                models.append((f"official fixture {case.name}, its {len(frames)} frames", case / "model_final.pth", frames))
        from vita_train.data.synthetic import moving_shapes_clip
        from vita_train.pretrained import demo_checkpoint

        # the demo's own clip (python -m runtime --demo), and a longer one at twice the size
        for t, h, w, seed in DEMO_CLIPS:
            models.append((f"demo model (trained tiny VITA), generated clip {t} frames {h}x{w} seed {seed}",
                           demo_checkpoint(), moving_shapes_clip(t, h, w, seed=seed)))
    return models


def _bf16(ckpt: Path, device: str, emulated: bool) -> Any:
    """A bf16 segmenter of ``ckpt``: runtime.load's, or on a CPU without bf16 instructions the emulated one."""
    import runtime

    if not emulated:
        return runtime.load(ckpt, device=device, dtype=PRECISIONS["bf16"])
    from runtime.backends.torch_backend import TorchBackend
    from vita_train.checkpoint.loader import load_model

    return runtime.Segmenter(TorchBackend(load_model(ckpt), device=device, dtype=PRECISIONS["bf16"],
                                          emulate_bf16=True))


def _perturb_backbone(model: Any, eps: float, seed: int) -> None:
    """Scale every backbone weight of ``model`` by 1 + eps N(0, 1), in place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.is_floating_point():
                p.mul_(1 + eps * torch.randn(p.shape, generator=g).to(p.dtype))


def _row(model: str, compared: str, reference: Any, other: Any) -> dict[str, Any]:
    a = agreement(reference, other)
    ref_labels, other_labels = Counter(i.label for i in reference.instances), Counter(i.label for i in other.instances)
    return {"model": model, "compared": compared, "mean_iou": a["mean_iou"], "min_iou": a["min_iou"],
            "labels_differing": sum((ref_labels - other_labels).values()),
            "score_diff": a["score_diff"], "max_score_diff": a["max_score_diff"]}


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """One row per model and comparison against that model's fp32 result."""
    import runtime

    if ws.is_export:
        rec.note("precision skipped: it runs the torch backend, which needs a checkpoint (--model FILE)")
        return
    device = ws.device
    available, missing = available_specs(device)
    bf16 = BackendSpec("torch", "bf16")
    emulated = bf16 not in available and not str(device).startswith("cuda")
    if emulated:
        rec.note(f"bf16 emulated: {missing['torch bf16']}, so the bf16 rows run the precision policy on PyTorch's "
                 "plain ops (TorchBackend(emulate_bf16=True)): the same roundings to bf16, other kernels and "
                 "summation orders than oneDNN's bf16 path")
    elif bf16 not in available:
        rec.note(skipped_note(bf16, missing))
    compared_bf16 = "bf16 (the precision policy)" + (", emulated" if emulated else "")
    table = rec.table(
        "precision", "Against the fp32 result of the same model: bf16, and fp32 with its backbone weights perturbed",
        [Column("model", "model and video"), Column("compared", "compared with fp32"),
         Column("mean_iou", "mean matched mask IoU", "score"), Column("min_iou", "min matched mask IoU", "score"),
         Column("labels_differing", "labels differing", "count"),
         Column("score_diff", "mean score difference", "error"),
         Column("max_score_diff", "largest score difference", "error")],
        keys=("model", "compared"),
        caption=(f"{device}, {s.threads} threads; torch backend, default settings; instances matched one to one by "
                 "video mask IoU (an unmatched one counts 0). Perturbed rows: every backbone weight times "
                 "1 + eps N(0, 1) (rounding to bf16 moves a weight by up to 2^-8 = 3.9e-3 of itself, 1.7e-3 rms)."),
    )
    for label, ckpt, video in bar(_models(s, ws), s.progress, desc="precision"):
        fp32 = runtime.load(ckpt, device=device).segment(video)
        if bf16 in available or emulated:
            rec.add(table, _row(label, compared_bf16, fp32, _bf16(ckpt, device, emulated).segment(video)))
        for eps in PERTURBATIONS:
            for seed in SEEDS:
                seg = runtime.load(ckpt, device=device)
                _perturb_backbone(seg.backend.model, eps, seed)
                rec.add(table, _row(label, f"fp32, backbone weights x (1 + {eps:g} N(0, 1)), seed {seed}", fp32,
                                    seg.segment(video)))
