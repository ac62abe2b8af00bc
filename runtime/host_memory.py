"""Host memory allocator settings for CPU inference: freed blocks stay in the process.

The detector allocates and frees tens of megabytes per frame. With glibc's default malloc, blocks that
large are mapped fresh and returned to the system each time, so every frame pays a page fault per 4 KB it
touches (measured on the 2-core Xeon: ~5% of the fp32 and bf16 detector time, with large swings between
runs). Raising malloc's mmap and trim thresholds keeps those blocks for reuse; peak memory is unchanged
(measured), but memory freed after the peak is not handed back to the system while the process lives.
Blocks of 64 MB and more (the feature store's read-ahead chunks, the tokens of a long video in one array)
still get a mapping of their own: kept in the heap among the small long-lived arrays, they fragmented it and
the peak crept up with video length (bf16 R-50, 360 frames, 2-core Xeon: 1.54-1.66 GB with a 256 MB
threshold, 1.24 with 64 MB; 36 frames 1.25-1.36 either way). With those thresholds every thread's malloc
arena keeps what it freed, so the process's peak became a sum of
per-thread peaks that varied from run to run; one arena for all threads makes it the peak of what is alive.
That holds for blocks allocated after the call: ``runtime.load`` makes it before building a CPU model.
Set ``VITA_KEEP_FREED_MEMORY=0`` to leave malloc as it is. Other C libraries (musl, macOS, Windows) are
left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30
ARENAS = 1


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed large blocks (once per process); True when it was set."""
    if os.environ.get("VITA_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    # one arena for every thread: a block kept by one thread's arena is reused by any other thread, so the
    # process's peak is the peak of what is alive, not a sum of per-thread peaks (measured, bf16 R-50, 36
    # frames: peak RSS 1.21-1.68 GB over five runs with an arena per thread, 1.28-1.33 GB with one)
    done = done and bool(mallopt(_M_ARENA_MAX, ARENAS))
    log.debug("malloc keeps freed blocks up to %d MB: %s", MMAP_THRESHOLD >> 20, done)
    return done


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (``malloc_trim``), where ``keep_freed_memory`` kept them.

    For the end of a video's detection: the detector's working memory is free then, and the token engine and
    mask head that follow allocate the whole video's tokens; on top of the pages the detector had freed they
    pushed the process's peak up with the video's length. The next video's detector faults its pages in again
    (one pass, ~0.3 GB at full size).
    """
    if not (keep_freed_memory.cache_info().currsize and keep_freed_memory()):
        return  # not set in this process (asking would set it): malloc trims by itself
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
