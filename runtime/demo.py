"""``python -m runtime --demo``: segment a held-out synthetic clip with the shipped demo model."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(out_dir: Path, progress: bool = False) -> tuple[Path, Path]:
    """Writes ``demo_results.json`` and ``demo_overlay.mp4`` into ``out_dir``; returns both paths."""
    from vita_train.data.synthetic import moving_shapes_clip
    from vita_train.pretrained import demo_checkpoint

    from .segmenter import load

    segmenter = load(demo_checkpoint(), backend="torch", device="cpu")
    frames = moving_shapes_clip(24, 96, 128, seed=0)
    result = segmenter.segment(frames, progress=progress)
    result.fps = 12.0
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, video_path = out_dir / "demo_results.json", out_dir / "demo_overlay.mp4"
    result.save(json_path)
    result.render(video_path, frames)
    log.info("wrote %s (%d instances) and %s", json_path, len(result.instances), video_path)
    return json_path, video_path
