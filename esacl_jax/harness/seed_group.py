"""Seeds as one program: the seeds of one (benchmark, method, config) trained together.

`--config.seeds=0,1,2,3,4` runs those seeds in one process. Each seed's train state is built
exactly as its separate run builds it (its own benchmark, method object, initialisation and
PRNG key); the states are stacked along a leading seed axis and one compiled program, the
method's training chunk under `jax.vmap`, trains them all. The host-side hooks (task and epoch
boundaries, mask refreshes, SparCL's and CO2L's end-of-task work, epoch indices, evaluation,
FLOPs and memory accounting) run per seed, with that seed's method object, on its slice of the
stacked state. Each seed writes the results.json its separate run would write, in
`WORKDIR/seed<N>/` (its own config and `seed`, plus `seed_group`: the seeds it trained with);
the group's checkpoints live in `WORKDIR/checkpoints`.

Times in a seed's record (`wall_time_s`, `train_time_per_task_s`) are the group's: the seeds
share one program, so no seed has a time of its own.

The seed axis and the data-parallel mesh do not compose: a group trains on one device; it
refuses an explicit mesh (num_devices > 1) in one line, and with num_devices=0 (every device)
and several visible says in one line that the seed axis wins (`check_group`). The measured peak
memory in a seed's record is the group process's.
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esacl_jax.harness import atomic_io, compilation, distributed
from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness import memory as memory_lib
from esacl_jax.harness.methods import TrainState
from esacl_jax.harness.methods.base import make_train_chunk
from esacl_jax.harness.methods.costs import count_passes
from esacl_jax.harness.run_logger import make_logger


def parse_seeds(value: str | Any) -> tuple[int, ...]:
    """The seeds of `--config.seeds` ("0,1,2,3,4"; empty: none).

    Args:
      value: the field's value: a comma-separated string, an int or a sequence of ints.

    Returns:
      The seeds, in the order given.

    Raises:
      ValueError: one line, for a value that is not distinct non-negative integers.
    """
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    else:
        items = list(value)
    try:
        seeds = tuple(int(item) for item in items)
    except (TypeError, ValueError):
        raise ValueError(f"seeds must be comma-separated integers such as 0,1,2,3,4, got "
                         f"{value!r}") from None
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be >= 0, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {value!r}")
    return seeds


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of `seed`'s separate run: `config` with `seed` set and `seeds` empty.

    Args:
      config: the group's config.
      seed: one of its seeds.

    Returns:
      An unlocked copy (what the seed's results.json records as its config).
    """
    one = ml_collections.ConfigDict(config.to_dict())
    one.seed = int(seed)
    one.seeds = ""
    return one


def seed_dir(workdir: pathlib.Path, seed: int) -> pathlib.Path:
    """Where seed `seed` of a group in `workdir` writes its results: WORKDIR/seed<N>."""
    return pathlib.Path(workdir) / f"seed{seed}"


def check_group(config: ml_collections.ConfigDict, seeds: tuple[int, ...]) -> None:
    """Refuses, in one line, what a seed group cannot do.

    Args:
      config: the group's config.
      seeds: its seeds.

    Raises:
      ValueError: no seeds, several processes, or a data-parallel mesh of several devices.
    """
    if not seeds:
        raise ValueError("seeds is empty: give the seeds to train together, e.g. "
                         "--config.seeds=0,1,2,3,4")
    if distributed.is_multiprocess() or config.get("distributed", False):
        raise ValueError("a seed group runs in one process: drop --config.distributed or "
                         "--config.seeds")
    if config.num_devices > 1:
        raise ValueError(f"the seed axis and a data-parallel mesh of {config.num_devices} "
                         "devices do not compose: a seed group trains on one device, set "
                         "--config.num_devices=1 (or drop --config.seeds)")


def warn_if_devices_idle(config: ml_collections.ConfigDict) -> None:
    """num_devices=0 (every device) with several visible: one line on stderr saying the seed
    axis wins and the group trains on one device."""
    if config.num_devices == 0 and jax.device_count() > 1:
        print(f"note: the seed axis wins over the data-parallel mesh: the seed group trains on "
              f"one of the {jax.device_count()} visible devices", file=sys.stderr, flush=True)


class _TreeProgram:
    """A jitted function of pytrees compiled once per argument structure and shapes, cheaply
    (`compilation.one_shot_options`): stacking the seeds' states is one program, not one eager
    operation (and one small compilation) per leaf."""

    def __init__(self, fn: Callable[..., Any], static_argnums: tuple[int, ...] = ()):
        self._jitted = jax.jit(fn, static_argnums=static_argnums)
        self._static = static_argnums
        self._compiled: dict[Any, Any] = {}

    def __call__(self, *args: Any) -> Any:
        dynamic = [a for i, a in enumerate(args) if i not in self._static]
        leaves, treedef = jax.tree.flatten(dynamic)
        key = (treedef, tuple(compilation.arg_spec(x) for x in leaves),
               tuple(args[i] for i in self._static))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._jitted.lower(*args).compile(
                compiler_options=compilation.one_shot_options())
            self._compiled[key] = compiled
        return compiled(*dynamic)


_stack = _TreeProgram(lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states))
_unstack = _TreeProgram(
    lambda stacked, count: [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(count)],
    static_argnums=(1,))


def stack(states: list[Any]) -> Any:
    """The per-seed pytrees stacked along a new leading seed axis (one compiled program)."""
    return _stack(list(states))


def unstack(stacked: Any, count: int) -> list[Any]:
    """The `count` per-seed slices of a stacked pytree (one compiled program)."""
    return _unstack(stacked, count)


def make_group_chunk(run_chunk: Callable, shared_data: bool) -> Callable:
    """`run_chunk` over a leading seed axis: one compiled program for every seed.

    Args:
      run_chunk: `make_train_chunk(method)`'s function.
      shared_data: True: every seed trains on the same task arrays (passed once, unbatched);
        False: the task arrays carry the seed axis too.

    Returns:
      `group_chunk(states, x_all, y_all, batch_idx, valid, ctx)`, every argument but the shared
      task arrays with a leading seed axis; the stacked state is donated.
    """
    data_axis = None if shared_data else 0
    return jax.jit(jax.vmap(run_chunk, in_axes=(0, data_axis, data_axis, 0, 0, 0)),
                   donate_argnums=(0,))


@dataclass(eq=False)
class SeedRun:
    """One seed of a group: its config, benchmark and method (as its separate run builds them)
    and what its results.json records, filled in as the group trains."""

    seed: int
    config: ml_collections.ConfigDict
    benchmark: Any
    method: Any
    counter: flops_lib.FlopsCounter | None = None
    class_il: np.ndarray | None = None
    task_il: np.ndarray | None = None
    per_task: list[dict] = field(default_factory=list)
    flops_per_task: list[float] = field(default_factory=list)
    # within the current task:
    examples_seen: int = 0
    indices: np.ndarray | None = None  # the epoch's custom indices (None: all examples)
    logger: Any = None

    def record(self) -> dict:
        """What a checkpoint keeps of this seed beside its slice of the train state."""
        t = len(self.per_task)
        return {"seed": self.seed, "class_il": self.class_il[:t], "task_il": self.task_il[:t],
                "per_task": self.per_task, "flops_per_task": self.flops_per_task,
                "flops_total": self.counter.total, "examples_seen": self.examples_seen,
                "indices": self.indices, "f_fwd": self.counter.f_fwd,
                "f_wgrad": self.counter.f_wgrad}

    def restore(self, record: dict) -> None:
        """Takes back what `record` kept."""
        t = len(record["per_task"])
        width = self.class_il.shape[1]
        self.class_il[:t] = np.asarray(record["class_il"], dtype=float).reshape(-1, width)
        self.task_il[:t] = np.asarray(record["task_il"], dtype=float).reshape(-1, width)
        self.per_task, self.flops_per_task = record["per_task"], record["flops_per_task"]
        self.counter.total = record["flops_total"]
        self.examples_seen = record["examples_seen"]
        self.indices = None if record["indices"] is None else np.asarray(record["indices"],
                                                                         np.int32)


def build_group(config: ml_collections.ConfigDict, seeds: tuple[int, ...],
                make_method: Callable[..., Any]) -> list[SeedRun]:
    """Each seed's (config, benchmark, method), built as its separate run builds them; seeds
    whose benchmarks hold the same arrays share one benchmark object's data on the device."""
    from esacl_jax.harness.loop import build_config_method

    runs = []
    for seed in seeds:
        one = seed_config(config, seed)
        benchmark, method = build_config_method(one, make_method=make_method)
        runs.append(SeedRun(seed, one, benchmark, method))
    names = {type(r.method) for r in runs}
    if len(names) != 1:
        raise ValueError("the seeds of a group built different method classes: run them "
                         "separately")
    return runs


def shared_test_sets(benchmarks: list[Any]) -> bool:
    """Whether every benchmark holds the first one's test arrays and scenario (a group's seeds
    then evaluate in one vmapped pass)."""
    first = benchmarks[0]

    def same(b: Any) -> bool:
        return b is first or (
            b.scenario == first.scenario and len(b.tasks) == len(first.tasks) and
            all(np.array_equal(t.x_test, u.x_test) and np.array_equal(t.y_test, u.y_test)
                for t, u in zip(b.tasks, first.tasks, strict=True)))

    return all(same(b) for b in benchmarks[1:])


def init_states(runs: list[SeedRun]) -> list[TrainState]:
    """Each seed's initial state, as its run computes it; one compilation for seeds whose
    initialisation programs are the same (their jaxprs print alike)."""
    compiled: dict[str, Any] = {}
    states = []
    for run in runs:
        key = jax.random.key(run.seed)
        text = str(jax.make_jaxpr(run.method.init)(key))
        program = compiled.get(text)
        if program is None:
            program = jax.jit(run.method.init).lower(key).compile(
                compiler_options=compilation.one_shot_options())
            compiled[text] = program
        states.append(program(key))
    return states


def task_data(runs: list[SeedRun], task_id: int, capacity: int,
              ) -> tuple[list[tuple[np.ndarray, np.ndarray]], jax.Array, jax.Array, bool]:
    """Each seed's training arrays of `task_id`, and the padded device arrays the chunk reads:
    one copy when every seed has the same arrays (shared=True), else stacked by seed."""
    from esacl_jax.harness.loop import pad_to

    host = [run.method.training_data(task_id) for run in runs]
    x0, y0 = host[0]
    shared = all(x is x0 or (x.shape == x0.shape and np.array_equal(x, x0) and
                             np.array_equal(y, y0)) for x, y in host[1:])
    if shared:
        return (host, jax.device_put(pad_to(x0, capacity)),
                jax.device_put(pad_to(y0.astype(np.int32), capacity)), True)
    xs = np.stack([pad_to(x, capacity) for x, _ in host])
    ys = np.stack([pad_to(y.astype(np.int32), capacity) for _, y in host])
    return host, jax.device_put(xs), jax.device_put(ys), False


def train_seed_group(config: ml_collections.ConfigDict, workdir: pathlib.Path, progress: bool,
                     on_task_end: Callable[[int, Any, Any], None] | None,
                     make_method: Callable[..., Any], stop: Any, start: float,
                     ) -> dict[str, Any]:
    """Trains the seeds of `config.seeds` as one program and writes each seed's results.

    Called by `loop.train_and_evaluate` (which holds the workdir lock and the signal handlers)
    for a config with `seeds`.

    Args:
      config: the group's config.
      workdir: the group's directory (each seed writes WORKDIR/seed<N>/results.json).
      progress: print progress bars and per-task lines.
      on_task_end: called after each task as `on_task_end(task_id, methods, stacked_state)`
        with the list of the seeds' method objects.
      make_method: builds each seed's method (`loop.train_and_evaluate`).
      stop: the loop's `_StopSignals`.
      start: `time.perf_counter()` when the run started.

    Returns:
      {"seeds": [...], "runs": [each seed's results dict, in the order of `seeds`]}.

    Raises:
      ValueError, TrainingError, atomic_io.WriteError, RunInterrupted as
      `loop.train_and_evaluate` does.
    """
    from esacl_jax.harness import loop

    seeds = parse_seeds(config.seeds)
    check_group(config, seeds)
    warn_if_devices_idle(config)
    runs = build_group(config, seeds, make_method)
    for run in runs:
        atomic_io.check_writable(seed_dir(workdir, run.seed))
    group = _Group(config, workdir, runs, progress, stop, start, loop)
    group.train(on_task_end)
    return {"seeds": list(seeds), "runs": group.results()}


class _Group:
    """The group's training loop, in the phases of `loop._run`: set up, a task (its epochs and
    chunks), the end of a task, results."""

    def __init__(self, config, workdir, runs: list[SeedRun], progress: bool, stop: Any,
                 start: float, loop: Any):
        self.config, self.workdir, self.runs = config, pathlib.Path(workdir), runs
        self.progress, self.stop, self.start, self.loop = progress, stop, start, loop
        self.lead = runs[0].method
        self.t_count = runs[0].benchmark.num_tasks
        if any(r.benchmark.num_tasks != self.t_count for r in runs):
            raise ValueError("the seeds of a group have benchmarks of different task counts: "
                             "run them separately")
        self.capacity = max(r.method.training_data(t)[1].shape[0]
                            for r in runs for t in range(self.t_count))
        self.run_chunk = make_train_chunk(self.lead)
        self.chunks: dict[bool, Callable] = {}
        self.predict = loop.make_predict(self.lead, runs[0].benchmark)
        # Evaluation: the seeds' forward passes as one vmapped program (`_evaluate`).
        self.predict_seeds = jax.jit(jax.vmap(self.predict, in_axes=(0, 0, None)))
        self.shared_tests = shared_test_sets([run.benchmark for run in runs])
        # The group's chunk compiles in a thread, from the shapes of its arguments, while the
        # states are initialised (as a single run's does, `loop._compile_in_background`).
        self.chunk_compile = self._compile_in_background()
        self.state = stack(init_states(runs))
        for run, one in zip(runs, unstack(self.state, len(runs)), strict=True):
            run.counter = flops_lib.FlopsCounter(run.method.flops_layers(one.params,
                                                                         one.batch_stats))
            run.class_il = np.full((self.t_count, self.t_count), np.nan)
            run.task_il = np.full((self.t_count, self.t_count), np.nan)
            run.logger = make_logger(seed_dir(workdir, run.seed), bool(config.tensorboard))
        self.train_times: list[float] = []
        self.eval_times: list[float] = []
        self.earlier_wall_time = 0.0
        self.checkpointer = None
        self.every = int(config.get("checkpoint_every_steps", 0)) if config.checkpoint else 0
        self.first_task, self.resume = 0, None
        if config.checkpoint:
            self._restore()

    def _compile_in_background(self) -> compilation.BackgroundCompile:
        config, count = self.config, len(self.runs)

        def seeded(spec: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((count, *spec.shape), spec.dtype,
                                        weak_type=spec.weak_type)

        state = jax.tree.map(seeded, jax.eval_shape(self.lead.init, jax.random.key(0)))
        _, x_dev, y_dev, shared = task_data(self.runs, 0, self.capacity)
        ctx = jax.tree.map(seeded, jax.eval_shape(
            lambda: self.loop.task_context(self.runs[0].benchmark, 0)))
        return compilation.BackgroundCompile(
            self._chunk_fn(shared), state, x_dev, y_dev,
            jax.ShapeDtypeStruct((count, config.steps_per_call, config.batch_size), np.int32),
            jax.ShapeDtypeStruct((count, config.steps_per_call), np.bool_), ctx)

    # ----- checkpoints -----
    def _restore(self) -> None:
        from esacl_jax.harness.checkpoint import RunCheckpointer

        self.checkpointer = RunCheckpointer(self.workdir / "checkpoints", self.config.to_dict())
        self.checkpointer.check_space(self.state)
        restored = self.checkpointer.restore(self.state)
        if restored is None:
            return
        self.state, done = restored
        saved = [record["seed"] for record in done["seeds"]]
        if saved != [run.seed for run in self.runs]:
            from esacl_jax.harness.checkpoint import CheckpointError

            raise CheckpointError(f"{self.checkpointer.directory} holds checkpoints of the seed "
                                  f"group {saved}: use a new --workdir or delete that directory")
        self.first_task = done["tasks_done"]
        for run, record in zip(self.runs, done["seeds"], strict=True):
            run.restore(record)
        self.train_times, self.eval_times = done["train_times"], done["eval_times"]
        self.earlier_wall_time = done["wall_time_s"]
        self.resume = done["in_task"]
        self.resumed_records = done["seeds"]
        if self.progress:
            where = (f"task {self.first_task + 1}" if self.resume is None else
                     f"task {self.resume['task'] + 1}, epoch {self.resume['epoch'] + 1}")
            print(f"resuming the seed group at {where} from {self.checkpointer.directory}",
                  flush=True)

    def _save(self, tasks_done: int, in_task: dict | None) -> None:
        self.checkpointer.save(self.state, atomic_io.to_jsonable({
            "tasks_done": tasks_done, "seeds": [run.record() for run in self.runs],
            "train_times": self.train_times, "eval_times": self.eval_times,
            "wall_time_s": self.earlier_wall_time + time.perf_counter() - self.start,
            "in_task": in_task}))

    def _interrupt(self, signum: int, where: str):
        import signal

        name = signal.Signals(signum).name
        if self.checkpointer is not None:
            return self.loop.RunInterrupted(
                signum, f"interrupted by {name} {where}: the seed group's state saved in "
                f"{self.checkpointer.directory}; the same command resumes there")
        return self.loop.RunInterrupted(
            signum, f"interrupted by {name} {where}: nothing was saved (with "
            "--config.checkpoint=True the same command resumes)")

    # ----- per-seed hooks on slices of the stacked state -----
    def _each(self, fn: Callable[[int, SeedRun, TrainState], TrainState]) -> None:
        """`fn(position, run, its state)` for every seed; the new states stacked again."""
        slices = unstack(self.state, len(self.runs))
        self.state = stack([fn(i, run, one) for i, (run, one) in
                            enumerate(zip(self.runs, slices, strict=True))])

    def _chunk_fn(self, shared: bool) -> Callable:
        if shared not in self.chunks:
            self.chunks[shared] = make_group_chunk(self.run_chunk, shared)
        return self.chunks[shared]

    # ----- training -----
    def train(self, on_task_end) -> None:
        self.steps_since_save = 0
        for task_id in range(self.first_task, self.t_count):
            self._train_task(task_id)
            if on_task_end is not None:
                on_task_end(task_id, [r.method for r in self.runs], self.state)
            signum = self.stop.pending()
            if signum is not None and task_id + 1 < self.t_count:
                raise self._interrupt(signum, f"after task {task_id + 1}")
        for run in self.runs:
            run.logger.close()
        if self.checkpointer is not None:
            self.checkpointer.close()

    def _train_task(self, task_id: int) -> None:
        config, loop = self.config, self.loop
        mid = self.resume if self.resume is not None and self.resume["task"] == task_id else None
        task_start = time.perf_counter() - (mid["train_time_s"] if mid else 0.0)
        host, x_dev, y_dev, shared = task_data(self.runs, task_id, self.capacity)
        ctx = stack([loop.task_context(r.benchmark, task_id) for r in self.runs])
        if mid is None:
            def begin(i: int, run: SeedRun, one: TrainState) -> TrainState:
                run.examples_seen = 0
                one = one.replace(task_id=jnp.asarray(task_id, jnp.int32))
                return run.method.begin_task(one, task_id)

            self._each(begin)
            first_epoch = 0
        else:
            first_epoch = mid["epoch"]
        bar = self.loop.progress_bar(
            desc=f"task {task_id + 1}/{self.t_count} ({len(self.runs)} seeds)", unit="step",
            disable=not self.progress, file=sys.stdout, leave=True, dynamic_ncols=True)
        for epoch in range(first_epoch, config.epochs):
            resumed = mid is not None and epoch == mid["epoch"]
            self._train_epoch(task_id, epoch, host, x_dev, y_dev, shared, ctx, bar,
                              mid["chunk"] if resumed else None, task_start,
                              first=epoch == first_epoch)
        bar.close()
        self._finish_task(task_id, host, task_start)

    def _epoch_batches(self, task_id: int, epoch: int, host, first_chunk: int | None):
        """Each seed's epoch set-up (indices, begin_epoch, FLOPs densities, shuffled batches),
        as its run does it; resumed mid-epoch: the saved indices and FLOPs costs instead."""
        config, loop = self.config, self.loop
        batches = []

        def begin(i: int, run: SeedRun, one: TrainState) -> TrainState:
            n = host[i][0].shape[0]
            if first_chunk is None:
                run.indices = run.method.epoch_indices(one, task_id, epoch, n)
                one = run.method.begin_epoch(one, task_id, epoch)
                run.counter.set_densities(*run.method.flops_densities(one))
            else:
                run.counter.set_densities(*run.method.flops_densities(one))
                record = self.resumed_records[i]
                run.counter.f_fwd, run.counter.f_wgrad = record["f_fwd"], record["f_wgrad"]
            indices = run.indices if run.indices is not None else np.arange(n, dtype=np.int32)
            batches.append(loop.epoch_batches(one.rng, indices, config.batch_size,
                                              config.steps_per_call,
                                              folds=(1_000_003 + task_id, epoch)))
            return one

        self._each(begin)
        length = max(b[0].shape[0] for b in batches)
        batch_idx = np.stack([np.concatenate([b[0], np.zeros((length - b[0].shape[0],
                                                               config.batch_size), np.int32)])
                              for b in batches])
        valid = np.stack([np.concatenate([b[1], np.zeros((length - b[1].shape[0],), bool)])
                          for b in batches])
        return batch_idx, valid, [b[2] for b in batches]

    def _train_epoch(self, task_id, epoch, host, x_dev, y_dev, shared, ctx, bar,
                     first_chunk: int | None, task_start: float, first: bool) -> None:
        config = self.config
        spc = config.steps_per_call
        batch_idx, valid, steps = self._epoch_batches(task_id, epoch, host, first_chunk)
        first_chunk = first_chunk or 0
        if first:
            bar.reset(total=max(steps) * config.epochs)
            bar.update(min(max(steps), first_chunk * spc) + max(steps) * epoch)
        chunk_fn = self._chunk_fn(shared)
        for c in range(first_chunk * spc, batch_idx.shape[1], spc):
            sl = slice(c, c + spc)
            if self.chunk_compile is not None:  # the first chunk: wait for its compilation
                self.chunk_compile.wait()
                self.chunk_compile = None
            self.state, metrics = chunk_fn(self.state, x_dev, y_dev, batch_idx[:, sl],
                                           valid[:, sl], ctx)
            losses = np.asarray(metrics.loss)
            accuracies = np.asarray(metrics.accuracy)
            step_counts = np.asarray(self.state.step)
            for i, run in enumerate(self.runs):
                ok = valid[i, sl]
                chunk_loss = losses[i][ok]
                if not np.all(np.isfinite(chunk_loss)):
                    raise self.loop.TrainingError(
                        f"loss became NaN/inf in task {task_id} epoch {epoch} of seed "
                        f"{run.seed}: lower --config.learning_rate (now "
                        f"{config.learning_rate}) or check the data")
                count_passes(run.counter, run.method.step_passes_for_task(task_id),
                             int(ok.sum()))
                if ok.any():
                    run.logger.scalars({"train/loss": float(np.mean(chunk_loss)),
                                        "train/accuracy": float(np.mean(accuracies[i][ok])),
                                        "train/flops": run.counter.total}, int(step_counts[i]))
            done = int(valid[:, sl].sum(axis=1).max())
            bar.update(done)
            self.steps_since_save += done
            due = self.every > 0 and self.steps_since_save >= self.every
            signum = self.stop.pending()
            if self.checkpointer is not None and (due or signum is not None):
                self._save(task_id, {"task": task_id, "epoch": epoch, "chunk": c // spc + 1,
                                     "train_time_s": time.perf_counter() - task_start})
                self.steps_since_save = 0
            if signum is not None:
                bar.close()
                raise self._interrupt(signum, f"in task {task_id + 1}, epoch {epoch + 1}")
        for run, count in zip(self.runs, steps, strict=True):
            run.examples_seen += count * config.batch_size

    def _finish_task(self, task_id: int, host, task_start: float) -> None:
        loop = self.loop

        def end(i: int, run: SeedRun, one: TrainState) -> TrainState:
            x_np, y_np = host[i]
            one = run.method.end_task(one, task_id, x_np, y_np)
            run.counter.set_densities(*run.method.flops_densities(one))
            count_passes(run.counter, run.method.end_task_passes(x_np.shape[0]), 1)
            run.flops_per_task.append(run.counter.total)
            return one

        self._each(end)
        jax.block_until_ready(self.state)
        self.train_times.append(time.perf_counter() - task_start)
        eval_start = time.perf_counter()
        slices = unstack(self.state, len(self.runs))
        for run, (class_il, task_il) in zip(
                self.runs, self._evaluate(slices, task_id), strict=True):
            run.class_il[task_id], run.task_il[task_id] = class_il, task_il
        self.eval_times.append(time.perf_counter() - eval_start)
        for run, one in zip(self.runs, slices, strict=True):
            run.per_task.append({"task": task_id,
                                 "classes": list(run.benchmark.tasks[task_id].classes),
                                 "train_examples_seen": run.examples_seen,
                                 "host_rss_bytes": memory_lib.current_rss_bytes(),
                                 **run.method.summary(one)})
            loop.log_task(run.logger, run.per_task[-1], run.class_il[task_id],
                          run.task_il[task_id], run.counter.total)
            run.indices = None
        if self.checkpointer is not None:
            self._save(task_id + 1, None)
            self.steps_since_save = 0
        if self.progress:
            seen = slice(0, task_id + 1)
            accs = " ".join(f"{100 * np.nanmean(r.class_il[task_id, seen]):.2f}"
                            for r in self.runs)
            print(f"  after task {task_id + 1}: class-IL by seed {accs}", flush=True)

    def _evaluate(self, slices: list[TrainState], task_id: int,
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each seed's class-IL and task-IL row after `task_id`: one vmapped forward pass over
        the seeds' evaluation variables when they share their test sets, else seed by seed."""
        loop, batch = self.loop, self.config.eval_batch_size
        if not self.shared_tests:
            return [loop.evaluate(run.method, self.predict, one, run.benchmark, task_id, batch)
                    for run, one in zip(self.runs, slices, strict=True)]
        # The seeds' evaluation variables taken from the stacked state (no restacking).
        params, batch_stats = jax.vmap(self.lead.eval_variables)(self.state)
        benchmark = self.runs[0].benchmark
        logits = [loop.predict_logits(self.predict_seeds, params, batch_stats, task.x_test,
                                      batch, axis=1) for task in benchmark.tasks]
        return [loop.task_accuracies(run.benchmark, task_id, [t[i] for t in logits])
                for i, run in enumerate(self.runs)]

    # ----- results -----
    def results(self) -> list[dict[str, Any]]:
        """Each seed's results.json record, written to WORKDIR/seed<N>/."""
        wall = self.earlier_wall_time + time.perf_counter() - self.start
        out = []
        for run, one in zip(self.runs, unstack(self.state, len(self.runs)), strict=True):
            result = self.loop.run_result(
                run.config, run.benchmark, run.method, one, run.class_il, run.task_il,
                train_times=self.train_times, eval_times=self.eval_times,
                per_task=run.per_task, counter=run.counter, flops_per_task=run.flops_per_task,
                num_devices=1, wall_time_s=wall)
            result["seed_group"] = [r.seed for r in self.runs]
            out.append(self.loop.write_results(seed_dir(self.workdir, run.seed), run.method,
                                               one, result))
        return out
