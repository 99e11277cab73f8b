"""Running a sweep: `run_all` executes a list of `Run`s, resumably, optionally in parallel.

- a run whose workdir already holds a results.json is skipped (so a sweep resumes where it
  stopped); `force=True` redoes it. A results.json written with a *different* config (say a
  smoke run with --max_train_per_task into the same --out) is never reused silently: that run
  fails with a message naming the differing fields (`reuse.check_existing`). These checks run in
  this process before any run starts, whichever launcher runs the rest.
- launcher "local" (the default): `jobs > 1` runs a pool of "spawn" worker processes; each
  imports JAX once and runs many configs, clearing JAX's caches between them. `isolate=True`
  gives every run a fresh process instead: results.json's measured peak memory is a per-process
  peak, so only isolated runs measure their own (the comparison isolates; the ablation, which
  reports no memory, does not).
- launcher "ray": every run is a Ray task on a local Ray instance or a cluster
  (`esacl_jax.harness.sweep.ray_launcher`; Ray is the optional ``cluster`` extra).
- a failing run is reported on one line with its name and the sweep goes on; the returned
  `SweepResult.exit_code` is non-zero when any run failed.
- every finished run records where it ran in its results.json (``"node"``: launcher, host and,
  with Ray, the node's ip and id).
- by default (`group=True`) the runs still to do of one cell (same benchmark, method,
  overrides and row, workdirs ``DIR/seed<N>``) run as one seed group (`group_seeds`,
  `esacl_jax.harness.seed_group`): one process, one compiled program, each seed's results.json
  where its own run would write it; skipping and resuming stay per seed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TextIO

from esacl_jax.harness.sweep.plan import Outcome, Run, SweepResult, build_config, one_line
from esacl_jax.harness.sweep.reuse import check_existing
from esacl_jax.harness.sweep.run_one import execute

LAUNCHERS = ("local", "ray")


def group_seeds(todo: Sequence[tuple[int, Run]]) -> list[tuple[tuple[int, ...], Run]]:
    """The units a sweep executes: the runs of one cell that differ only in their seed and
    write to sibling ``DIR/seed<N>`` workdirs become one seed-group run (``seeds`` set,
    workdir DIR); every other run stays alone.

    Args:
      todo: (position in the sweep, run) of the runs to do.

    Returns:
      (the positions a unit stands for, the unit's run), in the order of first appearance.
    """
    cells: dict[tuple, list[tuple[int, Run]]] = {}
    alone = 0
    for i, run in todo:
        path = pathlib.Path(run.workdir)
        if path.name == f"seed{run.seed}" and not run.seeds:
            key: tuple = (run.benchmark, run.method, repr(sorted(run.overrides.items())),
                          run.group, str(path.parent))
        else:
            key, alone = ("alone", alone), alone + 1
        cells.setdefault(key, []).append((i, run))
    units = []
    for members in cells.values():
        if len(members) == 1:
            units.append(((members[0][0],), members[0][1]))
            continue
        first = members[0][1]
        seeds = tuple(run.seed for _, run in members)
        units.append((tuple(i for i, _ in members), dataclasses.replace(
            first, workdir=pathlib.Path(first.workdir).parent, seeds=seeds)))
    return units


def _member_outcomes(unit: Run, outcome: Outcome, members: Sequence[tuple[int, Run]],
                     ) -> dict[int, Outcome]:
    """A seed group's outcome as its seeds' own: each seed's accuracies from the results.json
    it wrote; a failed group fails each of its seeds with the group's error."""
    outcomes = {}
    for i, run in members:
        if outcome.status != "done":
            outcomes[i] = dataclasses.replace(outcome, run=run,
                                              error=f"seed group {unit.name}: {outcome.error}")
            continue
        try:
            stored = json.loads(run.results_path.read_text(encoding="utf-8"))
            outcomes[i] = dataclasses.replace(
                Outcome.from_metrics(run, "done", stored.get("metrics") or {},
                                     stored.get("wall_time_s"), stored.get("node")),
                attempts=outcome.attempts)
        except (OSError, ValueError) as err:
            outcomes[i] = Outcome(run, "failed", error=f"seed group {unit.name} left no "
                                  f"readable {run.results_path}: {one_line(err)}")
    return outcomes


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
    """One line per finished run plus an ETA from the mean time per finished run so far;
    `show_node` adds where the run ran (and its attempts when Ray retried it)."""

    def __init__(self, total: int, stream: TextIO | None, start: float,
                 show_node: bool = False):
        self.total, self.stream, self.start, self.finished = total, stream, start, 0
        self.show_node = show_node

    def __call__(self, outcome: Outcome) -> None:
        self.finished += 1
        if self.stream is None:
            return
        width = len(str(self.total))
        head = f"[{self.finished:>{width}}/{self.total}]"
        where = ""
        if self.show_node:
            where = f" on {outcome.node}" if outcome.node else ""
            if outcome.attempts > 1:
                where += f" (attempt {outcome.attempts}: Ray retried it after its worker died)"
        if outcome.status == "failed":
            line = f"{head} FAILED {outcome.run.name}{where}: {outcome.error}"
        else:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.finished * (self.total - self.finished)
            line = (f"{head} {outcome.run.name}  class-IL {_percent(outcome.class_il)}  "
                    f"task-IL {_percent(outcome.task_il)}  {outcome.wall_time_s or 0:7.1f} s"
                    f"{' ' + where if where else ''}  ETA {format_duration(eta)}")
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


def check_launcher(launcher: str, ray_address: str | None = None,
                   ray_cpus_per_run: float = 1.0, ray_gpus_per_run: float = 0.0) -> None:
    """ValueError (one line) for an unknown launcher, Ray settings without the Ray launcher,
    impossible resource needs, or the Ray launcher without Ray installed."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if launcher != "ray":
        given = [name for name, value, default in (
            ("--ray_address", ray_address or "", ""), ("--ray_cpus_per_run", ray_cpus_per_run, 1),
            ("--ray_gpus_per_run", ray_gpus_per_run, 0)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} needs --launcher=ray")
        return
    if not ray_cpus_per_run > 0 or not ray_gpus_per_run >= 0:
        raise ValueError(f"a Ray run needs > 0 CPUs and >= 0 GPUs, got "
                         f"--ray_cpus_per_run={ray_cpus_per_run:g} "
                         f"--ray_gpus_per_run={ray_gpus_per_run:g}")
    from esacl_jax.harness.sweep import ray_launcher

    ray_launcher.require_ray()


def run_all(runs: Sequence[Run], jobs: int = 1, data_dir: str | None = None,
            progress: bool = True, force: bool = False, isolate: bool = False,
            stream: TextIO | None = None, launcher: str = "local",
            ray_address: str | None = None, ray_cpus_per_run: float = 1.0,
            ray_gpus_per_run: float = 0.0, group: bool = True) -> SweepResult:
    """Runs every run not already done; returns all outcomes (see the module docstring).

    Args:
      runs: the sweep; workdirs must be distinct.
      jobs: runs at a time. Without `isolate`: 1 runs in this process, more use that many
        long-lived "spawn" workers (JAX imported once per worker). With the Ray launcher and no
        `ray_address`: the CPUs of the local Ray instance (`jobs` x `ray_cpus_per_run`); on a
        cluster its resources decide.
      data_dir: sets ``config.data_dir`` of every run (None: keep the config's, i.e. the
        ``ESACL_DATA_DIR`` environment variable or tfds).
      progress: print one line per finished run (and the skip/summary lines) to `stream`.
      force: redo runs whose results.json exists.
      isolate: run each config in a fresh process (each run then pays a process start and the
        JAX import). Needed when the measured peak memory matters: it is a per-process peak,
        so runs sharing a process would report the largest peak of all runs before them.
        With Ray: a fresh worker process per task.
      stream: where lines go (default sys.stdout).
      launcher: "local" (this process or a process pool) or "ray" (a Ray task per run).
      ray_address: the Ray cluster to join ("auto", "HOST:PORT"); None or "": start a local
        Ray instance (or use this process's Ray session when one is initialized).
      ray_cpus_per_run, ray_gpus_per_run: each Ray task's resource needs. A task asking no GPU
        runs JAX on the CPU (``JAX_PLATFORMS=cpu``), so CPU runs never take GPU memory.
      group: run the seeds of a cell still to do as one seed group (`group_seeds`; the
        progress lines then show one line per group, with its seeds' mean accuracies); False:
        one run per seed.

    Raises:
      ValueError: bad launcher settings, Ray missing, two runs sharing a workdir.
      DataError: a dataset that runs to do need is missing (checked before any run starts).
    """
    start = time.perf_counter()
    check_launcher(launcher, ray_address, ray_cpus_per_run, ray_gpus_per_run)
    stream = (stream or sys.stdout) if progress else None
    workdirs = [pathlib.Path(r.workdir).resolve() for r in runs]
    if len(set(workdirs)) != len(workdirs):
        raise ValueError("two runs of the sweep share a workdir")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")

    outcomes, todo = _stored_outcomes(runs, data_dir, force, stream)
    check_data((runs[i] for i in todo), data_dir)
    units, note = _units(runs, todo, outcomes, group)

    def announce(workers: int, how: str) -> _Printer:
        if stream:
            print(f"sweep: {len(runs)} runs, {len(todo)} to run, {workers} at a time ({how})"
                  f"{note}", file=stream, flush=True)
        return _Printer(len(units), stream, time.perf_counter(), show_node=launcher == "ray")

    indexed = list(enumerate(unit for _, unit in units))
    if launcher == "ray" and todo:
        from esacl_jax.harness.sweep import ray_launcher

        with ray_launcher.RaySession(ray_address or None, jobs, ray_cpus_per_run,
                                     ray_gpus_per_run, isolate, data_dir) as session:
            printer = announce(min(session.concurrency, len(units)), session.describe())
            done = session.run(indexed, printer)
    else:
        workers = min(jobs, max(1, len(units)))
        how = "a fresh process per run" if isolate else "in this process" if workers == 1 \
            else "worker processes"
        printer = announce(workers, how)
        done = _run_local(indexed, workers, isolate, data_dir, printer) if todo else {}
    for u, outcome in done.items():
        members, unit = units[u]
        if unit.seeds:
            outcomes.update(_member_outcomes(unit, outcome, [(i, runs[i]) for i in members]))
        else:
            outcomes[members[0]] = outcome

    result = SweepResult(tuple(outcomes[i] for i in range(len(runs))),
                         time.perf_counter() - start)
    if stream:
        _print_summary(result, stream)
    return result


def _units(runs: Sequence[Run], todo: list[int], outcomes: dict[int, Outcome],
           group: bool) -> tuple[list[tuple[tuple[int, ...], Run]], str]:
    """What `run_all` runs: (positions in `runs`, the run or seed group) per unit, and the note
    its first line gets (runs skipped, seed groups)."""
    skipped = sum(o.status == "skipped" for o in outcomes.values())
    note = f"; skipping {skipped} with results.json (--force redoes them)" if skipped else ""
    units = group_seeds([(i, runs[i]) for i in todo]) if group else \
        [((i,), runs[i]) for i in todo]
    groups = sum(len(members) > 1 for members, _ in units)
    if groups:
        note += f"; as {len(units)} units ({groups} seed groups: --nogroup_seeds runs each alone)"
    return units, note


def _stored_outcomes(runs: Sequence[Run], data_dir: str | None, force: bool,
                     stream: TextIO | None) -> tuple[dict[int, Outcome], list[int]]:
    """The outcomes of the runs whose results.json exists (skipped, or failed when it was made
    with another config) and the indices of the runs still to do."""
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, run in enumerate(runs):
        if not force and run.results_path.exists():
            outcomes[i] = check_existing(run, data_dir)
            if outcomes[i].status == "failed" and stream:
                print(f"FAILED {run.name}: {outcomes[i].error}", file=stream, flush=True)
        else:
            todo.append(i)
    return outcomes, todo


def _print_summary(result: SweepResult, stream: TextIO) -> None:
    """The sweep's last lines: counts, time, and each failed run on a line of its own."""
    print(f"sweep: {result.count('done')} ran, {result.count('skipped')} skipped, "
          f"{len(result.failed)} failed in {format_duration(result.wall_time_s)}",
          file=stream, flush=True)
    for outcome in result.failed:
        print(f"  failed: {outcome.run.name}: {outcome.error}", file=stream, flush=True)


def _run_local(todo: Sequence[tuple[int, Run]], workers: int, isolate: bool,
               data_dir: str | None, printer: _Printer) -> dict[int, Outcome]:
    """The local launcher: this process, a "spawn" pool, or a fresh process per run."""
    outcomes: dict[int, Outcome] = {}
    if workers == 1 and not isolate:
        for i, run in todo:
            outcomes[i] = execute(run, data_dir)
            printer(outcomes[i])
        return outcomes
    if isolate:
        pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(workers)
        task = _execute_isolated
    else:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker)
        task = execute
    runs = dict(todo)
    with pool:
        futures = {pool.submit(task, run, data_dir): i for i, run in todo}
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
            stop_child_processes()
            raise
    return outcomes


def stop_child_processes() -> None:
    """SIGTERM to every worker process this process started (`multiprocessing`): a run in one
    stops at its next chunk (saving a checkpoint when checkpointing is on), a worker between
    runs or still importing ends at once; nothing goes on behind an interrupted sweep."""
    for child in multiprocessing.active_children():
        child.terminate()
