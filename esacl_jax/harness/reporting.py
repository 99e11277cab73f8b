"""Reports over many runs: collect results.json files, aggregate over seeds, tables and plots.

A run is one ``results.json`` (written by `esacl_jax.harness.loop.train_and_evaluate`). Runs
are grouped by (benchmark, label, sparsity, buffer), where the label is the method name plus any
method knob that differs from its default (``esacl[C,gamma=1]``), so ablations never merge with
the main method. Each group becomes one `Row` holding mean ± sample std over its seeds.

Units inside a `Row`: accuracies and forgetting in percent, training FLOPs in FLOPs, memory in
bytes, wall time in seconds. Keys missing from older files (``training_flops``, ``memory``)
give ``None`` statistics, shown as blank cells. This module reads no flags; plotting uses
matplotlib's object API with the Agg canvas, so it never touches the global pyplot backend.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from esacl_jax.harness.results import write_bytes_atomic

log = logging.getLogger(__name__)

# Methods in the order tables list them (unknown methods go last, alphabetically).
METHOD_ORDER = ("finetune", "joint", "ewc", "er", "derpp", "sparcl_ewc", "sparcl_er",
                "sparcl_derpp", "sparcl", "prune_retrain", "esacl")

# Method -> the config sub-dict holding its target sparsity. Methods not listed are dense.
_SPARSITY_KEY = {
    "esacl": "esacl",
    "sparcl": "sparcl",
    "sparcl_ewc": "sparcl",
    "sparcl_er": "sparcl",
    "sparcl_derpp": "sparcl",
    "prune_retrain": "prune_retrain",
}

# Method -> (config sub-dict, {knob: default}). A knob whose value differs from its default
# goes into the label, so variants/ablations form their own rows. Keep in sync with
# experiments/configs/common.py:base_config (tests/test_reporting.py checks it).
VARIANT_KNOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "esacl": ("esacl", {"step_variant": "C", "gamma": 0.25, "rho": 0.01, "sdp": True,
                        "replay": "derpp", "ids_score": "sharpness", "replay_at": "perturbed",
                        "init_rescale": True, "mask_update_every_steps": 0}),
    "sparcl": ("sparcl", {"base": "derpp", "ddr": True, "dgm": True}),
    "sparcl_ewc": ("sparcl", {"ddr": True, "dgm": True}),
    "sparcl_er": ("sparcl", {"ddr": True, "dgm": True}),
    "sparcl_derpp": ("sparcl", {"ddr": True, "dgm": True}),
}
# Knobs whose value alone is clear enough in a label ("esacl[C]" rather than "step_variant=C").
_BARE_KNOBS = {"step_variant"}

# Methods that never use the replay buffer (their buffer column is blank).
_NO_BUFFER = {"finetune", "joint", "ewc", "sparcl_ewc"}

MiB = 1024**2


# --------------------------------------------------------------------------------------------
# Loading


def load_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every readable results.json under `root` (recursive), sorted by path.

    Each dict gets a ``"path"`` key (the file's path as a string). Files that cannot be read,
    are not JSON, or lack the keys of a results.json are skipped with a logged warning: one bad
    file never hides the others.
    """
    runs = []
    root = pathlib.Path(root)
    if not root.is_dir():
        return runs
    for path in sorted(root.rglob("results.json")):
        try:
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("skipping unreadable %s: %s", path, err)
            continue
        if not isinstance(result, dict) or "method" not in result or "metrics" not in result:
            log.warning("skipping %s: not a results.json (no 'method'/'metrics')", path)
            continue
        result["path"] = str(path)
        runs.append(result)
    return runs


def _config(result: dict) -> dict:
    config = result.get("config")
    return config if isinstance(config, dict) else {}


def _get(mapping: Any, *keys: str) -> Any:
    """mapping[k0][k1]... or None where any level is missing or not a dict."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def benchmark_of(result: dict) -> str:
    """The benchmark's name (results.json stores a dict; older/hand-made files a string)."""
    bench = result.get("benchmark")
    if isinstance(bench, dict):
        bench = bench.get("name")
    if not bench:
        bench = _config(result).get("benchmark")
    return str(bench) if bench else "unknown"


def method_of(result: dict) -> str:
    """The run's method name."""
    return str(result.get("method") or _config(result).get("method") or "unknown")


def method_family(method: str) -> str:
    """The family a method belongs to in plots (all SparCL bases share one marker)."""
    return "sparcl" if method.startswith("sparcl") else method


def seed_of(result: dict) -> int | None:
    seed = result.get("seed", _config(result).get("seed"))
    return int(seed) if isinstance(seed, (int, float)) else None


def sparsity_of(result: dict) -> float:
    """Target sparsity from the method's config sub-dict; 0.0 for dense methods."""
    key = _SPARSITY_KEY.get(method_of(result))
    if key is None:
        return 0.0
    return _finite(_get(_config(result), key, "sparsity")) or 0.0


def buffer_of(result: dict) -> int | None:
    """Replay-buffer size, or None for methods that use no buffer."""
    method, config = method_of(result), _config(result)
    if method in _NO_BUFFER:
        return None
    if method == "esacl" and _get(config, "esacl", "replay") == "none":
        return None
    if method == "sparcl" and _get(config, "sparcl", "base") == "ewc":
        return None
    size = config.get("buffer_size")
    return int(size) if isinstance(size, (int, float)) else None


def _format_knob(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text if name in _BARE_KNOBS else f"{name}={text}"


def _differs(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return value != default
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return not math.isclose(value, default, rel_tol=1e-9, abs_tol=1e-12)
    return value != default


def method_label(result: dict) -> str:
    """Method name plus its non-default variant knobs, e.g. ``esacl[C,gamma=1,sdp=off]``.

    Knobs and defaults are listed in `VARIANT_KNOBS`; a knob missing from the config counts as
    its default. Knobs appear in `VARIANT_KNOBS` order.
    """
    method = method_of(result)
    if method not in VARIANT_KNOBS:
        return method
    section, defaults = VARIANT_KNOBS[method]
    sub = _get(_config(result), section) or {}
    parts = [_format_knob(name, sub[name]) for name, default in defaults.items()
             if name in sub and _differs(sub[name], default)]
    return f"{method}[{','.join(parts)}]" if parts else method


def peak_memory_of(result: dict) -> float | None:
    """Measured peak memory in bytes: the device allocator's peak, else the host's peak RSS."""
    measured = _get(result, "memory", "measured")
    device = _finite(_get(measured, "device_peak_bytes"))
    return device if device is not None else _finite(_get(measured, "host_peak_rss_bytes"))


def _percent(value: Any) -> float | None:
    value = _finite(value)
    return None if value is None else 100.0 * value


# Row statistic -> how to read it from one result (None when absent).
_METRICS: dict[str, Callable[[dict], float | None]] = {
    "class_il": lambda r: _percent(_get(r, "metrics", "class_il", "average_accuracy")),
    "task_il": lambda r: _percent(_get(r, "metrics", "task_il", "average_accuracy")),
    "forgetting": lambda r: _percent(_get(r, "metrics", "class_il", "forgetting")),
    "training_flops": lambda r: _finite(r.get("training_flops")),
    "peak_memory_bytes": peak_memory_of,
    "analytic_memory_bytes": lambda r: _finite(_get(r, "memory", "analytic", "total")),
    "wall_time_s": lambda r: _finite(r.get("wall_time_s")),
}


# --------------------------------------------------------------------------------------------
# Aggregation


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof=1; 0 for one value) of `n` runs' values."""

    mean: float
    std: float
    n: int


@dataclasses.dataclass(frozen=True)
class Row:
    """One (benchmark, label, sparsity, buffer) group aggregated over seeds.

    Accuracies/forgetting in percent, FLOPs in FLOPs, memory in bytes, time in seconds; a
    statistic is None when no run of the group recorded it.
    """

    benchmark: str
    method: str
    label: str
    sparsity: float
    buffer: int | None
    num_seeds: int
    seeds: tuple[int, ...]
    commits: tuple[str, ...]
    paths: tuple[str, ...]
    class_il: Stat | None
    task_il: Stat | None
    forgetting: Stat | None
    training_flops: Stat | None
    peak_memory_bytes: Stat | None
    analytic_memory_bytes: Stat | None
    wall_time_s: Stat | None


def run_key(result: dict) -> tuple[str, str, float, int | None]:
    """The group a run belongs to: (benchmark, label, sparsity, buffer)."""
    return benchmark_of(result), method_label(result), sparsity_of(result), buffer_of(result)


def _stat(values: Iterable[float | None]) -> Stat | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    arr = np.asarray(vals, dtype=np.float64)
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return Stat(float(arr.mean()), std, int(arr.size))


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _row_order(row: Row) -> tuple:
    return (row.benchmark, _method_rank(row.method), row.label, row.sparsity,
            -1 if row.buffer is None else row.buffer)


def group_runs(runs: Sequence[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by `run_key`, each group sorted by seed (then path)."""
    groups: dict[tuple, list[dict]] = {}
    for result in runs:
        groups.setdefault(run_key(result), []).append(result)
    for members in groups.values():
        members.sort(key=lambda r: (seed_of(r) is None, seed_of(r) or 0, r.get("path", "")))
    return groups


def aggregate(runs: Sequence[dict]) -> list[Row]:
    """Mean ± std over seeds per (benchmark, label, sparsity, buffer), in table order."""
    rows = []
    for (bench, label, sparsity, buffer), members in group_runs(runs).items():
        seeds = [s for s in (seed_of(r) for r in members) if s is not None]
        if len(set(seeds)) < len(seeds):
            log.warning("%s %s: several runs share a seed (%s); each counts as one seed",
                        bench, label, seeds)
        commits = sorted({str(c) for c in (_get(r, "environment", "git_commit")
                                           for r in members) if c})
        stats = {name: _stat(read(r) for r in members) for name, read in _METRICS.items()}
        rows.append(Row(benchmark=bench, method=method_of(members[0]), label=label,
                        sparsity=sparsity, buffer=buffer, num_seeds=len(members),
                        seeds=tuple(seeds), commits=tuple(commits),
                        paths=tuple(str(r.get("path", "")) for r in members), **stats))
    return sorted(rows, key=_row_order)


# --------------------------------------------------------------------------------------------
# Tables


def _decimals_for(value: float, significant: int = 3, max_decimals: int = 4) -> int:
    """Decimals that show `value` with about `significant` significant digits."""
    if value == 0 or not math.isfinite(value):
        return 2
    return int(min(max_decimals, max(0, significant - 1 - math.floor(math.log10(abs(value))))))


def format_stat(stat: Stat | None, scale: float = 1.0, decimals: int | None = None) -> str:
    """``"mean ± std"`` of `stat` divided by `scale`; blank for None.

    `decimals` None: about three significant digits of the mean.
    """
    if stat is None:
        return ""
    mean, std = stat.mean / scale, stat.std / scale
    d = _decimals_for(mean) if decimals is None else decimals
    return f"{mean:.{d}f} ± {std:.{d}f}"


def flops_exponent(rows: Sequence[Row]) -> int:
    """10^12 for the table's FLOPs unless its largest mean reaches 10^15 (PFLOPs)."""
    means = [r.training_flops.mean for r in rows if r.training_flops is not None]
    return 15 if means and max(means) >= 1e15 else 12


def format_sparsity(sparsity: float) -> str:
    return f"{sparsity:g}"


_COLUMNS = ("method", "sparsity", "buffer", "class-IL ACC (%)", "task-IL ACC (%)",
            "forgetting (%)", "training FLOPs", "peak memory (MiB)", "wall time (s)", "seeds")


def _table_cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    exp = flops_exponent(rows)
    header = list(_COLUMNS)
    header[6] = f"training FLOPs (×10^{exp})"
    body = []
    for r in rows:
        body.append([
            r.label,
            format_sparsity(r.sparsity),
            "" if r.buffer is None else str(r.buffer),
            format_stat(r.class_il, decimals=2),
            format_stat(r.task_il, decimals=2),
            format_stat(r.forgetting, decimals=2),
            format_stat(r.training_flops, scale=10.0**exp),
            format_stat(r.peak_memory_bytes, scale=MiB, decimals=1),
            format_stat(r.wall_time_s, decimals=1),
            str(r.num_seeds),
        ])
    return header, body


def benchmarks_of(rows: Sequence[Row]) -> list[str]:
    """The benchmarks present in `rows`, in first-seen order."""
    return list(dict.fromkeys(r.benchmark for r in rows))


def to_markdown(rows: Sequence[Row]) -> str:
    """A Markdown table per benchmark (``### name`` heading), FLOPs unit chosen per table."""
    sections = []
    for bench in benchmarks_of(rows):
        header, body = _table_cells([r for r in rows if r.benchmark == bench])
        lines = [f"### {bench}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n" if sections else ""


# CSV: plain numbers in a Row's units; a None statistic is three empty cells.
_ID_FIELDS = ("benchmark", "method", "label", "sparsity", "buffer", "num_seeds")
_STAT_FIELDS = tuple(name for name in _METRICS)
_LIST_FIELDS = ("seeds", "commits", "paths")


def csv_header() -> list[str]:
    stat_cols = [f"{name}_{part}" for name in _STAT_FIELDS for part in ("mean", "std", "n")]
    return [*_ID_FIELDS, *stat_cols, *_LIST_FIELDS]


def _csv_record(row: Row) -> list[str]:
    out = [row.benchmark, row.method, row.label, repr(row.sparsity),
           "" if row.buffer is None else str(row.buffer), str(row.num_seeds)]
    for name in _STAT_FIELDS:
        stat = getattr(row, name)
        out += ["", "", ""] if stat is None else [repr(stat.mean), repr(stat.std), str(stat.n)]
    out += [";".join(str(s) for s in row.seeds), ";".join(row.commits), ";".join(row.paths)]
    return out


def to_csv(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Writes `rows` as CSV (full precision; see `read_csv`), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header())
    writer.writerows(_csv_record(r) for r in rows)
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


def read_csv(path: str | os.PathLike) -> list[Row]:
    """Reads back a `to_csv` file (exact round trip)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            stats = {}
            for name in _STAT_FIELDS:
                mean = rec[f"{name}_mean"]
                stats[name] = None if mean == "" else Stat(
                    float(mean), float(rec[f"{name}_std"]), int(rec[f"{name}_n"]))
            split = lambda s: tuple(s.split(";")) if s else ()
            rows.append(Row(benchmark=rec["benchmark"], method=rec["method"], label=rec["label"],
                            sparsity=float(rec["sparsity"]),
                            buffer=int(rec["buffer"]) if rec["buffer"] else None,
                            num_seeds=int(rec["num_seeds"]),
                            seeds=tuple(int(s) for s in split(rec["seeds"])),
                            commits=split(rec["commits"]), paths=split(rec["paths"]), **stats))
    return rows


# --------------------------------------------------------------------------------------------
# Files


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) atomically, creating the parent directory."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _save_figure(fig: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
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


# --------------------------------------------------------------------------------------------
# Plots


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
    without FLOPs (older runs) are skipped; with none left the figure says so.
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
