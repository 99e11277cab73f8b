"""Sweeps: many (benchmark, method, overrides, seed) runs, resumable, optionally in parallel.

A `Run` names one experiment: a benchmark config module (`experiments/configs/<benchmark>.py`),
a protocol row of it (`get_config(method)`), dotted overrides (``{"esacl.gamma": 1.0}``), a seed
and a workdir. `run_all` executes a list of them:

- a run whose workdir already holds a results.json is skipped (so a sweep resumes where it
  stopped); `force=True` redoes it. A results.json written with a *different* config (say a
  smoke run with --max_train_per_task into the same --out) is never reused silently: that run
  fails with a message naming the differing fields.
- `jobs > 1` runs a pool of "spawn" worker processes; each imports JAX once and runs many
  configs, clearing JAX's caches between them. `isolate=True` gives every run a fresh process
  instead: results.json's measured peak memory is a per-process peak, so only isolated runs
  measure their own (the comparison isolates; the ablation, which reports no memory, does not).
- a failing run is reported on one line with its name and the sweep goes on; the returned
  `SweepResult.exit_code` is non-zero when any run failed.

The ablation and comparison entry points (`experiments.ablation`, `experiments.compare`) build
their run lists here and share the report provenance helpers. This module reads no flags.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import datetime
import importlib
import json
import math
import multiprocessing
import os
import pathlib
import pkgutil
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

import ml_collections

# Top-level fields that do not change what a run computes (where the data live, progress output,
# whether the state is checkpointed, whether file checksums are verified): a stored results.json
# that differs from the planned config only in these is still reused.
_IGNORED_CONFIG_KEYS = frozenset(
    {"data_dir", "progress", "tensorboard", "checkpoint", "verify_checksums"})
# Fields added to the schema after runs had been stored, each with the value that reproduces what
# a run made before the field existed computed. A stored run that lacks one of these counts as
# made with that value; one that lacks any other field of the planned config, or has a field the
# schema no longer has, counts as made with another config. Add an entry with every new field.
_LEGACY_VALUES = {
    "esacl.init_rescale": False,  # before b7f6aae: the plain magnitude-pruned init
    "esacl.mask_update_steps": 0,  # before b7f6aae: masks only updated between epochs
}
# Method-specific config sections and the only methods that read them: for any other method a
# difference there does not change what the run computed (e.g. a new EsaCL default must not
# invalidate stored DER++ runs).
_SECTION_READERS = {
    "esacl": frozenset({"esacl"}),
    "sparcl": frozenset({"sparcl", "sparcl_ewc", "sparcl_er", "sparcl_derpp"}),
    "prune_retrain": frozenset({"prune_retrain"}),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One experiment of a sweep.

    Attributes:
      benchmark: config module name under experiments/configs (``split_mnist``).
      method: the protocol row passed to its ``get_config`` (``esacl``).
      overrides: config fields to set afterwards; dotted keys reach sub-dicts
        (``{"esacl.gamma": 1.0}``). Unknown fields are an error, never silently added.
      seed: ``config.seed``.
      workdir: where results.json is written.
      group: the table row the run belongs to (e.g. an ablation variant); free text.
    """

    benchmark: str
    method: str
    overrides: Mapping[str, Any]
    seed: int
    workdir: pathlib.Path
    group: str = ""

    @property
    def name(self) -> str:
        """A short unique label for progress lines: ``split_mnist/esacl/s0.9/seed0``."""
        sparsity = next((v for k, v in self.overrides.items() if k.endswith(".sparsity")), None)
        parts = [self.benchmark, self.group or self.method]
        if sparsity is not None:
            parts.append(f"s{sparsity:g}")
        parts.append(f"seed{self.seed}")
        return "/".join(parts)

    @property
    def results_path(self) -> pathlib.Path:
        return pathlib.Path(self.workdir) / "results.json"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to one run: ``status`` is "done", "skipped" or "failed"."""

    run: Run
    status: str
    class_il: float | None = None  # average accuracy in [0, 1]
    task_il: float | None = None
    wall_time_s: float | None = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """All outcomes of `run_all`, in the order of the run list."""

    outcomes: tuple[Outcome, ...]
    wall_time_s: float

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def usable_runs(self) -> list[Run]:
        """Runs whose results.json belongs to the planned config (done now or skipped)."""
        return [o.run for o in self.outcomes if o.status in ("done", "skipped")]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


# --------------------------------------------------------------------------------------------
# Configs


def available_benchmarks() -> list[str]:
    """Benchmark config modules under experiments/configs (every module but ``common``)."""
    import experiments.configs as configs

    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "common")


def config_module(benchmark: str) -> Any:
    """The ``experiments.configs.<benchmark>`` module; ValueError naming the known ones."""
    known = available_benchmarks()
    if benchmark not in known:
        raise ValueError(f"no config for benchmark {benchmark!r}; choose from {', '.join(known)}")
    return importlib.import_module(f"experiments.configs.{benchmark}")


def parse_value(text: str) -> Any:
    """A Python literal (``0.5``, ``False``, ``(100, 100)``) or else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["esacl.rho=0.1", "model=resnet18"]`` -> ``{"esacl.rho": 0.1, "model": "resnet18"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. esacl.rho=0.1)")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Sets dotted fields in place. Missing fields and type mismatches raise with the key named."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise KeyError(f"override {dotted!r}: config has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"override {dotted!r}: config has no field {leaf!r}")
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as err:
            raise TypeError(f"override {dotted}={value!r}: {err}") from err


def build_config(run: Run, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The run's protocol row + overrides + seed, with progress bars and TensorBoard off."""
    config = config_module(run.benchmark).get_config(run.method)
    apply_overrides(config, run.overrides)
    config.seed = run.seed
    config.progress = False
    config.tensorboard = False
    if data_dir:
        config.data_dir = str(data_dir)
    return config


def _plain(config: ml_collections.ConfigDict) -> dict:
    """The config as stored in results.json (JSON types: tuples become lists)."""
    from esacl_jax.harness.results import to_jsonable

    return json.loads(json.dumps(to_jsonable(config.to_dict())))


def config_differences(planned: Mapping, stored: Mapping, prefix: str = "") -> list[str]:
    """``"field: stored -> planned"`` for every field whose value differs between two configs.

    A field only one side has is a difference too, except a field of `_LEGACY_VALUES` that the
    stored run lacks and the planned run sets to its legacy value (the behaviour from before the
    field existed). `_IGNORED_CONFIG_KEYS` at the top level and the method-specific sections of
    `_SECTION_READERS` that the planned run's method does not read are never compared.
    """
    diffs = []
    method = planned.get("method") if not prefix else None
    for key in sorted(planned.keys() | stored.keys()):
        if not prefix and key in _IGNORED_CONFIG_KEYS:
            continue
        if not prefix and key in _SECTION_READERS and method not in _SECTION_READERS[key]:
            continue
        name = f"{prefix}{key}"
        if key not in stored:
            value = planned[key]
            if isinstance(value, Mapping):  # a whole new section: compare each of its fields
                diffs += config_differences(value, {}, f"{name}.")
            elif name not in _LEGACY_VALUES:
                diffs.append(f"{name}: (not recorded) -> {value!r}")
            elif value != _LEGACY_VALUES[name]:
                diffs.append(f"{name}: (not recorded: {_LEGACY_VALUES[name]!r}) -> {value!r}")
            continue
        if key not in planned:
            diffs.append(f"{name}: {stored[key]!r} -> (not in the config schema)")
            continue
        a, b = planned[key], stored[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += config_differences(a, b, f"{name}.")
        elif a != b:
            diffs.append(f"{name}: {b!r} -> {a!r}")
    return diffs


def _check_existing(run: Run, data_dir: str | None) -> Outcome:
    """A skip for a results.json made by the same config, else a failure saying what differs."""
    try:
        stored = json.loads(run.results_path.read_text(encoding="utf-8"))
        planned = _plain(build_config(run, data_dir))
    except Exception as err:  # noqa: BLE001 - reported as this run's failure
        return Outcome(run, "failed", error=f"cannot reuse {run.results_path}: {_one_line(err)}")
    diffs = config_differences(planned, stored.get("config") or {})
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; +{len(diffs) - 4} more" if len(diffs) > 4 else "")
        return Outcome(run, "failed", error=f"{run.results_path} was made with another config "
                       f"({shown}): pass --force to redo it or choose another --out")
    metrics = stored.get("metrics") or {}
    return Outcome(run, "skipped", class_il=_accuracy(metrics, "class_il"),
                   task_il=_accuracy(metrics, "task_il"), wall_time_s=stored.get("wall_time_s"))


# --------------------------------------------------------------------------------------------
# Execution


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _accuracy(metrics: Mapping, setting: str) -> float | None:
    value = (metrics.get(setting) or {}).get("average_accuracy")
    return float(value) if isinstance(value, (int, float)) else None


def execute(run: Run, data_dir: str | None = None) -> Outcome:
    """Builds the run's config and trains it; any exception becomes a "failed" outcome."""
    import jax

    from esacl_jax.harness.loop import train_and_evaluate

    start = time.perf_counter()
    try:
        config = build_config(run, data_dir)
        result = train_and_evaluate(config, run.workdir, progress=False)
        metrics = result["metrics"]
        return Outcome(run, "done", class_il=_accuracy(metrics, "class_il"),
                       task_il=_accuracy(metrics, "task_il"),
                       wall_time_s=float(result.get("wall_time_s", time.perf_counter() - start)))
    except Exception as err:  # noqa: BLE001 - one bad run must not stop the sweep
        return Outcome(run, "failed", wall_time_s=time.perf_counter() - start,
                       error=_one_line(err))
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
      isolate: run each config in a fresh process (about 3 s more per run). Needed when the
        measured peak memory matters: it is a per-process peak, so runs sharing a process
        would report the largest peak of all runs before them.
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
            outcomes[i] = _check_existing(run, data_dir)
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
                                              error=f"worker process failed: {_one_line(err)}")
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


# --------------------------------------------------------------------------------------------
# Results and provenance


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


def format_list(values: Iterable[Any]) -> str:
    """Comma-separated flag value: ``0.75,0.9,0.95``."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def provenance(command: str, evaluation: str, results: Sequence[dict] = (),
               jobs: int = 1) -> dict[str, str]:
    """What produced a report: command, commit, machine, evaluation split, result commits."""
    import jax

    from esacl_jax.harness.results import git_commit

    devices = jax.devices()
    kinds = sorted({str(d.device_kind) for d in devices})
    info = {
        "command": command,
        "git commit": git_commit(),
        "machine": (f"{platform.platform()}; {os.cpu_count()} CPU cores; JAX {jax.__version__} "
                    f"backend {jax.default_backend()}, {len(devices)} device(s): "
                    f"{', '.join(kinds)}"),
        "evaluation split": evaluation,
        "runs at a time (--jobs)": (f"{jobs}: wall times include the contention between "
                                    "parallel runs" if jobs > 1 else "1"),
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    commits = sorted({str((r.get("environment") or {}).get("git_commit")) for r in results
                      if (r.get("environment") or {}).get("git_commit")})
    if commits:
        info["results from commit(s)"] = ", ".join(commits)
    return info


def provenance_markdown(title: str, info: Mapping[str, str]) -> str:
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
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def evaluation_split(validation_fraction: float) -> str:
    if validation_fraction > 0:
        return (f"validation: {validation_fraction:g} of each task's training set held out "
                "(stratified); the test set is not used")
    return "test"


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def exit_with(run: Callable[[], int]) -> None:
    """The sweeps' command-line contract: run, then exit 0/1; one-line errors exit 2 (bad
    settings, missing data), an interrupt exits 130 with the finished runs kept."""
    from esacl_jax.harness.data import DataError

    try:
        code = run()
    except (ValueError, DataError) as err:
        hint = " (here: --data_dir=DIR)" if isinstance(err, DataError) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def define_common_flags(defaults: Any, sparsity_help: str) -> None:
    """The absl flags every sweep shares, with `defaults` (a Settings instance) as defaults.

    Called only when a sweep module runs as a program, so importing several sweep modules
    (tests) never defines a flag twice.
    """
    from absl import flags

    d = defaults
    flags.DEFINE_list("benchmarks", list(d.benchmarks), "Benchmarks (experiments/configs names).")
    flags.DEFINE_list("sparsities", [f"{s:g}" for s in d.sparsities], sparsity_help)
    flags.DEFINE_list("seeds", [str(s) for s in d.seeds], "Seeds.")
    flags.DEFINE_integer("jobs", d.jobs, "Worker processes.")
    flags.DEFINE_string("out", d.out, "Output directory (one workdir per run below it).")
    flags.DEFINE_float("validation_fraction", d.validation_fraction,
                       "Held-out fraction of each task's training set evaluated instead of the "
                       "test set; 0 evaluates on test.")
    flags.DEFINE_integer("max_train_per_task", d.max_train_per_task,
                         "Training examples per task (0: all; for quick smoke runs).")
    flags.DEFINE_integer("epochs", d.epochs, "Epochs per task (0: the protocol's).")
    flags.DEFINE_integer("buffer_size", d.buffer_size, "Replay buffer size.")
    flags.DEFINE_string("data_dir", d.data_dir, "Dataset directory (else $ESACL_DATA_DIR).")
    flags.DEFINE_bool("force", d.force, "Redo runs whose results.json exists.")
    flags.DEFINE_bool("isolate", d.isolate, "Run each config in a fresh process (about 3 s more "
                      "per run); only then is the measured peak memory the run's own.")
    flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every run, repeatable "
                              "(e.g. --set=steps_per_call=500).")
    flags.DEFINE_bool("dry_run", False, "Only list the planned runs.")


def common_settings(f: Any) -> dict[str, Any]:
    """The Settings fields of the flags `define_common_flags` defines, read from parsed `f`."""
    return dict(
        benchmarks=tuple(f.benchmarks), sparsities=tuple(float(s) for s in f.sparsities),
        seeds=tuple(int(s) for s in f.seeds), jobs=f.jobs, out=f.out,
        validation_fraction=f.validation_fraction, max_train_per_task=f.max_train_per_task,
        epochs=f.epochs, buffer_size=f.buffer_size, data_dir=f.data_dir, force=f.force,
        isolate=f.isolate, overrides=tuple(f.set))
