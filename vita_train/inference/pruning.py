"""Top-r token pruning: per frame keep the queries least likely to be "no object" (reference, torch)."""

from __future__ import annotations

import math

from torch import Tensor


def kept_per_frame(num_queries: int, ratio: float) -> int:
    """How many of ``num_queries`` frame queries a ratio keeps: ceil(r * Nf), at least one."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in (0, 1] (1.0 = keep all), got {ratio}")
    return max(1, math.ceil(ratio * num_queries))


def prune_frame_queries(frame_queries: Tensor, frame_logits: Tensor, ratio: float) -> tuple[Tensor, Tensor | None]:
    """(B, Nf, C) queries and (B, Nf, K+1) logits -> kept queries (B, k, C) and their slot indices (B, k).

    Kept indices are in ascending slot order; VITA's decoder takes each token's positional embedding
    from its slot. ``ratio == 1`` returns the input untouched and ``None`` (no index needed).
    """
    n = frame_queries.shape[1]
    keep = kept_per_frame(n, ratio)
    if keep == n:
        return frame_queries, None
    no_object = frame_logits.float().softmax(-1)[..., -1]
    index = no_object.topk(keep, dim=1, largest=False).indices.sort(dim=1).values
    kept = frame_queries.gather(1, index.unsqueeze(-1).expand(-1, -1, frame_queries.shape[-1]))
    return kept, index
