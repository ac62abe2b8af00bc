"""Mixing clip sources, deterministic resumable sampling and the training DataLoader.

Every sample is a pure function of (seed, global index): ``MixedClipDataset[i]`` seeds its own
generator from ``[seed, i]``, picks a source with probability proportional to its ratio (as the
official ``CombinedDataLoader`` picks a loader per batch element), then an item uniformly, then the
frames and the augmentation. :class:`StepSampler` assigns global indices by (step, rank, slot), so
resuming at step s replays exactly the data a run from step 0 would have seen from step s on,
DDP ranks never share an index, and the number of DataLoader workers changes nothing.
"""

from __future__ import annotations

import logging
import random
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from vita_train.data.clips import ClipSource, SampleError
from vita_train.data.records import DatasetError

__all__ = ["MixedClipDataset", "StepSampler", "build_train_loader", "collate_clips"]

log = logging.getLogger(__name__)


class MixedClipDataset(Dataset):
    """Map-style dataset over an unbounded index space; item i is a pure function of (seed, i)."""

    def __init__(
        self,
        sources: Sequence[ClipSource],
        ratios: Optional[Sequence[float]] = None,
        seed: int = 0,
        max_attempts: int = 10,
    ) -> None:
        if not sources:
            raise ValueError("MixedClipDataset needs at least one source")
        ratios = [1.0] * len(sources) if ratios is None else [float(r) for r in ratios]
        if len(ratios) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(ratios)} ratios")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"ratios must be >= 0 with a positive sum, got {ratios}")
        for s, r in zip(sources, ratios):
            if r > 0 and len(s) == 0:
                raise ValueError(f"source {s.name!r} is empty but has ratio {r}")
        if seed < 0 or max_attempts < 1:
            raise ValueError(f"need seed >= 0 and max_attempts >= 1, got {seed}, {max_attempts}")
        self.sources = list(sources)
        self.ratios = ratios
        self.seed = int(seed)
        self.max_attempts = int(max_attempts)
        self._cum = np.cumsum(np.asarray(ratios) / sum(ratios))

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, int(index)])

    def _pick_source(self, rng: np.random.Generator) -> int:
        # searchsorted on the cumulative ratios; min() guards the float rounding of the last bound
        return min(int(np.searchsorted(self._cum, rng.random(), side="right")), len(self.sources) - 1)

    def choose(self, index: int) -> tuple[int, int]:
        """(source index, item) the first attempt of sample ``index`` uses, without building the clip."""
        rng = self._rng(index)
        s = self._pick_source(rng)
        return s, int(rng.integers(len(self.sources[s])))

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        if get_worker_info() is not None:
            # third-party code using the global generators stays deterministic per index, whatever the worker
            # count; in the main process the trainer's own RNG state is left alone
            sub = int(np.random.default_rng([self.seed, int(index), 1]).integers(2**31))
            np.random.seed(sub)
            random.seed(sub)
            torch.manual_seed(sub)
        s = self._pick_source(rng)
        source = self.sources[s]
        failures: list[str] = []
        for attempt in range(1, self.max_attempts + 1):
            item = int(rng.integers(len(source)))
            try:
                return source.make_clip(item, rng)
            except SampleError as err:
                failures.append(str(err))
                log.warning(
                    "sample %d (source %s, item %d, attempt %d/%d) failed: %s; drawing another item",
                    index, source.name, item, attempt, self.max_attempts, err,
                )
        raise DatasetError(
            f"sample {index}: {self.max_attempts} consecutive items of source {source.name!r} failed to load; "
            f"the dataset is likely damaged (last error: {failures[-1]})"
        )


class StepSampler(Sampler):
    """Infinite batch sampler: step s, rank r gets global indices s*W*B + r*B + [0, B)."""

    def __init__(self, start_step: int, batch_per_rank: int, rank: int = 0, world_size: int = 1) -> None:
        if start_step < 0 or batch_per_rank < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need start_step >= 0, batch_per_rank >= 1, 0 <= rank < world_size; got {start_step}, "
                f"{batch_per_rank}, {rank}, {world_size}"
            )
        self.start_step = start_step
        self.batch_per_rank = batch_per_rank
        self.rank = rank
        self.world_size = world_size

    def indices(self, step: int) -> list[int]:
        """The global indices of this rank's batch at ``step``."""
        base = step * self.world_size * self.batch_per_rank + self.rank * self.batch_per_rank
        return list(range(base, base + self.batch_per_rank))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.indices(step)
            step += 1


def collate_clips(batch: list[dict]) -> list[dict]:
    """Keep a batch as a list of clip dicts: clips differ in size and instance count."""
    return list(batch)


def _worker_init(worker_id: int) -> None:
    # decoding and augmentation are numpy/Pillow work; torch threads in every worker would oversubscribe
    torch.set_num_threads(1)


def build_train_loader(
    dataset: MixedClipDataset,
    batch_per_rank: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An infinite DataLoader yielding, per step, this rank's list of clip dicts, resumable at ``start_step``."""
    sampler = StepSampler(start_step, batch_per_rank, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_clips,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        # a private generator: creating the iterator would otherwise consume the trainer's global torch RNG
        generator=torch.Generator().manual_seed(dataset.seed),
    )
