"""Typed config YAML round-trip, presets, and reading each preset's architecture back from its weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vita_train import PRESET_NAMES, ConfigError, ModelConfig, VitaModel, preset
from vita_train.checkpoint import official
from vita_train.checkpoint.loader import config_for_official_state


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_yaml_round_trip(name):
    cfg = preset(name)
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg


def test_unknown_key_is_a_clear_error():
    data = preset("vita_r50_ytvis19").to_dict()
    data["vita"]["windw"] = 3
    with pytest.raises(ConfigError, match="vita.windw"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match="unknown config key 'vita.nope'"):
        preset("vita_r50_ytvis19").replace(**{"vita.nope": 1})


@pytest.mark.parametrize("key", ["input.min_size_test", "input.max_size_test", "test.detector_chunk", "test.mask_chunk"])
def test_sizes_and_chunks_below_one_are_refused(key):
    """A test size or chunk of 0 (load_model(min_size=0), a YAML typo) was accepted and failed or misread later."""
    with pytest.raises(ConfigError, match=f"{key} must be >= 1, got 0"):
        preset("vita_r50_ytvis19").replace(**{key: 0})


def test_released_preset_values():
    r50, swin, ovis = preset("vita_r50_ytvis19"), preset("vita_swinl_ytvis21"), preset("vita_r101_ovis")
    assert (r50.frame_decoder.num_queries, swin.frame_decoder.num_queries) == (100, 200)
    assert (r50.input.min_size_test, swin.input.min_size_test) == (360, 448)
    assert (r50.vita.enc_layers, r50.vita.dec_layers, r50.vita.num_queries, r50.vita.window) == (6, 3, 100, 6)
    assert (ovis.num_classes, ovis.test.topk, r50.test.topk) == (25, 20, 10)
    assert swin.swin.depths == (2, 2, 18, 2) and swin.swin.num_heads == (6, 12, 24, 48)
    assert r50.class_names[0] == "person" and swin.class_names[0] == "airplane"


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_recovered_from_official_layout_weights(name):
    cfg = preset(name)
    with torch.device("meta"):  # shapes only: no 900 MB of Swin-L weights
        state = VitaModel(cfg).state_dict()
    layout = official.to_official(state)
    assert any(k.startswith("sem_seg_head.predictor.") for k in layout)
    layout["criterion.empty_weight"] = torch.empty(cfg.num_classes + 1, device="meta")
    layout["vita_criterion.empty_weight"] = torch.empty(cfg.num_classes + 1, device="meta")
    settings = {"dataset": f"{cfg.dataset}_val"}
    if name == "vita_tiny":  # not a released model: what its weights cannot tell comes from its config
        settings.update({"vita.num_heads": cfg.vita.num_heads, "input.min_size_test": cfg.input.min_size_test})
    recovered = config_for_official_state(official.from_official(layout), settings)
    assert dataclasses.replace(recovered, name=cfg.name) == cfg
