"""Building a CPU model on a thread that ends with the load, so the caller's thread owns no OpenMP team.

GNU OpenMP (libgomp, which torch's CPU kernels run on) gives every thread that starts parallel work a team of
worker threads of its own, kept until that thread exits. Once the process's teams together hold more threads
than it has CPUs, libgomp cuts the spin-wait of every idle worker from ~300,000 iterations to ~100, so each of
the thousands of parallel regions in a frame begins by waking sleeping workers. The usual application shape
(load the model on the main thread, segment on a worker thread) hits exactly that: on the 2-core Xeon of
session 11 (bf16 R-50, 2 threads) the detector took 0.21 s/frame from a worker thread after a load on the
main thread, 0.15-0.16 when the load ran on a thread of its own, 0.15 with both on the main thread.
``OMP_WAIT_POLICY=ACTIVE`` made it worse (0.29: the main thread's idle team then spins on a CPU).

The load's own parallel work (reading and casting weights, folding norms) runs on a short-lived thread here;
its team ends with it, and whichever one thread then segments owns the process's only team. Torch work of the
application's own on another thread still makes a second team: keep it on the thread that segments.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def on_short_lived_thread(fn: Callable[[], T], name: str = "vita-load") -> T:
    """``fn()`` run on a new thread that ends with it: its result, or its exception raised here."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised on the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        error = box.pop("error")
        raise error  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
