"""Equal-shape arrays appended to an anonymous temporary file and read back in order.

What lets memory stay flat in video length: resized frames for a second pass over a one-shot input, and
mask features past the memory budgets. The file has no name (``tempfile.TemporaryFile``), so nothing is
left behind, even when the process is killed.
"""

from __future__ import annotations

import tempfile
from typing import Iterator, Optional

import numpy as np


class ArraySpool:
    """A sequence of arrays of one item shape and dtype, on disk."""

    def __init__(self, prefix: str, directory: Optional[str] = None) -> None:
        self.directory = directory or tempfile.gettempdir()
        self.file = tempfile.TemporaryFile(prefix=prefix, dir=self.directory)
        self.item_shape: Optional[tuple[int, ...]] = None
        self.dtype: Optional[np.dtype] = None
        self.count = 0

    def append(self, items: np.ndarray) -> None:
        """Append ``items`` (N, *item_shape); every call must give the same item shape and dtype."""
        if self.item_shape is None:
            self.item_shape, self.dtype = tuple(items.shape[1:]), items.dtype
        elif tuple(items.shape[1:]) != self.item_shape or items.dtype != self.dtype:
            raise ValueError(
                f"spool holds {self.dtype} items of shape {self.item_shape}, got {items.dtype} {tuple(items.shape[1:])}"
            )
        self.file.write(memoryview(np.ascontiguousarray(items)).cast("B"))
        self.count += items.shape[0]

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Everything written, in order, as fresh writable arrays of ``size`` items (the last may be shorter)."""
        self.file.seek(0)
        for start in range(0, self.count, size):
            out = np.empty((min(size, self.count - start), *self.item_shape), dtype=self.dtype)
            if self.file.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise OSError(f"the temporary spool file {self.file.name} was cut short")
            yield out

    def close(self) -> None:
        """Delete the file."""
        self.file.close()
