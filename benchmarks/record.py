"""One benchmark's results: tables of rows, written as ``<name>.json`` and ``<name>.md`` after every row.

Writing after every row (atomically) is what leaves the measured part on disk when a run is interrupted.
A cell is a number, a string, None (not applicable) or a statistic ``{"median", "min", "max", "n"}``.
Each column has a kind, which says what a valid value is and whether larger is better:
time / memory / error (lower is better), rate / ratio / frames / score (higher is better), count, change,
text. All but error, score (a fraction in [0, 1]) and change are positive when measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vita_train.utils.atomic import atomic_write

log = logging.getLogger(__name__)
PREVIOUS = ".previous"  # <name>.previous.json: the complete record a new run in the same folder set aside
LOWER_IS_BETTER = ("time", "memory", "error")
HIGHER_IS_BETTER = ("rate", "ratio", "frames", "score")
KINDS = LOWER_IS_BETTER + HIGHER_IS_BETTER + ("count", "change", "text")


@dataclass
class Column:
    """A table column: JSON key, header text (with unit) and kind."""

    key: str
    label: str
    kind: str = "text"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.key!r}: kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Table:
    """Rows under one heading; ``keys`` are the columns that identify a row across runs (for --compare)."""

    id: str
    title: str
    columns: list[Column]
    keys: tuple[str, ...] = ()
    caption: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "id": self.id,
            "title": self.title,
            "caption": self.caption,
            "keys": list(self.keys),
            "columns": [{"key": c.key, "label": c.label, "kind": c.kind} for c in self.columns],
            "rows": self.rows,
        }


def stat(values: list[float]) -> dict[str, Any]:
    """Median, min and max of repeated measurements."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("a statistic needs at least one measurement")
    mid = n // 2
    median = ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return {"median": median, "min": ordered[0], "max": ordered[-1], "n": n}


def scaled(cell: dict[str, Any], factor: float) -> dict[str, Any]:
    """A statistic multiplied by ``factor`` (e.g. seconds per run -> ms per frame)."""
    return {"median": cell["median"] * factor, "min": cell["min"] * factor, "max": cell["max"] * factor, "n": cell["n"]}


def value_of(cell: Any) -> Optional[float]:
    """The number a cell stands for (a statistic's median), or None."""
    if isinstance(cell, dict):
        return cell.get("median")
    if isinstance(cell, bool) or not isinstance(cell, (int, float)):
        return None
    return float(cell)


def format_number(v: float) -> str:
    """Integers as they are; otherwise four significant digits, without exponents from 10^4 to 10^9."""
    if isinstance(v, int) or v == 0 or not math.isfinite(v):
        return str(v)
    if 1e4 <= abs(v) < 1e9:
        return f"{v:.0f}"
    return f"{v:.4g}"


def format_cell(cell: Any) -> str:
    """Markdown text of one cell: statistics as ``median (min–max)``."""
    if cell is None:
        return "—"
    if isinstance(cell, dict):
        if cell["n"] == 1:
            return format_number(cell["median"])
        return f"{format_number(cell['median'])} ({format_number(cell['min'])}–{format_number(cell['max'])})"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, (int, float)):
        return format_number(cell)
    return str(cell).replace("|", "\\|").replace("\n", " ")


def table_markdown(table: dict[str, Any]) -> str:
    """A table (JSON form) as markdown: heading, caption, pipe table."""
    lines = [f"### {table['title']}", ""]
    if table.get("caption"):
        lines += [table["caption"], ""]
    columns = table["columns"]
    lines.append("| " + " | ".join(c["label"] for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in table["rows"]:
        lines.append("| " + " | ".join(format_cell(row.get(c["key"])) for c in columns) + " |")
    if not table["rows"]:
        lines.append("| " + " | ".join("(none)" if i == 0 else "" for i in range(len(columns))) + " |")
    return "\n".join(lines) + "\n"


def environment_markdown(env: dict[str, Any]) -> str:
    """One paragraph naming the machine, the software and the commit."""
    cpu = env.get("cpu", {})
    gpu = env.get("gpu") or {}
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    gpu_text = f"{gpu.get('name')} (driver {gpu.get('driver')})" if gpu.get("name") else "none"
    git = env.get("git", {})
    commit = (git.get("commit") or "unknown")[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")
    family = f" ({cpu['family']})" if cpu.get("family") else ""
    text = (
        f"Machine: {cpu.get('model', 'unknown CPU')}{family}, {cpu.get('logical_cpus')} logical CPUs "
        f"({cpu.get('usable_cpus')} usable), {env.get('threads')} threads; vector: {cpu.get('vector', 'unknown')}, "
        f"bf16: {cpu.get('bf16')}, AMX: {cpu.get('amx')}; GPU: {gpu_text}. Software: {versions}. Commit: {commit}."
    )
    rates = env.get("matmul_gflops") or {}
    if rates.get("before"):
        def one(r: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.0f}" for k, v in r.items())

        after = f"; after: {one(rates['after'])}" if rates.get("after") else ""
        text += (f" Machine state, 2048^3 matmul GFLOP/s with these threads, before this benchmark: "
                 f"{one(rates['before'])}{after} (a slower rate than usual marks a slow spell: compare rows "
                 f"within one run).")
    return text


def record_markdown(data: dict[str, Any], heading_level: int = 1) -> str:
    """The whole record as markdown (what ``<name>.md`` holds)."""
    h = "#" * heading_level
    status = data.get("status")
    lines = [f"{h} {data['title']}", ""]
    if status != "complete":
        lines += [f"**Status: {status}** — the tables hold what was measured before it stopped.", ""]
    lines += [environment_markdown(data.get("environment", {})), ""]
    model = data.get("model") or {}
    if model:
        lines += [f"Model: {model.get('preset')}, weights: {model.get('weights')} (sha256 {str(model.get('sha256'))[:12]}).", ""]
    for note in data.get("notes", []):
        lines += [f"- {note}"]
    if data.get("notes"):
        lines.append("")
    for table in data["tables"]:
        lines += [table_markdown(table), ""]
    for plot in data.get("plots", []):
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


class Record:
    """Collects one benchmark's tables and writes them to ``out_dir`` after every change."""

    def __init__(self, name: str, title: str, out_dir: Path, environment: dict[str, Any], settings: dict[str, Any]) -> None:
        self.name, self.title, self.out_dir = name, title, Path(out_dir)
        self.environment, self.settings = environment, settings
        self.model: dict[str, Any] = {}
        self.tables: list[Table] = []
        self.notes: list[str] = []
        self.plots: list[str] = []
        self.status = "running"
        self.started = _now()
        self._written = False

    @property
    def json_path(self) -> Path:
        """Where the JSON goes."""
        return self.out_dir / f"{self.name}.json"

    @property
    def md_path(self) -> Path:
        """Where the markdown goes."""
        return self.out_dir / f"{self.name}.md"

    def table(self, id: str, title: str, columns: list[Column], keys: tuple[str, ...] = (), caption: str = "") -> Table:
        """Start a table (written at once, so an interrupted run still shows its heading)."""
        t = Table(id, title, columns, keys, caption)
        self.tables.append(t)
        self.flush()
        return t

    def add(self, table: Table, row: dict[str, Any]) -> None:
        """Append a row and write both files."""
        unknown = set(row) - {c.key for c in table.columns}
        if unknown:
            raise KeyError(f"row has keys {sorted(unknown)} that table {table.id!r} has no columns for")
        table.rows.append(row)
        self.flush()

    def note(self, text: str) -> None:
        """A sentence shown above the tables."""
        self.notes.append(text)
        self.flush()

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "benchmark": self.name,
            "title": self.title,
            "status": self.status,
            "started": self.started,
            "finished": _now() if self.status != "running" else None,
            "environment": self.environment,
            "settings": self.settings,
            "model": self.model,
            "notes": self.notes,
            "tables": [t.to_dict() for t in self.tables],
            "plots": self.plots,
        }

    def flush(self) -> None:
        """Write ``<name>.json`` and ``<name>.md`` atomically (the first write sets an earlier record aside)."""
        if not self._written:
            set_aside_earlier_record(self.out_dir, self.name)
            self._written = True
        data = self.to_dict()
        text = json.dumps(data, indent=1, allow_nan=False)
        atomic_write(self.json_path, lambda f: f.write(text), binary=False)
        md = record_markdown(data)
        atomic_write(self.md_path, lambda f: f.write(md), binary=False)

    def finish(self, status: str) -> None:
        """Mark the run complete / interrupted / failed and write."""
        self.status = status
        self.flush()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_record(path: Path) -> dict[str, Any]:
    """A results JSON written by Record; a clear error when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable benchmark results file ({e})") from None
    if not isinstance(data, dict) or "benchmark" not in data or "tables" not in data:
        raise ValueError(f"{path} is JSON but not a benchmark results file (no 'benchmark'/'tables')")
    return data


def set_aside_earlier_record(out_dir: Path, name: str) -> None:
    """Keep a complete ``<name>.json`` already in ``out_dir`` (with its markdown and plots) as
    ``<name>.previous.*``; drop an incomplete one's plots. Called before a new run's first write."""
    out_dir = Path(out_dir)
    path = out_dir / f"{name}.json"
    if not path.exists():
        return
    try:
        old: Optional[dict[str, Any]] = load_record(path)
    except ValueError:
        old = None
    if old is not None and old.get("status") != "complete":
        # a failed or interrupted run is what a new run replaces; its plots would pass for the new run's
        for plot in old.get("plots", []):
            (out_dir / plot).unlink(missing_ok=True)
        return
    if old is None:
        # not a record this code can read: kept byte for byte, not overwritten
        os.replace(path, out_dir / f"{name}{PREVIOUS}.json")
        log.warning("%s is not a readable benchmark record; kept as %s%s.json", path, name, PREVIOUS)
        return
    plots = []
    for plot in old.get("plots", []):
        if (out_dir / plot).exists():
            kept = f"{Path(plot).stem}{PREVIOUS}{Path(plot).suffix}"
            os.replace(out_dir / plot, out_dir / kept)
            plots.append(kept)
    old["plots"] = plots
    text, md = json.dumps(old, indent=1, allow_nan=False), record_markdown(old)
    atomic_write(out_dir / f"{name}{PREVIOUS}.json", lambda f: f.write(text), binary=False)
    atomic_write(out_dir / f"{name}{PREVIOUS}.md", lambda f: f.write(md), binary=False)
    log.info("the earlier complete %s record in %s is kept as %s%s.json", name, out_dir, name, PREVIOUS)
