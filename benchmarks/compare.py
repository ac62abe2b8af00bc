"""``--compare OLD_DIR``: each measured figure against the same row of an older results directory.

A regression is a figure more than 10% worse: a time or memory 10% larger, a rate, ratio or frame count
10% smaller.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .record import HIGHER_IS_BETTER, LOWER_IS_BETTER, Column, Record, load_record, value_of

log = logging.getLogger(__name__)
THRESHOLD = 0.10


def _row_key(keys: list[str], row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in keys)


def changes(new: dict[str, Any], old: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per figure present in both: old, new, relative change (worse > 0) and whether it regressed."""
    old_tables = {t["id"]: t for t in old["tables"]}
    out = []
    for table in new["tables"]:
        before = old_tables.get(table["id"])
        # rows are matched on the keys both tables have: a key column added since still finds the older rows
        keys = [k for k in table["keys"] if before is not None and k in before["keys"]]
        if not keys:
            continue
        old_rows = {_row_key(keys, r): r for r in before["rows"]}
        for row in table["rows"]:
            match = old_rows.get(_row_key(keys, row))
            if match is None:
                continue
            for col in table["columns"]:
                kind = col["kind"]
                if kind not in LOWER_IS_BETTER + HIGHER_IS_BETTER:
                    continue
                a, b = value_of(match.get(col["key"])), value_of(row.get(col["key"]))
                if a is None or b is None or a <= 0 or b <= 0:
                    continue
                worse = (b / a - 1) if kind in LOWER_IS_BETTER else (a / b - 1)
                out.append({
                    "table": table["id"], "row": " / ".join(str(row.get(k)) for k in table["keys"]),
                    "figure": col["label"], "old": a, "new": b, "worse_pct": 100 * worse,
                    "regression": worse > THRESHOLD,
                })
    return out


def setting_differences(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """What two records were measured with that makes their figures incomparable: model, clip, threads, device,
    CPU (each ``what: old -> new``; a field an older record lacks is not counted)."""
    fields = [("model preset", ("model", "preset")), ("model weights sha256", ("model", "sha256")),
              ("frames", ("settings", "frames")), ("size", ("settings", "size")), ("video", ("settings", "video")),
              ("threads", ("settings", "threads")), ("device", ("settings", "device")),
              ("CPU", ("environment", "cpu", "model"))]
    out = []
    for what, path in fields:
        a, b = old, new
        for key in path:
            a = a.get(key) if isinstance(a, dict) else None
            b = b.get(key) if isinstance(b, dict) else None
        if a is not None and b is not None and a != b:
            if what == "model weights sha256":
                a, b = str(a)[:12], str(b)[:12]
            out.append(f"{what} {a} -> {b}")
    return out


def compare_record(rec: Record, old_dir: Path) -> None:
    """Add a comparison table against ``old_dir/<name>.json`` to ``rec``; warn about each regression. A record
    measured with other settings (model, clip, threads, device, CPU) is not compared: a note says what differs."""
    old_path = Path(old_dir) / f"{rec.name}.json"
    if not old_path.exists():
        rec.note(f"--compare: {old_path} does not exist, nothing to compare")
        return
    old = load_record(old_path)
    differs = setting_differences(rec.to_dict(), old)
    if differs:
        text = (f"--compare {old_dir}: not compared, the old record was measured with other settings "
                f"({'; '.join(differs)}), so its figures say nothing about a regression")
        log.warning("%s: %s", rec.name, text)
        rec.note(text)
        return
    found = changes(rec.to_dict(), old)
    table = rec.table(
        "comparison", f"Compared with {old_dir}",
        [Column("table", "table"), Column("row", "row"), Column("figure", "figure"), Column("old", "old", "count"),
         Column("new", "new", "count"), Column("worse_pct", "worse by %", "change"), Column("regression", "regression > 10%")],
        caption="worse by %: positive = slower / larger / fewer than before; medians compared.",
    )
    for entry in found:
        rec.add(table, entry)
        if entry["regression"]:
            log.warning("regression in %s [%s] %s: %.4g -> %.4g (%.1f%% worse)", entry["table"], entry["row"],
                        entry["figure"], entry["old"], entry["new"], entry["worse_pct"])
    regressions = sum(e["regression"] for e in found)
    rec.note(f"--compare {old_dir}: {regressions} of {len(found)} figures regressed by more than 10%")
