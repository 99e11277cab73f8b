"""The paper's comparison layout: one table per protocol with every method at each sparsity,
training FLOPs relative to dense DER++, the memory footprint, and differences paired by seed.

EsaCL's and SparCL's papers lay their comparison out as one row per method and, per sparsity,
class-IL and task-IL accuracy; cost is given as training FLOPs and memory footprint. Here:

- accuracy cells are mean ± sample std over seeds (percent);
- training FLOPs are the mean over seeds divided by the mean of dense DER++ on the same protocol;
- the memory footprint is model + replay buffer + optimizer state + the other state the method
  keeps between steps (`footprint_of`), where the model of a sparse run counts as the bytes of
  its compact export (``sparse_model.npz``) and a dense one as its parameters at their dtypes.
  Method state (EWC's Fisher and anchor, SparCL's masks and last gradient, the IDS and DDR
  tables, CO2L's past model) is counted like optimizer state: one method keeps in its optimizer
  what another keeps beside it (EsaCL's masks and gradient average sit in SDP's optimizer
  state). Runs recorded before every method's state was counted (no
  ``memory.method_state_counted``) get no footprint rather than an undercount;
- paired differences are per-seed differences of class-IL over the seeds both groups have,
  mean ± standard error (std / sqrt(n)).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from esacl_jax.harness.reporting.collect import (
    _finite,
    _get,
    benchmark_of,
    method_label,
    seed_of,
    sparsity_of,
)
from esacl_jax.harness.reporting.tables import METHOD_ORDER, Stat, stat_of

__all__ = ["footprint_of", "Cell", "cells", "paper_markdown", "paired_difference",
           "paired_markdown_lines"]

KiB = 1024
REFERENCE = "derpp"


def footprint_of(result: dict) -> dict[str, float] | None:
    """Bytes of {"model", "buffer", "opt_state", "method_state", "total"} for one run; "total"
    is model + buffer + optimizer state + method state. None when the run recorded no analytic
    memory, or recorded it before every method's state was counted."""
    analytic = _get(result, "memory", "analytic")
    if not isinstance(analytic, dict) or _get(result, "memory", "method_state_counted") is None:
        return None
    exported = _finite(_get(result, "sparse_export", "bytes"))
    model = exported if exported is not None else _finite(analytic.get("params"))
    parts = {name: _finite(analytic.get(name)) or 0.0 for name in ("buffer", "opt_state",
                                                                  "method_state")}
    if model is None:
        return None
    return {"model": model, **parts,
            "total": model + parts["buffer"] + parts["opt_state"] + parts["method_state"]}


def _class_il(result: dict) -> float | None:
    value = _finite(_get(result, "metrics", "class_il", "average_accuracy"))
    return None if value is None else 100.0 * value


def _task_il(result: dict) -> float | None:
    value = _finite(_get(result, "metrics", "task_il", "average_accuracy"))
    return None if value is None else 100.0 * value


class Cell:
    """One (benchmark, label, sparsity) group: its runs by seed and their statistics."""

    def __init__(self, benchmark: str, label: str, sparsity: float, runs: dict[int, dict]):
        self.benchmark, self.label, self.sparsity, self.runs = benchmark, label, sparsity, runs
        ordered = [runs[s] for s in sorted(runs)]
        self.class_il = stat_of(_class_il(r) for r in ordered)
        self.task_il = stat_of(_task_il(r) for r in ordered)
        self.flops = stat_of(_finite(r.get("training_flops")) for r in ordered)
        prints = [f for f in (footprint_of(r) for r in ordered) if f is not None]
        self.footprint = ({k: sum(f[k] for f in prints) / len(prints) for k in prints[0]}
                          if prints else None)
        self.nonzero = stat_of(_finite(_get(r, "weights", "nonzero")) for r in ordered)

    @property
    def method(self) -> str:
        return self.label.split("[", 1)[0]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(sorted(self.runs))


def cells(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, str, float], Cell]:
    """Runs grouped by (benchmark, method label, sparsity), keyed by seed (the last run of a
    seed wins, so a rerun replaces its predecessor)."""
    grouped: dict[tuple[str, str, float], dict[int, dict]] = defaultdict(dict)
    for result in runs:
        seed = seed_of(result)
        if seed is not None:
            grouped[(benchmark_of(result), method_label(result), sparsity_of(result))][seed] = \
                result
    return {key: Cell(*key, by_seed) for key, by_seed in grouped.items()}


def paired_difference(a: Cell, b: Cell) -> Stat | None:
    """Class-IL of `a` minus `b`, paired by seed: mean and standard error (in `Stat.std`) over
    the seeds both have; None with fewer than 2 common seeds."""
    common = sorted(set(a.runs) & set(b.runs))
    diffs = [_class_il(a.runs[s]) - _class_il(b.runs[s]) for s in common
             if _class_il(a.runs[s]) is not None and _class_il(b.runs[s]) is not None]
    if len(diffs) < 2:
        return None
    d = stat_of(diffs)
    return Stat(d.mean, d.std / math.sqrt(d.n), d.n)


def _rank(label: str) -> tuple[int, str]:
    method = label.split("[", 1)[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)


def _acc(stat: Stat | None) -> str:
    return "" if stat is None else f"{stat.mean:.2f} ± {stat.std:.2f}"


def _diff(stat: Stat | None) -> str:
    return "" if stat is None else f"{stat.mean:+.2f} ± {stat.std:.2f}"


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / KiB**2:.2f}"


def paper_markdown(runs: Sequence[dict[str, Any]], sparse_reference: str = "esacl") -> str:
    """Per benchmark: the accuracy table in the paper's layout (one row per method; class-IL and
    task-IL per sparsity), the cost table (FLOPs relative to dense DER++, memory footprint,
    model as saved) and EsaCL's paired differences against dense DER++ and every other sparse
    method at the same sparsity."""
    table = cells(runs)
    out = []
    for bench in dict.fromkeys(k[0] for k in sorted(table)):
        mine = {k: c for k, c in table.items() if k[0] == bench}
        sparsities = sorted({k[2] for k in mine if k[2] > 0})
        labels = sorted({k[1] for k in mine}, key=_rank)
        dense_labels = [lab for lab in labels if (bench, lab, 0.0) in mine]
        sparse_labels = [lab for lab in labels if lab not in dense_labels]
        ref = mine.get((bench, REFERENCE, 0.0))
        seeds = sorted({s for c in mine.values() for s in c.seeds})
        out += [f"## {bench}", "",
                f"Test split; mean ± std over seeds {','.join(map(str, seeds))} "
                f"(the number of seeds of each cell is in the cost table).", ""]
        head = ["method", "dense class-IL", "dense task-IL"]
        for s in sparsities:
            head += [f"{s:g} class-IL", f"{s:g} task-IL"]
        out += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for lab in dense_labels + sparse_labels:
            row = [lab]
            dense = mine.get((bench, lab, 0.0))
            row += [_acc(dense.class_il), _acc(dense.task_il)] if dense else ["", ""]
            for s in sparsities:
                c = mine.get((bench, lab, s))
                row += [_acc(c.class_il), _acc(c.task_il)] if c else ["", ""]
            out.append("| " + " | ".join(row) + " |")
        out += ["", "| method | sparsity | seeds | training FLOPs / DER++ | nonzero weights | "
                "memory footprint (MiB) | model as saved (MiB) | buffer (MiB) | "
                "optimizer state (MiB) | method state (MiB) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in sorted(mine, key=lambda k: (_rank(k[1]), k[2])):
            c = mine[key]
            rel = ("" if c.flops is None or ref is None or ref.flops is None
                   else f"{c.flops.mean / ref.flops.mean:.3f}x")
            f = c.footprint or {}
            out.append(f"| {c.label} | {c.sparsity:g} | {len(c.runs)} | {rel} | "
                       f"{'' if c.nonzero is None else f'{c.nonzero.mean:,.0f}'} | "
                       f"{_mib(f.get('total'))} | {_mib(f.get('model'))} | "
                       f"{_mib(f.get('buffer'))} | {_mib(f.get('opt_state'))} | "
                       f"{_mib(f.get('method_state'))} |")
        out += [""] + paired_markdown_lines(mine, bench, sparse_reference, sparsities) + [""]
    return "\n".join(out) + "\n"


def paired_markdown_lines(mine: dict[tuple[str, str, float], Cell], bench: str,
                          subject: str, sparsities: Sequence[float]) -> list[str]:
    """`subject` (e.g. esacl) at each sparsity against dense DER++ and against every other
    sparse method at the same sparsity, paired by seed (± SE)."""
    ref = mine.get((bench, REFERENCE, 0.0))
    others = sorted({k[1] for k in mine if k[2] > 0 and k[1] != subject}, key=_rank)
    head = ["sparsity", f"{subject} class-IL", "vs dense DER++"] + [f"vs {o}" for o in others]
    lines = [f"Paired by seed, {subject} minus the column's method (± SE):", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for s in sparsities:
        me = mine.get((bench, subject, s))
        if me is None:
            continue
        row = [f"{s:g}", _acc(me.class_il), _diff(paired_difference(me, ref) if ref else None)]
        row += [_diff(paired_difference(me, mine[(bench, o, s)]) if (bench, o, s) in mine
                      else None) for o in others]
        lines.append("| " + " | ".join(row) + " |")
    return lines
