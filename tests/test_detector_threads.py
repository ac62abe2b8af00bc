"""Each detector call runs with its own thread count (runtime/backends/torch_backend.py, kernels/csrc/thread_count.h).

Two detector calls run at once on worker threads, each with half the threads. torch keeps one process-wide
count beside each thread's: a fresh thread takes the process-wide one at its first op, so a call that set its
count before any op could run with the count another thread stored meanwhile, and its oneDNN packs and
products with it (on an AMD EPYC Zen 4 the first frame's mask features then differed from run to run).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kernels import native
from runtime.backends.torch_backend import TorchBackend
from tests.conftest import require_native_kernels
from vita_train import VitaModel, preset


def _other_thread_sets(count: int) -> None:
    worker = threading.Thread(target=torch.set_num_threads, args=(count,))
    worker.start()
    worker.join()


def test_a_detector_call_on_a_fresh_thread_runs_with_its_own_thread_count():
    """Another thread storing 2 while a fresh worker's call runs leaves the call at its 1 thread; the control
    (the same sequence without the backend's setting) shows the count a fresh thread would have taken."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backend = TorchBackend(VitaModel(preset("vita_tiny")).eval(), device="cpu", detector_streams=2)
        assert backend._call_threads == 1
        seen: list[int] = []
        detect = backend._detect

        def observed(images: torch.Tensor):
            _other_thread_sets(2)  # what another detector thread's restore, or a decode thread, does meanwhile
            seen.append(torch.get_num_threads())
            return detect(images)

        backend._detect = observed
        frames = np.zeros((1, 64, 96, 3), np.uint8)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(backend.detect, frames, 1.0).result()
        assert seen == [1]

        def control() -> int:
            torch.set_num_threads(1)  # set, but no op yet on this thread
            _other_thread_sets(2)
            return torch.get_num_threads()

        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(control).result() == 2
    finally:
        torch.set_num_threads(before)


def test_the_first_native_kernel_call_on_a_thread_keeps_its_thread_count():
    """torch's header initialises a thread's count once per shared library from the process-wide one: the
    kernels' first parallel loop on a thread that set 1 after another thread stored 2 left it at 2."""
    require_native_kernels()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, 64, generator=g) for _ in range(3))
        x = torch.randn(1, 16, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
        calls = {
            "masked_attention": lambda: native.masked_attention(q, k, v, None, 2),
            "winograd_input": lambda: native.winograd_input(x, 2, (0, 8)),
        }

        def on_fresh_thread(call) -> int:
            torch.get_num_threads()  # this thread's torch ops have run: libtorch's initialisation done
            torch.set_num_threads(1)
            _other_thread_sets(2)
            call()
            return torch.get_num_threads()

        for name, call in calls.items():
            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(on_fresh_thread, call).result() == 1, name
    finally:
        torch.set_num_threads(before)
