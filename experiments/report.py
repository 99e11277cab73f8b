"""Summarises runs: `python -m experiments.report --runs=DIR [--out=DIR]`, or from a study's
records: `--records=FILE --out=DIR`, or rebuilds every study under a folder: `--rebuild=docs`.

Collects every results.json under --runs (or every record of --records, a sweep's
records.jsonl), aggregates over seeds and writes into --out (default RUNS/report; required with
--records): table.md, table.csv, paired.md (with --paired_with: differences paired by seed
against one run group, with standard errors), accuracy_vs_flops.png (one per benchmark when
there are several: accuracy_vs_flops_<benchmark>.png) and accuracy_matrix_<label>.png (class-IL,
the first seed of each group; prefixed by the benchmark when there are several, suffixed by
sparsity/buffer when a label has several groups). Prints the Markdown table.

From --records the output is a function of the records and the flags alone (byte for byte), and
--out also gets report.json: the records file relative to --out and the flags, which
``--rebuild=FOLDER`` (``make report``: docs/) reads to rebuild every study under FOLDER in place
(`esacl_jax.harness.reporting.build`).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from esacl_jax.harness import reporting
from esacl_jax.harness.reporting.build import ReportError, ReportOptions, Source
from esacl_jax.harness.reporting.records import RecordsError
from esacl_jax.harness.sweep.provenance import portable_command

_RUNS = flags.DEFINE_string("runs", None, "Directory searched (recursively) for results.json.")
_RECORDS = flags.DEFINE_string(
    "records", None, "A study's records.jsonl (written by the sweeps beside their report): "
    "report from it instead of --runs; --out is then required and gets report.json.")
_REBUILD = flags.DEFINE_string(
    "rebuild", None, "Rebuild every study under this folder (each folder holding report.json) "
    "in place from its records, e.g. docs (`make report`).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: RUNS/report).")
_WRITE_RECORDS = flags.DEFINE_string(
    "write_records", None, "With --runs: also write the records of every run found (paths "
    "relative to --runs) to this file: one study from several sweeps' output folders placed "
    "under one --runs folder (e.g. RUNS/magnitude and RUNS/rescaled).")
_BENCHMARK = flags.DEFINE_string("benchmark", None, "Only report runs of this benchmark.")
_PAIRED_WITH = flags.DEFINE_string(
    "paired_with", None, "Also write paired.md: every run group (its directory under --runs "
    "without the benchmark and seed parts, e.g. esacl/s0.9 or derpp) against this one, paired "
    "by seed, with standard errors, learning accuracy and forgetting.")
_ACROSS = flags.DEFINE_bool(
    "paired_across_protocols", False, "With --paired_with: pair runs of different protocols on "
    "the same data (e.g. split_mnist_w400 against split_mnist: sparse-wide against dense-narrow)")
_PAPER = flags.DEFINE_bool(
    "paper_table", False,
    "Also write paper_table.md: per benchmark, every method's class-IL and task-IL at each "
    "sparsity in the paper's layout, training FLOPs relative to dense DER++, the memory "
    "footprint (model as saved + buffer + optimizer state), and --paper_subject paired by seed "
    "against dense DER++ and every other sparse method.")
_PAPER_SUBJECT = flags.DEFINE_string("paper_subject", "esacl",
                                     "The method whose paired differences paper_table.md lists.")


def _shown(path: pathlib.Path | str) -> str:
    """A directory as a report names it: as given when relative, RUNS when absolute."""
    return "RUNS" if pathlib.Path(path).is_absolute() else str(path)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _options() -> ReportOptions:
    return ReportOptions(benchmark=_BENCHMARK.value or None, paired_with=_PAIRED_WITH.value,
                         paired_across_protocols=_ACROSS.value, paper_table=_PAPER.value,
                         paper_subject=_PAPER_SUBJECT.value)


def _from_runs() -> tuple[str, pathlib.Path]:
    runs_dir = pathlib.Path(_RUNS.value)
    if not runs_dir.is_dir():
        fail(f"--runs={runs_dir} is not a directory")
    runs = reporting.load_runs(runs_dir)
    if not runs:
        fail(f"no readable results.json under {runs_dir}")
    out = pathlib.Path(_OUT.value) if _OUT.value else runs_dir / "report"
    if _WRITE_RECORDS.value:
        from esacl_jax.harness.reporting.records import write_records

        print(f"records: {write_records(runs, runs_dir, _WRITE_RECORDS.value)}")
    command = portable_command(" ".join(["python -m experiments.report", *sys.argv[1:]]))
    source = Source(command, runs_dir, _shown(runs_dir))
    return reporting.build.build_report(runs, out, _options(), source), out


def _rebuild(root: pathlib.Path) -> str:
    if not root.is_dir():
        fail(f"--rebuild={root} is not a directory")
    found = reporting.build.studies(root)
    for study in found:
        reporting.build.rebuild_study(study)
        print(f"rebuilt {study}")
    return f"{len(found)} stud{'y' if len(found) == 1 else 'ies'} rebuilt under {root}\n"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    given = [name for name, flag in (("--runs", _RUNS), ("--records", _RECORDS),
                                     ("--rebuild", _REBUILD)) if flag.value]
    if len(given) != 1:
        fail("give exactly one of --runs, --records and --rebuild"
             + (f" (got {', '.join(given)})" if given else ""))
    try:
        if _REBUILD.value:
            print(_rebuild(pathlib.Path(_REBUILD.value)), end="")
            return
        if _RECORDS.value:
            if not _OUT.value:
                fail("--records needs --out (the study's folder)")
            out = pathlib.Path(_OUT.value)
            text = reporting.build.build_from_records(_RECORDS.value, out, _options())
        else:
            text, out = _from_runs()
    except (ReportError, RecordsError) as err:
        fail(str(err))
    print(text, end="")
    print(f"report: {out}")


if __name__ == "__main__":
    app.run(main)
