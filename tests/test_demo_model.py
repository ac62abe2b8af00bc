"""The demo model that ships in the package: a trained tiny VITA that finds the synthetic shapes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import REPO
from vita_train.data.synthetic import SYNTHETIC_CLASSES, write_synthetic_dataset
from vita_train.pretrained import DEMO_CHECKPOINT, DEMO_RECIPE


def test_demo_checkpoint_ships_with_its_recipe():
    """The checkpoint is small, loads with load_model and names the synthetic classes; its recipe matches it."""
    from vita_train import load_model
    from vita_train.training.config import TrainConfig

    assert DEMO_CHECKPOINT.stat().st_size < 8e6
    model = load_model(DEMO_CHECKPOINT)
    assert model.config.class_names == SYNTHETIC_CLASSES
    assert TrainConfig.from_yaml(DEMO_RECIPE).model == model.config


def test_eval_cli_segments_then_scores_held_out_videos(tmp_path):
    """``python -m vita_train eval --model`` runs the runtime on every video, then scores it: the demo model
    reaches AP50 >= 0.6 on synthetic videos it never saw."""
    from vita_train.evaluation import evaluate_ytvis

    paths = write_synthetic_dataset(tmp_path, num_videos=12, num_frames=8, height=96, width=128, seed=11, split="test")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vita_train", "eval", "--model", str(DEMO_CHECKPOINT), "--ytvis-json",
         str(paths.ytvis_json), "--frames", str(paths.ytvis_frames), "--out", str(out), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout)
    assert stats == evaluate_ytvis(paths.ytvis_json, out)
    assert stats["AP50"] >= 0.6, stats
    # the same --out with another model: its parts are not scored as this model's, and the refusal is one line
    other = tmp_path / "other.pth"
    shutil.copy(DEMO_CHECKPOINT, other)
    proc = subprocess.run(
        [sys.executable, "-m", "vita_train", "eval", "--model", str(other), "--ytvis-json",
         str(paths.ytvis_json), "--frames", str(paths.ytvis_frames), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "earlier run made with a different model" in proc.stderr and "Traceback" not in proc.stderr
