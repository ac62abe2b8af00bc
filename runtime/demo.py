"""``python -m runtime --demo``: segment a generated clip with the built-in model, write JSON and overlay."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(out_dir: Path, progress: bool = False) -> tuple[Path, Path]:
    """Writes ``demo_results.json`` and ``demo_overlay.mp4`` into ``out_dir``; returns both paths."""
    import torch

    from vita_train import VitaModel, preset
    from vita_train.data.synthetic import moving_shapes_clip

    from .backends.torch_backend import TorchBackend
    from .segmenter import Segmenter

    torch.manual_seed(0)
    model = VitaModel(preset("vita_tiny")).eval()
    log.warning(
        "demo model: preset vita_tiny with RANDOM weights (no trained demo model ships yet); "
        "the output shows that the pipeline runs, not what a trained model finds"
    )
    frames = moving_shapes_clip(24, 120, 160, seed=0)
    result = Segmenter(TorchBackend(model, device="cpu")).segment(frames, progress=progress)
    result.fps = 12.0
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, video_path = out_dir / "demo_results.json", out_dir / "demo_overlay.mp4"
    result.save(json_path)
    result.render(video_path, frames)
    log.info("wrote %s (%d instances) and %s", json_path, len(result.instances), video_path)
    return json_path, video_path
