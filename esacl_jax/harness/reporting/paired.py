"""Differences paired by seed, with their standard errors, between groups of runs.

Two methods run with the same seed see the same data order, initialisation and buffer draws, so
the per-seed difference of their accuracies is far less noisy than the difference of their
means. A group is a run directory without its seed component (``esacl/s0.9`` for
``<root>/split_mnist_w400/esacl/s0.9/seed3/results.json``, the layout the sweeps write), within
one benchmark. The standard error of the mean paired difference d over n seeds is
std(d, ddof=1) / sqrt(n).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from esacl_jax.harness.reporting.collect import benchmark_of, seed_of
from esacl_jax.harness.reporting.tables import Stat, stat_of

_SEED_DIR = re.compile(r"seed\d+$")

def data_benchmark_of(result: dict) -> str:
    """The dataset benchmark a run's protocol is built on (split_mnist for split_mnist_w400)."""
    config = result.get("config") or {}
    return str(config.get("benchmark") or benchmark_of(result))


@dataclasses.dataclass(frozen=True)
class PairedRow:
    """One group of one benchmark; accuracies and differences in percentage points."""

    benchmark: str
    group: str
    seeds: tuple[int, ...]
    class_il: Stat
    learning_accuracy: Stat
    forgetting: Stat
    difference: Stat | None  # group minus reference, paired by seed (std is the SE)


def group_of(result: dict, root: str | pathlib.Path) -> str:
    """The run's directory relative to `root`, without the benchmark and seed components (so
    ``<root>/lr0.1/split_mnist/esacl/s0.9/seed0`` is ``lr0.1/esacl/s0.9``)."""
    parts = list(pathlib.Path(result["path"]).parent.relative_to(root).parts)
    if parts and _SEED_DIR.fullmatch(parts[-1]):
        parts.pop()
    parts = [p for p in parts if p not in (benchmark_of(result), data_benchmark_of(result))]
    return "/".join(parts) or "."


def _metric(result: dict, name: str) -> float:
    return 100.0 * float(result["metrics"]["class_il"][name])


def paired_rows(runs: Sequence[dict[str, Any]], root: str | pathlib.Path,
                reference: str, across_protocols: bool = False) -> list[PairedRow]:
    """Rows per (benchmark, group) in the runs' order; `difference` against the benchmark's
    `reference` group over the seeds both have (None for the reference itself, where the
    benchmark has no such group, or with fewer than 2 common seeds).

    `across_protocols`: pair runs of different protocols on the same data (the same seed sees
    the same task order and data order), e.g. a sparse 784-400-400 MLP (split_mnist_w400)
    against a dense 784-100-100 one (split_mnist): rows are then per dataset benchmark.
    """
    bench_of = data_benchmark_of if across_protocols else benchmark_of
    by_group: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for result in runs:
        seed = seed_of(result)
        if seed is not None:
            by_group[(bench_of(result), group_of(result, root))][seed] = result
    rows = []
    for (bench, group), seeds in by_group.items():
        ref = by_group.get((bench, reference), {})
        common = sorted(set(seeds) & set(ref)) if group != reference else []
        difference = None
        if len(common) >= 2:
            d = stat_of([_metric(seeds[s], "average_accuracy") - _metric(ref[s], "average_accuracy")
                       for s in common])
            difference = Stat(d.mean, d.std / math.sqrt(d.n), d.n)
        ordered = sorted(seeds)
        rows.append(PairedRow(
            bench, group, tuple(ordered),
            stat_of([_metric(seeds[s], "average_accuracy") for s in ordered]),
            stat_of([_metric(seeds[s], "learning_accuracy") for s in ordered]),
            stat_of([_metric(seeds[s], "forgetting") for s in ordered]), difference))
    return rows


def paired_markdown(rows: Sequence[PairedRow], reference: str) -> str:
    """One table per benchmark: class-IL, learning accuracy, forgetting (mean ± std over
    seeds) and the paired difference to `reference` (± its standard error, n seeds)."""
    parts = []
    for bench in dict.fromkeys(r.benchmark for r in rows):
        md = [f"## {bench}", "",
              f"| runs | seeds | class-IL (%) | learning accuracy (%) | forgetting (%) | "
              f"vs {reference} (paired ± SE) |", "|---|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r.benchmark == bench):
            diff = "" if r.difference is None else \
                f"{r.difference.mean:+.2f} ± {r.difference.std:.2f} (n={r.difference.n})"
            md.append(f"| {r.group} | {','.join(map(str, r.seeds))} | "
                      f"{r.class_il.mean:.2f} ± {r.class_il.std:.2f} | "
                      f"{r.learning_accuracy.mean:.2f} ± {r.learning_accuracy.std:.2f} | "
                      f"{r.forgetting.mean:.2f} ± {r.forgetting.std:.2f} | {diff} |")
        parts.append("\n".join(md) + "\n")
    return "\n".join(parts)
