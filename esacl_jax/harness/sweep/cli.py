"""The command line the sweeps share (`experiments.ablation`, `experiments.compare`).

`SweepSettings` holds the settings every sweep has (one field per shared flag); each sweep's
`Settings` subclasses it with its own fields and defaults. Flags are defined only when a sweep
module runs as a program (`define_common_flags`), so importing several sweep modules (tests)
never defines a flag twice.
"""

from __future__ import annotations

import dataclasses
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from esacl_jax.harness.sweep.plan import parse_overrides


def format_list(values: Iterable[Any]) -> str:
    """Comma-separated flag value: ``0.75,0.9,0.95``."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """The settings every sweep shares: the flags of `define_common_flags`, one to one.

    A sweep subclasses it (frozen too) with its own fields, defaults (`out`, `isolate`,
    `validation_fraction`, ...) and the hooks `command` reads: `program`, `selection_args`,
    `model_args` and `dir_fields`.
    """

    program: ClassVar[str] = ""  # the sweep's module, e.g. "experiments.compare"
    selection_after_seeds: ClassVar[bool] = False  # where `selection_args` go in `command`
    dir_fields: ClassVar[tuple[str, ...]] = ("data_dir",)  # directory flags `command` lists

    benchmarks: tuple[str, ...] = ("split_mnist", "split_fashion_mnist")
    sparsities: tuple[float, ...] = (0.75, 0.9, 0.95)
    seeds: tuple[int, ...] = (0, 1, 2)
    jobs: int = 2
    out: str = "runs/sweep"
    validation_fraction: float = 0.0
    max_train_per_task: int = 0
    epochs: int = 0  # 0: the protocol's
    buffer_size: int = 500
    data_dir: str = ""
    force: bool = False
    isolate: bool = True  # a fresh process per run (clean measured peak memory)
    overrides: tuple[str, ...] = ()  # KEY=VALUE applied to every run (--set)
    launcher: str = "local"  # or "ray": a Ray task per run (esacl_jax.harness.sweep.ray_launcher)
    ray_address: str = ""  # "": a local Ray instance; "auto" / "HOST:PORT": a cluster
    ray_cpus_per_run: float = 1.0
    ray_gpus_per_run: float = 0.0
    group_seeds: bool = True  # a cell's seeds as one seed group (harness.seed_group)

    def check_values(self) -> None:
        """Raises ValueError for a shared setting out of range (sparsities, validation
        fraction) or a malformed ``--set`` override.

        Raises:
          ValueError: one line saying which value.
        """
        for s in self.sparsities:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {s}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got "
                             f"{self.validation_fraction}")
        parse_overrides(self.overrides)

    def selection_args(self) -> list[str]:
        """The sweep's own selection flags (``--methods=...``, ``--variants=...``)."""
        return []

    def model_args(self) -> list[str]:
        """The sweep's own model flags, listed after ``--buffer_size``."""
        return []

    def command(self) -> str:
        """The equivalent explicit command line.

        Returns:
          The shell-quoted command.
        """
        selection = self.selection_args()
        args = ["python", "-m", self.program, f"--benchmarks={format_list(self.benchmarks)}"]
        if not self.selection_after_seeds:
            args += selection
        args += [f"--sparsities={format_list(self.sparsities)}",
                 f"--seeds={format_list(self.seeds)}"]
        if self.selection_after_seeds:
            args += selection
        args += [f"--jobs={self.jobs}", f"--out={self.out}",
                 f"--validation_fraction={self.validation_fraction:g}",
                 f"--max_train_per_task={self.max_train_per_task}", f"--epochs={self.epochs}",
                 f"--buffer_size={self.buffer_size}", *self.model_args()]
        args += [f"--{name}={getattr(self, name)}" for name in self.dir_fields
                 if getattr(self, name)]
        if self.force:
            args.append("--force")
        if self.isolate != type(self).isolate:
            args.append("--isolate" if self.isolate else "--noisolate")
        args += [f"--set={item}" for item in self.overrides]
        args += launcher_args(self, type(self))
        return shlex.join(args)


class SweepInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the sweep (`signum`); the launchers stop their runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    del frame
    raise SweepInterrupted(signum)


def exit_with(run: Callable[[], int], early: Any = None) -> None:
    """The sweeps' command-line contract: run, then exit 0/1; one-line errors exit 2 (bad
    settings, missing data), SIGINT / SIGTERM exit 130 / 143 with one line and the finished
    runs kept (the launchers stop every run they started first).

    Args:
      run: the sweep; returns its exit status.
      early: the program's `experiments.early_signals.EarlySignals` (a signal that came
        during its imports stops the sweep before it starts), or None.
    """
    from esacl_jax.harness import interrupts
    from esacl_jax.harness.data import DataError

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _interrupt)
    try:
        with interrupts.redelivered():  # an interrupt raised inside a GC callback is not lost
            if early is not None:
                early.exit_if_signalled()
            code = run()
    except (ValueError, DataError) as err:
        hint = " (here: --data_dir=DIR)" if isinstance(err, DataError) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)  # also a run's RunInterrupted
        print(f"interrupted by {signal.Signals(signum).name}: finished runs are kept; rerun "
              "the same command to resume", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(code)


def run_program(make_settings: Callable[[Any], SweepSettings],
                run_sweep: Callable[..., int], early: Any = None) -> None:
    """A sweep program's main: its settings from the parsed flags, then the sweep (or its
    ``--dry_run`` listing), under `exit_with`'s exit codes.

    Args:
      make_settings: the sweep's Settings from `absl.flags.FLAGS`.
      run_sweep: ``run_sweep(settings, dry_run=...)`` -> the exit status.
      early: the program's `experiments.early_signals.EarlySignals`, or None.
    """
    from absl import flags

    f = flags.FLAGS

    def run() -> int:
        return run_sweep(make_settings(f), dry_run=f.dry_run)

    exit_with(run, early=early)


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
                         "Training examples per task (0: the protocol's, which is all for most; "
                         "a positive value is for quick smoke runs).")
    flags.DEFINE_integer("epochs", d.epochs, "Epochs per task (0: the protocol's).")
    flags.DEFINE_integer("buffer_size", d.buffer_size, "Replay buffer size.")
    flags.DEFINE_string("data_dir", d.data_dir, "Dataset directory (else $ESACL_DATA_DIR).")
    flags.DEFINE_bool("force", d.force, "Redo runs whose results.json exists.")
    flags.DEFINE_bool("isolate", d.isolate, "Run each config in a fresh process (slower: a process "
                      "start and JAX import per run); only then is the measured peak memory the "
                      "run's own.")
    flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every run, repeatable "
                              "(e.g. --set=steps_per_call=500).")
    flags.DEFINE_string("launcher", d.launcher, "Who runs the runs: local (this process or a "
                        "process pool) or ray (a Ray task per run; pip install -e '.[cluster]').")
    flags.DEFINE_string("ray_address", d.ray_address, "--launcher=ray: the Ray cluster to join "
                        "(auto: the one `ray start` began on this node; HOST:PORT: its head). "
                        "Empty: start a local Ray instance with --jobs CPUs.")
    flags.DEFINE_float("ray_cpus_per_run", d.ray_cpus_per_run, "--launcher=ray: CPUs a run asks.")
    flags.DEFINE_float("ray_gpus_per_run", d.ray_gpus_per_run, "--launcher=ray: GPUs a run asks "
                       "(the configs name no device: 1 for the GPU protocols, e.g. ResNet-18 on "
                       "split_cifar10; 0 runs JAX on the CPU).")
    flags.DEFINE_bool("group_seeds", d.group_seeds, "Train the seeds of a cell still to do as "
                      "one seed group (one process, one vmapped program; --config.seeds); "
                      "--nogroup_seeds: one run per seed.")
    flags.DEFINE_bool("dry_run", False, "Only list the planned runs.")


def common_settings(f: Any) -> dict[str, Any]:
    """The `SweepSettings` fields of the flags `define_common_flags` defines, read from
    parsed `f`."""
    return dict(
        benchmarks=tuple(f.benchmarks), sparsities=tuple(float(s) for s in f.sparsities),
        seeds=tuple(int(s) for s in f.seeds), jobs=f.jobs, out=f.out,
        validation_fraction=f.validation_fraction, max_train_per_task=f.max_train_per_task,
        epochs=f.epochs, buffer_size=f.buffer_size, data_dir=f.data_dir, force=f.force,
        isolate=f.isolate, overrides=tuple(f.set), launcher=f.launcher,
        ray_address=f.ray_address, ray_cpus_per_run=f.ray_cpus_per_run,
        ray_gpus_per_run=f.ray_gpus_per_run, group_seeds=f.group_seeds)


def launcher_args(settings: Any, defaults: Any) -> list[str]:
    """The launcher flags of `settings` that differ from `defaults` (for `Settings.command`)."""
    args = []
    if settings.launcher != defaults.launcher:
        args.append(f"--launcher={settings.launcher}")
    if settings.ray_address:
        args.append(f"--ray_address={settings.ray_address}")
    for name in ("ray_cpus_per_run", "ray_gpus_per_run"):
        if getattr(settings, name) != getattr(defaults, name):
            args.append(f"--{name}={getattr(settings, name):g}")
    if settings.group_seeds != defaults.group_seeds:
        args.append("--group_seeds" if settings.group_seeds else "--nogroup_seeds")
    return args


def launcher_kwargs(settings: Any) -> dict[str, Any]:
    """`run_all`'s launcher arguments from a sweep's Settings."""
    return dict(launcher=settings.launcher, ray_address=settings.ray_address or None,
                ray_cpus_per_run=settings.ray_cpus_per_run,
                ray_gpus_per_run=settings.ray_gpus_per_run, group=settings.group_seeds)
