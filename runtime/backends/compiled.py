"""The detector through ``torch.compile`` (Inductor, weights frozen as constants), the eager model beside it.

Inductor fuses the element-wise work between convolutions and matmuls (a third of the eager time on a
CPU), folds the frozen weights, and on a CPU with bf16 hardware emits AMX/AVX-512 code. The compiled
graph is specialised to one batch shape: a short last batch is padded with copies of its last frame
(and the extra outputs dropped) instead of compiling a second graph. Inductor caches what it builds on
disk (``TORCHINDUCTOR_CACHE_DIR``), so later processes compile the same model much faster. Where
compiling fails (no C++ compiler, an unsupported op), the eager model runs and a warning says why.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from kernels import native
from vita_train.modeling.vita_model import DetectorOutput, VitaModel

log = logging.getLogger(__name__)


def _pad_batch(images: Tensor, size: int) -> Tensor:
    """``images`` (B, ...) with its last item repeated up to ``size`` items."""
    extra = images[-1:].expand(size - images.shape[0], *images.shape[1:])
    return torch.cat([images, extra])


class CompiledDetector:
    """``model.detect`` compiled on first use, for one image size and batch size."""

    def __init__(self, model: VitaModel, project_mask_features: bool = True) -> None:
        self.model = model
        self.project_mask_features = project_mask_features
        self._fn: Optional[Callable[[Tensor], DetectorOutput]] = None
        self._batch: Optional[int] = None
        self.failed: Optional[str] = None

    def _eager(self, images: Tensor) -> DetectorOutput:
        return self.model.detect(images, project_mask_features=self.project_mask_features)

    def __call__(self, images: Tensor) -> DetectorOutput:
        """Detector outputs of ``images`` (B, 3, H, W), as ``model.detect`` gives them."""
        if self.failed is not None:
            return self._eager(images)
        b = images.shape[0]
        if self._batch is None or b > self._batch:
            self._batch = b
            native.mark_constant_for_compilers()
            self._fn = torch.compile(self._eager, dynamic=False, options={"freezing": True})
        padded = images if b == self._batch else _pad_batch(images, self._batch)
        try:
            out = self._fn(padded)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same eager model
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning("torch.compile of the detector failed (%s); running it eagerly", self.failed)
            return self._eager(images)
        if b == self._batch:
            return out
        return DetectorOutput(out.frame_queries[:b], out.frame_logits[:b], out.mask_features[:b])
