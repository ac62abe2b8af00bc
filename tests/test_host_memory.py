"""runtime.host_memory: with malloc keeping freed blocks, a frame-sized buffer is reused without page faults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# allocate, touch and free a 32 MB buffer (under the 64 MB threshold above which blocks stay mapped on their
# own) eight times; print whether the setting took and the fewest page
# faults of any round after the first (the first always faults). With the setting some later round reuses the
# freed block without faults; not every one does (on this VM re-faults come and go between rounds, most
# likely its idle-page reclaim, kdamond, taking back free heap pages). Without it every round maps fresh pages.
_CODE = """
import resource, torch
from runtime.host_memory import keep_freed_memory
took = keep_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(8 << 20)  # torch's CPU allocator is malloc (numpy's large arrays would use huge pages)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, min(faults[1:]))
"""


def _run(keep: str) -> tuple[str, int]:
    res = subprocess.run([sys.executable, "-c", _CODE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "VITA_KEEP_FREED_MEMORY": keep})
    assert res.returncode == 0, res.stderr
    took, faults = res.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is for glibc's malloc on Linux")
def test_freed_frame_buffers_are_reused_without_page_faults():
    took, faults = _run("1")
    if took != "True":
        pytest.skip("this Linux's C library is not glibc")
    off, faults_off = _run("0")
    assert off == "False"
    # 32 MB is 8,192 pages: returned to the system after every round by default, kept for reuse with the setting
    assert faults_off > 6_000
    assert faults < 2_000


def test_the_torch_backend_sets_it_on_the_cpu():
    code = ("import torch\nfrom vita_train.presets import preset\nfrom vita_train.modeling.vita_model import VitaModel\n"
            "from runtime.backends.torch_backend import TorchBackend\nfrom runtime.host_memory import keep_freed_memory\n"
            "TorchBackend(VitaModel(preset('vita_tiny')).eval(), device='cpu')\n"
            "print(keep_freed_memory.cache_info().currsize)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"


# keep freed blocks, free 32 MB of small tensors in the middle of the heap (a live block above them), and print
# the resident MB freed but kept, then what release_freed_memory hands back
_RELEASE = """
import torch
from runtime.host_memory import keep_freed_memory, release_freed_memory
took = keep_freed_memory()
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
parts = [torch.ones(1 << 18) for _ in range(32)]  # 1 MB each
above = torch.ones(1 << 18)
start = rss(); del parts; kept = rss()
release_freed_memory()
print(took, round(start - kept), round(kept - rss()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is for glibc's malloc on Linux")
def test_release_hands_the_kept_pages_back():
    """After detection the pipeline calls release_freed_memory: the heap's free pages leave the process."""
    res = subprocess.run([sys.executable, "-c", _RELEASE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    took, freed_at_del, released = res.stdout.split()
    if took != "True":
        pytest.skip("this Linux's C library is not glibc")
    assert int(freed_at_del) < 4  # kept by the setting: nothing went back when the tensors were freed
    assert int(released) >= 28  # handed back by the call


def test_release_leaves_an_unset_malloc_alone():
    """Where nothing set malloc to keep freed blocks (a GPU backend's process), releasing does not set it."""
    code = ("from runtime.host_memory import keep_freed_memory, release_freed_memory\n"
            "release_freed_memory()\nprint(keep_freed_memory.cache_info().currsize)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"
