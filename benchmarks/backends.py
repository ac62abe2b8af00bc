"""``backends``: the same clip through every backend and precision this machine has, same weights, side by
side: detector and token-engine time, end-to-end s/frame, and the largest output differences against
torch fp32 (frame queries, mask features, video class logits, mask embeddings, final masks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .agreement import agreement
from .clip import benchmark_clip
from .e2e import segment_repeats
from .progress import bar
from .record import Column, Record, stat
from .settings import Settings
from .workspace import REFERENCE, BackendSpec, Workspace, available_specs


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _outputs(backend: Any, frames: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Detector outputs of every frame and the token engine's outputs over all of them, as numpy."""
    tokens, features = [], []
    for start in range(0, len(frames), batch):
        det = backend.detect(frames[start : start + batch], 1.0)
        tokens.append(det.tokens)
        features.append(_numpy(det.mask_features))
    logits, embed = backend.track(tokens, None, None)
    return {"frame queries": np.concatenate([_numpy(t) for t in tokens]), "mask features": np.concatenate(features),
            "video logits": _numpy(logits), "mask embeddings": _numpy(embed)}


def _resized_clip(ws: Workspace, clip: Any) -> np.ndarray:
    from runtime.video_io import open_video
    from vita_train.inference.preprocess import resize_frame

    size = ws.resized(clip.height, clip.width)
    source = open_video(clip.video)
    try:
        return np.stack([resize_frame(f, size) for f in source])
    finally:
        source.close()


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """Every available (backend, precision), filtered by --backend / --precision when given."""
    clip = benchmark_clip(s, ws)
    available, missing = available_specs(ws.device)
    specs = [x for x in available if (not s.backends or x.backend in s.backends)
             and (not s.precisions or x.precision in s.precisions)]
    if ws.is_export:
        specs = [x for x in specs if x.backend != "torch"]
    reference: BackendSpec = REFERENCE if not ws.is_export else specs[0]
    specs = [reference] + [x for x in specs if x != reference]
    for what, why in missing.items():
        rec.note(f"not run here: {what} — {why}")
    names = ("frame queries", "mask features", "video logits", "mask embeddings")
    table = rec.table(
        "backends", f"Backends side by side ({clip.description})",
        [Column("backend", "backend"), Column("precision", "precision"), Column("kernels", "kernels"), Column("s_per_frame", "end to end s/frame", "time"),
         Column("speedup", f"speed-up vs {reference.label}", "ratio")]
        + [Column("diff_" + n.replace(" ", "_"), f"max |diff| {n}", "error") for n in names]
        + [Column("mask_iou", "mean mask IoU vs reference", "score")],
        keys=("backend", "precision", "kernels"),
        caption=(f"{ws.device}, {s.threads} threads; s/frame: median (min–max) over {s.repeats} runs. Differences "
                 f"against {reference.label} on the same frames and weights ({ws.model_info()['weights']}); each "
                 "backend's token engine runs on its own detector's queries, so differences accumulate as in use."),
    )
    frames = _resized_clip(ws, clip)
    ref_out, ref_result, ref_s = None, None, None
    for spec in bar(specs, s.progress, desc="backends"):
        m = segment_repeats(s, ws, spec, clip, s.repeats)
        per_frame = stat([w / clip.frames for w in m["walls"]])
        out = _outputs(m["backend"], frames, 2)
        row = {"backend": spec.backend, "precision": spec.precision, "kernels": spec.kernels_label, "s_per_frame": per_frame}
        if ref_out is None:
            ref_out, ref_result, ref_s = out, m["result"], per_frame["median"]
            row.update({"speedup": 1.0, "mask_iou": None, **{"diff_" + n.replace(" ", "_"): None for n in names}})
        else:
            row["speedup"] = ref_s / per_frame["median"]
            for n in names:
                row["diff_" + n.replace(" ", "_")] = float(np.abs(out[n] - ref_out[n]).max())
            row["mask_iou"] = agreement(ref_result, m["result"])["mean_iou"]
        rec.add(table, row)
        del m, out
