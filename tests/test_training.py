"""Training end to end on the CPU: a tiny model on synthetic videos, resume, torchrun, fine-tuning, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, require_shared
from vita_train.config import ConfigError
from vita_train.data.synthetic import SYNTHETIC_CLASSES, write_synthetic_dataset

TINY_MODEL = {
    "preset": "vita_tiny",
    "dataset": "synthetic",
    "num_classes": 4,
    "class_names": list(SYNTHETIC_CLASSES),
    "resnet": {"stage_blocks": [1, 1, 1, 1]},
    "input": {"min_size_test": 64},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A small synthetic dataset in YouTube-VIS format."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_videos=6, num_frames=5, height=64, width=64, seed=3, coco_images=6)
    return root / "train"


def recipe(tmp_path: Path, synthetic: Path, name: str = "recipe.yaml", **top) -> Path:
    """A tiny training recipe on the synthetic dataset, written as YAML."""
    data = {
        "model": TINY_MODEL,
        "data": {
            "datasets": [
                {"name": "synth", "format": "ytvis", "json": str(synthetic / "instances.json"),
                 "images": str(synthetic / "JPEGImages")}
            ],
            "num_frames": 2,
            "frame_range": 3,
            "augment": {"min_sizes": [64], "max_size": 96, "crop_enabled": False},
            "num_workers": 0,
        },
        "solver": {"batch_size": 2, "base_lr": 1e-3, "max_iter": 6, "steps": [4], "warmup_iters": 0, "amp": "off",
                   "clip_grad_norm": 1.0},
        "loss": {"num_points": 64},
        "output_dir": str(tmp_path / "run"),
        "checkpoint_period": 2,
        "log_period": 1,
        "tensorboard": False,
    }
    data.update(top)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m vita_train ...`` in a fresh interpreter."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vita_train", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=full_env,
    )


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """total_loss per logged step from metrics.csv."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["total_loss"]) for r in csv.DictReader(f)}


def test_train_resume_matches_uninterrupted(tmp_path, synthetic):
    """Losses are finite and fall; an interrupted run resumed from its checkpoint repeats the same losses."""
    from vita_train.training.config import TrainConfig
    from vita_train.training.trainer import train

    full = TrainConfig.from_yaml(recipe(tmp_path, synthetic), [f"output_dir={tmp_path / 'full'}"])
    result = train(full)
    ref = losses_by_step(tmp_path / "full")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in ref.values())
    assert min(ref[5], ref[6]) < ref[1]
    assert (tmp_path / "full" / "checkpoints" / "model_0000004.pth").is_file()
    model = __import__("vita_train").load_model(result.final_checkpoint)  # our format, loadable for inference
    assert model.config.class_names == SYNTHETIC_CLASSES

    stopped = full.replace(output_dir=str(tmp_path / "split"), **{"solver.max_iter": 4})
    train(stopped)
    resumed = full.replace(output_dir=str(tmp_path / "split"))
    train(resumed, resume=True)
    again = losses_by_step(tmp_path / "split")
    assert sorted(again) == sorted(ref)
    for step in ref:
        assert again[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), step


def test_refuses_to_overwrite_a_run(tmp_path, synthetic):
    """A second run into the same output_dir is refused unless --resume is given; nothing is changed."""
    path = recipe(tmp_path, synthetic, solver={"batch_size": 2, "max_iter": 1, "amp": "off"})
    first = run_cli("train", "--config", str(path), "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "run" / "metrics.csv").read_bytes()
    second = run_cli("train", "--config", str(path), "--no-progress")
    assert second.returncode == 2
    assert "already holds a training run" in second.stderr and "--resume" in second.stderr
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == before


def test_torchrun_two_processes_equal_one(tmp_path, synthetic):
    """torchrun --nproc_per_node 2 (gloo): one step gives the weights of one process on the same global batch."""
    path = recipe(tmp_path, synthetic, solver={"batch_size": 2, "max_iter": 1, "amp": "off", "base_lr": 1e-3})
    single = run_cli("train", "--config", str(path), f"output_dir={tmp_path / 'one'}", "--no-progress")
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vita_train", "train", "--config", str(path), f"output_dir={tmp_path / 'two'}", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "model_final.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    losses_one, losses_two = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert losses_two[1] == pytest.approx(losses_one[1], rel=1e-4)


def test_finetune_official_checkpoint_then_export(tmp_path, synthetic):
    """An official-format checkpoint is fine-tuned on new classes, saved in our format, and exported."""
    ckpt = require_shared("fixtures", "official", "r50_tiny", "model_final.pth")
    path = recipe(
        tmp_path,
        synthetic,
        model={"preset": "init", "num_classes": 4, "class_names": list(SYNTHETIC_CLASSES), "dataset": "synthetic",
               "input": {"min_size_test": 64}},
        init=str(ckpt),
        solver={"batch_size": 1, "max_iter": 2, "amp": "off", "base_lr": 1e-4},
    )
    done = run_cli("train", "--config", str(path), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    final = tmp_path / "run" / "model_final.pth"
    from vita_train import load_model

    official = load_model(ckpt)
    tuned = load_model(final)
    assert tuned.config.num_classes == 4 and tuned.config.backbone == official.config.backbone
    changed = [k for k, v in official.state_dict().items() if k in tuned.state_dict() and v.shape ==
               tuned.state_dict()[k].shape and not torch.equal(v, tuned.state_dict()[k])]
    assert changed, "fine-tuning changed no weight"
    out = tmp_path / "export"
    exp = subprocess.run([sys.executable, "-m", "export", "--ckpt", str(final), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, exp.stderr[-3000:]
    meta = json.loads((out / "vita.json").read_text())
    assert meta["class_names"] == list(SYNTHETIC_CLASSES)


def test_non_finite_loss_stops_naming_the_step(tmp_path, synthetic):
    """A diverging run stops with a message naming the step, before the weights or a checkpoint are touched."""
    path = recipe(tmp_path, synthetic, solver={"batch_size": 2, "max_iter": 3, "amp": "off", "base_lr": 1e-3})
    from vita_train.training.config import TrainConfig
    from vita_train.training.trainer import TrainingError, train

    cfg = TrainConfig.from_yaml(path, ["loss.class_weight=.nan"])
    with pytest.raises(TrainingError, match=r"not finite at step 1 .*loss_ce"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("solver.base_rate=1", "unknown config key 'solver.base_rate'"),
        ("model.vita.windoww=3", "unknown config key 'model.vita.windoww'"),
        ("solver.batch_size=zero", "solver.batch_size must be int"),
    ],
)
def test_bad_recipe_key_is_a_clear_error(tmp_path, synthetic, override, message):
    """A recipe key that does not exist (or a value of the wrong type) exits 2 with a message naming it."""
    proc = run_cli("train", "--config", str(recipe(tmp_path, synthetic)), override, "--no-progress")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def _bad_dataset(tmp_path: Path, synthetic: Path, change) -> Path:
    gt = json.loads((synthetic / "instances.json").read_text())
    change(gt)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(gt))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda gt: gt["videos"][0]["file_names"].__setitem__(0, "nowhere/00000.jpg"), "missing"),
        (lambda gt: gt["annotations"][0].__setitem__("category_id", 99), "99"),
    ],
)
def test_bad_dataset_is_a_clear_error(tmp_path, synthetic, change, message):
    """A dataset JSON naming a missing frame or an unknown category exits 2 with a message naming it."""
    bad = _bad_dataset(tmp_path, synthetic, change)
    proc = run_cli("train", "--config", str(recipe(tmp_path, synthetic)), "--no-progress",
                   f"data.datasets=[{{name: bad, format: ytvis, json: {bad}, images: {synthetic / 'JPEGImages'}}}]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_empty_mask_annotation_is_skipped_with_a_warning(tmp_path, synthetic, caplog):
    """An annotation whose masks are all empty is reported by id and skipped; training goes on."""
    from vita_train.data.records import load_ytvis

    def empty(gt):
        ann = gt["annotations"][0]
        ann["segmentations"] = [None] * len(ann["segmentations"])

    bad = _bad_dataset(tmp_path, synthetic, empty)
    gt = json.loads(bad.read_text())
    with caplog.at_level("WARNING"):
        ds = load_ytvis(bad, synthetic / "JPEGImages")
    assert str(gt["annotations"][0]["id"]) in caplog.text
    assert sum(len(v.instances) for v in ds.videos) == len(gt["annotations"]) - 1


def test_eval_cli_scores_a_results_file(tmp_path):
    """``python -m vita_train eval`` prints the 12 numbers of a results file, equal to the official ones."""
    case = require_shared("fixtures", "ytvis_eval", "easy")
    proc = run_cli("eval", "--ytvis-json", str(case / "gt.json"), "--results", str(case / "results.json"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout)
    expected = json.loads((case / "expected_stats.json").read_text())
    for name, value in zip(expected["names"], expected["stats"]):
        assert abs(stats[name] - value) <= 1e-9, name


def test_bf16_autocast_and_tensorboard(tmp_path, synthetic):
    """Mixed precision (bf16 autocast on the CPU) trains with finite losses; TensorBoard gets the scalars."""
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra: pip install 'vita-toolkit[train]'")
    from vita_train.training.config import TrainConfig
    from vita_train.training.trainer import train

    cfg = TrainConfig.from_yaml(recipe(tmp_path, synthetic), ["solver.amp=bf16", "solver.max_iter=2", "tensorboard=true"])
    result = train(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses_by_step(result.output_dir).values())
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_imagenet_backbone_init_from_torchvision_and_detectron2_files(tmp_path):
    """ImageNet weights load into the backbone from a torchvision .pth and from a detectron2 .pkl of arrays."""
    import pickle

    import torchvision

    from vita_train import VitaModel, preset
    from vita_train.checkpoint.errors import CheckpointError
    from vita_train.training.init_weights import init_backbone

    tv = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(tv, tmp_path / "resnet50.pth")
    model = VitaModel(preset("vita_r50_ytvis19"))
    loaded = init_backbone(model, tmp_path / "resnet50.pth")
    assert len(loaded) == len([k for k in tv if not k.startswith("fc.") and "num_batches_tracked" not in k])
    own = model.state_dict()
    torch.testing.assert_close(own["backbone.stem.conv1.weight"], tv["conv1.weight"])
    torch.testing.assert_close(own["backbone.res3.0.shortcut.norm.running_var"], tv["layer2.0.downsample.1.running_var"])
    torch.testing.assert_close(own["backbone.res5.2.conv3.weight"], tv["layer4.2.conv3.weight"])

    d2 = {k.removeprefix("backbone."): (v + 1).numpy() for k, v in own.items() if k.startswith("backbone.")}
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"model": d2, "__author__": "test"}, f)
    fresh = VitaModel(preset("vita_r50_ytvis19"))
    init_backbone(fresh, tmp_path / "R-50.pkl")
    torch.testing.assert_close(fresh.state_dict()["backbone.res4.1.conv2.weight"], own["backbone.res4.1.conv2.weight"] + 1)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        init_backbone(fresh, tmp_path / "evil.pkl")


def test_frozen_detector_trains_only_vita(tmp_path, synthetic):
    """freeze_detector: one step changes VITA's weights and leaves the detector's untouched."""
    from vita_train.training.config import TrainConfig
    from vita_train.training.trainer import build_model, train

    cfg = TrainConfig.from_yaml(recipe(tmp_path, synthetic), ["freeze_detector=true", "solver.max_iter=1"])
    torch.manual_seed(cfg.seed)
    before = build_model(cfg).state_dict()
    after = torch.load(train(cfg).final_checkpoint, weights_only=True)["model"]
    detector = [k for k in before if not k.startswith("vita.") and before[k].is_floating_point()]
    vita = [k for k in before if k.startswith("vita.")]
    assert all(torch.equal(before[k], after[k]) for k in detector)
    assert any(not torch.equal(before[k], after[k]) for k in vita)


def test_videos_mixed_with_coco_pseudo_videos(tmp_path, synthetic):
    """A recipe mixing a video dataset with COCO images (pseudo-videos) trains; both sources are drawn."""
    from vita_train.training.config import TrainConfig
    from vita_train.training.datasets import build_dataset
    from vita_train.training.trainer import train

    coco = {"name": "synth_coco", "format": "coco", "json": str(synthetic / "coco" / "instances.json"),
            "images": str(synthetic / "coco" / "images"), "ratio": 1.0}
    path = recipe(tmp_path, synthetic)
    cfg = TrainConfig.from_yaml(path, ["solver.max_iter=2"])
    cfg = cfg.replace(**{"data.datasets": [cfg.to_dict()["data"]["datasets"][0], coco]})
    dataset = build_dataset(cfg)
    assert {dataset.choose(i)[0] for i in range(40)} == {0, 1}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses_by_step(train(cfg).output_dir).values())


def cli(capsys, *args: str) -> tuple[int, str]:
    """``python -m vita_train ...`` in this process, through ``main(argv)``: (exit code, stderr)."""
    from vita_train.__main__ import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, synthetic) -> tuple[Path, Path]:
    """(recipe, output_dir) of a finished one-step run with a checkpoint; tests that change it copy it first."""
    from vita_train.training.config import TrainConfig
    from vita_train.training.trainer import train

    root = tmp_path_factory.mktemp("one_step")
    path = recipe(root, synthetic, solver={"batch_size": 2, "max_iter": 1, "amp": "off", "steps": [4],
                                           "warmup_iters": 0, "base_lr": 1e-3})
    train(TrainConfig.from_yaml(path), recipe=path)
    return path, root / "run"


def test_refuses_to_overwrite_the_users_files(tmp_path, synthetic, one_step_run, capsys, monkeypatch):
    """init or recipe where the run writes, an empty output_dir, or a stray model_final.pth: refused, nothing written."""
    path, run = one_step_run
    init_dir = tmp_path / "d"
    init_dir.mkdir()
    init = init_dir / "model_final.pth"
    init.write_bytes((run / "model_final.pth").read_bytes())
    before = init.read_bytes()
    code, err = cli(capsys, "train", "--config", str(path), f"init={init}", f"output_dir={init_dir}", "--no-progress")
    assert code == 2 and "init checkpoint" in err and "model_final.pth" in err, err
    assert init.read_bytes() == before and sorted(p.name for p in init_dir.iterdir()) == ["model_final.pth"]
    code, err = cli(capsys, "train", "--config", str(path), f"output_dir={init_dir}", "--no-progress")
    assert code == 2 and "already holds model_final.pth" in err, err

    code, err = cli(capsys, "train", "--config", str(path), "output_dir=", "--no-progress")
    assert code == 2 and err.startswith("error: output_dir is empty"), err

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    user_recipe = cwd / "config.yaml"
    user_recipe.write_text("# my recipe\n_base_: " + str(path) + "\n")
    code, err = cli(capsys, "train", "--config", "config.yaml", "output_dir=.", "--no-progress")
    assert code == 2 and "recipe config.yaml" in err, err
    assert user_recipe.read_text().startswith("# my recipe") and sorted(p.name for p in cwd.iterdir()) == ["config.yaml"]


def test_resume_from_another_runs_checkpoint_into_a_run_is_refused(tmp_path, one_step_run, capsys):
    """--resume PATH into an output_dir holding a different run would truncate that run's metrics: refused."""
    path, run = one_step_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.csv").write_text("step,total_loss\n1,3.0\n")
    code, err = cli(capsys, "train", "--config", str(path), f"output_dir={other}", "--no-progress",
                    f"--resume={run / 'checkpoints' / 'model_0000001.pth'}")
    assert code == 2 and "not a checkpoint of the run" in err, err
    assert (other / "metrics.csv").read_text() == "step,total_loss\n1,3.0\n"


def test_category_map_class_count_is_checked_up_front(tmp_path, synthetic, capsys):
    """A category_map onto 40 YouTube-VIS classes for a 4-class model exits 2 naming both, before any write."""
    coco = {"name": "synth_coco", "format": "coco", "json": str(synthetic / "coco" / "instances.json"),
            "images": str(synthetic / "coco" / "images"), "category_map": "coco_to_ytvis_2019"}
    path = recipe(tmp_path, synthetic, data={"datasets": [coco], "num_frames": 1, "num_workers": 0})
    code, err = cli(capsys, "train", "--config", str(path), "--no-progress")
    assert code == 2, err
    assert "category_map coco_to_ytvis_2019 maps onto 40 classes" in err and "model.num_classes=4" in err, err
    assert not (tmp_path / "run").exists()


def test_dataset_naming_other_classes_than_the_model_warns(tmp_path, synthetic, caplog):
    """A dataset whose label k names another class than model.class_names[k] is trained with a warning naming both."""
    from vita_train.training.config import TrainConfig
    from vita_train.training.datasets import build_dataset

    swapped = list(SYNTHETIC_CLASSES[::-1])
    cfg = TrainConfig.from_yaml(recipe(tmp_path, synthetic), [f"model.class_names={swapped}"])
    with caplog.at_level("WARNING", logger="vita_train.training.datasets"):
        build_dataset(cfg)
    assert f"0: {SYNTHETIC_CLASSES[0]!r} vs {swapped[0]!r}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vita_train.training.datasets"):
        build_dataset(TrainConfig.from_yaml(recipe(tmp_path, synthetic)))
    assert "other classes" not in caplog.text


def _copy_run(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_resume_applies_a_changed_learning_rate(tmp_path, one_step_run, capsys):
    """--resume with solver.base_lr changed trains at the new rate, which config.yaml then records."""
    path, run = one_step_run
    out = _copy_run(run, tmp_path / "run")
    code, err = cli(capsys, "train", "--config", str(path), f"output_dir={out}", "solver.base_lr=2e-3",
                    "solver.max_iter=2", "--resume", "--no-progress")
    assert code == 0, err
    with open(out / "metrics.csv", newline="") as f:
        lr = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert lr[2] == pytest.approx(2 * lr[1])  # base_lr 1e-3 -> 2e-3, no decay before step 4
    assert yaml.safe_load((out / "config.yaml").read_text())["solver"]["base_lr"] == 2e-3


def test_resume_with_another_model_is_a_resume_error(tmp_path, one_step_run, capsys):
    """--resume with a changed model.* key names the key and the run's config.yaml; nothing is written."""
    path, run = one_step_run
    out = _copy_run(run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = cli(capsys, "train", "--config", str(path), f"output_dir={out}",
                    "model.frame_decoder.num_queries=7", "--resume", "--no-progress")
    assert code == 2, err
    assert "model.frame_decoder.num_queries" in err and "run's own config.yaml" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("device=gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("data.frame_range=-1", "data.frame_range must be >= 0, got -1"),
        ("solver.base_lr=-1e-4", "solver.base_lr must be >= 0"),
        pytest.param("device=cuda", "device=cuda, but torch sees no CUDA device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")),
    ],
)
def test_bad_config_value_is_a_clear_error(tmp_path, synthetic, capsys, override, message):
    """Values that validate by type but cannot run exit 2 naming the key, before anything is written."""
    code, err = cli(capsys, "train", "--config", str(recipe(tmp_path, synthetic)), override, "--no-progress")
    assert code == 2 and message in err and err.startswith("error: "), err
    assert not (tmp_path / "run").exists()


def test_overrides_may_complete_a_recipe_that_is_not_valid_alone(tmp_path, synthetic):
    """The recipe is checked once, with its overrides: ``init=`` on the command line for a ``preset: init`` model,
    an ``output_dir`` left empty in a shared recipe. Both were refused before the overrides applied."""
    from vita_train import save_checkpoint
    from vita_train.modeling.vita_model import VitaModel
    from vita_train.training.config import TrainConfig

    start = tmp_path / "start.pth"
    save_checkpoint(start, VitaModel(TrainConfig.from_yaml(recipe(tmp_path, synthetic)).model))
    shared = recipe(tmp_path, synthetic, "shared.yaml", model={"preset": "init"}, output_dir="")
    cfg = TrainConfig.from_yaml(shared, [f"init={start}", f"output_dir={tmp_path / 'mine'}", "model.test.topk=3"])
    assert cfg.init == str(start) and cfg.output_dir == str(tmp_path / "mine") and cfg.model.test.topk == 3
    assert cfg.model.num_classes == 4  # the architecture of the init checkpoint
    # what no override fixes is still refused, and so is an override of a key the config does not have
    with pytest.raises(ConfigError, match="output_dir is empty"):
        TrainConfig.from_yaml(shared, [f"init={start}"])
    with pytest.raises(ConfigError, match="unknown config key 'solver.base_lrr'"):
        TrainConfig.from_yaml(shared, [f"init={start}", "output_dir=x", "solver.base_lrr=1"])


def test_override_after_a_bare_resume_is_an_override(tmp_path, one_step_run, capsys):
    """``--resume solver.max_iter=2`` resumes the run in output_dir and applies the override, rather than reading
    it as a checkpoint path; an override may also come between other options."""
    path, run = one_step_run
    out = _copy_run(run, tmp_path / "run")
    code, err = cli(capsys, "train", "--config", str(path), f"output_dir={out}", "--resume", "solver.max_iter=2",
                    "--no-progress", "log_period=1")
    assert code == 0, err
    assert sorted(losses_by_step(out)) == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["solver"]["max_iter"] == 2
