"""Training logs: one CSV row per logged step and, when installed, TensorBoard scalars."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from ..utils.atomic import atomic_write

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Rows of ``metrics.csv``; a resumed run keeps the rows of the steps its checkpoint includes."""

    def __init__(self, output_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = output_dir / METRICS_FILE
        self.fields: list[str] = []
        kept = _rows_up_to(self.path, start_step) if self.path.is_file() else []
        self._rewrite(kept)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=start_step)
            except ImportError:
                log.warning("tensorboard is not installed (pip install 'vita-toolkit[train]'); logging to CSV only")

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` for ``step`` (1-based count of finished steps)."""
        row = {"step": step, **values}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if any(k not in self.fields for k in row):  # a new column: rewrite once with the wider header
            self._rewrite(_rows_up_to(self.path, step) + [row])
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)

    def _rewrite(self, rows: list[dict]) -> None:
        for r in rows:
            self.fields += [k for k in r if k not in self.fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.fields or ["step"])
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.path, lambda f: f.write(buf.getvalue()), binary=False)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def _rows_up_to(path: Path, step: int) -> list[dict]:
    """Rows of an existing metrics.csv whose step is <= ``step`` (a torn last line is dropped)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                if int(float(r["step"])) <= step and None not in r.values():
                    rows.append({k: v for k, v in r.items() if v != ""})
            except (TypeError, ValueError):
                continue
    return rows
