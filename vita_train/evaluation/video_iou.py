"""Tracks as foreground intervals of their RLEs, and the YouTube-VIS video IoU between tracks.

A track's frames are laid end to end in one position space (frame f, column-major pixel p at f*H*W + p), so
the intersection summed over a video is the overlap of two sorted interval lists: no mask is ever decoded
to pixels, which keeps full-resolution videos cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class Track:
    """One instance over a video: its foreground intervals and per-frame pixel counts."""

    ann_id: int
    starts: np.ndarray  # (n,) int64, sorted, in the video's position space
    ends: np.ndarray  # (n,) int64, exclusive
    pixels: np.ndarray  # (L,) int64 pixel count per frame, 0 where absent
    mean_area: float = 0.0  # the area used for the small/medium/large ranges
    score: float = 0.0
    crowd: bool = False


def decode_counts(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths of compressed COCO RLE strings, concatenated, and how many runs each string has."""
    n_str = len(strings)
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=n_str)
    code = np.frombuffer(b"".join(strings), dtype=np.uint8).astype(np.int64) - 48
    if code.size == 0:
        return _EMPTY, np.zeros(n_str, dtype=np.int64)
    if ((code < 0) | (code > 63)).any():
        raise ValueError("RLE string has a character outside '0'..'o'")
    more = (code & 0x20) != 0
    last_char = np.cumsum(lengths)[lengths > 0] - 1
    if more[last_char].any():
        raise ValueError("RLE string ends inside a number")
    # 5 bits per character, least significant first; a set 0x20 bit continues the number.
    ends = np.flatnonzero(~more)
    firsts = np.concatenate(([0], ends[:-1] + 1))
    number = np.cumsum(~more) - ~more
    digit = np.arange(code.size) - firsts[number]
    value = np.add.reduceat((code & 0x1F) << (5 * digit), firsts)
    n_digits = digit[ends] + 1
    value -= np.where((code[ends] & 0x10) != 0, np.left_shift(1, 5 * n_digits), 0)  # sign extension
    # runs from the 4th on are stored as differences to the run two before
    owner = np.searchsorted(np.cumsum(lengths), ends, side="right")
    per_string = np.bincount(owner, minlength=n_str)
    first_run = np.cumsum(per_string) - per_string
    m = np.arange(value.size) - first_run[owner]
    delta = np.where(m == 0, 0, value)
    even = m % 2 == 0
    acc_even = np.concatenate(([0], np.cumsum(np.where(even, delta, 0))))
    acc_odd = np.concatenate(([0], np.cumsum(np.where(even, 0, delta))))
    chained = np.where(even, acc_even[1:] - acc_even[first_run[owner]], acc_odd[1:] - acc_odd[first_run[owner]])
    counts = np.where(m == 0, value, chained)
    if (counts < 0).any():
        raise ValueError("RLE has a negative run length")
    return counts, per_string


def build_track(ann_id: int, frames: list[bytes | None], frame_pixels: int) -> Track:
    """A track from per-frame compressed RLE strings (None where absent), all of ``frame_pixels`` pixels."""
    present = [f for f, s in enumerate(frames) if s is not None]
    pixels = np.zeros(len(frames), dtype=np.int64)
    if not present:
        return Track(ann_id, _EMPTY, _EMPTY, pixels)
    counts, per_string = decode_counts([frames[f] for f in present])
    total = np.concatenate(([0], np.cumsum(counts)))
    bounds = np.concatenate(([0], np.cumsum(per_string)))
    sizes = total[bounds[1:]] - total[bounds[:-1]]
    bad = np.flatnonzero(sizes != frame_pixels)
    if bad.size:
        f = present[bad[0]]
        raise ValueError(f"frame {f}: RLE runs cover {sizes[bad[0]]} pixels, not the mask's {frame_pixels}")
    string = np.repeat(np.arange(len(present)), per_string)
    m = np.arange(counts.size) - bounds[string]
    # odd runs are foreground (RLEs start with background)
    fg = (m % 2 == 1) & (counts > 0)
    offset = np.asarray(present, dtype=np.int64)[string] * frame_pixels - total[bounds[string]]
    starts = (total[:-1] + offset)[fg]
    pixels[present] = np.bincount(string[fg], weights=counts[fg], minlength=len(present)).astype(np.int64)
    return Track(ann_id, starts, starts + counts[fg], pixels)


def _covered(gt: Track, x: np.ndarray) -> np.ndarray:
    """Number of the GT's foreground positions below each position in ``x``."""
    lengths = gt.ends - gt.starts
    before = np.concatenate(([0], np.cumsum(lengths)))
    i = np.searchsorted(gt.ends, x, side="right")  # intervals wholly below x
    open_start = np.concatenate((gt.starts, [np.iinfo(np.int64).max]))[i]
    return before[i] + np.maximum(x - open_start, 0)


def video_iou(dets: list[Track], gts: list[Track]) -> np.ndarray:
    """(D, G) video IoU: integer intersections and unions summed over all frames, then one division."""
    n_d, n_g = len(dets), len(gts)
    iou = np.zeros((n_d, n_g), dtype=np.float64)
    if n_d == 0 or n_g == 0:
        return iou
    d_starts = np.concatenate([d.starts for d in dets])
    d_ends = np.concatenate([d.ends for d in dets])
    d_bounds = np.concatenate(([0], np.cumsum([d.starts.size for d in dets])))
    inter = np.zeros((n_d, n_g), dtype=np.int64)
    for j, gt in enumerate(gts):
        if gt.starts.size == 0 or d_starts.size == 0:
            continue
        overlap = np.concatenate(([0], np.cumsum(_covered(gt, d_ends) - _covered(gt, d_starts))))
        inter[:, j] = overlap[d_bounds[1:]] - overlap[d_bounds[:-1]]
    # |d ∪ g| = |d| + |g| - |d ∩ g| per frame, and a frame where only one side has pixels adds those pixels.
    union = np.array([d.pixels.sum() for d in dets])[:, None] + np.array([g.pixels.sum() for g in gts])[None, :]
    union -= inter
    np.divide(inter, union, out=iou, where=union > 0)
    return iou
