"""COCO category ids -> YouTube-VIS 2019 / 2021 / OVIS category ids, for joint training on COCO pseudo-videos.

The three tables are the ones the official VITA code uses (``vita/data/datasets/ytvis.py`` and
``ovis.py``); COCO categories absent from a table have no counterpart in that dataset and their
annotations are dropped. Several COCO classes may map to one target class (e.g. COCO car, bus and
truck all become OVIS "Vehical").
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence, Union

from vita_train.data.class_names import OVIS, YTVIS_2019, YTVIS_2021

__all__ = [
    "COCO_TO_OVIS", "COCO_TO_YTVIS_2019", "COCO_TO_YTVIS_2021", "coco_category_map", "target_class_names", "target_key",
]

log = logging.getLogger(__name__)

COCO_TO_YTVIS_2019: Mapping[int, int] = {
    1: 1, 2: 21, 3: 6, 4: 21, 5: 28, 7: 17, 8: 29, 9: 34, 17: 14, 18: 8, 19: 18, 21: 15, 22: 32, 23: 20,
    24: 30, 25: 22, 35: 33, 36: 33, 41: 5, 42: 27, 43: 40,
}

COCO_TO_YTVIS_2021: Mapping[int, int] = {
    1: 26, 2: 23, 3: 5, 4: 23, 5: 1, 7: 36, 8: 37, 9: 4, 16: 3, 17: 6, 18: 9, 19: 19, 21: 7, 22: 12, 23: 2,
    24: 40, 25: 18, 34: 14, 35: 31, 36: 31, 41: 29, 42: 33, 43: 34,
}

COCO_TO_OVIS: Mapping[int, int] = {
    1: 1, 2: 21, 3: 25, 4: 22, 5: 23, 6: 25, 8: 25, 9: 24, 17: 3, 18: 4, 19: 5, 20: 6, 21: 7, 22: 8, 23: 9,
    24: 10, 25: 11,
}

_TABLES: dict[str, tuple[Mapping[int, int], tuple[str, ...]]] = {
    "ytvis_2019": (COCO_TO_YTVIS_2019, YTVIS_2019),
    "ytvis_2021": (COCO_TO_YTVIS_2021, YTVIS_2021),
    "ovis": (COCO_TO_OVIS, OVIS),
}

_ALIASES = {
    "ytvis_2019": "ytvis_2019", "ytvis2019": "ytvis_2019", "ytvis19": "ytvis_2019", "ytvis_19": "ytvis_2019",
    "coco2ytvis2019": "ytvis_2019",
    "ytvis_2021": "ytvis_2021", "ytvis2021": "ytvis_2021", "ytvis21": "ytvis_2021", "ytvis_21": "ytvis_2021",
    "coco2ytvis2021": "ytvis_2021",
    "ovis": "ovis", "coco2ovis": "ovis",
}

CategoryList = Sequence[Union[Mapping[str, object], int]]


def target_key(target: str) -> str:
    """Normalise a target dataset name (``ytvis_2019``, ``ytvis19``, ``ovis_train``, ...) to a table key."""
    name = target.lower().replace("-", "_")
    for suffix in ("_train", "_val", "_valid", "_test"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name not in _ALIASES:
        raise ValueError(
            f"no COCO category table for target dataset {target!r}; known targets: ytvis_2019, ytvis_2021, ovis"
        )
    return _ALIASES[name]


def target_class_names(target: str) -> tuple[str, ...]:
    """Class names of ``target`` (label k = category id k + 1), the label space a COCO map leads into."""
    return _TABLES[target_key(target)][1]


def coco_category_map(target: str, target_categories: CategoryList | None = None) -> dict[int, int]:
    """COCO category id -> 0-based class index of ``target`` (positions in ``target_categories``, default 1..K)."""
    table, names = _TABLES[target_key(target)]
    if target_categories is None:
        # the released datasets number their categories 1..K in class-name order
        target_ids = list(range(1, len(names) + 1))
    else:
        target_ids = [int(c["id"]) if isinstance(c, Mapping) else int(c) for c in target_categories]
    position = {cid: i for i, cid in enumerate(target_ids)}
    mapping: dict[int, int] = {}
    missing = sorted({t for t in table.values() if t not in position})
    for coco_id, target_id in table.items():
        if target_id in position:
            mapping[coco_id] = position[target_id]
    if missing:
        # a subset of the target's categories is legitimate (small experiments); say which COCO classes vanish
        log.warning(
            "target %s categories lack ids %s that COCO classes map to; those COCO annotations will be dropped",
            target, missing,
        )
    return mapping
