"""Summarises a directory of runs: `python -m experiments.report --runs=DIR [--out=DIR]`.

Collects every results.json under --runs, aggregates over seeds and writes into --out
(default RUNS/report): table.md, table.csv, paired.md (with --paired_with: differences paired by
seed against one run group, with standard errors), accuracy_vs_flops.png (one per benchmark
when there are several: accuracy_vs_flops_<benchmark>.png) and accuracy_matrix_<label>.png
(class-IL, the first seed of each group; prefixed by the benchmark when there are several,
suffixed by sparsity/buffer when a label has several groups). Prints the Markdown table.
"""

from __future__ import annotations

import pathlib
import sys
from collections import defaultdict

from absl import app, flags

from esacl_jax.harness import reporting
from esacl_jax.harness.atomic_io import write_text_atomic
from esacl_jax.harness.sweep.provenance import portable_command

_RUNS = flags.DEFINE_string("runs", None, "Directory searched (recursively) for results.json.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: RUNS/report).")
_BENCHMARK = flags.DEFINE_string("benchmark", None, "Only report runs of this benchmark.")
_PAIRED_WITH = flags.DEFINE_string(
    "paired_with", None, "Also write paired.md: every run group (its directory under --runs "
    "without the benchmark and seed parts, e.g. esacl/s0.9 or derpp) against this one, paired "
    "by seed, with standard errors, learning accuracy and forgetting.")
_ACROSS = flags.DEFINE_bool(
    "paired_across_protocols", False, "With --paired_with: pair runs of different protocols on "
    "the same data (e.g. split_mnist_w400 against split_mnist: sparse-wide against dense-narrow)")
flags.mark_flag_as_required("runs")


_PAPER = flags.DEFINE_bool(
    "paper_table", False,
    "Also write paper_table.md: per benchmark, every method's class-IL and task-IL at each "
    "sparsity in the paper's layout, training FLOPs relative to dense DER++, the memory "
    "footprint (model as saved + buffer + optimizer state), and --paper_subject paired by seed "
    "against dense DER++ and every other sparse method.")
_PAPER_SUBJECT = flags.DEFINE_string("paper_subject", "esacl",
                                     "The method whose paired differences paper_table.md lists.")


def _provenance(runs: list[dict]) -> str:
    """Commits and machines the runs recorded, as Markdown list items."""
    commits = sorted({reporting.commit_of(r) or "unknown" for r in runs})
    machines = sorted({f"{(r.get('environment') or {}).get('platform', '?')}; "
                       f"{(r.get('environment') or {}).get('cpu_count', '?')} CPU cores; "
                       f"backend {(r.get('environment') or {}).get('backend', '?')}"
                       for r in runs})
    return (f"- results from commit(s): {', '.join(commits)}\n"
            f"- machine(s): {' | '.join(machines)}\n")


def _shown(path: pathlib.Path | str) -> str:
    """A directory as a report names it: as given when relative, RUNS when absolute."""
    return "RUNS" if pathlib.Path(path).is_absolute() else str(path)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    runs_dir = pathlib.Path(_RUNS.value)
    if not runs_dir.is_dir():
        fail(f"--runs={runs_dir} is not a directory")
    runs = reporting.load_runs(runs_dir)
    if not runs:
        fail(f"no readable results.json under {runs_dir}")
    if _BENCHMARK.value:
        runs = [r for r in runs if reporting.benchmark_of(r) == _BENCHMARK.value]
        if not runs:
            fail(f"no runs of benchmark {_BENCHMARK.value!r} under {runs_dir}")
    out = pathlib.Path(_OUT.value) if _OUT.value else runs_dir / "report"

    rows = reporting.aggregate(runs)
    table = reporting.to_markdown(rows)
    write_text_atomic(out / "table.md", table)
    reporting.to_csv(rows, out / "table.csv")

    benchmarks = reporting.benchmarks_of(rows)
    several = len(benchmarks) > 1
    for bench in benchmarks:
        name = f"accuracy_vs_flops_{reporting.slug(bench)}.png" if several else \
            "accuracy_vs_flops.png"
        reporting.plot_accuracy_vs_flops(rows, out / name, benchmark=bench)

    groups = reporting.group_runs(runs)
    sparsities, buffers = defaultdict(set), defaultdict(set)
    for row in rows:
        sparsities[(row.benchmark, row.label)].add(row.sparsity)
        buffers[(row.benchmark, row.label)].add(row.buffer)
    for row in rows:
        first = groups[(row.benchmark, row.label, row.sparsity, row.buffer)][0]
        # a label with several sparsities/buffers gets one file per value, never overwritten
        stem = reporting.slug(row.label)
        if len(sparsities[(row.benchmark, row.label)]) > 1:
            stem += f"_s{row.sparsity:g}"
        if len(buffers[(row.benchmark, row.label)]) > 1:
            stem += f"_b{row.buffer}"
        if several:
            stem = f"{reporting.slug(row.benchmark)}_{stem}"
        try:
            reporting.plot_accuracy_matrix(first, out / f"accuracy_matrix_{stem}.png")
        except ValueError as err:
            print(f"warning: {err}", file=sys.stderr)

    print(table, end="")
    if _PAPER.value:
        command = portable_command(" ".join(["python -m experiments.report", *sys.argv[1:]]))
        text = (f"# The paper's comparison on our protocols\n\n- command: `{command}`\n"
                + _provenance(runs) + f"- {len(runs)} runs under {_shown(runs_dir)}\n\n"
                + reporting.paper.paper_markdown(runs, _PAPER_SUBJECT.value))
        write_text_atomic(out / "paper_table.md", text)
        print(text, end="")
    if _PAIRED_WITH.value:
        paired = reporting.paired_rows(runs, runs_dir, _PAIRED_WITH.value,
                                       across_protocols=_ACROSS.value)
        if not any(r.group == _PAIRED_WITH.value for r in paired):
            known = sorted({r.group for r in paired})
            fail(f"--paired_with={_PAIRED_WITH.value!r} names no run group; groups: "
                 f"{', '.join(known)}")
        command = portable_command(" ".join(["python -m experiments.report", *sys.argv[1:]]))
        text = (f"# Differences paired by seed\n\n- command: `{command}`\n- runs: "
                f"{len(runs)} results.json under {_shown(runs_dir)} (commits and machines: their "
                f"results.json and the sweep's report)\n- mean ± sample std over seeds; the "
                "last column is the mean per-seed difference ± its standard error\n\n"
                + reporting.paired_markdown(paired, _PAIRED_WITH.value))
        write_text_atomic(out / "paired.md", text)
        print(text, end="")
    print(f"report: {out}")


if __name__ == "__main__":
    app.run(main)
