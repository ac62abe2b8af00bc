"""Whole-dataset inference to a YouTube-VIS submission file: sharded across processes, resumable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vita_train.utils.atomic import atomic_write

from .segmenter import Segmenter
from .video_io import read_image

log = logging.getLogger(__name__)


class DatasetRunError(ValueError):
    """The json or the ``<out>.parts`` folder of a dataset run cannot be used as given."""


_RESULT_OPTIONS = ("prune_ratio", "window", "topk", "min_size", "max_size", "token_dtype")
_WHAT = {"model": "model", "ytvis_json": "ground-truth json", "options": "set of options"}


def _read_frames(root: Path, file_names: list[str]) -> Iterator[np.ndarray]:
    for name in file_names:
        yield read_image(root / name)


def shard() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _check_categories(data: dict, names: tuple[str, ...], ytvis_json: Path) -> None:
    """Warn where the json's categories (id = label + 1) name other classes than the model: a model of another
    dataset, or a 40-class checkpoint read as YouTube-VIS 2019 on 2021 data."""
    cats = {c.get("id"): c.get("name") for c in data.get("categories") or [] if isinstance(c, dict)}
    differ = [(i + 1, name, cats[i + 1]) for i, name in enumerate(names) if i + 1 in cats and cats[i + 1] != name]
    if differ:
        cid, ours, theirs = differ[0]
        log.warning("the model's class names differ from %s's categories at %d of %d ids (id %d: the model's %r, "
                    "the json's %r); the submission uses the model's labels as category ids. If the model was "
                    "trained on this dataset, name it (--dataset / dataset=, e.g. ytvis_2021)",
                    ytvis_json, len(differ), len(cats), cid, ours, theirs)


def _run_identity(segmenter: Segmenter, ytvis_json: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What the parts of a run depend on: the model, the ground-truth json's bytes and the segment options that
    change results (not those of memory, batching or speed, which a rerun after a crash may well change)."""
    used = dataclasses.asdict(segmenter.options.updated(**options))
    used = {k: used[k] for k in _RESULT_OPTIONS}
    return {
        "model": segmenter.source,
        "ytvis_json": hashlib.sha256(Path(ytvis_json).read_bytes()).hexdigest(),
        "options": used,
    }


def _claim_parts(parts: Path, identity: dict[str, Any]) -> None:
    """Refuse a parts folder left by a run of another model, json or options: its videos would be skipped and
    their old results merged as if they were this run's."""
    record = parts / "run.json"
    if not record.exists():
        # (another rank may write the record meanwhile: it does so before any result of its own)
        if any(p.name != record.name for p in parts.glob("*.json")) and not record.exists():
            raise DatasetRunError(f"{parts} holds results that do not say which model and options made them; "
                                  "remove that folder to start again, or choose another --out")
        atomic_write(record, lambda f: json.dump(identity, f, indent=1), binary=False)
    try:
        earlier = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        earlier = None
    if earlier != identity:
        differ = [_WHAT[k] for k in identity if not isinstance(earlier, dict) or earlier.get(k) != identity[k]]
        raise DatasetRunError(f"{parts} holds the results of an earlier run made with a different "
                              f"{' and '.join(differ)}; remove that folder to start again, or choose another --out")


def run_dataset(
    segmenter: Segmenter, ytvis_json: Path, frames_root: Path, out: Path, wait_s: float = 3600.0, **options: Any
) -> int:
    """Segment every video of a YouTube-VIS json; write ``out`` (rank 0). Returns the videos done here.

    Each video's records go to ``<out>.parts/<video_id>.json`` as soon as it is done, so a rerun after a
    crash skips finished videos; rank r takes videos r, r+W, ...; rank 0 merges once all parts exist.
    """
    try:
        data = json.loads(Path(ytvis_json).read_text())
        videos = sorted(data["videos"], key=lambda v: v["id"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetRunError(f"{ytvis_json} is not a readable YouTube-VIS json with a 'videos' list ({e})") from None
    _check_categories(data, segmenter.config.label_names(), ytvis_json)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    _claim_parts(parts, _run_identity(segmenter, ytvis_json, options))
    rank, world = shard()
    done_here = 0
    for video in videos[rank::world]:
        part = parts / f"{video['id']}.json"
        if part.exists():
            log.info("video %s already done, skipping", video["id"])
            continue
        missing = [n for n in video["file_names"] if not (frames_root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"video {video['id']}: {len(missing)} frame files missing under {frames_root}, e.g. {missing[0]}")
        result = segmenter.segment(_read_frames(frames_root, video["file_names"]), **options)
        records = result.to_ytvis(video["id"])
        atomic_write(part, lambda f: json.dump(records, f), binary=False)
        done_here += 1
    if rank == 0:
        deadline = time.monotonic() + wait_s
        expected = [parts / f"{v['id']}.json" for v in videos]
        while not all(p.exists() for p in expected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for other ranks' results in {parts}")
            time.sleep(1.0)
        merged: list[dict] = []
        for p in expected:
            merged.extend(json.loads(p.read_text()))
        atomic_write(out, lambda f: json.dump(merged, f), binary=False)
    return done_here
