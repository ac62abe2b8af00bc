"""tqdm progress bars on stderr, only when asked for."""

from __future__ import annotations

from typing import Any, Iterable


def bar(iterable: Iterable[Any], enabled: bool, **kw: Any) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (lists get a total)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, leave=False, **kw)
