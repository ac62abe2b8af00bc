"""``prune``: for each pruning ratio r, token-engine and end-to-end time, and agreement with r = 1.0 on the
same video (instances matched by video mask IoU: mean IoU, label agreement, score difference)."""

from __future__ import annotations

from . import references
from .agreement import agreement
from .clip import benchmark_clip
from .e2e import segment_repeats
from .plots import prune_agreement
from .progress import bar
from .record import Column, Record, stat
from .settings import Settings
from .workspace import TORCH, Workspace


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """Segment the clip with each r on the torch fp32 path; r = 1.0 first, as the reference."""
    clip = benchmark_clip(s, ws)
    ratios = [1.0] + [r for r in s.prune_ratios if r != 1.0]
    table = rec.table(
        "prune", f"Pruning ratio r: speed and agreement with r = 1.0 ({clip.description})",
        [Column("ratio", "r"), Column("s_per_frame", "end to end s/frame", "time"),
         Column("tokens_s", "token engine (s)", "time"), Column("speedup_tokens", "token engine speed-up vs r=1", "ratio"),
         Column("speedup_e2e", "end-to-end speed-up vs r=1", "ratio"), Column("mean_iou", "mean mask IoU vs r=1", "score"),
         Column("label_agreement", "label agreement", "score"), Column("score_diff", "mean |score diff|", "error"),
         Column("instances", "instances", "count"), Column("paper_ap", "paper Table 6 AP (YTVIS19, R-50)")],
        keys=("ratio",),
        caption=(f"torch fp32 (kernels auto), {ws.device}, {s.threads} threads; median (min–max) over {s.repeats} runs. "
                 f"Weights: {ws.model_info()['weights']} — agreement figures mean little for an untrained model. "
                 "The paper's AP column is from trained models on YouTube-VIS 2019, for orientation."),
    )
    # Table 6 is the trained full-size R-50; its AP says nothing about another architecture
    paper_ap = {} if references.reference_mismatch(ws.config) else references.TABLE6_AP
    if not paper_ap:
        rec.note(f"paper AP column left empty: Table 6 is for the full-size R-50, and the model is {ws.config.name}")
    base = None
    for r in bar(ratios, s.progress, desc="prune"):
        m = segment_repeats(s, ws, TORCH, clip, s.repeats, prune_ratio=r)
        e2e = stat([w / clip.frames for w in m["walls"]])
        tokens = stat(m["stages"]["token engine"])
        row = {"ratio": r, "s_per_frame": e2e, "tokens_s": tokens, "instances": len(m["result"].instances),
               "paper_ap": paper_ap.get(r)}
        if base is None:
            base = m
            row.update(speedup_tokens=None, speedup_e2e=None, mean_iou=None, label_agreement=None, score_diff=None)
        else:
            agree = agreement(base["result"], m["result"])
            row.update(
                speedup_tokens=stat(base["stages"]["token engine"])["median"] / tokens["median"],
                speedup_e2e=stat([w / clip.frames for w in base["walls"]])["median"] / e2e["median"],
                mean_iou=agree["mean_iou"], label_agreement=agree["label_agreement"], score_diff=agree["score_diff"],
            )
        rec.add(table, row)
    rec.plots += prune_agreement(rec.out_dir / "prune.png", table)
