"""The continual loop: for each task, train compiled epochs, then evaluate every task.

Data flows one way: config -> benchmark -> method (state + pure step) -> this loop -> results.json.
The loop knows nothing about which method it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from esacl_jax import metrics as metrics_lib
from esacl_jax.harness import atomic_io, compilation, distributed, export_model, interrupts
from esacl_jax.harness import flops as flops_lib
from esacl_jax.harness import memory as memory_lib
from esacl_jax.harness import results as results_lib
from esacl_jax.harness.config import sparse_start_of
from esacl_jax.harness.data import Benchmark, class_mask, load_benchmark, preprocess
from esacl_jax.harness.methods import (
    Method,
    TaskContext,
    TrainState,
    build_method,
    method_class,
)
from esacl_jax.harness.methods.base import make_train_chunk, task_context
from esacl_jax.harness.methods.costs import count_passes, memory_footprint, weight_counts
from esacl_jax.harness.models import MODELS, build_model, forward
from esacl_jax.harness.run_logger import make_logger


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN). The message says what to do."""


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects impossible values with one line saying what is wrong and what to do."""
    from esacl_jax.harness.data import BENCHMARKS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(config.benchmark in BENCHMARKS,
         f"unknown benchmark {config.benchmark!r}; choose one of {', '.join(sorted(BENCHMARKS))}")
    method_class(config.method)  # raises for an unknown method
    need(config.model in MODELS,
         f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}")
    need(config.batch_size > 0, f"batch_size must be > 0, got {config.batch_size}")
    need(config.eval_batch_size > 0, f"eval_batch_size must be > 0, got {config.eval_batch_size}")
    need(config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}")
    need(config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}")
    need(config.num_tasks >= 0,
         f"num_tasks must be >= 0 (0 = the protocol's), got {config.num_tasks}")
    need(config.steps_per_call > 0, f"steps_per_call must be > 0, got {config.steps_per_call}")
    every = config.get("checkpoint_every_steps", 0)
    need(every >= 0, f"checkpoint_every_steps must be >= 0 (0: at task ends only), got {every}")
    need(0.0 <= config.validation_fraction < 1.0,
         f"validation_fraction must be in [0, 1), got {config.validation_fraction}")
    sparse_start_of(config, warn=True)  # refuses a misspelt start or a conflicting alias
    if config.get("seeds"):
        from esacl_jax.harness import seed_group

        seed_group.check_group(config, seed_group.parse_seeds(config.seeds))


def load_config_benchmark(config: ml_collections.ConfigDict) -> Benchmark:
    return load_benchmark(
        config.benchmark,
        data_dir=config.data_dir or None,
        seed=config.seed,
        class_order_seed=None if config.class_order_seed < 0 else config.class_order_seed,
        num_tasks=config.num_tasks or None,
        max_train_per_task=config.max_train_per_task or None,
        max_test_per_task=config.max_test_per_task or None,
        validation_fraction=config.validation_fraction,
        verify_checksums=config.verify_checksums,
    )


def build_model_for(config: ml_collections.ConfigDict, benchmark: Benchmark):
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    return build_model(config.model, benchmark.num_classes, widths=tuple(config.mlp_widths),
                       nf=config.resnet_nf, dtype=dtype, mlp_init=config.mlp_init)


def build_config_method(config: ml_collections.ConfigDict, benchmark: Benchmark | None = None,
                        make_method: Callable[..., Any] = build_method) -> tuple[Benchmark, Any]:
    """(benchmark, method) of a config: the benchmark it names (unless one is given) and the
    method built on the config's model, as a run builds them."""
    if benchmark is None:
        benchmark = load_config_benchmark(config)
    return benchmark, make_method(config, build_model_for(config, benchmark), benchmark)


def task_arrays(benchmark: Benchmark, task_id: int) -> tuple[jax.Array, jax.Array, TaskContext]:
    """Task `task_id`'s training images and int32 labels on the default device, and its context:
    what `make_train_chunk`'s function takes, for driving it outside the loop (benchmarks,
    tests)."""
    task = benchmark.tasks[task_id]
    return (jax.device_put(task.x_train), jax.device_put(task.y_train.astype(np.int32)),
            task_context(benchmark, task_id))


def make_predict(method: Method, benchmark: Benchmark):
    mean, std = benchmark.mean, benchmark.std

    @jax.jit
    def predict(params, batch_stats, x_raw):
        logits, _ = forward(method.model, params, batch_stats, preprocess(x_raw, mean, std),
                            train=False)
        return logits.astype(jnp.float32)

    return predict


def predict_logits(predict, params, batch_stats, x: np.ndarray, batch_size: int,
                   axis: int = 0) -> np.ndarray:
    """Logits for a whole test set in fixed-size chunks (the last one padded): one compilation.

    Args:
      predict: the compiled forward pass, (params, batch_stats, x) -> logits.
      params: the parameters `predict` reads.
      batch_stats: the batch-norm statistics `predict` reads.
      x: the test inputs, examples first.
      batch_size: the chunk size (`predict`'s compiled batch).
      axis: the axis of `predict`'s logits that holds the examples (1 for a seed group's
        vmapped predict, whose logits are seeds x examples x classes).

    Returns:
      The logits of every example of `x`, concatenated along `axis`.
    """
    n = x.shape[0]
    out = []
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        logits = np.asarray(predict(params, batch_stats, chunk))
        out.append(logits[(slice(None),) * axis + (slice(0, batch_size - pad),)])
    return np.concatenate(out, axis=axis) if out else np.zeros((0, 0), np.float32)


def masked_accuracy(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    if labels.shape[0] == 0:
        return float("nan")
    masked = np.where(mask[None, :], logits, -np.inf)
    return float(np.mean(np.argmax(masked, axis=-1) == labels))


def evaluate(method: Method, predict, state: TrainState, benchmark: Benchmark, trained_up_to: int,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-IL and task-IL accuracy on every task after training task `trained_up_to`.

    Class-IL: argmax over the classes seen so far. Task-IL: argmax over the evaluated task's
    classes. Domain-IL: both are the argmax over all classes.
    """
    params, batch_stats = method.eval_variables(state)
    return task_accuracies(
        benchmark, trained_up_to,
        [predict_logits(predict, params, batch_stats, task.x_test, batch_size)
         for task in benchmark.tasks])


def task_accuracies(benchmark: Benchmark, trained_up_to: int,
                    logits_by_task: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Class-IL and task-IL accuracy of each task's test logits (`evaluate`'s rule).

    Args:
      benchmark: the benchmark whose tasks' test labels and classes score the logits.
      trained_up_to: the last task trained (its classes and those before are "seen").
      logits_by_task: each task's test-set logits, in task order.

    Returns:
      (class_il, task_il): one accuracy per task.
    """
    k = benchmark.num_classes
    seen = class_mask(benchmark.classes_up_to(trained_up_to), k)
    class_il, task_il = [], []
    for task, logits in zip(benchmark.tasks, logits_by_task, strict=True):
        if benchmark.scenario == "domain_il":
            acc = masked_accuracy(logits, task.y_test, np.ones((k,), bool))
            class_il.append(acc)
            task_il.append(acc)
        else:
            class_il.append(masked_accuracy(logits, task.y_test, seen))
            task_il.append(masked_accuracy(logits, task.y_test, class_mask(task.classes, k)))
    return np.asarray(class_il), np.asarray(task_il)


def pad_to(array: np.ndarray, capacity: int) -> np.ndarray:
    """Zero-pads the leading axis to `capacity`, so every task's arrays have one shape and the
    compiled chunk is reused (batch indices never point into the padding)."""
    pad = capacity - array.shape[0]
    if pad <= 0:
        return array
    return np.concatenate([array, np.zeros((pad, *array.shape[1:]), array.dtype)])


def _padded_permutation_fn(key: jax.Array, folds: jax.Array, n: jax.Array, *, size: int,
                           num_rounds: int) -> jax.Array:
    """jax.random.permutation's sort-based shuffle of arange(n) inside an array of `size`: the
    positions >= n get the largest sort key, so the (stable) sorts keep them last and the first
    n entries are bit for bit `jax.random.permutation(fold_in(...fold_in(key, folds[0])...), n)`
    (the loop's per-task and per-epoch keys are folded in here, not by eager ops that would
    each compile a program of their own)."""
    for i in range(folds.shape[0]):
        key = jax.random.fold_in(key, folds[i])
    x = jnp.arange(size, dtype=jnp.int32)
    real = x < n
    for _ in range(num_rounds):
        key, subkey = jax.random.split(key)
        bits = jnp.where(real, jax.random.bits(subkey, (size,), jnp.uint32),
                         jnp.uint32(np.iinfo(np.uint32).max))
        _, x = jax.lax.sort_key_val(bits, x)
    return x


# Run once an epoch: compiled cheaply, once per power-of-two size bucket (`compilation`).
_padded_permutation = compilation.OneShot(_padded_permutation_fn, ("size", "num_rounds"))


def permutation(key: jax.Array, n: int, folds: tuple[int, ...] = ()) -> np.ndarray:
    """`jax.random.permutation(key', n)` with key' = key with `folds` folded in one by one,
    compiled once per power-of-two size bucket instead of once per n (each task's training set
    has its own size: a compilation per task before)."""
    size = 1 << max(0, (n - 1).bit_length())
    num_rounds = int(np.ceil(3 * np.log(max(1, n)) / np.log(np.iinfo(np.uint32).max)))
    folds_array = np.asarray(folds, np.uint32).reshape(-1)
    return np.asarray(_padded_permutation(key, folds_array, np.int32(n), size=size,
                                          num_rounds=num_rounds))[:n]


def epoch_batches(key: jax.Array, indices: np.ndarray, batch_size: int, steps_per_call: int,
                  folds: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, int]:
    """Shuffles `indices` (with `key`, `folds` folded into it), drops the incomplete last batch,
    pads to whole chunks.

    Returns (batch_idx [chunks*steps_per_call, B], valid [same leading dim], real step count).
    """
    order = permutation(key, indices.shape[0], folds)
    shuffled = indices[order]
    steps = shuffled.shape[0] // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {indices.shape[0]} examples "
                         "of the task: lower --config.batch_size")
    batch_idx = shuffled[: steps * batch_size].reshape(steps, batch_size)
    padded = math.ceil(steps / steps_per_call) * steps_per_call
    valid = np.zeros((padded,), bool)
    valid[:steps] = True
    batch_idx = np.concatenate([batch_idx, np.zeros((padded - steps, batch_size), batch_idx.dtype)])
    return batch_idx.astype(np.int32), valid, steps


def log_task(logger, summary: dict, class_il_row: np.ndarray, task_il_row: np.ndarray,
             flops: float) -> None:
    """TensorBoard scalars after a task: accuracy on each task so far, sparsity, FLOPs."""
    task_id = summary["task"]
    values = {"eval/class_il_acc": np.mean(class_il_row[: task_id + 1]),
              "eval/task_il_acc": np.mean(task_il_row[: task_id + 1]),
              "eval/cumulative_flops": flops}
    for j in range(task_id + 1):
        values[f"eval_class_il/task_{j}"] = class_il_row[j]
        values[f"eval_task_il/task_{j}"] = task_il_row[j]
    if "sparsity" in summary:
        values["sparsity/global"] = summary["sparsity"]["prunable_sparsity"]
    logger.scalars(values, task_id)


def make_data_mesh(num_devices: int, batch_size: int) -> jax.sharding.Mesh | None:
    """A 1-D ("data",) mesh over the first `num_devices` devices (0: all); None for one device.

    Data parallelism is plain jit + NamedSharding: the train state is replicated, each batch is
    split along its leading axis, and XLA inserts the gradient all-reduce (the documented
    successor of pmap). Works the same on CPU devices, GPUs and TPU slices, and over the devices
    of several processes (`esacl_jax.harness.distributed`: then every device, in `jax.devices()`
    order, i.e. grouped by process).
    """
    available = jax.device_count()
    n = available if num_devices == 0 else num_devices
    if n > available:
        raise ValueError(f"num_devices={n} but only {available} devices are visible")
    if distributed.is_multiprocess() and n != available:
        raise ValueError(f"num_devices={n} but a run of {jax.process_count()} processes uses "
                         f"all their {available} devices: set --config.num_devices=0")
    if n <= 1:
        return None
    if batch_size % n:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {n} devices "
                         "of the data-parallel mesh: change --config.batch_size or num_devices")
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))


def format_matrix(name: str, matrix: np.ndarray) -> str:
    t = matrix.shape[1]
    lines = [f"{name} accuracy (%) — row i: after task i, column j: task j",
             "        " + " ".join(f"{'T' + str(j):>6}" for j in range(t))]
    for i, row in enumerate(matrix):
        lines.append(f"after {i:<2}" + " ".join(f"{100 * v:6.1f}" for v in row))
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    m = result["metrics"]
    lines = [format_matrix("class-IL", np.asarray(result["class_il_matrix"])), "",
             format_matrix("task-IL", np.asarray(result["task_il_matrix"])), "",
             f"{'':14}{'ACC':>8}{'learn':>8}{'BWT':>8}{'forget':>8}"]
    for setting in ("class_il", "task_il"):
        s = m[setting]
        lines.append(f"{setting:14}{100 * s['average_accuracy']:8.2f}"
                     f"{100 * s['learning_accuracy']:8.2f}"
                     f"{100 * s['backward_transfer']:8.2f}{100 * s['forgetting']:8.2f}")
    if "weights" in result:
        w = result["weights"]
        lines.append(f"weights: {w['nonzero']:,} nonzero of {w['total']:,} "
                     f"(sparsity over all weights {100 * w['sparsity']:.1f}%)")
    lines.append(f"training FLOPs {result['training_flops']:.4g}; peak host RSS "
                 f"{result['memory']['measured']['host_peak_rss_bytes'] / 2**20:.0f} MiB")
    lines.append(f"wall time {result['wall_time_s']:.1f} s "
                 f"(train {sum(result['train_time_per_task_s']):.1f} s)")
    return "\n".join(lines)


TaskEndCallback = Callable[[int, Any, Any], None]


def progress_bar(**kwargs: Any) -> tqdm.tqdm:
    """`tqdm.tqdm(**kwargs)` under a thread lock. tqdm's default lock holds a multiprocessing RLock,
    a named semaphore registered with multiprocessing's resource tracker: a sweep's worker that
    is stopped by SIGTERM leaves it behind, and the tracker prints "leaked semaphore" lines under
    the sweep's one-line exit. A run's bars are one process's, so a thread lock is all they need;
    a lock the program already set (`tqdm.tqdm.set_lock`) is kept."""
    if getattr(tqdm.tqdm, "_lock", None) is None:
        tqdm.tqdm.set_lock(threading.RLock())
    return tqdm.tqdm(**kwargs)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run at a chunk boundary (after saving a checkpoint when
    checkpointing is on). `exit_code` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class _StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`; the loop checks it after every compiled
    chunk, saves and stops. A second signal interrupts at once (KeyboardInterrupt). Handlers are
    installed only in the main thread (the only one Python delivers signals to), and not for a
    signal the process ignores (SIG_IGN: a sweep's worker process, whose parent turns Ctrl-C into
    one SIGTERM; taking SIGINT there too would make that SIGTERM a second signal)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def pending(self) -> int | None:
        """The signal to stop for, agreed by every process of a multi-process run (a signal
        to any one of them stops all at the same chunk boundary); one process: `signum`."""
        if not distributed.is_multiprocess():
            return self.signum
        return distributed.agree(self.signum or 0) or None

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
                # A signal recorded by the handler this one replaces (an entry point's, before
                # the run started: `experiments.main`) is taken over, not lost.
                earlier = getattr(getattr(self._previous[sig], "__self__", None), "signum", None)
                if self.signum is None and isinstance(earlier, int):
                    self.signum = earlier
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       *, progress: bool = True,
                       on_task_end: TaskEndCallback | None = None,
                       make_method: Callable[..., Any] = build_method) -> dict[str, Any]:
    """Runs the whole continual experiment and writes workdir/results.json atomically.

    `on_task_end(task_id, method, state)` is called after each task is trained, evaluated (and
    checkpointed), with the method object and its train state: the hook for inspecting or
    interrupting a run. `make_method(config, model, benchmark)` builds the method (default: the
    registry's class for config.method; tests pass an instrumented subclass).

    Before loading data the workdir is proved writable and locked (`workdir/.lock`) against a
    second run. With config.checkpoint, the state is saved every config.checkpoint_every_steps
    steps (at a chunk boundary) and after every task, and a restarted run resumes from the latest
    good checkpoint, mid-task included, to the same result. SIGINT/SIGTERM stop the run at the
    next chunk boundary (saving first) with RunInterrupted. However the run ends, the programs
    it compiles in background threads are joined before this returns or raises (`compilation`).

    With config.seeds ("0,1,2"), the seeds train together as one vmapped program and each writes
    workdir/seed<N>/results.json (`esacl_jax.harness.seed_group`); the return value is then
    {"seeds": [...], "runs": [each seed's results dict]}, and `on_task_end` receives the list of
    the seeds' methods and the stacked state.

    Returns the results dict. Raises ValueError (bad config, unusable checkpoint), DataError
    (data), TrainingError, atomic_io.WriteError (a write failed: one line; when results.json
    itself failed, the error's `result` holds the results), WorkdirBusyError or RunInterrupted.
    """
    start = time.perf_counter()
    validate_config(config)
    distributed.initialize(config)  # several processes: before any other JAX call
    workdir = pathlib.Path(workdir)
    atomic_io.check_writable(workdir)
    # Leaving the block in any way first joins the run's background threads (`compilation`:
    # an interpreter finalizing during an XLA compilation aborts) and closes the run's writers,
    # then restores the signal handlers, then releases the lock.
    with _workdir_lock(workdir), _StopSignals() as stop, contextlib.ExitStack() as resources:
        resources.enter_context(interrupts.redelivered())  # a second signal inside a GC callback
        resources.enter_context(compilation.owned_threads())
        if config.get("seeds"):  # several seeds as one program (`seed_group`)
            from esacl_jax.harness import seed_group

            return seed_group.train_seed_group(config, workdir, progress, on_task_end,
                                               make_method, stop, start)
        return _run(config, workdir, progress, on_task_end, make_method, stop, start, resources)


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path):
    """The workdir lock, held by process 0 alone in a multi-process run; when process 0 cannot
    take it, every process raises (none waits for the others at a collective). One process:
    an ordinary lock (`distributed.agree` is then the process's own flag)."""
    lock = atomic_io.WorkdirLock(workdir) if distributed.is_primary() else None
    failure: BaseException | None = None
    if lock is not None:
        try:
            lock.acquire()
        except (atomic_io.WorkdirBusyError, atomic_io.WriteError) as err:
            failure = err
    if distributed.agree(int(failure is not None)):
        if failure is not None:
            raise failure
        raise atomic_io.WorkdirBusyError(f"process 0 could not lock workdir {workdir}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _compile_in_background(method: Method, run_chunk: Callable, predict: Callable,
                           key: jax.Array, capacity: int, replicated: Any, batch_sharding: Any,
                           ) -> tuple[compilation.BackgroundCompile,
                                      compilation.BackgroundCompile | None]:
    """Starts compiling the training chunk and the prediction from the shapes of the arguments
    the loop will call them with (the state's from `jax.eval_shape` of its initialisation)."""
    config, benchmark = method.config, method.benchmark

    def placed(spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, weak_type=spec.weak_type,
                                    sharding=replicated)

    state = jax.eval_shape(method.init, key)
    if replicated is not None:
        state = jax.tree.map(placed, state)
    x0 = method.training_data(0)[0]
    chunk = compilation.BackgroundCompile(
        run_chunk, state,
        jax.ShapeDtypeStruct((capacity, *x0.shape[1:]), x0.dtype, sharding=replicated),
        jax.ShapeDtypeStruct((capacity,), np.int32, sharding=replicated),
        jax.ShapeDtypeStruct((config.steps_per_call, config.batch_size), np.int32,
                             sharding=batch_sharding),
        jax.ShapeDtypeStruct((config.steps_per_call,), np.bool_), task_context(benchmark, 0))
    try:
        eval_variables = jax.eval_shape(method.eval_variables, state)
    except Exception:  # noqa: BLE001 - not traceable: evaluation compiles it when first called
        return chunk, None
    prediction = compilation.BackgroundCompile(
        predict, *eval_variables, jax.ShapeDtypeStruct(
            (config.eval_batch_size, *benchmark.input_shape), benchmark.tasks[0].x_test.dtype))
    return chunk, prediction


@dataclasses.dataclass
class RunRecord:
    """What a run carries from task to task beside the train state, and what a checkpoint keeps
    of it: `snapshot` (the checkpoint's progress record) and `restore` (back from one)."""

    class_il: np.ndarray  # [tasks, tasks] class-IL accuracy; row i: after task i (NaN: not yet)
    task_il: np.ndarray  # [tasks, tasks] task-IL accuracy
    counter: flops_lib.FlopsCounter  # the training FLOPs so far
    train_times: list[float] = dataclasses.field(default_factory=list)  # seconds, per task
    eval_times: list[float] = dataclasses.field(default_factory=list)  # seconds, per task
    per_task: list[dict] = dataclasses.field(default_factory=list)  # each task's summary
    flops_per_task: list[float] = dataclasses.field(default_factory=list)  # cumulative FLOPs
    earlier_wall_time: float = 0.0  # seconds of the processes before a resumption

    @classmethod
    def empty(cls, num_tasks: int, counter: flops_lib.FlopsCounter) -> RunRecord:
        """The record of a run before its first task.

        Args:
          num_tasks: the benchmark's tasks.
          counter: the run's FLOPs counter.

        Returns:
          A record with NaN accuracy matrices and empty lists.
        """
        return cls(np.full((num_tasks, num_tasks), np.nan),
                   np.full((num_tasks, num_tasks), np.nan), counter)

    def wall_time(self, start: float) -> float:
        """The run's wall time across resumptions (this process's began at `start`)."""
        return self.earlier_wall_time + time.perf_counter() - start

    def snapshot(self, tasks_done: int, in_task: dict | None, start: float) -> dict:
        """Everything the loop needs to go on from here (beside the train state).

        Args:
          tasks_done: tasks trained and evaluated.
          in_task: where in the next task the run stands (None: at the task boundary).
          start: when this process's run began (`time.perf_counter`).

        Returns:
          A JSON-able dict (the checkpoint's progress record).
        """
        return atomic_io.to_jsonable({
            "tasks_done": tasks_done, "class_il": self.class_il[:tasks_done],
            "task_il": self.task_il[:tasks_done], "train_times": self.train_times,
            "eval_times": self.eval_times, "per_task": self.per_task,
            "flops_per_task": self.flops_per_task, "flops_total": self.counter.total,
            "wall_time_s": self.wall_time(start), "in_task": in_task})

    def restore(self, done: dict) -> tuple[int, dict | None]:
        """Takes back a `snapshot`.

        Args:
          done: the progress record of a checkpoint.

        Returns:
          (tasks done, where in the next task the run stands: None at a task boundary).
        """
        first_task, t_count = done["tasks_done"], self.class_il.shape[1]
        self.class_il[:first_task] = np.asarray(done["class_il"], dtype=float).reshape(-1, t_count)
        self.task_il[:first_task] = np.asarray(done["task_il"], dtype=float).reshape(-1, t_count)
        self.train_times, self.eval_times = done["train_times"], done["eval_times"]
        self.per_task, self.flops_per_task = done["per_task"], done["flops_per_task"]
        self.counter.total = done["flops_total"]
        self.earlier_wall_time = done["wall_time_s"]
        return first_task, done["in_task"]


@dataclasses.dataclass
class _Run:
    """A run's fixed parts (`_set_up`), its record and the little mutable state of the loop
    (the background compilations not yet waited for, the steps since the last save)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    benchmark: Benchmark
    method: Method
    run_chunk: Callable
    predict: Callable
    mesh: jax.sharding.Mesh | None
    replicated: Any  # the replicated sharding on the mesh (None: one device)
    batch_sharding: Any  # a chunk's batch indices split over the mesh (None: one device)
    capacity: int  # the largest task's training examples (every task is padded to it)
    multiprocess: bool
    primary: bool  # several processes: only process 0 writes and prints
    progress: bool
    stop: _StopSignals
    start: float  # time.perf_counter() at the run's start
    logger: Any
    on_task_end: TaskEndCallback | None
    record: RunRecord
    every: int = 0  # save every this many steps (0: at task ends only)
    checkpointer: Any = None
    chunk_compile: compilation.BackgroundCompile | None = None
    predict_compile: compilation.BackgroundCompile | None = None
    steps_since_save: int = 0

    def settle(self, state: TrainState) -> TrainState:
        """Several processes: every leaf a global array replicated on the mesh (host hooks may
        put process-local arrays in the state; checkpoints and host reads need global ones)."""
        return distributed.ensure_replicated(state, self.replicated) if self.multiprocess \
            else state

    def stop_now(self, signum: int, where: str) -> RunInterrupted:
        """The exception that ends the run for signal `signum` (`where`: in which task)."""
        name = signal.Signals(signum).name
        if self.checkpointer is not None:
            return RunInterrupted(signum, f"interrupted by {name} {where}: state saved in "
                                  f"{self.checkpointer.directory}; the same command resumes there")
        return RunInterrupted(signum, f"interrupted by {name} {where}: nothing was saved "
                              "(with --config.checkpoint=True the same command resumes)")


@dataclasses.dataclass
class _Task:
    """The task being trained: its data (host, and devices padded to the capacity), its context,
    when its training began (earlier processes' part included) and the examples seen so far."""

    task_id: int
    x: np.ndarray
    y: np.ndarray
    x_dev: jax.Array
    y_dev: jax.Array
    ctx: TaskContext
    start: float
    examples_seen: int = 0


class _Epoch(NamedTuple):
    """An epoch's batches: indices [chunks * steps_per_call, B], their valid flags, and the
    examples it trains on (None: all; what a mid-epoch checkpoint keeps)."""

    epoch: int
    batch_idx: np.ndarray
    valid: np.ndarray
    indices: np.ndarray | None


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path, progress: bool,
         on_task_end: TaskEndCallback | None, make_method: Callable[..., Any],
         stop: _StopSignals, start: float, resources: contextlib.ExitStack) -> dict[str, Any]:
    """The run itself (`train_and_evaluate`), phase by phase: set up, resume, train and finish
    each task, results. Writers it opens are closed by `resources` on every way out."""
    if stop.signum is not None and not distributed.is_multiprocess():  # before the run began
        raise RunInterrupted(stop.signum, f"interrupted by {signal.Signals(stop.signum).name} "
                             "before training started: nothing was written")
    run, state = _set_up(config, workdir, progress, on_task_end, make_method, stop, start,
                         resources)
    state, first_task, resume = _open_checkpoints(run, state, resources)
    for task_id in range(first_task, run.benchmark.num_tasks):
        mid = resume if resume is not None and resume["task"] == task_id else None
        state, task = _train_task(run, state, task_id, mid)
        state = _finish_task(run, state, task)
    return _results(run, state)


def _set_up(config: ml_collections.ConfigDict, workdir: pathlib.Path, progress: bool,
            on_task_end: TaskEndCallback | None, make_method: Callable[..., Any],
            stop: _StopSignals, start: float,
            resources: contextlib.ExitStack) -> tuple[_Run, TrainState]:
    """The run's method, mesh, compiled functions (compiling in the background), initial state,
    FLOPs counter and logger."""
    multiprocess = distributed.is_multiprocess()
    primary = distributed.is_primary()
    benchmark, method = build_config_method(config, make_method=make_method)
    mesh = make_data_mesh(config.num_devices, config.batch_size)
    key = jax.random.key(config.seed)
    replicated = batch_sharding = None
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    run_chunk = make_train_chunk(method)
    predict = make_predict(method, benchmark)
    capacity = max(method.training_data(t)[1].shape[0] for t in range(benchmark.num_tasks))
    # The training chunk and the prediction compile in threads, from the shapes of their
    # arguments, while the state is initialised and the first task set up (and, for the
    # prediction, trained): their first calls find them compiled (`compilation`).
    chunk_compile, predict_compile = (None, None) if multiprocess else _compile_in_background(
        method, run_chunk, predict, key, capacity, replicated, batch_sharding)
    # One compilation instead of one per primitive, and a cheap one: it runs once.
    state = compilation.call_once(method.init, key)
    if mesh is not None:
        state = distributed.replicate(state, replicated)
    counter = flops_lib.FlopsCounter(method.flops_layers(state.params, state.batch_stats))
    logger = resources.enter_context(make_logger(workdir, bool(config.tensorboard) and primary))
    run = _Run(config=config, workdir=workdir, benchmark=benchmark, method=method,
               run_chunk=run_chunk, predict=predict, mesh=mesh, replicated=replicated,
               batch_sharding=batch_sharding, capacity=capacity, multiprocess=multiprocess,
               primary=primary, progress=progress and primary, stop=stop, start=start,
               logger=logger, on_task_end=on_task_end,
               record=RunRecord.empty(benchmark.num_tasks, counter),
               every=int(config.get("checkpoint_every_steps", 0)) if config.checkpoint else 0,
               chunk_compile=chunk_compile, predict_compile=predict_compile)
    return run, state


def _open_checkpoints(run: _Run, state: TrainState, resources: contextlib.ExitStack,
                      ) -> tuple[TrainState, int, dict | None]:
    """With config.checkpoint: the run's checkpointer, and the state and record of its latest
    good checkpoint. Returns (state, first task to train, where in it the run stands)."""
    if not run.config.checkpoint:
        return state, 0, None
    from esacl_jax.harness.checkpoint import RunCheckpointer

    run.checkpointer = RunCheckpointer(run.workdir / "checkpoints", run.config.to_dict())
    resources.callback(run.checkpointer.close)
    run.checkpointer.check_space(state)
    restored = run.checkpointer.restore(state)
    if restored is None:
        return state, 0, None
    state, done = restored
    first_task, resume = run.record.restore(done)
    if run.progress:
        where = (f"task {first_task + 1}" if resume is None else
                 f"task {resume['task'] + 1}, epoch {resume['epoch'] + 1}, "
                 f"step {int(state.step)}")
        print(f"resuming at {where} from {run.checkpointer.directory}", flush=True)
    return state, first_task, resume


def _train_task(run: _Run, state: TrainState, task_id: int,
                mid: dict | None) -> tuple[TrainState, _Task]:
    """Trains task `task_id`'s epochs (from where a mid-task checkpoint `mid` stood)."""
    task_start = time.perf_counter() - (mid["train_time_s"] if mid else 0.0)
    x_np, y_np = run.method.training_data(task_id)
    x_dev = distributed.global_array(pad_to(x_np, run.capacity), run.replicated)
    y_dev = distributed.global_array(pad_to(y_np.astype(np.int32), run.capacity), run.replicated)
    task = _Task(task_id, x_np, y_np, x_dev, y_dev, task_context(run.benchmark, task_id),
                 task_start)
    if mid is None:
        state = state.replace(task_id=jnp.asarray(task_id, jnp.int32))
        state = run.method.begin_task(state, task_id)
        first_epoch = 0
    else:  # the restored state is past begin_task (and the epoch's begin_epoch)
        task.examples_seen, first_epoch = mid["examples_seen"], mid["epoch"]
    bar = progress_bar(desc=f"task {task_id + 1}/{run.benchmark.num_tasks}", unit="step",
                       disable=not run.progress, file=sys.stdout, leave=True, dynamic_ncols=True)
    for epoch in range(first_epoch, run.config.epochs):
        first = epoch == first_epoch
        state = _train_epoch(run, state, task, epoch, mid if first else None, bar, first)
    bar.close()
    return state, task


def _train_epoch(run: _Run, state: TrainState, task: _Task, epoch: int, mid: dict | None,
                 bar: tqdm.tqdm, first: bool) -> TrainState:
    """Trains one epoch of `task` chunk by chunk; `mid`: the checkpoint of a resumed epoch
    (else None); `bar` is set up at the task's `first` epoch trained here."""
    method, config, counter = run.method, run.config, run.record.counter
    spc = config.steps_per_call
    if mid is not None:
        custom = mid["indices"]
        custom = None if custom is None else np.asarray(custom, np.int32)
        # The densities of partial passes (`Pass.layers`) from the state; the whole
        # network's costs as the checkpoint recorded them.
        counter.set_densities(*method.flops_densities(state))
        counter.f_fwd, counter.f_wgrad = mid["f_fwd"], mid["f_wgrad"]
        first_chunk = mid["chunk"]
    else:
        custom = method.epoch_indices(state, task.task_id, epoch, task.x.shape[0])
        state = method.begin_epoch(state, task.task_id, epoch)
        counter.set_densities(*method.flops_densities(state))
        first_chunk = 0
    indices = custom if custom is not None else np.arange(task.x.shape[0], dtype=np.int32)
    # The epoch's key: the run key with the task and the epoch folded in.
    batch_idx, valid, steps = epoch_batches(state.rng, indices, config.batch_size, spc,
                                            folds=(1_000_003 + task.task_id, epoch))
    if first:
        bar.reset(total=steps * config.epochs)
        bar.update(min(steps, first_chunk * spc) + steps * (epoch))
    batches = _Epoch(epoch, batch_idx, valid, custom)
    for c in range(first_chunk * spc, batch_idx.shape[0], spc):
        state = _train_chunk(run, state, task, batches, c, bar)
    task.examples_seen += steps * config.batch_size
    return state


def _train_chunk(run: _Run, state: TrainState, task: _Task, batches: _Epoch, c: int,
                 bar: tqdm.tqdm) -> TrainState:
    """Runs the compiled chunk of steps starting at step `c` of the epoch; counts, logs, saves
    when a save is due or a signal came (and then stops)."""
    config, counter, spc = run.config, run.record.counter, run.config.steps_per_call
    sl = slice(c, c + spc)
    # Several processes: each feeds only its own devices' columns of the batch.
    chunk_idx = distributed.global_array(batches.batch_idx[sl], run.batch_sharding)
    state = run.settle(state)
    if run.chunk_compile is not None:  # the first chunk: wait for its compilation
        run.chunk_compile.wait()
        run.chunk_compile = None
    state, step_metrics = run.run_chunk(state, task.x_dev, task.y_dev, chunk_idx,
                                        batches.valid[sl], task.ctx)
    state = run.settle(state)
    ok = batches.valid[sl]
    chunk_loss = np.asarray(step_metrics.loss)[ok]
    if not np.all(np.isfinite(chunk_loss)):
        raise TrainingError(
            f"loss became NaN/inf in task {task.task_id} epoch {batches.epoch}: lower "
            f"--config.learning_rate (now {config.learning_rate}) or check the data")
    chunk_acc = np.asarray(step_metrics.accuracy)[ok]
    bar.set_postfix(loss=f"{np.mean(chunk_loss):.3f}", acc=f"{100 * np.mean(chunk_acc):.1f}%",
                    refresh=False)
    bar.update(int(ok.sum()))
    count_passes(counter, run.method.step_passes_for_task(task.task_id), int(ok.sum()))
    run.logger.scalars({"train/loss": float(np.mean(chunk_loss)),
                        "train/accuracy": float(np.mean(chunk_acc)),
                        "train/flops": counter.total}, int(state.step))
    run.steps_since_save += int(ok.sum())
    due = run.every > 0 and run.steps_since_save >= run.every
    signum = run.stop.pending()
    if run.checkpointer is not None and (due or signum is not None):
        run.checkpointer.save(state, run.record.snapshot(task.task_id, {
            "task": task.task_id, "epoch": batches.epoch, "chunk": c // spc + 1,
            "examples_seen": task.examples_seen, "indices": batches.indices,
            "f_fwd": counter.f_fwd, "f_wgrad": counter.f_wgrad,
            "train_time_s": time.perf_counter() - task.start}, run.start))
        run.steps_since_save = 0
    if signum is not None:
        bar.close()
        raise run.stop_now(signum, f"in task {task.task_id + 1}, epoch {batches.epoch + 1}")
    return state


def _finish_task(run: _Run, state: TrainState, task: _Task) -> TrainState:
    """The task's end: the method's end-of-task hook, its FLOPs, evaluation on every task, the
    task's summary, a checkpoint, the progress line, the `on_task_end` hook; then a pending
    signal stops the run (unless the task was the last)."""
    method, record, task_id = run.method, run.record, task.task_id
    state = run.settle(method.end_task(state, task_id, task.x, task.y))
    record.counter.set_densities(*method.flops_densities(state))  # e.g. retraining after pruning
    count_passes(record.counter, method.end_task_passes(task.x.shape[0]), 1)
    record.flops_per_task.append(record.counter.total)
    jax.block_until_ready(state)
    record.train_times.append(time.perf_counter() - task.start)
    eval_start = time.perf_counter()
    if run.predict_compile is not None:
        run.predict_compile.wait()
        run.predict_compile = None
    record.class_il[task_id], record.task_il[task_id] = evaluate(
        method, run.predict, state, run.benchmark, task_id, run.config.eval_batch_size)
    record.eval_times.append(time.perf_counter() - eval_start)
    record.per_task.append({"task": task_id,
                            "classes": list(run.benchmark.tasks[task_id].classes),
                            "train_examples_seen": task.examples_seen,
                            "host_rss_bytes": memory_lib.current_rss_bytes(),
                            **method.summary(state)})
    log_task(run.logger, record.per_task[-1], record.class_il[task_id], record.task_il[task_id],
             record.counter.total)
    if run.checkpointer is not None:
        run.checkpointer.save(state, record.snapshot(task_id + 1, None, run.start))
        run.steps_since_save = 0
    if run.progress:
        seen = slice(0, task_id + 1)
        print(f"  after task {task_id + 1}: class-IL "
              f"{100 * np.nanmean(record.class_il[task_id, seen]):.2f}% "
              f"task-IL {100 * np.nanmean(record.task_il[task_id, seen]):.2f}%", flush=True)
    if run.on_task_end is not None:
        run.on_task_end(task_id, method, state)
    signum = run.stop.pending()
    if signum is not None and task_id + 1 < run.benchmark.num_tasks:
        raise run.stop_now(signum, f"after task {task_id + 1}")
    return state


def _results(run: _Run, state: TrainState) -> dict[str, Any]:
    """Closes the run's writers and writes its results (process 0); returns the results."""
    run.logger.close()
    if run.checkpointer is not None:
        run.checkpointer.close()
    record = run.record
    result = run_result(run.config, run.benchmark, run.method, state, record.class_il,
                        record.task_il, train_times=record.train_times,
                        eval_times=record.eval_times, per_task=record.per_task,
                        counter=record.counter, flops_per_task=record.flops_per_task,
                        num_devices=1 if run.mesh is None else run.mesh.size,
                        # across resumptions: the time of every process up to its last checkpoint
                        wall_time_s=record.wall_time(run.start))
    if run.multiprocess:
        result["num_processes"] = jax.process_count()
    if not run.primary:
        return result
    return write_results(run.workdir, run.method, state, result)


def run_result(config: ml_collections.ConfigDict, benchmark: Benchmark, method: Method,
               state: TrainState, class_il: np.ndarray, task_il: np.ndarray, *,
               train_times: list[float], eval_times: list[float], per_task: list[dict],
               counter: flops_lib.FlopsCounter, flops_per_task: list[float], num_devices: int,
               wall_time_s: float) -> dict[str, Any]:
    """The results.json record of a finished run (one seed of a seed group alike).

    Args:
      config: the run's config (for a seed of a group: that seed's own, `seed_group.seed_config`).
      benchmark: the run's benchmark.
      method: the run's method object.
      state: the final train state (unstacked: one seed's).
      class_il: [tasks, tasks] class-IL accuracy matrix.
      task_il: [tasks, tasks] task-IL accuracy matrix.
      train_times: training seconds of each task.
      eval_times: evaluation seconds of each task.
      per_task: each task's summary record.
      counter: the run's training-FLOPs counter.
      flops_per_task: cumulative training FLOPs after each task.
      num_devices: devices of the data-parallel mesh.
      wall_time_s: the run's wall time.

    Returns:
      The results dict (what `write_results` writes).
    """
    return {
        "config": config.to_dict(),
        "seed": config.seed,
        "benchmark": {"name": benchmark.name, "scenario": benchmark.scenario,
                      "num_tasks": benchmark.num_tasks, "num_classes": benchmark.num_classes,
                      "source": benchmark.source},
        "method": method.name,
        "class_il_matrix": class_il,
        "task_il_matrix": task_il,
        "metrics": metrics_lib.summarize_run(class_il, task_il),
        "train_time_per_task_s": train_times,
        "eval_time_per_task_s": eval_times,
        "per_task": per_task,
        "training_flops": counter.total,
        "training_flops_cumulative_per_task": flops_per_task,
        "dense_forward_flops_per_example": counter.dense_forward,
        "memory": memory_footprint(method, state, benchmark, config.batch_size),
        "weights": weight_counts(method.eval_variables(state)[0]),
        "num_devices": num_devices,
        "wall_time_s": wall_time_s,
        "environment": results_lib.environment(),
    }


def write_results(workdir: pathlib.Path, method: Method, state: TrainState,
                  result: dict[str, Any]) -> dict[str, Any]:
    """Exports a sparse method's model (workdir/sparse_model.npz) and writes
    workdir/results.json atomically.

    Args:
      workdir: the run's directory.
      method: the run's method object.
      state: the final train state (one seed's).
      result: the record from `run_result`.

    Returns:
      `result`, with "sparse_export" added for a sparse method.

    Raises:
      atomic_io.WriteError: a write failed (its `result` holds the record).
    """
    sparse_export = export_model.export_sparse_model(workdir, method, state)
    if sparse_export is not None:  # a sparse method: workdir/sparse_model.npz
        result["sparse_export"] = sparse_export
    try:
        atomic_io.write_json_atomic(workdir / "results.json", result)
    except atomic_io.WriteError as err:
        err.result = result  # the caller can still show what the run computed
        raise
    return result
