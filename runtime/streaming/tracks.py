"""Track state across clips: persistent ids, score-weighted label votes, the masks to match the next clip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .association import mask_iou, match
from .options import StreamOptions


@dataclass
class Track:
    """One live track: what the next clip is matched against."""

    track_id: int
    last_masks: list[Optional[dict]]  # RLEs of the last frames of the clip that last saw it
    votes: dict[int, float] = field(default_factory=dict)  # label -> summed score
    missed: int = 0  # consecutive clips without a match

    def vote(self, label: int, score: float) -> int:
        """Add this clip's vote; returns the track's label (highest summed score, lower label on ties)."""
        self.votes[label] = self.votes.get(label, 0.0) + float(score)
        return self.label

    @property
    def label(self) -> int:
        """The label with the highest summed score."""
        return min(self.votes, key=lambda lab: (-self.votes[lab], lab))


class TrackSet:
    """The live tracks; ``update`` links one clip's instances to them and ends stale ones."""

    def __init__(self, options: StreamOptions, frame_pixels: int) -> None:
        self.options = options
        self.frame_pixels = frame_pixels
        self.live: list[Track] = []
        self.next_id = 0

    def update(
        self,
        labels: Sequence[int],
        scores: Sequence[float],
        heads: Sequence[Sequence[Optional[dict]]],
        tails: Sequence[list[Optional[dict]]],
    ) -> tuple[list[tuple[int, int, bool]], list[int]]:
        """Link instance i (its ``heads[i]`` masks on the frames shared with the last clip) to a track.

        Returns per instance (track id, voted label, started here) and the ids of tracks that ended.
        ``tails[i]`` are the masks the next clip will be matched against.
        """
        previous = [t.label for t in self.live]
        iou = mask_iou([t.last_masks for t in self.live], heads, self.frame_pixels)
        pairs = match(iou, self.options.association, self.options.min_iou, previous, labels)
        track_of = {i: t for t, i in pairs}
        out: list[tuple[int, int, bool]] = []
        for i, (label, score) in enumerate(zip(labels, scores)):
            if i in track_of:
                track, new = self.live[track_of[i]], False
            else:
                track, new = Track(self.next_id, []), True
                self.next_id += 1
            track.missed = 0
            track.last_masks = list(tails[i])
            out.append((track.track_id, track.vote(int(label), float(score)), new))
            if new:
                self.live.append(track)
        matched = set(track_of.values())
        ended: list[int] = []
        kept: list[Track] = []
        for n, track in enumerate(self.live):
            if n < len(previous) and n not in matched:
                track.missed += 1
                if track.missed > self.options.max_missed:
                    ended.append(track.track_id)
                    continue
            kept.append(track)
        self.live = kept
        return out, ended
