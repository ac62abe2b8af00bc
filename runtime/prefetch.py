"""Decoding and resizing in a background thread, handed over through a bounded queue."""

from __future__ import annotations

import queue
import threading
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
