"""PNG plots of benchmark tables (matplotlib, from the optional ``bench`` extra; skipped without it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from .record import Table, value_of

log = logging.getLogger(__name__)


def _pyplot() -> Optional[Any]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'vita-toolkit[bench]')")
        return None
    return plt


def _save(path: Path, draw: Callable[[Any], Any]) -> list[str]:
    """Draw with pyplot and write ``path`` atomically; returns [file name] or [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    from vita_train.utils.atomic import atomic_write

    fig = draw(plt)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return [path.name]


def _err(rows: list[dict], key: str) -> tuple[list[float], list[list[float]]]:
    """Medians and asymmetric error bars (median - min, max - median) of a statistic column."""
    med, lo, hi = [], [], []
    for r in rows:
        c = r.get(key)
        m = value_of(c) or 0.0
        med.append(m)
        lo.append(m - c["min"] if isinstance(c, dict) else 0.0)
        hi.append(c["max"] - m if isinstance(c, dict) else 0.0)
    return med, [lo, hi]


def _plain_log_ticks(ax: Any) -> None:
    """A log T axis labelled 100, 1000 rather than 10^2 with crowded minor labels."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def stage_bars(path: Path, table: Table, stage_keys: dict[str, str]) -> list[str]:
    """Stacked per-stage s/frame bars, one per backend row."""
    if not table.rows:
        return []

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        labels = [f"{r['backend']} {r['precision']}\n{r.get('kernels', '')}" for r in table.rows]
        bottom = [0.0] * len(labels)
        for name, key in stage_keys.items():
            values = [value_of(r.get(key)) or 0.0 for r in table.rows]
            ax.bar(labels, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("seconds per frame (median)")
        ax.set_title("End to end, per stage")
        ax.legend(fontsize=8)
        return fig

    return _save(path, draw)


def detector_lines(path: Path, table: Table) -> list[str]:
    """Frames/s vs batch size, one line per backend and resolution."""
    if not table.rows:
        return []

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        groups: dict[str, list[dict]] = {}
        for r in table.rows:
            groups.setdefault(f"{r['backend']} {r['precision']} {r['resolution']}", []).append(r)
        for label, rows in groups.items():
            med, err = _err(rows, "fps")
            ax.errorbar([r["batch"] for r in rows], med, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (frames per call)")
        ax.set_ylabel("frames/s")
        ax.set_title("Detector throughput")
        ax.legend(fontsize=8)
        return fig

    return _save(path, draw)


def scaling(path: Path, table: Table, fits: dict[tuple[str, str], tuple[float, float, int, int]], title: str) -> list[str]:
    """Token-engine time and peak memory vs T on log-log axes, with the fitted power laws."""
    rows = [r for r in table.rows if value_of(r.get("seconds"))]
    if len(rows) < 2:
        return []

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        t = [r["frames"] for r in rows]
        for ax, key, label, fit_key in (
            (axes[0], "seconds", "seconds", "time"),
            (axes[1], "peak_memory_mb", "peak memory above baseline (MB)", "memory"),
        ):
            med, err = _err(rows, key)
            ax.errorbar(t, med, yerr=err, marker="o", capsize=3, linestyle="none", label="measured")
            for (quantity, over), (p, c, lo, hi) in fits.items():
                if quantity == fit_key:
                    ax.plot([lo, hi], [c * lo**p, c * hi**p], "--", label=f"fit over {over}: T^{p:.2f}")
                elif quantity == fit_key + " line":  # (a, b): a * T + b, the tokens plus a constant
                    xs = [lo * (hi / lo) ** (i / 49) for i in range(50)]
                    ax.plot(xs, [p * x + c for x in xs], ":", label=f"{p:.3g} MB x T + {c:.0f} MB")
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.set_xlabel("frames T")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        return fig

    return _save(path, draw)


def prune_agreement(path: Path, table: Table) -> list[str]:
    """Agreement with r = 1.0 and speed-up vs the pruning ratio r."""
    if len(table.rows) < 2:
        return []
    # the r = 1.0 row is the reference: agreement and speed-up 1 by definition
    rows = [dict(r, mean_iou=1.0, label_agreement=1.0, speedup_tokens=1.0) if r.get("mean_iou") is None else r
            for r in table.rows]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        r = [row["ratio"] for row in rows]
        ax.plot(r, [row["mean_iou"] for row in rows], "o-", label="mean mask IoU vs r=1.0")
        ax.plot(r, [row["label_agreement"] for row in rows], "s-", label="label agreement")
        ax.set_xlabel("pruning ratio r")
        ax.set_ylim(0, 1.05)
        ax.invert_xaxis()
        ax2 = ax.twinx()
        ax2.plot(r, [value_of(row.get("speedup_tokens")) or 0 for row in rows], "^--", color="tab:red", label="token engine speed-up")
        ax2.set_ylabel("speed-up vs r=1.0")
        ax.legend(loc="lower left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        ax.set_title("Pruning: agreement with r = 1.0")
        return fig

    return _save(path, draw)
