"""runtime.load on the CPU leaves the caller's thread no OpenMP team (runtime/openmp_team.py).

A thread's team is visible as the worker threads it keeps alive; counted here from /proc in a fresh process
with 2 torch threads. The control runs the same load without the short-lived thread and sees a worker stay.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CODE = """
import os, sys, time, torch
torch.set_num_threads(2)
import runtime
from runtime.backends.torch_backend import TorchBackend
from vita_train import load_model

def threads(settle=2.0):
    # a finished thread's team winds down just after the thread is joined: wait until the count holds still
    deadline, count = time.monotonic() + settle, len(os.listdir("/proc/self/task"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = len(os.listdir("/proc/self/task"))
        if now != count:
            deadline, count = time.monotonic() + settle, now
    return count

start = threads()
seg = runtime.load(sys.argv[1])
after_load = threads()
TorchBackend(load_model(sys.argv[1]), device="cpu")  # the same load, on this thread
after_plain = threads()
print(start, after_load, after_plain)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_cpu_load_leaves_the_calling_thread_without_an_openmp_team(tmp_path):
    import torch

    from vita_train import save_checkpoint
    from vita_train.modeling.vita_model import VitaModel
    from vita_train.presets import preset

    ckpt = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    save_checkpoint(ckpt, VitaModel(preset("vita_tiny")).eval())
    res = subprocess.run([sys.executable, "-c", _CODE, str(ckpt)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    start, after_load, after_plain = map(int, res.stdout.split())
    assert after_load == start  # the load's team ended with its thread
    assert after_plain > after_load  # control: loading on this thread leaves its team's worker behind


def test_an_error_in_the_load_reaches_the_caller(tmp_path):
    import runtime

    bad = tmp_path / "not_a_model.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(runtime.ModelPathError, match="not_a_model.pth"):
        runtime.load(bad)
