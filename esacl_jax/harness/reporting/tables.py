"""Aggregation over seeds (`Row`, `Stat`) and the Markdown/CSV tables made from it.

Units inside a `Row`: accuracies and forgetting in percent, training FLOPs in FLOPs, memory in
bytes, wall time in seconds; a statistic no run of the group recorded is None (a blank cell).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from esacl_jax.harness.atomic_io import write_text_atomic
from esacl_jax.harness.methods import registry
from esacl_jax.harness.reporting.collect import METRICS, commit_of, method_of, run_key, seed_of

log = logging.getLogger(__name__)

# Methods in the order tables list them, the registry's (unknown methods go last,
# alphabetically).
METHOD_ORDER = registry.method_names()

MiB = 1024**2


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
    sparsity_all: Stat | None = None  # percent of all parameters that are zero
    nonzero_weights: Stat | None = None


# --------------------------------------------------------------------------------------------
# Aggregation


def stat_of(values: Iterable[float | None]) -> Stat | None:
    """Mean and sample std of the values that are not None (None when there are none)."""
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
        commits = sorted({c for c in (commit_of(r) for r in members) if c})
        stats = {name: stat_of(read(r) for r in members) for name, read in METRICS.items()}
        rows.append(Row(benchmark=bench, method=method_of(members[0]), label=label,
                        sparsity=sparsity, buffer=buffer, num_seeds=len(members),
                        seeds=tuple(seeds), commits=tuple(commits),
                        paths=tuple(str(r.get("relative_path", r.get("path", "")))
                                    for r in members), **stats))
    return sorted(rows, key=_row_order)


def benchmarks_of(rows: Sequence[Row]) -> list[str]:
    """The benchmarks present in `rows`, in first-seen order."""
    return list(dict.fromkeys(r.benchmark for r in rows))


# --------------------------------------------------------------------------------------------
# Markdown


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


_COLUMNS = ("method", "sparsity (prunable set)", "sparsity, all weights (%)", "nonzero weights",
            "buffer", "class-IL ACC (%)", "task-IL ACC (%)", "forgetting (%)", "training FLOPs",
            "peak memory (MiB)", "wall time (s)", "seeds")


def _table_cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    exp = flops_exponent(rows)
    header = list(_COLUMNS)
    header[header.index("training FLOPs")] = f"training FLOPs (×10^{exp})"
    body = []
    for r in rows:
        body.append([
            r.label,
            format_sparsity(r.sparsity),
            format_stat(r.sparsity_all, decimals=1),
            format_stat(r.nonzero_weights, decimals=0),
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


# --------------------------------------------------------------------------------------------
# CSV: plain numbers in a Row's units; a None statistic is three empty cells.

_ID_FIELDS = ("benchmark", "method", "label", "sparsity", "buffer", "num_seeds")
_STAT_FIELDS = tuple(METRICS)
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


def csv_text(rows: Sequence[Row]) -> str:
    """`rows` as CSV text (header line, then one record per row, full precision)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header())
    writer.writerows(_csv_record(r) for r in rows)
    return buf.getvalue()


def to_csv(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """Writes `rows` as CSV (full precision; see `read_csv`), atomically."""
    write_text_atomic(path, csv_text(rows))


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
