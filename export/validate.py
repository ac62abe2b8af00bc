"""Run exported graphs with ONNX Runtime against the torch model on generated inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .graphs import DETECTOR_OUTPUTS, TOKENS_OUTPUTS, DetectorGraph

RTOL = 1e-4


@dataclass
class Comparison:
    """One output tensor of one generated input."""

    graph: str
    case: str
    output: str
    rel_error: float


class ValidationError(RuntimeError):
    """An exported graph disagrees with the torch model beyond the tolerance."""


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    denom = np.linalg.norm(ref64)
    return float(np.linalg.norm(ours.astype(np.float64) - ref64) / (denom if denom > 0 else 1.0))


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def validate_detector(model, path: Path, sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[Comparison]:
    """Compare detector.onnx with the torch detector at each (H, W), batch 1 and 2."""
    sess, graph = _session(path), DetectorGraph(model).eval()
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        for batch in (1, 2):
            frames = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
            with torch.no_grad():
                ref = [t.numpy() for t in graph(torch.from_numpy(frames))]
            got = sess.run(DETECTOR_OUTPUTS, {"frames": frames})
            case = f"B={batch} {h}x{w}"
            out += [Comparison("detector", case, n, _rel(g, r)) for n, g, r in zip(DETECTOR_OUTPUTS, got, ref)]
    return out


def validate_tokens(model, path: Path, frame_counts: Sequence[int], seed: int = 0) -> list[Comparison]:
    """Compare vita_tokens.onnx with the torch token engine for each T, all tokens and half pruned."""
    sess = _session(path)
    nf = model.config.frame_decoder.num_queries
    c = model.config.frame_decoder.hidden_dim
    rng = np.random.default_rng(seed)
    out = []
    for t in frame_counts:
        for n in (nf, max(1, math.ceil(nf / 2))):
            queries = rng.standard_normal((t, n, c)).astype(np.float32)
            index = np.sort(np.stack([rng.permutation(nf)[:n] for _ in range(t)]), axis=1).astype(np.int64)
            with torch.no_grad():
                ref = [x.numpy() for x in model.track(torch.from_numpy(queries), torch.from_numpy(index))]
            got = sess.run(TOKENS_OUTPUTS, {"frame_queries": queries, "query_index": index})
            case = f"T={t} N={n}"
            out += [Comparison("vita_tokens", case, name, _rel(g, r)) for name, g, r in zip(TOKENS_OUTPUTS, got, ref)]
    return out


def raise_if_failed(comparisons: list[Comparison], rtol: float = RTOL) -> None:
    """Raise ValidationError listing the worst tensors when any relative error exceeds ``rtol``."""
    bad = [c for c in comparisons if not c.rel_error <= rtol]  # NaN fails too
    if bad:
        worst = sorted(comparisons, key=lambda c: -c.rel_error if c.rel_error == c.rel_error else -math.inf)[:8]
        lines = [f"  {c.graph} {c.output} [{c.case}]: relative error {c.rel_error:.3g}" for c in worst]
        raise ValidationError(
            f"{len(bad)} exported outputs differ from the torch model by more than {rtol:g} (worst first):\n"
            + "\n".join(lines)
        )
