"""Bounded memory for long videos: peak memory flat in video length; a 10,000-frame run completes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, require_shared
from .media import encode

_MEASURE = r"""
import json, resource, sys
import numpy as np
import runtime
ckpt, frames, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seg = runtime.load(ckpt, device="cpu")

def clip(n):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for t in range(n):
        yield np.roll(base, t, axis=1)

result = seg.segment(clip(frames), feature_policy=policy, min_size=64)
assert result.num_frames == frames
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _peak_kb(ckpt: Path, frames: int, policy: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ckpt), str(frames), policy],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"]


@pytest.mark.parametrize("policy", ["host", "recompute"])
def test_peak_memory_flat_in_video_length(policy):
    ckpt = require_shared("fixtures", "official", "r50_tiny", "model_final.pth")
    short, long = _peak_kb(ckpt, 150, policy), _peak_kb(ckpt, 600, policy)
    assert long <= 1.5 * short, f"{policy}: 600 frames peak {long} kB vs 150 frames {short} kB"


@pytest.mark.slow
def test_ten_thousand_frames_complete(tmp_path):
    import runtime

    ckpt = require_shared("fixtures", "official", "r50_tiny", "model_final.pth")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, t, axis=1) for t in range(10_000)])
    video = encode(tmp_path / "long.mkv", frames, "ffv1", "bgr0")
    del frames
    result = runtime.segment(video, runtime.load(ckpt, device="cpu"), min_size=64)
    assert result.num_frames == 10_000 and not result.truncated
    assert len(result.instances) == 10 and all(len(i.masks) == 10_000 for i in result.instances)
