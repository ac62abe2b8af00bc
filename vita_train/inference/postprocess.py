"""The official VITA post-processing: top-k (video query, class) pairs, masks, mask-weighted scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TopK:
    """The selected (video query, class) pairs."""

    scores: Tensor  # (k,) class probability
    labels: Tensor  # (k,) 0-based class index
    query_index: Tensor  # (k,) video query of each pair


@dataclass
class VideoPrediction:
    """Final results: instance scores, labels and boolean masks at the original resolution."""

    scores: Tensor  # (k,)
    labels: Tensor  # (k,)
    masks: Tensor  # (k, T, H, W) bool
    query_index: Tensor  # (k,)


def select_topk(pred_logits: Tensor, k: int) -> TopK:
    """Softmax without the no-object column, then top-k over all (query, class) pairs (row-major)."""
    probs = pred_logits.float().softmax(-1)[:, :-1]
    num_classes = probs.shape[1]
    scores, flat = probs.flatten().topk(min(k, probs.numel()), sorted=False)
    return TopK(scores=scores, labels=flat % num_classes, query_index=flat // num_classes)


class MaskScorer:
    """Turns chunks of mask features into final masks and accumulates the mask-quality score.

    score = class probability * mean of sigmoid(logit) inside the hard mask, measured at the resized
    (not the original) resolution, summed over every frame of the video.
    """

    def __init__(
        self,
        mask_embed: Tensor,
        resized_size: tuple[int, int],
        padded_size: tuple[int, int],
        orig_size: tuple[int, int],
    ) -> None:
        self.mask_embed = mask_embed
        self.resized_size, self.padded_size, self.orig_size = resized_size, padded_size, orig_size
        self.numerator = torch.zeros(len(mask_embed), dtype=torch.float32, device=mask_embed.device)
        self.denominator = torch.zeros_like(self.numerator)

    def masks(self, mask_features: Tensor) -> Tensor:
        """(t, D, Hp/4, Wp/4) features of consecutive frames -> (k, t, H, W) bool masks."""
        logits = torch.einsum("qc,tchw->qthw", self.mask_embed, mask_features.to(self.mask_embed))
        # one query at a time: the full-resolution float temporaries exist for one instance, not k
        return torch.cat([self._query_masks(q, logits[q : q + 1]) for q in range(len(logits))])

    def _query_masks(self, q: int, logits: Tensor) -> Tensor:
        logits = F.interpolate(logits, size=self.padded_size, mode="bilinear", align_corners=False)
        logits = logits[:, :, : self.resized_size[0], : self.resized_size[1]]
        soft = logits.sigmoid()
        hard = soft > 0.5
        self.numerator[q] += (soft * hard).sum()
        self.denominator[q] += hard.sum()
        return F.interpolate(logits, size=self.orig_size, mode="bilinear", align_corners=False) > 0.0

    def mask_quality(self) -> Tensor:
        """(k,) mean soft value inside the hard masks so far (0 for empty masks)."""
        return self.numerator / (self.denominator + 1e-6)


def postprocess(
    pred_logits: Tensor,
    mask_embed: Tensor,
    mask_feature_chunks: Iterable[Tensor],
    resized_size: tuple[int, int],
    padded_size: tuple[int, int],
    orig_size: tuple[int, int],
    topk: int,
) -> VideoPrediction:
    """Official post-processing over the whole video; ``mask_feature_chunks`` yields (t, D, h, w) in order."""
    sel = select_topk(pred_logits, topk)
    scorer = MaskScorer(mask_embed[sel.query_index], resized_size, padded_size, orig_size)
    masks = torch.cat([scorer.masks(chunk).cpu() for chunk in mask_feature_chunks], dim=1)
    return VideoPrediction(
        scores=sel.scores * scorer.mask_quality(), labels=sel.labels, masks=masks, query_index=sel.query_index
    )


def chunks(tensor: Tensor, size: int) -> Iterator[Tensor]:
    """Consecutive slices of ``size`` along the first axis."""
    for start in range(0, tensor.shape[0], size):
        yield tensor[start : start + size]
