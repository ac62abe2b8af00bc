"""``python -m benchmarks report DIR``: every results JSON of a directory on one markdown page, with its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vita_train.utils.atomic import atomic_write

from .record import PREVIOUS, load_record, record_markdown


def write_report(directory: Path, out: Optional[Path] = None) -> Path:
    """Render ``directory``'s ``*.json`` results (in suite order) into ``out`` (default DIR/report.md; a folder
    gets report.md in it)."""
    from .suite import BENCHMARKS

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of benchmark results")
    order = list(BENCHMARKS)
    records = []
    for path in sorted(directory.glob("*.json")):
        if path.name.endswith(f"{PREVIOUS}.json"):
            continue  # an earlier run's record, set aside by the run that replaced it
        try:
            records.append(load_record(path))
        except ValueError:
            continue  # other JSON files (e.g. trt_check's) are not ours to render
    if not records:
        raise FileNotFoundError(f"{directory} holds no benchmark results (*.json written by python -m benchmarks)")
    records.sort(key=lambda r: (order.index(r["benchmark"]) if r["benchmark"] in order else len(order), r["benchmark"]))
    out = Path(out) if out else directory / "report.md"
    if out.is_dir():
        out = out / "report.md"
    prefix = "" if out.parent.resolve() == directory.resolve() else f"{directory.resolve()}/"
    parts = ["# VITA benchmarks", "", "Contents: " + ", ".join(r["benchmark"] for r in records), ""]
    for data in records:
        data = dict(data, plots=[prefix + p for p in data.get("plots", [])])
        parts += [record_markdown(data, heading_level=2), ""]
    text = "\n".join(parts)
    atomic_write(out, lambda f: f.write(text), binary=False)
    return out
