"""What the Ray launcher costs per run against the local process pool (not a timed test).

    python -m experiments.bench.ray_overhead [--runs=20] [--workers=2] [--repeats=1] \
        [--out=runs/bench_ray_overhead] [--markdown=FILE]

The same sweep of split_digits runs (--methods x seeds, --epochs and --max_train_per_task
small, so that the launchers' costs are not lost in training) runs with the local launcher
(--workers "spawn" worker processes, JAX imported once per worker) and with the Ray launcher (a
local Ray instance started by the sweep with --workers CPUs, one CPU per run, workers reused),
each into a fresh --out folder, local first then Ray, --repeats times (the order alternates
between repeats). Both launchers' sweep wall times include their start: the pool's worker
processes, Ray's instance (started and stopped by the sweep; its start and stop are also timed
once on their own). No persistent compilation cache: every run compiles, as in a real sweep.

Reported per pair: each sweep's wall time, the sum of its runs' own wall times (results.json),
the overhead per run, (Ray sweep - local sweep) / runs, and the ratio of the sweep times; then
the medians over the pairs, with and without Ray's start and stop. The accuracy matrices of the
first pair's two sweeps are compared too (exit status 1 when they differ).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time

from absl import app, flags

from esacl_jax.harness import sweep
from esacl_jax.harness.sweep.provenance import portable_command

_RUNS = flags.DEFINE_integer("runs", 20, "Runs in the sweep (methods x seeds 0, 1, ...).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Runs at a time, each way.")
_METHODS = flags.DEFINE_list("methods", ["finetune", "er"], "Methods (the runs cycle them).")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Epochs per task.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_per_task", 100, "Training examples per task.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Local + Ray pairs (the order alternates).")
_OUT = flags.DEFINE_string("out", "runs/bench_ray_overhead", "Scratch folder (emptied first).")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Also write the report to this file.")


def plan(out: pathlib.Path) -> list[sweep.Run]:
    methods = _METHODS.value
    overrides = {"epochs": _EPOCHS.value, "max_train_per_task": _MAX_TRAIN.value}
    return [sweep.Run("split_digits", methods[k % len(methods)], overrides,
                      k // len(methods), out / f"run{k:02d}") for k in range(_RUNS.value)]


def time_sweep(launcher: str, out: pathlib.Path) -> dict:
    runs = plan(out)
    start = time.perf_counter()
    result = sweep.run_all(runs, jobs=_WORKERS.value, launcher=launcher)
    wall = time.perf_counter() - start
    if result.exit_code or result.count("done") != len(runs):
        raise RuntimeError(f"{launcher} sweep: {len(result.failed)} failed runs")
    return {"launcher": launcher, "wall_s": wall,
            "runs_s": sum(o.wall_time_s or 0.0 for o in result.outcomes), "runs": runs}


def ray_start_stop() -> tuple[float, float]:
    """Seconds to start and to stop a local Ray instance like the sweep's."""
    import logging

    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=_WORKERS.value, include_dashboard=False,
             logging_level=logging.WARNING)
    started = time.perf_counter()
    ray.shutdown()
    return started - start, time.perf_counter() - started


def matrices(runs: list[sweep.Run]) -> list:
    out = []
    for run in runs:
        result = json.loads(run.results_path.read_text(encoding="utf-8"))
        out.append((result["class_il_matrix"], result["task_il_matrix"]))
    return out


def report(pairs: list[dict], start_s: float, stop_s: float, identical: bool) -> str:
    from esacl_jax.harness.results import git_commit

    n = _RUNS.value
    overheads = [(p["ray"]["wall_s"] - p["local"]["wall_s"]) / n for p in pairs]
    ratios = [p["ray"]["wall_s"] / p["local"]["wall_s"] for p in pairs]
    lines = [
        "# Ray launcher overhead (split_digits sweep)", "",
        "- command: `python -m experiments.bench.ray_overhead "
        f"{portable_command(' '.join(sys.argv[1:]))}`",
        f"- git commit: `{git_commit()}`",
        f"- machine: {platform.platform()}; {os.cpu_count()} CPU cores",
        f"- sweep: {n} runs ({', '.join(_METHODS.value)}; epochs {_EPOCHS.value}, "
        f"{_MAX_TRAIN.value} examples per task), {_WORKERS.value} at a time each way", "",
        "| pair | order | local sweep (s) | Ray sweep (s) | local, sum of runs (s) | "
        "Ray, sum of runs (s) | overhead per run (s) | Ray / local |",
        "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k, (p, per_run, ratio) in enumerate(zip(pairs, overheads, ratios, strict=True)):
        lines.append(f"| {k + 1} | {p['order']} | {p['local']['wall_s']:.1f} | "
                     f"{p['ray']['wall_s']:.1f} | {p['local']['runs_s']:.1f} | "
                     f"{p['ray']['runs_s']:.1f} | {per_run:+.2f} | {ratio:.2f} |")
    median = statistics.median(overheads)
    lines += [
        "",
        f"- overhead per run, median of the pairs: {median:+.2f} s with Ray's start and stop "
        f"in the Ray sweep, {median - (start_s + stop_s) / n:+.2f} s without them",
        f"- Ray / local sweep wall time, median of the pairs: {statistics.median(ratios):.2f}",
        f"- a local Ray instance's start {start_s:.1f} s and stop {stop_s:.1f} s (timed on "
        "their own)",
        f"- accuracy matrices of the two launchers identical (first pair): "
        f"{'yes' if identical else 'NO'}",
        ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sweep.exit_with(bench)


def bench() -> int:
    sweep.check_launcher("ray")  # one line (exit 2) when Ray is not installed
    out = pathlib.Path(_OUT.value)
    shutil.rmtree(out, ignore_errors=True)
    start_s, stop_s = ray_start_stop()
    pairs = []
    for repeat in range(_REPEATS.value):
        order = ("local", "ray") if repeat % 2 == 0 else ("ray", "local")
        pair = {"order": " then ".join(order)}
        for launcher in order:
            pair[launcher] = time_sweep(launcher, out / f"{launcher}_{repeat}")
        pairs.append(pair)
    identical = matrices(pairs[0]["local"]["runs"]) == matrices(pairs[0]["ray"]["runs"])
    text = report(pairs, start_s, stop_s, identical)
    print(text)
    if _MARKDOWN.value:
        from esacl_jax.harness.atomic_io import write_text_atomic

        write_text_atomic(_MARKDOWN.value, text)
    return 0 if identical else 1


if __name__ == "__main__":
    app.run(main)
