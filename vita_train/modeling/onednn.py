"""When the CPU inference fast paths may run, and the linear layer that uses oneDNN's packed weights there.

The fast paths call oneDNN directly with weights prepacked once in its blocked layout. They run only on
a CPU, without gradients, and outside tracing, export and compilers, which must see plain ops (and
fold weights themselves). Everything else takes the plain PyTorch op, which is also the reference the
tests hold the fast path to.
"""

from __future__ import annotations

import functools
import platform
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def exporting() -> bool:
    """True while the model is traced or exported (jit trace, ONNX export, torch.export)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def needs_plain_ops(x: Tensor, *params: Tensor) -> bool:
    """True where a prepacked oneDNN call must not replace the plain op: gradients, compilers or export."""
    return (torch.compiler.is_compiling() or exporting()
            or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))))


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True when this CPU runs bf16 matmuls and convolutions natively (AVX-512-BF16 or AMX)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    return _has_bf16_instructions()


def _has_bf16_instructions() -> bool:
    """On x86, whether the CPU has AVX-512-BF16 or AMX. oneDNN also takes bf16 on AVX-512 CPUs without them
    (Skylake to Ice Lake Xeons: bf16 converted in software, fp32 arithmetic; not measured here) and on AVX2
    ones with AVX-NE-CONVERT; those are not bf16 CPUs here, as the precision policy says. Elsewhere (ARM),
    and with a torch too old to tell, oneDNN's word stands."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is None for check in checks):
        return True
    return any(check() for check in checks if check is not None)


@functools.lru_cache(maxsize=1)
def fp32_linear_as_conv() -> bool:
    """True where float32 linears run fastest as oneDNN 1x1 convolutions: CPUs whose widest vectors are AVX2.

    There oneDNN's 1x1-convolution kernels (brgconv_1x1) ran the encoder's linears (4760 rows of 256 -> 1024,
    1024 -> 256, 256 -> 256 and 256 -> 96) at 186-199 GFLOP/s, its matmul kernels and MKL's at 138-150 (AMD
    EPYC Zen 2, 2 threads). On AVX-512 and AMX machines the matmul path was measured and is kept.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def pack_threads() -> int:
    """The thread count a oneDNN weight pack is made for: the calling thread's. oneDNN picks a convolution's
    weight layout for the threads it runs on, and a pack made for another count was reordered on every call
    (the detector 3x slower: packed by a 2-thread call, then run by 1-thread calls; AMD EPYC Zen 2)."""
    return torch.get_num_threads()


def _fusable(residual: Tensor, x: Tensor, out_features: int) -> bool:
    """True where oneDNN can add ``residual`` inside the packed call: the output's dtype, shape and layout."""
    return (residual.dtype == x.dtype and residual.is_contiguous()
            and residual.shape == (*x.shape[:-1], out_features))


class PackedWeight:
    """One linear weight's oneDNN layout, packed on first use and again whenever the weight or bias changes.

    ``PackedLinear`` holds one; layers whose weights are slices of a larger parameter (the packed q/k/v
    projection of ``MultiheadAttention``) hold one per slice and call ``linear``. ``float32=False`` packs
    bf16 weights only and leaves float32 to the plain op: for the decoders' smaller linears the packed fp32
    call measured no faster, and its copy of the weights would add to the fp32 path's memory. ``float32="conv"``
    packs float32 only where it runs as a 1x1 convolution (``fp32_linear_as_conv``), and, with
    ``min_rows``, only for inputs of at least that many rows (fewer ran faster as the plain op).
    """

    def __init__(self, float32: Union[bool, str] = True, min_rows: int = 0) -> None:
        self.float32 = float32
        self.min_rows = min_rows
        self._packed: Optional[tuple[tuple, Tensor]] = None

    def __getstate__(self) -> dict:
        # a packed oneDNN weight has no storage: copies and pickles leave the cache behind
        return {"float32": self.float32, "min_rows": self.min_rows, "_packed": None}

    def __setstate__(self, state: dict) -> None:
        self.float32 = state.get("float32", True)
        self.min_rows = state.get("min_rows", 0)
        self._packed = None

    @property
    def packed(self) -> bool:
        """True once a packed weight is held."""
        return self._packed is not None

    @property
    def form(self) -> Optional[str]:
        """The oneDNN call of the packed weight held: "conv" (a 1x1 convolution), "matmul", or None."""
        return None if self._packed is None else "conv" if self._packed[0][-1] == "conv" else "matmul"

    def usable(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
        """True where the packed call may replace ``F.linear(x, weight, bias)``: CPU inference, fp32 or native bf16."""
        if needs_plain_ops(x, weight) or torch.is_autocast_enabled("cpu"):  # first: a tracer must not see the
            return False  # shape tests below; under autocast the plain op takes autocast's dtype
        dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
        return (x.device.type == "cpu" and torch.backends.mkldnn.is_available()
                and ((dtypes == {torch.float32} and self._packs_float32() and x.numel() >= self.min_rows * x.shape[-1])
                     or (dtypes == {torch.bfloat16} and bf16_supported()))
                and x.dim() >= 2 and x.numel() > 0 and x.shape[-1] == weight.shape[1])

    def _packs_float32(self) -> bool:
        return self.float32 is True or (self.float32 == "conv" and fp32_linear_as_conv())

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool = False,
               residual: Optional[Tensor] = None, into_residual: bool = False) -> Tensor:
        """linear(x, weight, bias), then ReLU when ``relu``, or plus ``residual``: the packed call where
        ``usable``, else the plain ops. ``into_residual``: the caller gives ``residual`` up, and the 1x1
        convolution form writes the sum into it (oneDNN's in-place sum: the encoder's 1024 -> 256 and
        256 -> 256 linears at 5040 rows took 13.4 and 3.3 ms instead of 14.1 and 3.6, AMD EPYC Zen 2)."""
        if relu and residual is not None:
            raise ValueError("a packed linear fuses a ReLU or a residual add, not both")
        if not self.usable(x, weight, bias):
            out = F.linear(x, weight, bias)
            if residual is not None:
                return out.add_(residual)
            return F.relu(out, inplace=True) if relu else out
        params = (weight,) if bias is None else (weight, bias)
        # a slice of a parameter is a new tensor per call: key on its storage, offset and the version
        key = tuple((p.untyped_storage().data_ptr(), p.storage_offset(), p.shape, p.dtype, p._version) for p in params)
        key += (pack_threads(),)
        if x.dtype == torch.float32 and fp32_linear_as_conv():
            return self._as_conv((*key, "conv"), x, weight, bias, relu, residual, into_residual)
        rows = max(1, x.numel() // weight.shape[1])
        packed = self._cached(key, lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows))
        if residual is not None:
            if _fusable(residual, x, weight.shape[0]):
                # the add happens on each output tile while it is in cache: no second pass over the output
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").add_(residual)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "relu" if relu else "none", [], "")

    def conv1x1(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``F.conv2d(x, weight, bias)`` for a stride-1 1x1 ``weight`` (Cout, Cin, 1, 1): on a channels-last
        ``x`` the packed ``linear`` over its pixels (no copy either way), the output channels-last too.

        With one thread torch's own 1x1 convolution of a single image is not oneDNN's but a plain GEMM: the
        pixel decoder's res2 adapter (256 -> 256 at 96x160) took 31 ms instead of 26, its res3 input
        projection 13.4 instead of 10.4 (AMD EPYC Zen 2, one thread: each of two detector calls at once).
        """
        # first: a tracer or compiler must see the plain op alone, not the views below
        if needs_plain_ops(x, weight) or not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
            return F.conv2d(x, weight, bias)
        w2d, rows = weight.view(weight.shape[0], weight.shape[1]), x.permute(0, 2, 3, 1)
        if not self.usable(rows, w2d, bias):
            return F.conv2d(x, weight, bias)
        return self.linear(rows, w2d, bias).permute(0, 3, 1, 2)

    def _cached(self, key: tuple, pack: Callable[[], Tensor]) -> Tensor:
        """The packed weight held for ``key``, packed anew by ``pack()`` when the key changed."""
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack())
        return self._packed[1]

    def _as_conv(self, key: tuple, x: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool,
                 residual: Optional[Tensor], into_residual: bool = False) -> Tensor:
        """``linear`` as a 1x1 convolution (``fp32_linear_as_conv``): rows of ``x`` are the pixels of a
        channels-last (1, in, rows, 1) image, so neither input nor output is copied."""
        rows, cin, cout = x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]
        image = x.contiguous().view(1, rows, 1, cin).permute(0, 3, 1, 2)
        zeros, ones = [0, 0], [1, 1]
        packed = self._cached(key, lambda: torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach().reshape(cout, cin, 1, 1).contiguous(memory_format=torch.channels_last),
            zeros, ones, ones, 1, list(image.shape)))
        if residual is not None and into_residual and _fusable(residual, x, cout):
            torch.ops.mkldnn._convolution_pointwise_.binary(
                residual.view(1, rows, 1, cout).permute(0, 3, 1, 2), image, packed, bias, zeros, ones, ones, 1,
                "add", 1.0, None, [], None)
            return residual
        if residual is not None and _fusable(residual, x, cout):
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                image, residual.view(1, rows, 1, cout).permute(0, 3, 1, 2), packed, bias, zeros, ones, ones, 1,
                "add", 1.0, None, [], None)
            residual = None
        else:
            out = torch.ops.mkldnn._convolution_pointwise(
                image, packed, bias, zeros, ones, ones, 1, "relu" if relu else "none", [], "")
        out = out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], cout)
        return out if residual is None else out.add_(residual)


class PackedLinears:
    """``F.linear(x, weight, bias)`` for weights given at each call, each packed once as a oneDNN 1x1
    convolution (``PackedWeight(float32="conv")``, AVX2) and held with its weight.

    For the token engine, which runs its layers' parameters over row blocks (``kernels.cpu.MklPackedLinear``
    elsewhere): 600 rows of 256 -> 2048 -> 256 took 3.50 and 3.26 ms instead of MKL's packed 4.26 and 4.13,
    2400 rows of 256 -> 768 4.91 instead of 6.09 (AMD EPYC Zen 2). Fewer than ``min_rows`` rows, and every
    input the packed call does not take, run ``F.linear``. Make a new instance when the weights change.
    """

    def __init__(self, min_rows: int = 128) -> None:
        self.min_rows = min_rows
        self._packs: dict[int, tuple[Tensor, PackedWeight]] = {}

    def __call__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``F.linear(x, weight, bias)``."""
        entry = self._packs.get(id(weight))
        if entry is None:  # the weight is kept with its pack: its id cannot be reused while the pack lives
            entry = self._packs[id(weight)] = (weight, PackedWeight(float32="conv", min_rows=self.min_rows))
        return entry[1].linear(x, weight, bias)


class PackedConv1x1(nn.Conv2d):
    """A stride-1 1x1 nn.Conv2d (same parameters and state-dict keys) whose CPU inference on a channels-last
    input runs ``PackedWeight.conv1x1``; everything else runs the plain convolution."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.pack = PackedWeight()

    def forward(self, x: Tensor) -> Tensor:
        """``conv2d(x, weight, bias)``."""
        return self.pack.conv1x1(x, self.weight, self.bias)


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that runs float32 and bf16 CPU inference through oneDNN.

    On this path the weight is reordered once into oneDNN's layout (cached until it changes) and an
    optional ReLU is applied inside the same call; on the AVX2 EPYC the encoder's 5040x256x1024 matmuls
    ran 10-17% faster than MKL's addmm; in bf16 on the AMX Xeon the 256->1024 FFN matmul with its ReLU
    took 2.0 ms instead of 4.7 (two frames), and the frame decoder's and deformable attention's smaller
    linears together 3-4% of the bf16 detector (aten's addmm first copies the bias into the output; those
    layers pass ``float32=False``, see ``PackedWeight``).
    ``forward(x, relu=True)`` equals ``relu(linear(x))`` and ``forward(x, residual=r)`` equals
    ``linear(x) + r`` (the add inside the same call where ``r`` allows). bf16 runs here only where the CPU
    has bf16 instructions (else the plain op).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, float32: Union[bool, str] = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.pack = PackedWeight(float32)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "pack" not in self.__dict__:  # pickled before the cache became its own object
            self.pack = PackedWeight()

    def forward(self, x: Tensor, relu: bool = False, residual: Optional[Tensor] = None,
                into_residual: bool = False) -> Tensor:
        """linear(x), then ReLU when ``relu``, or plus ``residual`` (one or the other); ``into_residual`` as in
        ``PackedWeight.linear``."""
        return self.pack.linear(x, self.weight, self.bias, relu=relu, residual=residual, into_residual=into_residual)
