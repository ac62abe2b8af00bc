"""Training logs: one CSV row per logged step and, when installed, TensorBoard scalars."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Optional

from ..utils.atomic import atomic_write

log = logging.getLogger(__name__)


class MetricsLogger:
    """Rows of ``metrics.csv``; a resumed run keeps the rows of the steps its checkpoint includes."""

    def __init__(self, output_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = output_dir / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= start_step]
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step)
            except ImportError:
                log.warning("tensorboard is not installed (pip install 'vita-toolkit[train]'); logging to CSV only")

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` for ``step`` (1-based count of finished steps)."""
        self.rows.append({"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        self._flush()

    def _flush(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write(self.path, lambda f: f.write(buf.getvalue()), binary=False)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()

    def last(self) -> Optional[dict]:
        """The newest row, if any."""
        return self.rows[-1] if self.rows else None
