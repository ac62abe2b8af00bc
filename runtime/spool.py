"""Equal-shape arrays appended to an anonymous temporary file and read back in order.

What lets memory stay flat in video length: resized frames for a second pass over a one-shot input, and
mask features past the memory budgets. The file has no name (``tempfile.TemporaryFile``), so nothing is
left behind, even when the process is killed.

Writes happen in a background thread: a page-cache write of one frame's float32 features (15 MB at 360p)
takes tens of milliseconds of kernel time, which the caller's next detector call hides. At most
``pending`` arrays wait for the writer, so memory stays bounded; a write error is raised by the next call.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from typing import Iterator, Optional

import numpy as np

_STOP = object()


class ArraySpool:
    """A sequence of arrays of one item shape and dtype, on disk."""

    def __init__(self, prefix: str, directory: Optional[str] = None, pending: int = 2) -> None:
        self.directory = directory or tempfile.gettempdir()
        # unbuffered: the arrays are large, and an error belongs to the write that met it, not to a later close
        self.file = tempfile.TemporaryFile(prefix=prefix, dir=self.directory, buffering=0)
        self.item_shape: Optional[tuple[int, ...]] = None
        self.dtype: Optional[np.dtype] = None
        self.count = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, pending))
        self._error: Optional[BaseException] = None
        self._writer: Optional[threading.Thread] = None

    def append(self, items: np.ndarray) -> None:
        """Append ``items`` (N, *item_shape); every call must give the same item shape and dtype.

        The array is written later, from the writer thread: the caller must not change it afterwards.
        """
        self._raise_error()
        if self.item_shape is None:
            self.item_shape, self.dtype = tuple(items.shape[1:]), items.dtype
        elif tuple(items.shape[1:]) != self.item_shape or items.dtype != self.dtype:
            raise ValueError(
                f"spool holds {self.dtype} items of shape {self.item_shape}, got {items.dtype} {tuple(items.shape[1:])}"
            )
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="vita-spool-writer", daemon=True)
            self._writer.start()
        self._queue.put(items)
        self.count += items.shape[0]

    def _write_loop(self) -> None:
        while True:
            items = self._queue.get()
            try:
                if items is _STOP:
                    return
                if self._error is None:  # after an error, drain without writing so that no caller blocks
                    view = memoryview(np.ascontiguousarray(items)).cast("B")
                    while view:  # a raw write may take less than it was given
                        view = view[self.file.write(view):]
            except BaseException as e:  # handed to the caller by the next append/chunks/flush
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise OSError(f"writing the temporary spool file failed: {self._error}") from self._error

    def flush(self) -> None:
        """Wait until everything appended is in the file; raises what the writer met."""
        if self._writer is not None:
            self._queue.join()
        self._raise_error()

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Everything written, in order, as fresh writable arrays of ``size`` items (the last may be shorter)."""
        self.flush()
        self.file.seek(0)
        for start in range(0, self.count, size):
            out = np.empty((min(size, self.count - start), *self.item_shape), dtype=self.dtype)
            view = memoryview(out).cast("B")
            while view:  # a raw read may give less than asked
                got = self.file.readinto(view)
                if not got:
                    raise OSError(f"the temporary spool file {self.file.name} was cut short")
                view = view[got:]
            yield out

    def close(self) -> None:
        """Stop the writer and delete the file."""
        if self._writer is not None:
            self._error = self._error or OSError("spool closed")  # pending arrays are dropped, not written
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self.file.close()
