"""What a sweep's report is made from and where it came from.

`load_results` reads the results.json of planned runs; `write_records` writes their per-run
records (records.jsonl, what the report is rebuilt from); `provenance` describes what produced a
report (command, commit, machine, evaluation split, launcher, and the nodes that ran the runs
of a Ray sweep), and `provenance_markdown` / `provenance_csv` turn that into a report's header.
Each run's own node is in its results.json (``"node"``: launcher, host, ip, Ray node id).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import platform
from collections.abc import Iterable, Mapping, Sequence

from esacl_jax.harness.sweep.plan import Run, describe_node


def load_results(runs: Iterable[Run]) -> list[tuple[Run, dict]]:
    """(run, results.json dict with a ``"path"`` key) for every run that has a readable one."""
    out = []
    for run in runs:
        try:
            result = json.loads(run.results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and "metrics" in result:
            result["path"] = str(run.results_path)
            out.append((run, result))
    return out


def write_records(results: Sequence[dict], out: str | os.PathLike) -> pathlib.Path:
    """The study's per-run records, ``<out>/records.jsonl``, beside its report: what every table
    of it is rebuilt from (`esacl_jax.harness.reporting.records`; ``python -m
    experiments.report --records=<out>/records.jsonl --out=DIR``).

    Args:
      results: the study's results.json dicts, each with its ``"path"`` (`load_results`).
      out: the sweep's output folder (record paths are relative to it).

    Returns:
      The records file's path.
    """
    from esacl_jax.harness.reporting.records import write_records as write

    return write(results, out)


def nodes_summary(results: Sequence[dict]) -> str:
    """Where the runs ran, from their results.json ``node`` records: ``host-a (10.0.0.5): 12
    runs, host-b (10.0.0.6): 8 runs`` ("" when no result records one)."""
    counts: dict[str, int] = {}
    for result in results:
        where = describe_node(result.get("node"))
        if where:
            counts[where] = counts.get(where, 0) + 1
    unrecorded = len(results) - sum(counts.values())
    parts = [f"{where}: {n} run{'s' if n > 1 else ''}" for where, n in sorted(counts.items())]
    if counts and unrecorded:
        parts.append(f"not recorded: {unrecorded} run{'s' if unrecorded > 1 else ''}")
    return ", ".join(parts)


# Placeholders for absolute paths in a recorded command line: a report names the flag's role,
# never the machine it ran on (a user fills in their own directories).
_PATH_PLACEHOLDERS = {"data_dir": "DATA", "out": "OUT", "runs": "RUNS", "docs_dir": "DOCS",
                      "workdir": "WORKDIR"}


def portable_command(command: str) -> str:
    """`command` with every absolute path given to a `--flag=PATH` replaced by a placeholder
    (`--data_dir=DATA`, `--out=OUT`, `--runs=RUNS`, ...; another flag's by its upper-cased name).

    Args:
      command: a command line as recorded (space-separated tokens).

    Returns:
      The same command with no absolute path in it.
    """
    tokens = []
    for token in command.split(" "):
        flag, eq, value = token.partition("=")
        if eq and flag.startswith("--") and os.path.isabs(value):
            name = flag.lstrip("-")
            token = f"{flag}={_PATH_PLACEHOLDERS.get(name, name.upper())}"
        tokens.append(token)
    return " ".join(tokens)


def provenance(command: str, evaluation: str, results: Sequence[dict] = (),
               jobs: int = 1, launcher: str = "local") -> dict[str, str]:
    """What produced a report: command, commit, machine, evaluation split, how the runs were
    launched and, when the results record it (the Ray launcher), the nodes that ran them, and
    the results' commits."""
    import jax

    from esacl_jax.harness.results import git_commit

    devices = jax.devices()
    kinds = sorted({str(d.device_kind) for d in devices})
    info = {
        "command": portable_command(command),
        "git commit": git_commit(),
        "machine": (f"{platform.platform()}; {os.cpu_count()} CPU cores; JAX {jax.__version__} "
                    f"backend {jax.default_backend()}, {len(devices)} device(s): "
                    f"{', '.join(kinds)}"),
        "evaluation split": evaluation,
    }
    if launcher == "ray":
        info["launcher"] = ("ray: one Ray task per run; wall times include the contention "
                            "between runs sharing a node")
        ran_on = [r for r in results if (r.get("node") or {}).get("launcher") == "ray"]
        if ran_on:
            # Only runs the Ray launcher ran: the "machine" line above is the driver's.
            info["nodes (Ray runs each)"] = nodes_summary(ran_on)
    else:
        info["runs at a time (--jobs)"] = (f"{jobs}: wall times include the contention "
                                           "between parallel runs" if jobs > 1 else "1")
    info["generated"] = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")
    commits = sorted({str((r.get("environment") or {}).get("git_commit")) for r in results
                      if (r.get("environment") or {}).get("git_commit")})
    if commits:
        info["results from commit(s)"] = ", ".join(commits)
    return info


def provenance_markdown(title: str, info: Mapping[str, str]) -> str:
    """A report's Markdown head: ``# title`` and one ``- key: value`` line per `info` entry."""
    lines = [f"# {title}", ""]
    for key, value in info.items():
        shown = f"`{value}`" if key in ("command", "git commit") else value
        lines.append(f"- {key}: {shown}")
    return "\n".join(lines) + "\n"


def provenance_csv(info: Mapping[str, str]) -> str:
    """``# key: value`` comment lines (read the CSV with ``pandas.read_csv(path, comment="#")``
    or `read_csv_records`)."""
    return "".join(f"# {key}: {' '.join(str(value).split())}\n" for key, value in info.items())


def read_csv_records(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV written with a `provenance_csv` header, as dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def evaluation_split(validation_fraction: float) -> str:
    """The provenance line saying what a sweep was evaluated on (validation split or test)."""
    if validation_fraction > 0:
        return (f"validation: {validation_fraction:g} of each task's training set held out "
                "(stratified); the test set is not used")
    return "test"
