"""Loss hyper-parameters (official VITA / Mask2Former defaults), plain types so they round-trip through YAML."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossConfig:
    """Weights and point-sampling settings of the frame (Mask2Former) and video (VITA) criteria."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    video_no_object_weight: float = 0.1
    frame_loss_weight: float = 1.0
    video_loss_weight: float = 1.0
    # 0 switches the similarity loss off entirely, as the official code does with SIM_WEIGHT 0
    sim_weight: float = 0.5
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    num_frame_query_layers: int = 3
