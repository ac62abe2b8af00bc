"""Work ahead of the consumer on background threads: decoding and resizing through a bounded queue
(``prefetch``), and calls run a few at a time, handed over in order (``in_order``)."""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
U = TypeVar("U")
_END = object()


def prefetch(items: Iterable[T], fn: Callable[[T], U], maxsize: int = 8) -> Iterator[U]:
    """Yield ``fn(item)`` for each item, computed ahead in a thread; at most ``maxsize`` results wait.

    An exception in the thread is re-raised in the consumer; stopping early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
    stop = threading.Event()

    def put(obj: object) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("ok", fn(item))):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(("err", e))
            return
        put(("ok", _END))

    thread = threading.Thread(target=work, name="vita-decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "err":
                raise value
            if value is _END:
                return
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def in_order(fn: Callable[[T], U], items: Iterable[T], workers: int, name: str = "vita-worker") -> Iterator[U]:
    """Yield ``fn(item)`` for each item in order, with up to ``workers`` calls running at once on worker threads
    (``workers`` <= 1: on the caller's thread, one at a time).

    An exception in a call is re-raised in the consumer; stopping early waits for the calls already running.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        running: deque = deque()
        try:
            for item in items:
                running.append(pool.submit(fn, item))
                if len(running) >= workers:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:
            for future in running:  # not started yet: dropped; already running: waited for by the pool's exit
                future.cancel()
