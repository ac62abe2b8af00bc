"""``kernels``: each fast kernel against its plain-PyTorch reference (time and max error), as measured by
``benchmarks.kernels.measure`` (written with the kernels); a note until that module exists."""

from __future__ import annotations

from typing import Any

from .record import Column, Record
from .settings import Settings
from .workspace import Workspace

NOT_PRESENT = "kernels/ not present yet"


def guess_column(key: str, values: list[Any]) -> Column:
    """A column for a key of rows we did not define: its kind read from the name (for --compare and checks)."""
    name = key.lower()
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None):
        kind = "text"
    elif any(w in name for w in ("err", "diff")):
        kind = "error"
    elif any(w in name for w in ("speedup", "speed_up", "ratio")):
        kind = "ratio"
    elif name.endswith(("_ms", "_s", "seconds", "time", "_us")):
        kind = "time"
    elif any(w in name for w in ("mb", "gb", "bytes", "memory")):
        kind = "memory"
    else:
        kind = "count"
    return Column(key, key.replace("_", " "), kind)


def rows_table(rec: Record, id: str, title: str, rows: list[dict[str, Any]], caption: str) -> None:
    """A table of rows another module measured; text columns identify a row."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = [guess_column(k, [r.get(k) for r in rows]) for k in keys]
    table = rec.table(id, title, columns, keys=tuple(c.key for c in columns if c.kind == "text"), caption=caption)
    for r in rows:
        rec.add(table, {k: r.get(k) for k in keys})


def run(s: Settings, ws: Workspace, rec: Record) -> None:
    """Rows from ``benchmarks.kernels.measure(quick, device)``, one table."""
    try:
        from . import kernels
    except ImportError as e:
        rec.note(f"{NOT_PRESENT} ({e})")
        return
    rows = kernels.measure(quick=s.quick, device=ws.device)
    rows_table(rec, "kernels", "Fast kernels against their references", rows,
               f"{ws.device}, {s.threads} threads (the threads column: the Winograd and masked-attention rows run "
               "with the threads of one detector call, two of which run at once by default); as measured by "
               "benchmarks.kernels.measure.")
