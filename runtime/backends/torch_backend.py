"""The PyTorch backend: runs vita_train's model (CPU: float32, bfloat16 where the CPU has it; CUDA: float32,
float16, bfloat16)."""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vita_train.inference.postprocess import MaskScorer, select_topk
from vita_train.inference.pruning import prune_frame_queries
from vita_train.modeling.precision import bf16_supported, cast_detector
from vita_train.modeling.vita_model import VitaModel

from ..host_memory import keep_freed_memory
from . import numpy_ops
from .base import Detection, Selection, chosen_detector_streams
from .compiled import CompiledDetector

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# On the CPU "device" memory is host memory: features go straight to the host tier (float32 in a float32 run,
# see to_host), then to a temporary file, so that peak memory does not grow with the video.
_CPU_FEATURE_BUDGET = 0


class _TorchMaskHead:
    def __init__(self, scorer: MaskScorer) -> None:
        self.scorer = scorer

    def masks(self, mask_features: torch.Tensor) -> np.ndarray:
        return self.scorer.masks(mask_features).cpu().numpy()

    def mask_quality(self) -> np.ndarray:
        return self.scorer.mask_quality().cpu().numpy()


class _HostMaskHead:
    """On the CPU: the logits by torch (one GEMM on the features as they lie), the masks and mask quality by
    ``numpy_ops.MaskHead`` (its compiled kernel where it runs: one pass, no full-size float temporaries).

    The features are the unprojected /4 maps (``project_mask_features=False``): ``embed`` and ``bias`` are the
    selected mask embeddings with VITA's mask-feature projection folded in (VitaModule.fold_mask_projection).
    """

    def __init__(self, embed: torch.Tensor, bias: torch.Tensor, resized, padded, orig) -> None:
        self.embed, self.bias = embed.float(), bias.float()
        self.head = numpy_ops.MaskHead(self.embed.numpy(), resized, padded, orig, threads=torch.get_num_threads())

    def masks(self, mask_features: torch.Tensor) -> np.ndarray:
        t, c, h, w = mask_features.shape
        # (t*h*w, C) rows, a view of channels-last features; the (t*h*w, k) product then transposed to (k, t, h, w)
        # (half the time of the einsum, which reads the features in the other order)
        rows = mask_features.float().permute(0, 2, 3, 1).reshape(t * h * w, c)
        logits = torch.addmm(self.bias, rows, self.embed.t()).t().contiguous()
        return self.head.masks_from_logits(logits.view(-1, t, h, w).numpy())

    def mask_quality(self) -> np.ndarray:
        return self.head.mask_quality()


class TorchBackend:
    """Backend over a VitaModel.

    ``dtype`` float16/bfloat16 runs under autocast on CUDA; bfloat16 on a CPU with AVX-512-BF16 or AMX runs a
    bf16 copy of the detector (the caller's model is left in float32). Both follow the one policy of
    ``vita_train.modeling.precision`` (fp16 keeps the whole pixel decoder fp32, as the official code).
    """

    def __init__(
        self,
        model: VitaModel,
        device: Optional[str] = None,
        dtype: str = "float32",
        kernels: Optional[str] = None,
        token_dtype: Optional[str] = None,
        compile: bool = False,
        detector_streams: Optional[int] = None,
        emulate_bf16: bool = False,
    ) -> None:
        """``kernels``, ``token_dtype`` (None: the model config's) and ``compile`` as in SegmentOptions;
        ``detector_streams``: detector calls the streaming loop runs at once (None: 2 on a CPU with two threads
        or more, uncompiled; else 1); ``emulate_bf16``: bfloat16 on a CPU without bf16 instructions too, on
        PyTorch's plain ops (the same policy, 14x slower than float32 for full-size R-50 on an AMD EPYC Zen 2:
        for measuring bf16's agreement there, not for speed)."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device='cpu'")
        cpu_bf16 = dtype == "bfloat16" and not device.startswith("cuda")
        if dtype == "float16" and not device.startswith("cuda"):
            raise ValueError(f"dtype float16 needs a CUDA device; on {device} use float32 (or bfloat16 where the CPU has it)")
        if cpu_bf16 and not bf16_supported() and not emulate_bf16:
            raise ValueError(
                "dtype bfloat16 on the CPU needs AVX-512-BF16 or AMX, which this CPU lacks; use dtype float32 "
                "(to check bf16's results here, slowly: TorchBackend(model, dtype='bfloat16', emulate_bf16=True))"
            )
        if token_dtype is not None and token_dtype not in _DTYPES:
            raise ValueError(f"token_dtype must be one of {sorted(_DTYPES)}, got {token_dtype!r}")
        if not device.startswith("cuda"):
            keep_freed_memory()
        if cpu_bf16:
            model = cast_detector(copy.deepcopy(model), torch.bfloat16)
        self.model = model.to(device).eval()
        if kernels is not None:
            self.model.set_kernels(kernels)
        if token_dtype is not None:
            self.model.vita.token_dtype = _DTYPES[token_dtype]
        # tokens are kept in this dtype from detection to the token engine
        self.token_dtype = self.model.vita.token_dtype
        self.config = model.config
        self.device = device
        self.dtype = dtype
        # on the CPU the features stay unprojected and the mask head folds the projection into its k embeddings
        self._project = device.startswith("cuda")
        detect = functools.partial(self.model.detect, project_mask_features=self._project)
        self._detect = CompiledDetector(self.model, self._project) if compile else detect
        # On the CPU with two threads or more the loop runs two frames' detector calls at once, each on its own
        # thread with half the threads: a call's many small parallel regions no longer leave the other thread
        # waiting at their ends. Full-size R-50 at 360x640 on 2 cores (AMD EPYC Zen 2): 653-671 instead of
        # 701 ms a frame, for a second frame's activations in memory (0.17 GB). Every detector call runs with
        # that many threads, and the threads as at construction are restored after it (oneDNN packs the
        # weights for the calling thread's count: onednn.pack_threads).
        self.threads = torch.get_num_threads()
        self.detector_streams = chosen_detector_streams(
            detector_streams, not device.startswith("cuda") and not compile, self.threads)
        self._call_threads = max(1, self.threads // self.detector_streams)

    def _autocast(self):
        if self.dtype == "float32" or not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=_DTYPES[self.dtype])

    def _images(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2)

    @contextlib.contextmanager
    def _call_threads_set(self):
        """This thread runs a detector call with ``_call_threads`` threads, and ``threads`` again after it."""
        if self._call_threads == self.threads:
            yield
            return
        # A thread's first torch op sets its OpenMP count from the process-wide one, which every detector thread
        # writes (set_num_threads stores it there too): were that first op inside the call, a fresh worker thread
        # could run it with another thread's count, its oneDNN packs and products with it (the first frame's mask
        # features then differed from run to run). Reading the count makes that happen now, before setting ours.
        torch.get_num_threads()
        torch.set_num_threads(self._call_threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)

    @torch.no_grad()
    def detect(self, frames: np.ndarray, prune_ratio: float) -> Detection:
        with self._autocast(), self._call_threads_set():
            out = self._detect(self._images(frames))
        tokens, index = prune_frame_queries(out.frame_queries.float(), out.frame_logits.float(), prune_ratio)
        index = None if index is None else index.cpu().numpy()
        # on the CPU the features stay in the detector's dtype: a bf16 run's go to the host as float16 in one
        # conversion (not through a float32 copy) and the host mask head widens what it reads
        features = out.mask_features.float() if self.device.startswith("cuda") else out.mask_features
        return Detection(tokens.to(self.token_dtype), index, features)

    @torch.no_grad()
    def mask_features(self, frames: np.ndarray) -> torch.Tensor:
        with self._autocast(), self._call_threads_set():
            return self.model.mask_features(self._images(frames), project=self._project).float()

    @torch.no_grad()
    def track(self, tokens: Sequence[torch.Tensor], query_index: Optional[Sequence[np.ndarray]], window: Optional[int],
              owned: bool = False):
        queries = tokens[0] if owned and len(tokens) == 1 else torch.cat(list(tokens))
        index = None
        if query_index is not None:
            index = torch.from_numpy(np.concatenate(list(query_index))).to(self.device)
        with self._autocast():
            # the concatenation, or the given-up array, is ours: the encoder may overwrite it instead of copying
            logits, embed = self.model.track(queries, index, window=window, overwrite_input=True)
        return logits.float().cpu().numpy(), embed.float()

    def select(self, logits: np.ndarray, k: int) -> Selection:
        sel = select_topk(torch.from_numpy(logits), k)
        return Selection(sel.scores.numpy(), sel.labels.numpy(), sel.query_index.numpy())

    def mask_head(self, mask_embed, selection: Selection, resized, padded, orig) -> Any:
        index = torch.from_numpy(selection.query_index).to(mask_embed.device)
        if not self._project:
            return _HostMaskHead(*self.model.vita.fold_mask_projection(mask_embed[index]), resized, padded, orig)
        return _TorchMaskHead(MaskScorer(mask_embed[index], resized, padded, orig))

    def concat(self, arrays: Sequence[Any]) -> Any:
        return torch.cat(list(arrays))

    def to_host(self, features: torch.Tensor) -> np.ndarray:
        # host arrays are (B, h, w, D): the CPU detector's channels-last features are that in memory already,
        # so storing them is a plain copy, not a transpose (which cost as much as writing them to disk)
        features = features.permute(0, 2, 3, 1)
        if not self.device.startswith("cuda"):
            if features.dtype == torch.float32:
                return features.numpy()  # exact: a float32 CPU run keeps its features bit for bit
            if features.dtype == torch.bfloat16:
                # the bf16 bits as they are (numpy has no bfloat16): exact, and no float16 conversion each
                # way, which cost 4.4 ms a frame (full-size R-50, 360x640, 2-core Xeon)
                return features.contiguous().view(torch.int16).numpy()
        return features.to(torch.float16).cpu().numpy()

    def from_host(self, features: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(features)
        if host.dtype == torch.int16:  # bf16 bits (to_host)
            host = host.view(torch.bfloat16)
        return host.to(self.device).float().permute(0, 3, 1, 2)

    def nbytes(self, features: torch.Tensor) -> int:
        return features.numel() * features.element_size()

    def device_budget(self) -> int:
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            return int(free * 0.4)
        return _CPU_FEATURE_BUDGET
