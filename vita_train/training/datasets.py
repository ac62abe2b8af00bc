"""From the data section of a training config to the infinite, resumable loader of clips."""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader

from ..config import ConfigError
from ..data.category_maps import coco_category_map, target_class_names
from ..data.clips import make_source
from ..data.loader import MixedClipDataset, build_train_loader
from ..data.records import load_coco, load_ytvis
from .config import TrainConfig, category_map_target

log = logging.getLogger(__name__)


def build_dataset(cfg: TrainConfig) -> MixedClipDataset:
    """Load every dataset of ``cfg.data`` and mix them by their ratios."""
    data = cfg.data
    if not data.datasets:
        raise ConfigError("data.datasets is empty: name at least one dataset (format, json, images)")
    sources, ratios = [], []
    for i, ds in enumerate(data.datasets):
        if not ds.json or not ds.images:
            raise ConfigError(f"data.datasets[{i}] ({ds.name}) needs both 'json' and 'images' paths")
        category_map = coco_category_map(category_map_target(ds.category_map)) if ds.category_map else None
        loader = load_ytvis if ds.format == "ytvis" else load_coco
        records = loader(ds.json, ds.images, name=ds.name, category_map=category_map)
        if category_map is None and len(records.class_names) != cfg.model.num_classes:
            raise ConfigError(
                f"dataset {ds.name} ({ds.json}) has {len(records.class_names)} categories but the model has "
                f"model.num_classes={cfg.model.num_classes}; set model.num_classes (and class_names) to match, or "
                "give a category_map"
            )
        names = records.class_names
        if category_map is not None:
            names = target_class_names(category_map_target(ds.category_map))
        _warn_if_other_classes(ds.name, names, cfg.model.class_names)
        sources.append(make_source(records, data.num_frames, data.frame_range, data.augment, ds.name))
        ratios.append(ds.ratio)
        log.info("dataset %s: %d items, ratio %.2f", ds.name, len(sources[-1]), ds.ratio)
    return MixedClipDataset(sources, ratios, seed=cfg.seed)


def _warn_if_other_classes(dataset: str, names: tuple[str, ...] | None, model_names: tuple[str, ...]) -> None:
    """Warn when a dataset's label k names another class than the model's label k (another dataset's model)."""
    if not names or not model_names:
        return

    def key(name: str) -> str:
        return name.strip().lower().replace(" ", "_").replace("-", "_")

    differ = [f"{k}: {a!r} vs {b!r}" for k, (a, b) in enumerate(zip(names, model_names)) if key(a) != key(b)]
    if differ:
        log.warning(
            "dataset %s names other classes than model.class_names at %d labels (label: dataset vs model; %s%s); the "
            "model will learn and report the dataset's classes under its own names: check model.class_names",
            dataset, len(differ), "; ".join(differ[:5]), ", ..." if len(differ) > 5 else "",
        )


def build_train_loader_from_config(
    cfg: TrainConfig, dataset: MixedClipDataset, batch_per_rank: int, start_step: int, rank: int, world_size: int
) -> DataLoader:
    """The loader for this process, starting at ``start_step`` so a resumed run sees the same clips."""
    return build_train_loader(dataset, batch_per_rank, start_step, rank, world_size, num_workers=cfg.data.num_workers)
