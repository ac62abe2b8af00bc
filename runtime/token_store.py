"""A video's frame tokens, kept out of the detector's memory while it runs.

Every frame leaves tokens (100 x 256 float32, 100 KB) that live until the token engine has run: a memory cost
that grows with the video while the detector is at its peak. The first ``memory_budget`` bytes (8 MB: 80
full-size frames) stay in memory, the rest go to an unnamed temporary file and come back when the token engine
asks for them, after detection, when the detector's working memory is free (``release_freed_memory``). The
torch backend's peak for a 360-frame clip then equals the 36-frame one (full-size R-50, 360x640, AMD EPYC Zen 2,
memory benchmark: 1.375 / 1.379 GB, against 1.382 / 1.454 with every token in memory). Where the file cannot
be written (a full or read-only disk) the tokens stay in memory, with a warning.

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

from .spool import ArraySpool, check_disk_reserve

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20
MEMORY_BUDGET = 8 << 20
READ_FRAMES = 256  # frames read back from the file at a time
_FILE = "the temporary file"  # the place of the file's frames among the parts (written once, in one run)


class TokenStore:
    """Frame tokens (B, Q, C) added batch by batch (torch CPU tensors or numpy arrays, one kind and per-frame shape
    per store), handed back by ``take()`` as one array in frame order. Tensors on a GPU are kept as given.

    ``memory_budget``: bytes kept in memory before the rest goes to a temporary file in ``directory`` (the
    system's temporary folder by default); None keeps everything in memory.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, memory_budget: Optional[int] = MEMORY_BUDGET,
                 directory: Optional[str] = None) -> None:
        self.chunk_bytes = chunk_bytes
        self.memory_budget = memory_budget
        self.directory = directory or tempfile.gettempdir()
        self._kept: list[Any] = []  # device tensors, as given
        # in frame order: [bytes of one mapping, frames written into it], or _FILE
        self._parts: list = []
        self._memory_bytes = 0
        self._spool: Optional[ArraySpool] = None
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
        if last is None or last is _FILE or (last[1] + frames) * self._frame_bytes > last[0].nbytes:
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
            if self._spool is None:
                # written by append itself (pending=0): a failed write raises here, before anything is lost;
                # through the page cache (100 KB a frame), not waiting on the disk in the detector loop
                self._spool = ArraySpool(prefix="vita-tokens-", directory=self.directory, pending=0, direct=False)
                log.info("frame tokens past %.0f MB wait in a temporary file", self.memory_budget / 2**20)
            check_disk_reserve(self.directory, raw.nbytes)
            self._spool.append(raw.reshape(frames, self._frame_bytes))
        except OSError as e:
            log.warning("cannot write frame tokens to a temporary file in %s (%s): keeping them in memory",
                        self.directory, e)
            self._file_failed = True
            return False
        if not self._parts or self._parts[-1] is not _FILE:
            self._parts.append(_FILE)
        return True

    @property
    def frames_in_file(self) -> int:
        """How many frames' tokens wait in the temporary file."""
        return 0 if self._spool is None else self._spool.count

    def take(self) -> Optional[Any]:
        """Everything added, in frame order, as one new (frames, Q, C) array (a torch tensor for torch batches;
        device tensors concatenated where they are), or None when nothing was. The caller owns it; the store
        is emptied as it is filled, so the tokens are in memory once."""
        if self._kept:
            out, self._kept = _cat_torch(self._kept), []
            return out
        if self._like is None:
            return None
        frames = sum(part[1] for part in self._parts if part is not _FILE) + self.frames_in_file
        out, flat = self._empty(frames)
        pos = 0
        while self._parts:
            part = self._parts.pop(0)  # each mapping unmapped once copied
            if part is _FILE:
                for raw in self._spool.chunks(READ_FRAMES):
                    flat[pos : pos + raw.nbytes] = raw.reshape(-1)
                    pos += raw.nbytes
            else:
                chunk, used = part
                flat[pos : pos + used * self._frame_bytes] = chunk[: used * self._frame_bytes]
                pos += used * self._frame_bytes
        self.close()
        return out

    def close(self) -> None:
        """Delete the temporary file, if any, and let go of the tokens."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._parts, self._kept = [], []

    def _empty(self, frames: int) -> tuple[Any, np.ndarray]:
        """A new (frames, Q, C) array of the batches' kind and dtype, and its bytes as a flat uint8 view."""
        like = self._like
        shape = (frames, *like.shape[1:])
        if _is_torch(like):
            import torch

            out = torch.empty(shape, dtype=like.dtype)
            return out, out.view(-1).view(torch.uint8).numpy()
        out = np.empty(shape, dtype=like.dtype)
        return out, out.reshape(-1).view(np.uint8)


def _cat_torch(tensors: list[Any]) -> Any:
    import torch

    return torch.cat(tensors)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _raw(tokens: Any) -> np.ndarray:
    """The bytes of a CPU batch as a flat uint8 array (bf16 included, which numpy has no type for)."""
    if _is_torch(tokens):
        import torch

        return tokens.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(tokens).reshape(-1).view(np.uint8)
