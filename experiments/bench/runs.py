"""Speed benchmark: whole-run wall time and peak RSS per method, and per-step cost ratios.

    python -m experiments.bench.runs --data_dir=../shared/data [--out=docs/bench.md]

1. Whole runs: `python -m experiments.main` for each method on split_mnist, in a fresh process
   (import, data load, compilation, 5 tasks, evaluation), timed from outside, with the child's
   peak RSS.
2. Step cost: the compiled training chunk of each method on the same task-0 batches, after
   compilation, reported in microseconds per step and as a ratio to dense DER++.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from absl import app, flags

from esacl_jax.harness.sweep.provenance import portable_command

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with mnist/ (else $ESACL_DATA_DIR).")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown report to this file.")
_RUNS = flags.DEFINE_list("runs", ["finetune", "derpp", "esacl"], "Methods for whole runs.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repetitions of each measurement (best is kept).")
_STEPS = flags.DEFINE_integer("steps", 1000, "Steps timed per step-cost measurement.")
_PERMUTED_TASKS = flags.DEFINE_integer(
    "permuted_tasks", 50, "permuted_mnist finetune run with this many tasks: per-task time and "
    "memory must stay flat (0: skip).")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Whole runs with JAX's persistent compilation cache in this directory (filled by one "
    "untimed run per method first): the start-up cost of a repeated run.")

REPO = pathlib.Path(__file__).resolve().parents[2]

# (label, method row, esacl overrides) for the step-cost table.
STEP_VARIANTS = [
    ("finetune", "finetune", {}),
    ("DER++ (dense)", "derpp", {}),
    ("EsaCL (published default: C, rho 0.01, gamma 0.25)", "esacl", {}),
    ("EsaCL C, no SAM (rho 0)", "esacl", {"rho": 0.0}),
    ("EsaCL C, IDS score=random", "esacl", {"ids_score": "random"}),
    ("EsaCL C, gamma 0.5", "esacl", {"gamma": 0.5}),
    ("EsaCL B, rho 0.05 (METHOD.md reference)", "esacl",
     {"step_variant": "B", "rho": 0.05, "gamma": 0.5}),
    ("EsaCL A, rho 0.05", "esacl", {"step_variant": "A", "rho": 0.05, "gamma": 0.5}),
    ("EsaCL B, no IDS (gamma=1)", "esacl", {"step_variant": "B", "rho": 0.05, "gamma": 1.0}),
    ("EsaCL B, IDS score=clean_loss", "esacl",
     {"step_variant": "B", "rho": 0.05, "gamma": 0.5, "ids_score": "clean_loss"}),
]


def cache_env(cache_dir: str | None) -> dict[str, str]:
    """The environment of a child run using JAX's persistent compilation cache in `cache_dir`
    (every compilation cached: the harness's are many small ones under the 1 s default)."""
    env = dict(os.environ)
    # experiments.main caches compilations by default: off unless a cache is asked for, so
    # whole runs measure cold starts.
    env["ESACL_COMPILATION_CACHE"] = str(cache_dir) if cache_dir else "0"
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def whole_run(method: str, data_dir: str, workdir: pathlib.Path,
              cache_dir: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `experiments.main` split_mnist run in a new process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    run_main(f"split_mnist.py:{method}", data_dir, workdir, cache_dir)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024


def run_main(config: str, data_dir: str, workdir: pathlib.Path, cache_dir: str | None,
             *overrides: str) -> None:
    """One `experiments.main` run of experiments/configs/<config> in a fresh process (no
    progress bars or TensorBoard); its last stderr line in the error if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main", f"--config=experiments/configs/{config}",
         f"--workdir={workdir}", f"--config.data_dir={data_dir}", *overrides,
         "--config.progress=False", "--config.tensorboard=False"],
        cwd=REPO, capture_output=True, text=True, env=cache_env(cache_dir))
    if proc.returncode:
        raise RuntimeError(f"{config} run failed: {proc.stderr.strip().splitlines()[-1]}")


def step_cost_us(method: str, overrides: dict, data_dir: str, steps: int, repeats: int) -> float:
    """Best-of-`repeats` microseconds per compiled train step on split_mnist task 0 batches."""
    import jax
    import numpy as np

    from esacl_jax.harness import loop as train
    from experiments.configs import split_mnist

    config = split_mnist.get_config(method)
    config.data_dir = data_dir
    config.esacl.update(overrides)
    benchmark, m = train.build_config_method(config)
    run_chunk = train.make_train_chunk(m)
    x, y, ctx = train.task_arrays(benchmark, 0)
    task = benchmark.tasks[0]
    chunk = config.steps_per_call
    batch_idx, valid, _ = train.epoch_batches(
        jax.random.key(1), np.arange(task.num_train, dtype=np.int32), config.batch_size, chunk)
    state = m.init(jax.random.key(0))
    state, _ = run_chunk(state, x, y, batch_idx[:chunk], valid[:chunk], ctx)  # compile
    jax.block_until_ready(state)
    best = float("inf")
    for _ in range(repeats):
        start, done = time.perf_counter(), 0
        while done < steps:
            i = chunk + done % (batch_idx.shape[0] - 2 * chunk)
            i -= i % chunk
            state, _ = run_chunk(state, x, y, batch_idx[i:i + chunk], valid[i:i + chunk], ctx)
            done += chunk
        jax.block_until_ready(state)
        best = min(best, (time.perf_counter() - start) / done * 1e6)
    return best


def permuted_rows(data_dir: str, num_tasks: int, workdir: pathlib.Path,
                  cache: str | None) -> list[str]:
    """permuted_mnist finetune with `num_tasks` tasks: per-task train time and process RSS at
    tasks 1, 10, 20, ... (permutations are applied lazily, so both stay flat)."""
    run_main("permuted_mnist.py:finetune", data_dir, workdir, cache,
             f"--config.num_tasks={num_tasks}")
    result = json.loads((workdir / "results.json").read_text())
    shown = sorted({0, *range(9, num_tasks, 10), num_tasks - 1})
    lines = ["", f"## permuted_mnist, {num_tasks} tasks (finetune, batch 128)", "",
             "| task | train time (s) | eval time (s) | process RSS after the task (MiB) |",
             "|---|---|---|---|"]
    for t in shown:
        rss = result["per_task"][t].get("host_rss_bytes")
        lines.append(f"| {t + 1} | {result['train_time_per_task_s'][t]:.2f} | "
                     f"{result['eval_time_per_task_s'][t]:.2f} | "
                     f"{'' if rss is None else f'{rss / 2**20:.0f}'} |")
    peak = result["memory"]["measured"]["host_peak_rss_bytes"] / 2**20
    lines.append(f"\nPeak RSS of the whole run: {peak:.0f} MiB (task 1 includes compilation).")
    return lines


def main(argv: list[str]) -> None:
    del argv
    data_dir = _DATA_DIR.value or os.environ.get("ESACL_DATA_DIR")
    if not data_dir:
        print("error: pass --data_dir or set ESACL_DATA_DIR (a directory holding mnist/)",
              file=sys.stderr)
        sys.exit(1)
    from esacl_jax.harness.results import environment

    env = environment()
    lines = ["# Speed benchmark (split_mnist, batch 10, buffer 500, sparsity 0.9)", "",
             "- command: `python -m experiments.bench.runs "
             f"{portable_command(' '.join(sys.argv[1:]))}`",
             f"- commit: {env['git_commit']}",
             f"- machine: {env['platform']}, {env['cpu_count']} CPUs, jax {env['packages']['jax']}"
             f" on {env['backend']} ({', '.join(env['devices'])})", "",
             "## Whole runs (fresh process: import, data, compile, 5 tasks, evaluation)", "",
             "| method | wall time (s), best of runs | peak RSS (MiB) |", "|---|---|---|"]
    tmp = REPO / "runs" / "bench"
    cache = _CACHE.value
    if cache:
        lines[-4] += f" (warm persistent compilation cache in {cache})"
        for method in _RUNS.value:  # fill the cache
            whole_run(method, data_dir, tmp / method, cache)
    # Interleaved (A B A B ...), so a change of machine load hits every method alike.
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in _RUNS.value}
    for _ in range(_REPEATS.value):
        for method in _RUNS.value:
            results[method].append(whole_run(method, data_dir, tmp / method, cache))
    walls = {}
    for method, runs in results.items():
        walls[method] = min(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        lines.append(f"| {method} | {walls[method]:.2f} (all: "
                     f"{', '.join(f'{r[0]:.2f}' for r in runs)}) | {rss:.0f} |")
        print(lines[-1], flush=True)
    if "derpp" in walls:
        lines += ["", "Ratio to DER++ (best whole run): " + ", ".join(
            f"{m} {w / walls['derpp']:.2f}x" for m, w in walls.items() if m != "derpp")]
    lines += ["", "## Step cost (compiled chunk, same batches, best of repeats)", "",
              "| step | us/step | ratio to DER++ |", "|---|---|---|"]
    costs = {}
    for label, method, overrides in STEP_VARIANTS:
        costs[label] = step_cost_us(method, overrides, data_dir, _STEPS.value, _REPEATS.value)
    for label, cost in costs.items():
        lines.append(f"| {label} | {cost:.0f} | {cost / costs['DER++ (dense)']:.2f} |")
    if _PERMUTED_TASKS.value:
        lines += permuted_rows(data_dir, _PERMUTED_TASKS.value, tmp / "permuted", cache)
    report = "\n".join(lines) + "\n"
    print(report)
    if _OUT.value:
        from esacl_jax.harness.atomic_io import write_text_atomic

        write_text_atomic(_OUT.value, report)


if __name__ == "__main__":
    app.run(main)
