"""Figures of runs: a run's accuracy-matrix heatmap, accuracy against training FLOPs.

Figures are drawn with matplotlib's object API on the Agg canvas (never the global pyplot
backend) and saved as PNG through `esacl_jax.harness.atomic_io`, without the software-version
metadata, so the same figure gives the same bytes.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from esacl_jax.harness.atomic_io import write_bytes_atomic
from esacl_jax.harness.reporting.collect import (
    benchmark_of,
    method_family,
    method_label,
    seed_of,
    sparsity_of,
)
from esacl_jax.harness.reporting.tables import Row, benchmarks_of

log = logging.getLogger(__name__)

# 90 dpi: legible, and a study's dozen plots stay small enough to commit beside its records.
DPI = 90


def _save_figure(fig: Any, path: str | os.PathLike) -> None:
    """The figure as PNG, its bytes a function of the figure alone (no software version in the
    metadata): a report rebuilt from the same records is byte for byte the same."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None},
                pil_kwargs={"optimize": True})
    write_bytes_atomic(path, buf.getvalue())


def _new_figure(figsize: tuple[float, float]) -> Any:
    """A Figure on the Agg canvas: no pyplot, no display, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def slug(text: str) -> str:
    """A file-name-safe form of a label: ``esacl[C,gamma=1]`` -> ``esacl_C_gamma=1``."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_") or "run"


def plot_accuracy_matrix(result: dict, path: str | os.PathLike, setting: str = "class_il") -> None:
    """Heatmap of a run's accuracy matrix (percent written in each cell), saved as PNG.

    Rows: trained up to task i; columns: evaluated on task j (1-based). Missing entries (null)
    stay blank. Raises ValueError when the run has no matrix for `setting`.
    """
    if setting not in ("class_il", "task_il"):
        raise ValueError(f"setting must be 'class_il' or 'task_il', got {setting!r}")
    raw = result.get(f"{setting}_matrix")
    if raw is None:
        raise ValueError(f"{result.get('path', 'run')}: no {setting}_matrix")
    matrix = np.array([[np.nan if v is None else v for v in row] for row in raw], np.float64)
    matrix = 100.0 * matrix
    t = matrix.shape[0]
    size = min(14.0, 2.5 + 0.6 * t)
    fig = _new_figure((size + 1.2, size))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=100.0, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    if t <= 30:
        fontsize = max(5.0, min(10.0, 90.0 / t))
        for i in range(t):
            for j in range(matrix.shape[1]):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.1f}", ha="center", va="center",
                            fontsize=fontsize, color="black" if matrix[i, j] > 60 else "white")
    ticks = np.arange(t) if t <= 20 else np.arange(0, t, max(1, t // 10))
    ax.set_xticks(ticks, [str(k + 1) for k in ticks])
    ax.set_yticks(ticks, [str(k + 1) for k in ticks])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("trained up to task i")
    name = "class-IL" if setting == "class_il" else "task-IL"
    sparsity = sparsity_of(result)
    extra = f", sparsity {sparsity:g}" if sparsity > 0 else ""
    seed = seed_of(result)
    extra += "" if seed is None else f", seed {seed}"
    ax.set_title(f"{method_label(result)} on {benchmark_of(result)}{extra}\n{name} accuracy",
                 fontsize=10)
    _save_figure(fig, path)


_FAMILY_MARKERS = {"finetune": "v", "joint": "*", "ewc": "D", "er": "s", "derpp": "P",
                   "sparcl": "^", "prune_retrain": "X", "esacl": "o"}
_EXTRA_MARKERS = ("<", ">", "h", "p", "d", "8")


def _sci_tick_formatter(mantissas: tuple[float, ...]) -> Callable[[float, Any], str]:
    """Log-axis tick labels ``m×10^e`` (mathtext), only for the given mantissas so that dense
    fallback ticks on short ranges do not overlap."""

    def fmt(value: float, _pos: Any = None) -> str:
        if value <= 0:
            return ""
        exp = math.floor(math.log10(value) + 1e-9)
        mantissa = round(value / 10.0**exp, 6)
        if not any(math.isclose(mantissa, m) for m in mantissas):
            return ""
        head = "" if mantissa == 1 else f"{mantissa:g}\\times"
        return f"${head}10^{{{exp}}}$"

    return fmt


def _plot_tradeoff(ax: Any, rows: Sequence[Row], title: str, colors: dict[str, Any],
                   markers: dict[str, str]) -> int:
    """Draws one benchmark's ACC-vs-FLOPs panel; returns how many points it drew."""
    points = [r for r in rows if r.training_flops is not None and r.class_il is not None]
    skipped = len(rows) - len(points)
    if skipped:
        log.warning("%s: %d row(s) without training FLOPs or class-IL ACC are not plotted",
                    title, skipped)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("class-IL accuracy (%)")
    if not points:
        ax.text(0.5, 0.5, "no runs with training FLOPs", ha="center", va="center",
                transform=ax.transAxes)
        return 0
    for label in dict.fromkeys(r.label for r in points):
        group = sorted((r for r in points if r.label == label),
                       key=lambda r: r.training_flops.mean)
        x = [r.training_flops.mean for r in group]
        y = [r.class_il.mean for r in group]
        ax.errorbar(x, y, xerr=[r.training_flops.std for r in group],
                    yerr=[r.class_il.std for r in group],
                    marker=markers[method_family(group[0].method)], color=colors[label],
                    linestyle="-" if len(group) > 1 else "none", markersize=7, capsize=3,
                    linewidth=1, label=label)
        for r in group:
            if r.sparsity > 0:
                ax.annotate(f"{100 * r.sparsity:g}%", (r.training_flops.mean, r.class_il.mean),
                            textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    xs = [r.training_flops.mean for r in points]
    decades = math.log10(max(xs) / min(xs)) if min(xs) > 0 else 0.0
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0)
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(_sci_tick_formatter(subs)))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return len(points)


def plot_accuracy_vs_flops(rows: Sequence[Row], path: str | os.PathLike,
                           benchmark: str | None = None) -> None:
    """Class-IL ACC against training FLOPs (log x), error bars = std over seeds, saved as PNG.

    One marker per method family, one colour per label; sparse points are annotated with their
    sparsity. `benchmark` None and several benchmarks in `rows`: one panel per benchmark. Rows
    without FLOPs are skipped; with none left the figure says so.
    """
    if benchmark is not None:
        rows = [r for r in rows if r.benchmark == benchmark]
    benches = benchmarks_of(rows) or [benchmark or "no runs"]
    n = len(benches)
    import matplotlib as mpl

    # the same label/family looks the same in every panel
    palette = mpl.colormaps["tab10"].colors
    labels = list(dict.fromkeys(r.label for r in rows))
    colors = {label: palette[k % len(palette)] for k, label in enumerate(labels)}
    extra = iter(_EXTRA_MARKERS * 8)
    markers = {f: _FAMILY_MARKERS.get(f) or next(extra)
               for f in dict.fromkeys(method_family(r.method) for r in rows)}
    fig = _new_figure((6.4 * min(n, 3), 4.8 * math.ceil(n / 3)))
    for k, bench in enumerate(benches):
        ax = fig.add_subplot(math.ceil(n / 3), min(n, 3), k + 1)
        _plot_tradeoff(ax, [r for r in rows if r.benchmark == bench],
                       f"{bench}: accuracy vs. training cost", colors, markers)
    _save_figure(fig, path)
