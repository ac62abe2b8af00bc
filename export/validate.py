"""Check exported graphs with ONNX Runtime against a float64 torch reference, hard decisions pinned.

Why not "ONNX Runtime vs torch fp32 within 1e-4": two correct fp32 implementations differ by ~1e-6 per op,
sharp attention amplifies that (a trained-like model's token engine is 3e-4 from float64 in torch fp32
itself), and the frame decoder's masked attention turns ``sigmoid(logit) < 0.5`` into a yes/no that flips
between implementations when a logit sits within rounding of 0, after which the queries diverge. So:

- The reference is the same torch model in float64. Each output's tolerance is set from how far torch fp32
  is from that reference on the same inputs: ``max(RTOL, FP32_FACTOR * torch fp32 error)``.
- Every hard decision of the detector graph (the masked-attention thresholds) is read out of the exported
  graph and pinned in both torch runs, so the compared outputs follow the same discrete path.
- A decision where the graph and the float64 reference disagree is allowed only when the reference's own
  logit lies within float32 noise of the threshold (``FLIP_FACTOR`` x torch fp32's largest logit error at
  that decision layer); a flip with a larger margin is a wrong graph and fails.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
import torch

from vita_train.modeling.frame_decoder import AttentionMaskThreshold
from vita_train.token_steps import TokenSteps

from .graphs import DETECTOR_OUTPUTS, TOKENS_OUTPUTS, DetectorGraph

RTOL = 1e-4  # the floor of every output's tolerance (relative L2 error against float64)
FP32_FACTOR = 4.0  # an exported graph may be this many times further from float64 than torch fp32 is
FLIP_FACTOR = 8.0  # a flipped decision's reference margin may be this many times torch fp32's logit error
_DECISION_SCOPE = re.compile(r"/attn_mask_threshold(?:_(\d+))?/Less$")


@dataclass
class OrtSettings:
    """ONNX Runtime session settings the graphs are validated under."""

    threads: int = 0  # intra-op threads; 0 = ONNX Runtime's default
    optimization: str = "all"  # "disabled", "basic", "extended" or "all"


@dataclass
class Comparison:
    """One output tensor of one generated input, against the float64 reference."""

    graph: str
    case: str
    output: str
    rel_error: float  # the exported graph
    torch_fp32_error: float  # torch fp32 on the same input and decisions: the yardstick
    tolerance: float = math.nan  # set by judge()


@dataclass
class DecisionCheck:
    """One decision layer (one masked-attention threshold) of one generated input."""

    graph: str
    case: str
    layer: int
    decisions: int  # how many yes/no values the layer has
    flips: int  # where the exported graph decided differently from the float64 reference
    max_flip_margin: float  # the largest |float64 logit| among the flips (0 without flips)
    allowed_margin: float  # FLIP_FACTOR x torch fp32's largest |logit error| in this layer


@dataclass
class ValidationReport:
    """Everything compared; ``summary()`` goes into vita.json."""

    comparisons: list[Comparison] = field(default_factory=list)
    decisions: list[DecisionCheck] = field(default_factory=list)
    settings: OrtSettings = field(default_factory=OrtSettings)

    def extend(self, other: "ValidationReport") -> None:
        """Add another report's rows (same settings)."""
        self.comparisons += other.comparisons
        self.decisions += other.decisions

    def summary(self) -> dict:
        """What was compared, how, and the worst figures; JSON-ready."""
        outputs = {}
        for c in self.comparisons:
            row = outputs.setdefault(f"{c.graph}/{c.output}", {"max_rel_error": 0.0, "max_torch_fp32_error": 0.0})
            row["max_rel_error"] = max(row["max_rel_error"], c.rel_error)
            row["max_torch_fp32_error"] = max(row["max_torch_fp32_error"], c.torch_fp32_error)
            row["tolerance"] = c.tolerance
        flips = [d for d in self.decisions if d.flips]
        return {
            "reference": "torch float64, masked-attention decisions pinned to the exported graph's",
            "rtol_floor": RTOL,
            "fp32_factor": FP32_FACTOR,
            "flip_factor": FLIP_FACTOR,
            "onnxruntime": asdict(self.settings),
            "cases": sorted({f"{c.graph} {c.case}" for c in self.comparisons}),
            "outputs": outputs,
            "max_rel_error": max((c.rel_error for c in self.comparisons), default=0.0),
            "decisions": {
                "checked": sum(d.decisions for d in self.decisions),
                "flipped": sum(d.flips for d in self.decisions),
                "max_flip_margin": max((d.max_flip_margin for d in flips), default=0.0),
            },
            "redrawn_inputs": 0,  # decisions are pinned, never avoided by drawing other inputs
        }


class ValidationError(RuntimeError):
    """An exported graph disagrees with the torch model beyond what float32 rounding explains."""


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    ref64 = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref64)
    return float(np.linalg.norm(np.asarray(ours, dtype=np.float64) - ref64) / (denom if denom > 0 else 1.0))


def session(model: "str | Path | onnx.ModelProto", settings: Optional[OrtSettings] = None):
    """A CPU ONNX Runtime session for a graph file or an in-memory graph, under ``settings``."""
    import onnxruntime as ort

    settings = settings or OrtSettings()
    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if settings.optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}, got {settings.optimization!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.graph_optimization_level = levels[settings.optimization]
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def decision_tensors(graph: onnx.ModelProto) -> list[str]:
    """Names of the masked-attention decision tensors of a detector graph, in the order they are computed."""
    found = []
    for node in graph.graph.node:
        m = _DECISION_SCOPE.search(node.name)
        if node.op_type == "Less" and m:
            found.append((int(m.group(1) or 0), node.output[0]))
    return [name for _, name in sorted(found)]


def with_outputs(graph: onnx.ModelProto, names: Sequence[str], elem_type: int = onnx.TensorProto.BOOL) -> onnx.ModelProto:
    """A copy of ``graph`` that also returns the intermediate tensors ``names``."""
    out = copy.deepcopy(graph)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return out


class _PinnedDecisions:
    """Forward hooks that replace a model's masked-attention decisions by given ones and record the logits."""

    def __init__(self, model: torch.nn.Module, decisions: list[np.ndarray]) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, AttentionMaskThreshold)]
        self.decisions, self.logits, self.handles = decisions, [], []

    def _hook(self, module, inputs, output):
        i = len(self.logits)
        self.logits.append(inputs[0].detach().double().numpy())
        if i >= len(self.decisions):
            raise ValidationError(
                f"the torch model made more masked-attention decisions ({i + 1}) than the exported graph "
                f"exposes ({len(self.decisions)}): the graph's decision nodes were not found"
            )
        pinned = torch.from_numpy(self.decisions[i])
        if pinned.shape != output.shape:
            raise ValidationError(
                f"decision layer {i}: the exported graph's shape {tuple(pinned.shape)} differs from the torch "
                f"model's {tuple(output.shape)}"
            )
        return pinned.to(output.device)

    def __enter__(self) -> "_PinnedDecisions":
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _run_pinned(graph: torch.nn.Module, frames: np.ndarray, decisions: list[np.ndarray]):
    with torch.no_grad(), _PinnedDecisions(graph, decisions) as pin:
        outs = [t.double().numpy() for t in graph(torch.from_numpy(frames))]
    if len(pin.logits) != len(decisions):
        raise ValidationError(
            f"the exported graph exposes {len(decisions)} masked-attention decisions but the torch model made "
            f"{len(pin.logits)}"
        )
    return outs, pin.logits


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The float64 reference: a deep copy of ``model`` with every floating parameter and buffer in float64."""
    return copy.deepcopy(model).double().eval()


def detector_cases(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(batch, H, W) cases: batch 2 at the first size (the batch axis), batch 1 at the others."""
    return [(2 if i == 0 else 1, h, w) for i, (h, w) in enumerate(sizes)]


def validate_detector(
    model,
    path: Path,
    sizes: Sequence[tuple[int, int]],
    seed: int = 0,
    settings: Optional[OrtSettings] = None,
    reference: Optional[torch.nn.Module] = None,
) -> ValidationReport:
    """Compare detector.onnx with the torch detector (fp32 and float64, decisions pinned) on random frames."""
    settings = settings or OrtSettings()
    graph_proto = onnx.load(str(path))
    names = decision_tensors(graph_proto)
    sess = session(with_outputs(graph_proto, names), settings)
    fp32 = DetectorGraph(model).eval()
    fp64 = DetectorGraph(reference if reference is not None else float64_copy(model)).eval()
    rng = np.random.default_rng(seed)
    report = ValidationReport(settings=settings)
    for batch, h, w in detector_cases(sizes):
        frames = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        got = sess.run(DETECTOR_OUTPUTS + names, {"frames": frames})
        outs, decisions = got[: len(DETECTOR_OUTPUTS)], [np.asarray(d, dtype=bool) for d in got[len(DETECTOR_OUTPUTS) :]]
        ref64, logits64 = _run_pinned(fp64, frames, decisions)
        ref32, logits32 = _run_pinned(fp32, frames, decisions)
        case = f"B={batch} {h}x{w}"
        for name, g, r64, r32 in zip(DETECTOR_OUTPUTS, outs, ref64, ref32):
            report.comparisons.append(Comparison("detector", case, name, _rel(g, r64), _rel(r32, r64)))
        for layer, (d, l64, l32) in enumerate(zip(decisions, logits64, logits32)):
            # the float64 reference's own decision, made the official way (sigmoid < 0.5)
            ref_decision = torch.from_numpy(l64).sigmoid().numpy() < 0.5
            flipped = d != ref_decision
            margins = np.abs(l64[flipped])
            report.decisions.append(
                DecisionCheck(
                    "detector", case, layer, int(d.size), int(flipped.sum()),
                    float(margins.max()) if margins.size else 0.0,
                    FLIP_FACTOR * float(np.abs(l32 - l64).max()) if l64.size else 0.0,
                )
            )
    return report


def validate_tokens(
    model,
    path: Path,
    frame_counts: Sequence[int],
    seed: int = 0,
    settings: Optional[OrtSettings] = None,
    reference: Optional[torch.nn.Module] = None,
    steps_dir: Optional[Path] = None,
    step_files: Optional[dict[str, list[str]]] = None,
) -> ValidationReport:
    """Compare vita_tokens.onnx with the torch token engine (fp32 and float64) for each T, all and half the tokens.

    With ``step_files`` (in ``steps_dir``), the token step graphs run chunk by chunk as the onnxruntime backend
    runs them (vita_train.token_steps, small chunks so every T above crosses chunk boundaries) are compared
    on the same inputs as graph ``vita_token_steps``.
    """
    settings = settings or OrtSettings()
    sess = session(path, settings)
    ref_model = reference if reference is not None else float64_copy(model)
    nf = model.config.frame_decoder.num_queries
    c = model.config.frame_decoder.hidden_dim
    window = model.config.vita.window
    steps = None
    if step_files is not None:
        # chunks of two windows (encoder) and of three frames (decoder): the validation's T cross both
        steps = TokenSteps.open(steps_dir, step_files, window, lambda p: session(p, settings),
                                encode_chunk_tokens=2 * max(window, 1) * nf, attend_chunk_tokens=3 * nf)
    rng = np.random.default_rng(seed)
    report = ValidationReport(settings=settings)
    for t in frame_counts:
        for n in (nf, max(1, math.ceil(nf / 2))):
            queries = rng.standard_normal((t, n, c)).astype(np.float32)
            index = np.sort(np.stack([rng.permutation(nf)[:n] for _ in range(t)]), axis=1).astype(np.int64)
            q, i = torch.from_numpy(queries), torch.from_numpy(index)
            with torch.no_grad():
                ref32 = [x.numpy() for x in model.track(q, i)]
                ref64 = [x.numpy() for x in ref_model.track(q.double(), i)]
            got = {"vita_tokens": sess.run(TOKENS_OUTPUTS, {"frame_queries": queries, "query_index": index})}
            if steps is not None:
                got["vita_token_steps"] = steps(queries.copy(), index)
            case = f"T={t} N={n}"
            for graph, outs in got.items():
                for name, g, r64, r32 in zip(TOKENS_OUTPUTS, outs, ref64, ref32):
                    report.comparisons.append(Comparison(graph, case, name, _rel(g, r64), _rel(r32, r64)))
    return report


def judge(report: ValidationReport, rtol: Optional[float] = None) -> None:
    """Set each comparison's tolerance; raise ValidationError listing the worst tensors and flips when any fails.

    An output's tolerance is ``max(rtol, FP32_FACTOR x the largest torch fp32 error of that output over all
    inputs)``: a model whose fp32 computation is itself far from float64 is judged against that.
    """
    rtol = RTOL if rtol is None else rtol
    yardstick: dict[tuple[str, str], float] = {}
    for c in report.comparisons:
        key = (c.graph, c.output)
        yardstick[key] = max(yardstick.get(key, 0.0), c.torch_fp32_error)
    for c in report.comparisons:
        c.tolerance = max(rtol, FP32_FACTOR * yardstick[(c.graph, c.output)])
    bad = [c for c in report.comparisons if not c.rel_error <= c.tolerance]  # NaN fails too
    bad_flips = [d for d in report.decisions if d.flips and not d.max_flip_margin <= d.allowed_margin]
    if not bad and not bad_flips:
        return
    lines = []
    if bad:
        worst = sorted(bad, key=lambda c: -(c.rel_error / c.tolerance) if c.rel_error == c.rel_error else -math.inf)
        lines.append(
            f"{len(bad)} exported outputs differ from the float64 torch reference by more than their tolerance "
            "(worst first):"
        )
        lines += [
            f"  {c.graph} {c.output} [{c.case}]: relative error {c.rel_error:.3g} (tolerance {c.tolerance:.3g}; "
            f"torch fp32 {c.torch_fp32_error:.3g})"
            for c in worst[:8]
        ]
    if bad_flips:
        worst_flips = sorted(bad_flips, key=lambda d: -d.max_flip_margin)
        lines.append(
            f"{len(bad_flips)} masked-attention decision layers flipped where the reference is far from the "
            "threshold (a wrong graph, not rounding; worst first):"
        )
        lines += [
            f"  {d.graph} layer {d.layer} [{d.case}]: {d.flips} of {d.decisions} decisions flipped, reference logit "
            f"up to {d.max_flip_margin:.3g} from the threshold (float32 noise there: {d.allowed_margin:.3g})"
            for d in worst_flips[:8]
        ]
    raise ValidationError("\n".join(lines))
