"""Figures measured elsewhere, shown beside ours as reference rows (never mixed into our measurements)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

# The setting every official and paper figure below was measured in: the full-size R-50 (vita_r50_ytvis19's
# layers; its class count aside, which does not change the cost) on a 36-frame 360x640 clip.
REFERENCE_PRESET = "vita_r50_ytvis19"
REFERENCE_FRAMES = 36
REFERENCE_SIZE = (360, 640)
REFERENCE_TEXT = "the full-size R-50 (vita_r50_ytvis19's architecture) on a 36-frame 360x640 clip"
# what decides the cost of running a model: its layers and the size frames are resized to
_ARCHITECTURE = ("backbone", "resnet", "swin", "pixel_decoder", "frame_decoder", "vita")
_RESIZE = ("min_size_test", "max_size_test")


def _architecture(config: Any) -> dict[str, Any]:
    # through JSON: a config read from a file holds lists where a preset holds tuples
    layers = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
              for k, v in ((k, getattr(config, k)) for k in _ARCHITECTURE)}
    layers["input"] = {k: getattr(config.input, k) for k in _RESIZE}
    return json.loads(json.dumps(layers))


def reference_mismatch(config: Any, frames: Optional[int] = None, size: Optional[tuple[int, int]] = None) -> list[str]:
    """How a run (model config; clip frames and HxW where they matter) differs from the reference setting."""
    from vita_train.presets import preset

    out = []
    if _architecture(config) != _architecture(preset(REFERENCE_PRESET)):
        out.append(f"the model is {config.name}, not the full-size R-50 architecture")
    if frames is not None and frames != REFERENCE_FRAMES:
        out.append(f"the clip has {frames} frames, not {REFERENCE_FRAMES}")
    if size is not None and tuple(size) != REFERENCE_SIZE:
        out.append(f"the clip is {size[0]}x{size[1]}, not {REFERENCE_SIZE[0]}x{REFERENCE_SIZE[1]}")
    return out

# End-to-end speed of full-size VITA R-50 reported for other machines.
E2E = [
    {"source": "official code (sukjunhwang/VITA)", "machine": "AMD EPYC CPU",
     "setting": "R-50, 36 frames 360x640, CPU", "s_per_frame": 2.79, "fps": 1 / 2.79, "memory_gb": None},
    {"source": "official code (sukjunhwang/VITA)", "machine": "Intel Xeon CPU, 2 threads",
     "setting": "R-50 full size, 36 frames 360x640", "s_per_frame": "1.87–2.00", "fps": "0.50–0.53",
     "memory_gb": 7.4},
    {"source": "VITA maintainers", "machine": "NVIDIA V100",
     "setting": "R-50", "s_per_frame": 1 / 46.1, "fps": 46.1, "memory_gb": None},
]

# The official code's end-to-end CPU time (2 threads, full-size R-50, 36 frames 360x640) per CPU kind: the
# vendor in the model name and what decides its speed — the bf16 / AMX instructions, else the vector width and
# the CPU family (a figure from an AVX-512 machine says nothing about an AVX2-only one of the same vendor, nor
# one Zen generation about another). Machines of one kind still differ: measure the official code beside ours
# and pass its time with --official-s-per-frame where that matters.
OFFICIAL_CPU_S_PER_FRAME = [
    {"vendor": "Intel", "needs": {"amx": "amx_bf16"}, "s_per_frame": 1.935,
     "text": "official code on an Intel Xeon with AMX, 1.87–2.00 s/frame (another run)"},
    {"vendor": "AMD", "needs": {"bf16": "avx512_bf16", "family": "family 25 model 17"}, "s_per_frame": 2.190,
     "text": "official code on an AMD EPYC Zen 4 (family 25 model 17, AVX-512-BF16), 2.15–2.25 s/frame, median "
             "of 3 runs with the same weights and clip (7 Dec 2026; the issue's figure for this kind was 2.79)"},
    {"vendor": "AMD", "needs": {"bf16": "avx512_bf16"}, "s_per_frame": 2.79,
     "text": "official code on an AMD EPYC with AVX-512-BF16, 2.79 s/frame (another run)"},
    {"vendor": "AMD", "needs": {"vector": "avx2", "family": "family 23 model 49"}, "s_per_frame": 2.156,
     "text": "official code on an AMD EPYC Zen 2 (family 23 model 49, AVX2 only), 2.11–2.33 s/frame, median "
             "of 3 runs with the same weights and clip (6 Dec 2026)"},
]


def official_cpu_figure(cpu: dict) -> tuple[float, str] | None:
    """The official code's s/frame on a CPU of this kind (``environment.cpu_info()``'s dict), or None."""
    model = (cpu.get("model") or "").lower()
    for figure in OFFICIAL_CPU_S_PER_FRAME:
        # each needed value is one of the field's comma-separated items ("amx_bf16, amx_int8, amx_tile")
        if figure["vendor"].lower() in model and all(
            want in [item.strip() for item in str(cpu.get(key) or "").split(",")]
            for key, want in figure["needs"].items()
        ):
            return figure["s_per_frame"], figure["text"]
    return None


# Paper Table 4: the longest video processed at once on a 12 GB Titan XP, 360x640.
TABLE4 = {3: 2677, 6: 1392, 12: 741}
TABLE4_OTHERS = {"VisTR": 46, "IFC": 123, "Mask2Former-VIS": 81}
# Paper Table 6 / Sec. 4.4: with r = 0.75 the maximum frame number at W = 6 grows from 1392 to 2635.
TABLE6_MAXFRAMES = {(6, 0.75): 2635}
# Paper Table 6: YouTube-VIS 2019 AP vs pruning ratio r.
TABLE6_AP = {1.0: 49.8, 0.75: 49.7, 0.5: 48.9, 0.25: 48.1}


def paper_max_frames(window: int, ratio: float) -> int | None:
    """The paper's maximum frame count for (W, r) at 12 GB, where it reports one."""
    if ratio == 1.0:
        return TABLE4.get(window)
    return TABLE6_MAXFRAMES.get((window, ratio))
