"""Loading official and native checkpoints, and clear errors for every kind of bad file."""

from __future__ import annotations

import collections
import shutil

import av
import numpy as np
import pytest
import torch

from vita_train import CheckpointError, ConfigError, load_model, save_checkpoint
from vita_train.inference import predict_video
from vita_train.modeling.vita_model import VitaModel

from .conftest import require_shared


class NotATensor:
    """A custom class: unpickling it would need arbitrary code."""

    def __init__(self) -> None:
        self.payload = 1


@pytest.fixture(scope="module")
def r50_dir():
    return require_shared("fixtures", "official", "r50_tiny")


@pytest.fixture(scope="module")
def r50_state(r50_dir):
    return torch.load(r50_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def test_config_beside_checkpoint_is_read(r50_dir):
    model = load_model(r50_dir / "model_final.pth")
    assert model.config.vita.window == 6 and model.config.vita.num_heads == 4
    assert model.config.input.min_size_test == 128
    assert model.config.dataset == "ytvis_2019" and model.config.class_names[0] == "person"
    assert not model.training


def test_without_config_released_defaults_and_overrides(r50_dir, r50_state, tmp_path):
    path = tmp_path / "alone.pth"
    torch.save({"model": r50_state, "iteration": 0}, path)
    model = load_model(path, vita_heads=4)
    assert (model.config.vita.window, model.config.test.topk, model.config.input.min_size_test) == (6, 10, 360)
    model = load_model(path, config=r50_dir / "config.yaml", window=3, dataset="ytvis_2021")
    assert model.config.vita.window == 3 and model.config.class_names[0] == "airplane"


def test_module_prefix_and_bare_state_dict(r50_state, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in r50_state.items()), path)
    load_model(path, vita_heads=4)


def test_native_round_trip_gives_identical_results(r50_dir, tmp_path):
    model = load_model(r50_dir / "model_final.pth")
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model)
    again = load_model(path)
    assert again.config == model.config
    frames = np.load(r50_dir / "frames.npy")[:4]
    a, b = predict_video(model, frames), predict_video(again, frames)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.masks, b.masks)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(path)


def test_files_of_another_kind_are_named_not_called_unsafe_pickles(r50_dir, tmp_path):
    """A config, a video or an array given as the checkpoint: torch's weights-only unpickler reads their bytes as
    opcodes and would have the user re-save them as if they were pickles that run code."""
    with pytest.raises(CheckpointError, match="is a config file, not a checkpoint") as err:
        load_model(r50_dir / "config.yaml")
    assert "arbitrary Python objects" not in str(err.value)
    np.save(tmp_path / "frames.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(CheckpointError, match="is a NumPy array file"):
        load_model(tmp_path / "frames.npy")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    with pytest.raises(CheckpointError, match="clip.mp4 is not a PyTorch checkpoint, neither a zip archive nor a pickle"):
        load_model(video)
    # control: a legacy-format (pickle, not zip) checkpoint with an arbitrary object still gets the unsafe-pickle refusal
    legacy = tmp_path / "legacy.pth"
    torch.save({"trainer": NotATensor()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        load_model(legacy)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth")


def test_truncated_file(r50_dir, tmp_path):
    data = (r50_dir / "model_final.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_arbitrary_objects_are_refused(r50_state, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": r50_state, "trainer": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        load_model(path)


def test_mask2former_image_checkpoint_is_refused(r50_state, tmp_path):
    path = tmp_path / "m2f.pth"
    torch.save({"model": {k: v for k, v in r50_state.items() if not k.startswith("vita_module.")}}, path)
    with pytest.raises(CheckpointError, match="Mask2Former image checkpoint without the VITA module"):
        load_model(path)


def test_other_model_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}}, path)
    with pytest.raises(CheckpointError, match="not of a VITA/Mask2Former model"):
        load_model(path)


def test_missing_and_unexpected_keys_are_listed(r50_state, r50_dir, tmp_path):
    state = dict(r50_state)
    del state["vita_module.query_embed.weight"]
    state["vita_module.extra.weight"] = torch.zeros(1)
    shutil.copy(r50_dir / "config.yaml", tmp_path / "config.yaml")
    path = tmp_path / "model.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "missing keys (1): vita.query_embed.weight" in msg
    assert "unexpected keys (1): vita.extra.weight" in msg


def test_a_training_runs_config_yaml_gives_the_model_config(tmp_path):
    """A run's config.yaml (model: plus data:, solver:, ...) given as config= uses its model: section; it was
    refused as unknown keys (solver, data, ...)."""
    from vita_train.presets import preset
    from vita_train.training.config import TrainConfig

    model = VitaModel(preset("vita_tiny").replace(**{"vita.window": 3})).eval()
    ckpt = tmp_path / "model_final.pth"
    save_checkpoint(ckpt, model)
    run_config = tmp_path / "config.yaml"
    run_config.write_text(TrainConfig(model=model.config.replace(**{"test.topk": 7})).to_yaml())
    loaded = load_model(ckpt, config=run_config)
    assert loaded.config.test.topk == 7 and loaded.config.vita.window == 3


def test_bad_config_file(r50_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model(r50_dir / "model_final.pth", config=bad)
