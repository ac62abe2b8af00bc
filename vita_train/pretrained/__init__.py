"""Weights that ship inside the package: the demo model trained on the synthetic shapes dataset."""

from __future__ import annotations

from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).with_name("vita_demo_synthetic.pth")
DEMO_RECIPE = Path(__file__).with_name("vita_demo_synthetic.yaml")  # the training config that made it


def demo_checkpoint() -> Path:
    """Path of the shipped demo checkpoint (our format, 4 shape classes, ~5 MB)."""
    if not DEMO_CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"the demo checkpoint {DEMO_CHECKPOINT} is missing from this installation; reinstall the package, or "
            "train it: python -m vita_train train --config demo_synthetic"
        )
    return DEMO_CHECKPOINT
