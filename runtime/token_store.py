"""A video's frame tokens, kept out of the detector's memory while it runs.

Every frame leaves tokens (100 x 256 float32, 100 KB) that live until the token engine has run: a memory cost
that grows with the video while the detector is at its peak. The first ``memory_budget`` bytes (8 MB: 80
full-size frames) stay in memory, the rest go to an unnamed temporary file and come back when the token engine
asks for them, after detection, when the detector's working memory is free (``release_freed_memory``). The
torch backend's peak for a 360-frame clip then equals the 36-frame one (full-size R-50, 360x640, AMD EPYC Zen 2:
1.38 / 1.37 GB, against 1.38 / 1.41-1.45 with every token in memory). Where the file cannot be written (a full
or read-only disk) the tokens stay in memory, with a warning.

In memory they sit in anonymous mappings of their own, not in malloc's heap: allocated there among two
detector calls' transient blocks they split its holes, and the heap grew with the video (the torch backend's
peak 1.39 -> 1.47 GB over 360 frames). Only the pages written count towards resident memory.
"""

from __future__ import annotations

import logging
import mmap
import tempfile
from typing import Any, Optional

import numpy as np

from .spool import check_disk_reserve

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20
MEMORY_BUDGET = 8 << 20


class TokenStore:
    """Frame tokens (B, Q, C) added batch by batch (torch CPU tensors or numpy arrays, one kind and per-frame shape
    per store), handed back by ``arrays()`` as a few arrays in frame order. Tensors on a GPU are kept as given.

    ``memory_budget``: bytes kept in memory before the rest goes to a temporary file in ``directory`` (the
    system's temporary folder by default); None keeps everything in memory.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, memory_budget: Optional[int] = MEMORY_BUDGET,
                 directory: Optional[str] = None) -> None:
        self.chunk_bytes = chunk_bytes
        self.memory_budget = memory_budget
        self.directory = directory or tempfile.gettempdir()
        self._kept: list[Any] = []  # device tensors, as given
        # in frame order: [bytes of one mapping, frames written into it], or a tuple ("file", first frame, frames)
        self._parts: list = []
        self._memory_bytes = 0
        self._file: Optional[Any] = None
        self._file_frames = 0
        self._file_failed = False
        self._like: Optional[Any] = None  # the first batch: kind, dtype and per-frame shape of every one
        self._frame_bytes = 0

    def add(self, tokens: Any) -> None:
        """Keep a batch's tokens (a copy, on the CPU or in the file)."""
        if _is_torch(tokens) and tokens.device.type != "cpu":
            self._kept.append(tokens)
            return
        if self._like is None:
            self._like = tokens[:0]
            self._frame_bytes = _raw(tokens[:1]).nbytes
        elif tokens.dtype != self._like.dtype or tuple(tokens.shape[1:]) != tuple(self._like.shape[1:]):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} and {tokens.dtype} after "
                             f"{tuple(self._like.shape[1:])} and {self._like.dtype}: one video's frames give the same")
        raw = _raw(tokens)
        frames = tokens.shape[0]
        over = self.memory_budget is not None and self._memory_bytes + raw.nbytes > self.memory_budget
        if over and not self._file_failed and self._write(raw, frames):
            return
        self._keep_in_memory(raw, frames)

    def _keep_in_memory(self, raw: np.ndarray, frames: int) -> None:
        last = self._parts[-1] if self._parts else None
        if last is None or isinstance(last, tuple) or (last[1] + frames) * self._frame_bytes > last[0].nbytes:
            size = max(self.chunk_bytes, raw.nbytes)
            last = [np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8), 0]
            self._parts.append(last)
        chunk, used = last
        chunk[used * self._frame_bytes : used * self._frame_bytes + raw.nbytes] = raw
        last[1] = used + frames
        self._memory_bytes += raw.nbytes

    def _write(self, raw: np.ndarray, frames: int) -> bool:
        """Append to the file (made on first use); False, with a warning, where it cannot be written."""
        try:
            if self._file is None:
                # unbuffered and written in this thread: a failed write raises here, before anything is lost
                self._file = tempfile.TemporaryFile(prefix="vita-tokens-", dir=self.directory, buffering=0)
                log.info("frame tokens past %.0f MB wait in a temporary file", self.memory_budget / 2**20)
            check_disk_reserve(self.directory, raw.nbytes)
            view = memoryview(raw)
            offset = self._file_frames * self._frame_bytes
            self._file.seek(offset)
            while view:
                view = view[self._file.write(view):]
        except OSError as e:
            log.warning("cannot write frame tokens to a temporary file in %s (%s): keeping them in memory",
                        self.directory, e)
            self._file_failed = True
            return False
        if self._parts and isinstance(self._parts[-1], tuple):
            self._parts[-1] = ("file", self._parts[-1][1], self._parts[-1][2] + frames)
        else:
            self._parts.append(("file", self._file_frames, frames))
        self._file_frames += frames
        return True

    def arrays(self) -> list[Any]:
        """What was added, oldest first: one (frames, Q, C) array per part (device tensors as given). Parts in
        memory are views of the store's mappings; parts from the file are read into new arrays."""
        if self._kept:
            return list(self._kept)
        out = []
        for part in self._parts:
            if isinstance(part, tuple):
                _, first, frames = part
                raw = np.empty(frames * self._frame_bytes, dtype=np.uint8)
                view, offset = memoryview(raw), first * self._frame_bytes
                self._file.seek(offset)
                while view:
                    got = self._file.readinto(view)
                    if not got:
                        raise OSError(f"the temporary token file {self._file.name} was cut short")
                    view = view[got:]
                out.append(self._view(raw, frames))
            else:
                chunk, used = part
                out.append(self._view(chunk[: used * self._frame_bytes], used))
        return out

    def close(self) -> None:
        """Delete the temporary file, if any, and let go of the tokens."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._parts, self._kept = [], []

    def _view(self, raw: np.ndarray, frames: int) -> Any:
        like = self._like
        shape = (frames, *like.shape[1:])
        if _is_torch(like):
            import torch

            return torch.from_numpy(raw).view(like.dtype).view(shape)
        return raw.view(like.dtype).reshape(shape)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _raw(tokens: Any) -> np.ndarray:
    """The bytes of a CPU batch as a flat uint8 array (bf16 included, which numpy has no type for)."""
    if _is_torch(tokens):
        import torch

        return tokens.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(tokens).reshape(-1).view(np.uint8)
