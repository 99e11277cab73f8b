"""Running a sweep: `run_all` executes a list of `Run`s, resumably, optionally in parallel.

- a run whose workdir already holds a results.json is skipped (so a sweep resumes where it
  stopped); `force=True` redoes it. A results.json written with a *different* config (say a
  smoke run with --max_train_per_task into the same --out) is never reused silently: that run
  fails with a message naming the differing fields (`reuse.check_existing`).
- `jobs > 1` runs a pool of "spawn" worker processes; each imports JAX once and runs many
  configs, clearing JAX's caches between them. `isolate=True` gives every run a fresh process
  instead: results.json's measured peak memory is a per-process peak, so only isolated runs
  measure their own (the comparison isolates; the ablation, which reports no memory, does not).
- a failing run is reported on one line with its name and the sweep goes on; the returned
  `SweepResult.exit_code` is non-zero when any run failed.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TextIO

from esacl_jax.harness.sweep.plan import Outcome, Run, SweepResult, build_config, one_line
from esacl_jax.harness.sweep.reuse import check_existing


def execute(run: Run, data_dir: str | None = None) -> Outcome:
    """Builds the run's config and trains it; any exception becomes a "failed" outcome."""
    import jax

    from esacl_jax.harness.loop import train_and_evaluate

    start = time.perf_counter()
    try:
        config = build_config(run, data_dir)
        result = train_and_evaluate(config, run.workdir, progress=False)
        return Outcome.from_metrics(
            run, "done", result["metrics"],
            float(result.get("wall_time_s", time.perf_counter() - start)))
    except Exception as err:  # noqa: BLE001 - one bad run must not stop the sweep
        return Outcome(run, "failed", wall_time_s=time.perf_counter() - start,
                       error=one_line(err))
    finally:
        jax.clear_caches()  # compiled functions of this run's shapes are not needed again


def _init_worker() -> None:
    """Imports the heavy modules once per worker process."""
    import esacl_jax.harness.loop  # noqa: F401


def format_duration(seconds: float) -> str:
    """``42s``, ``5m12s``, ``2h03m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _percent(value: float | None) -> str:
    return "  n/a " if value is None else f"{100 * value:6.2f}%"


class _Printer:
    """One line per finished run plus an ETA from the mean time per finished run so far."""

    def __init__(self, total: int, stream: TextIO | None, start: float):
        self.total, self.stream, self.start, self.finished = total, stream, start, 0

    def __call__(self, outcome: Outcome) -> None:
        self.finished += 1
        if self.stream is None:
            return
        width = len(str(self.total))
        head = f"[{self.finished:>{width}}/{self.total}]"
        if outcome.status == "failed":
            line = f"{head} FAILED {outcome.run.name}: {outcome.error}"
        else:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.finished * (self.total - self.finished)
            line = (f"{head} {outcome.run.name}  class-IL {_percent(outcome.class_il)}  "
                    f"task-IL {_percent(outcome.task_il)}  {outcome.wall_time_s or 0:7.1f} s  "
                    f"ETA {format_duration(eta)}")
        print(line, file=self.stream, flush=True)


def check_data(runs: Iterable[Run], data_dir: str | None = None) -> None:
    """Reads each dataset the runs need once, so that missing data stops a sweep with one
    DataError (saying where to put the files) instead of failing every run. Runs whose config
    cannot be built are left to fail on their own."""
    from esacl_jax.harness.data import BENCHMARKS
    from esacl_jax.harness.data.sources import load_dataset

    seen = set()
    for run in runs:
        try:
            config = build_config(run, data_dir)
            key = (BENCHMARKS[config.benchmark].dataset, config.data_dir)
        except Exception:  # noqa: BLE001 - reported when the run executes
            continue
        if key not in seen:
            seen.add(key)
            load_dataset(key[0], key[1] or None)


def _execute_isolated(run: Run, data_dir: str | None) -> Outcome:
    """`execute` in a fresh "spawn" process of its own, so the process-lifetime peaks that
    results.json records as measured memory (ru_maxrss, the device allocator's peak) are this
    run's alone."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(execute, run, data_dir).result()


def run_all(runs: Sequence[Run], jobs: int = 1, data_dir: str | None = None,
            progress: bool = True, force: bool = False, isolate: bool = False,
            stream: TextIO | None = None) -> SweepResult:
    """Runs every run not already done; returns all outcomes (see the module docstring).

    Args:
      runs: the sweep; workdirs must be distinct.
      jobs: runs at a time. Without `isolate`: 1 runs in this process, more use that many
        long-lived "spawn" workers (JAX imported once per worker).
      data_dir: sets ``config.data_dir`` of every run (None: keep the config's, i.e. the
        ``ESACL_DATA_DIR`` environment variable or tfds).
      progress: print one line per finished run (and the skip/summary lines) to `stream`.
      force: redo runs whose results.json exists.
      isolate: run each config in a fresh process (each run then pays a process start and the
        JAX import). Needed when the measured peak memory matters: it is a per-process peak,
        so runs sharing a process would report the largest peak of all runs before them.
      stream: where lines go (default sys.stdout).

    Raises:
      DataError: a dataset that runs to do need is missing (checked before any run starts).
    """
    start = time.perf_counter()
    stream = (stream or sys.stdout) if progress else None
    workdirs = [pathlib.Path(r.workdir).resolve() for r in runs]
    if len(set(workdirs)) != len(workdirs):
        raise ValueError("two runs of the sweep share a workdir")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")

    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, run in enumerate(runs):
        if not force and run.results_path.exists():
            outcomes[i] = check_existing(run, data_dir)
            if outcomes[i].status == "failed" and stream:
                print(f"FAILED {run.name}: {outcomes[i].error}", file=stream, flush=True)
        else:
            todo.append(i)
    check_data((runs[i] for i in todo), data_dir)
    workers = min(jobs, max(1, len(todo)))
    if stream:
        skipped = sum(o.status == "skipped" for o in outcomes.values())
        note = f"; skipping {skipped} with results.json (--force redoes them)" if skipped else ""
        how = "a fresh process per run" if isolate else "in this process" if workers == 1 \
            else "worker processes"
        print(f"sweep: {len(runs)} runs, {len(todo)} to run, {workers} at a time ({how}){note}",
              file=stream, flush=True)

    printer = _Printer(len(todo), stream, time.perf_counter())
    if todo and workers == 1 and not isolate:
        for i in todo:
            outcomes[i] = execute(runs[i], data_dir)
            printer(outcomes[i])
    elif todo:
        if isolate:
            pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(workers)
            task = _execute_isolated
        else:
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker)
            task = execute
        with pool:
            futures = {pool.submit(task, runs[i], data_dir): i for i in todo}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    try:
                        outcomes[i] = future.result()
                    except Exception as err:  # noqa: BLE001 - a worker died (e.g. killed)
                        outcomes[i] = Outcome(runs[i], "failed",
                                              error=f"worker process failed: {one_line(err)}")
                    printer(outcomes[i])
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    result = SweepResult(tuple(outcomes[i] for i in range(len(runs))),
                         time.perf_counter() - start)
    if stream:
        print(f"sweep: {result.count('done')} ran, {result.count('skipped')} skipped, "
              f"{len(result.failed)} failed in {format_duration(result.wall_time_s)}",
              file=stream, flush=True)
        for outcome in result.failed:
            print(f"  failed: {outcome.run.name}: {outcome.error}", file=stream, flush=True)
    return result
