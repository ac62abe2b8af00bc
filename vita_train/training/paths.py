"""Path checks shared by the training and evaluation commands."""

from __future__ import annotations

from pathlib import Path


def is_within(path: Path, parent: Path) -> bool:
    """Whether ``path`` is ``parent`` or lies under it, after resolving links and '..'."""
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents
