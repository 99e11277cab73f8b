"""The report of a set of runs (what `experiments.report` writes), and rebuilding a study's.

`build_report` writes table.md, table.csv, accuracy_vs_flops*.png, accuracy_matrix_*.png and,
when asked, paper_table.md and paired.md from runs loaded from results.json files
(`load_runs`) or from a records file (`records.load_records`). From records, the output depends
on nothing but the records and the options: the command in its headers names the study's
folder STUDY (``--records=STUDY/records.jsonl --out=STUDY``), commits and machines come from
the records, and the PNGs carry no software version. `build_report` then also writes
``report.json``, the invocation that rebuilds the folder (`rebuild_study`; relative paths only).
`studies` finds every study under a folder (``make report`` rebuilds docs/'s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections import defaultdict
from collections.abc import Sequence

from esacl_jax.harness.atomic_io import write_text_atomic
from esacl_jax.harness.reporting import collect, paired, paper, plots, records, tables

REPORT_FILE = "report.json"


class ReportError(ValueError):
    """A report that cannot be made; the message is one line saying why."""


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """What a report holds beyond the table and plots (`experiments.report`'s flags)."""

    benchmark: str | None = None  # only this benchmark's runs
    paired_with: str | None = None  # also paired.md against this run group
    paired_across_protocols: bool = False
    paper_table: bool = False  # also paper_table.md
    paper_subject: str = "esacl"

    def flags(self) -> list[str]:
        """The options as `experiments.report` flags, in a fixed order."""
        out = [f"--benchmark={self.benchmark}"] if self.benchmark else []
        if self.paper_table:
            out.append("--paper_table")
            if self.paper_subject != "esacl":
                out.append(f"--paper_subject={self.paper_subject}")
        if self.paired_with:
            out.append(f"--paired_with={self.paired_with}")
            if self.paired_across_protocols:
                out.append("--paired_across_protocols")
        return out


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the runs of a report came from, as its headers name it.

    Attributes:
      command: the command line the headers show (no absolute path).
      root: the folder the runs' paths are relative to (paired groups are made from them).
      shown: that folder as headers name it (RUNS for an absolute one).
      records: the records file's name as the headers show it; empty: results.json files.
    """

    command: str
    root: pathlib.Path
    shown: str
    records: str = ""


def _provenance(runs: Sequence[dict]) -> str:
    """Commits and machines the runs recorded, as Markdown list items."""
    commits = sorted({collect.commit_of(r) or "unknown" for r in runs})
    machines = sorted({f"{(r.get('environment') or {}).get('platform', '?')}; "
                       f"{(r.get('environment') or {}).get('cpu_count', '?')} CPU cores; "
                       f"backend {(r.get('environment') or {}).get('backend', '?')}"
                       for r in runs})
    return (f"- results from commit(s): {', '.join(commits)}\n"
            f"- machine(s): {' | '.join(machines)}\n")


def _plot_matrices(runs: Sequence[dict], rows: Sequence[tables.Row], out: pathlib.Path,
                   several: bool) -> None:
    """accuracy_matrix_<label>.png of each row's first seed (one file per sparsity/buffer where
    a label has several, prefixed by the benchmark when there are several)."""
    groups = tables.group_runs(runs)
    sparsities, buffers = defaultdict(set), defaultdict(set)
    for row in rows:
        sparsities[(row.benchmark, row.label)].add(row.sparsity)
        buffers[(row.benchmark, row.label)].add(row.buffer)
    for row in rows:
        first = groups[(row.benchmark, row.label, row.sparsity, row.buffer)][0]
        stem = plots.slug(row.label)
        if len(sparsities[(row.benchmark, row.label)]) > 1:
            stem += f"_s{row.sparsity:g}"
        if len(buffers[(row.benchmark, row.label)]) > 1:
            stem += f"_b{row.buffer}"
        if several:
            stem = f"{plots.slug(row.benchmark)}_{stem}"
        try:
            plots.plot_accuracy_matrix(first, out / f"accuracy_matrix_{stem}.png")
        except ValueError as err:
            print(f"warning: {err}", file=sys.stderr)


def _paper_text(runs: Sequence[dict], options: ReportOptions, source: Source) -> str:
    where = (f"{len(runs)} runs from {source.records}" if source.records
             else f"{len(runs)} runs under {source.shown}")
    return (f"# The paper's comparison on our protocols\n\n- command: `{source.command}`\n"
            + _provenance(runs) + f"- {where}\n\n"
            + paper.paper_markdown(runs, options.paper_subject))


def _paired_text(runs: Sequence[dict], options: ReportOptions, source: Source) -> str:
    rows = paired.paired_rows(runs, source.root, options.paired_with,
                              across_protocols=options.paired_across_protocols)
    if not any(r.group == options.paired_with for r in rows):
        known = sorted({r.group for r in rows})
        raise ReportError(f"--paired_with={options.paired_with!r} names no run group; groups: "
                          f"{', '.join(known)}")
    where = (f"{len(runs)} records in {source.records} (commits and machines: the records)"
             if source.records else
             f"{len(runs)} results.json under {source.shown} (commits and machines: their "
             "results.json and the sweep's report)")
    return (f"# Differences paired by seed\n\n- command: `{source.command}`\n- runs: {where}\n"
            "- mean ± sample std over seeds; the last column is the mean per-seed difference "
            "± its standard error\n\n" + paired.paired_markdown(rows, options.paired_with))


def build_report(runs: Sequence[dict], out: str | os.PathLike, options: ReportOptions,
                 source: Source) -> str:
    """Writes the report of `runs` into `out`; returns the text `experiments.report` prints.

    Args:
      runs: run dicts (`load_runs` or `records.load_records`).
      out: the output folder.
      options: what to write beyond the table and plots.
      source: where the runs came from (headers, paired groups).

    Returns:
      The Markdown table, then paper_table.md's and paired.md's text when written.

    Raises:
      ReportError: no run of `options.benchmark`, or `options.paired_with` names no group.
    """
    out = pathlib.Path(out)
    if options.benchmark:
        runs = [r for r in runs if collect.benchmark_of(r) == options.benchmark]
        if not runs:
            raise ReportError(f"no runs of benchmark {options.benchmark!r} under "
                              f"{source.records or source.shown}")
    rows = tables.aggregate(runs)
    table = tables.to_markdown(rows)
    printed = [table]
    write_text_atomic(out / "table.md", table)
    tables.to_csv(rows, out / "table.csv")
    benchmarks = tables.benchmarks_of(rows)
    several = len(benchmarks) > 1
    for bench in benchmarks:
        name = f"accuracy_vs_flops_{plots.slug(bench)}.png" if several else \
            "accuracy_vs_flops.png"
        plots.plot_accuracy_vs_flops(rows, out / name, benchmark=bench)
    _plot_matrices(runs, rows, out, several)
    if options.paper_table:
        text = _paper_text(runs, options, source)
        write_text_atomic(out / "paper_table.md", text)
        printed.append(text)
    if options.paired_with:
        text = _paired_text(runs, options, source)
        write_text_atomic(out / "paired.md", text)
        printed.append(text)
    return "".join(printed)


# --------------------------------------------------------------------------------------------
# Studies: a folder built from a records file, with the invocation that rebuilds it


def records_command(records_path: str, options: ReportOptions) -> str:
    """The command that rebuilds a study, STUDY standing for its folder.

    Args:
      records_path: the records file relative to the study's folder (POSIX).
      options: the report's options.

    Returns:
      ``python -m experiments.report --records=STUDY/<records_path> --out=STUDY <flags>``.
    """
    return " ".join(["python -m experiments.report", f"--records=STUDY/{records_path}",
                     "--out=STUDY", *options.flags()])


def report_spec(records_path: str, options: ReportOptions) -> str:
    """report.json's text: the records file (relative to the study) and the options."""
    spec = {"command": records_command(records_path, options), "records": records_path,
            "options": dataclasses.asdict(options)}
    return json.dumps(spec, indent=1, sort_keys=True) + "\n"


def _build_study(records_file: pathlib.Path, rel: str, out: str | os.PathLike,
                 options: ReportOptions) -> str:
    """`build_report` of a records file named `rel` by its study, plus out/report.json."""
    runs = records.load_records(records_file)
    if not runs:
        raise records.RecordsError(f"no records in {records_file}")
    source = Source(records_command(rel, options), records_file.parent, "STUDY", records=rel)
    text = build_report(runs, out, options, source)
    write_text_atomic(pathlib.Path(out) / REPORT_FILE, report_spec(rel, options))
    return text


def build_from_records(records_file: str | os.PathLike, out: str | os.PathLike,
                       options: ReportOptions) -> str:
    """`build_report` of a records file into the study folder `out`, plus out/report.json.

    Args:
      records_file: the records.jsonl.
      out: the study's folder (output).
      options: the report's options.

    Returns:
      The printed text (`build_report`).

    Raises:
      records.RecordsError: an unreadable records file, or one without records.
      ReportError: as `build_report`.
    """
    records_file = pathlib.Path(records_file)
    rel = os.path.relpath(records_file.resolve(), pathlib.Path(out).resolve())
    return _build_study(records_file, pathlib.PurePath(rel).as_posix(), out, options)


def _read_spec(study: pathlib.Path) -> tuple[str, ReportOptions]:
    path = study / REPORT_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        options = ReportOptions(**spec["options"])
        rel = str(spec["records"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportError(f"{path}: not a report invocation ({type(err).__name__}: {err})") \
            from None
    if pathlib.PurePosixPath(rel).is_absolute():
        raise ReportError(f"{path}: records must be a path relative to the study, got {rel!r}")
    return rel, options


def rebuild_study(study: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Rebuilds a study from its report.json (in place, or into `out`).

    Args:
      study: a folder holding report.json (and, where it names it, the records file).
      out: where to write (default: `study` itself); the output is the same either way.

    Returns:
      The printed text.

    Raises:
      ReportError, records.RecordsError: as `build_from_records`; a missing or bad report.json.
    """
    study = pathlib.Path(study)
    rel, options = _read_spec(study)
    return _build_study(study / rel, rel, study if out is None else out, options)


def studies(root: str | os.PathLike) -> list[pathlib.Path]:
    """Every study folder under `root` (one holding report.json), sorted.

    Args:
      root: the folder searched (recursively), e.g. docs/.

    Returns:
      The study folders.

    Raises:
      ReportError: a records.jsonl under `root` that no report.json names (its study could
        not be rebuilt).
    """
    root = pathlib.Path(root)
    found = sorted(p.parent for p in root.rglob(REPORT_FILE))
    named = set()
    for study in found:
        rel, _ = _read_spec(study)
        named.add((study / rel).resolve())
    for path in sorted(root.rglob(records.RECORDS_FILE)):
        if path.resolve() not in named:
            raise ReportError(f"{path}: no {REPORT_FILE} names it; write one with python -m "
                              f"experiments.report --records={path} --out={path.parent} [flags]")
    return found

