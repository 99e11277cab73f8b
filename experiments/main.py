"""Runs one continual-learning experiment: `python -m experiments.main --config=... --workdir=...`.

Any config field is overridable as --config.field=value; the config-file argument picks the
method's protocol row: --config=experiments/configs/split_mnist.py:esacl.

Every failure a user can cause or meet (bad value, unknown field, data, a workdir that is full,
read-only or in use by another run, a damaged checkpoint, NaN loss) ends with one line on stderr
and exit status 1 (2 for command-line errors). SIGINT and SIGTERM stop the run at the next chunk
boundary, saving a checkpoint when --config.checkpoint=True, and exit 130 or 143; one that comes
before the run started (imports, set-up) is held until it can stop cleanly, with the same status.
Whatever ends a run, its background compilations are joined before the interpreter finalizes
(`esacl_jax.harness.compilation`).

A --workdir that already holds a finished run (results.json) of another config is left as it
is: the run writes to the first free DIR-2, DIR-3, ... and says so in one line
(`esacl_jax.harness.workdirs`). Same config: the run replaces it; no results.json yet (an
interrupted run): the run resumes there.

Several hosts: start the same command on every host with --config.distributed=True (and, unless
the cluster is auto-detected, --config.coordinator_address=HOST:PORT --config.num_processes=N
--config.process_id=I); only process 0 writes results and prints the summary.

--config.seeds=0,1,2,3,4 trains those seeds together as one vmapped program on one device; each
seed writes DIR/seed<N>/results.json as its separate run would.
"""

from __future__ import annotations

import os
import sys

from experiments import early_signals

# Before the imports below (seconds: jax): a signal meanwhile stops the run cleanly.
_EARLY = early_signals.install_if_main(__name__)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from esacl_jax.harness import distributed, workdirs  # noqa: E402
from esacl_jax.harness.atomic_io import WorkdirBusyError, WriteError  # noqa: E402
from esacl_jax.harness.config import base_config, closest_name  # noqa: E402
from esacl_jax.harness.data import DataError  # noqa: E402
from esacl_jax.harness.loop import (  # noqa: E402
    RunInterrupted,
    TrainingError,
    format_summary,
    train_and_evaluate,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file (and :method).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _field_paths(config, prefix: str = "") -> list[str]:
    """Every dotted field path of a ConfigDict (sub-dicts and their fields)."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if hasattr(value, "items"):
            paths.extend(_field_paths(value, f"{path}."))
    return paths


def unknown_field_message(argv: list[str]) -> str | None:
    """One line for the first --config.FIELD override that names no field, with the closest."""
    known = _field_paths(base_config())
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        name = arg[len("--config."):].split("=", 1)[0]
        if name not in known:
            match = closest_name(name, known)
            hint = f"; did you mean --config.{match}?" if match else ""
            return f"error: unknown config field {name!r}{hint}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with each command-line mistake reported in one line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as err:
        message = unknown_field_message(argv)
        if message is None:
            text = " ".join(str(err).split())
            message = f"error: {text[:300]}"
        print(message, file=sys.stderr)
        sys.exit(2)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache: a repeated run skips most of its XLA compilation
    (about half of a split_mnist run on a CPU). $ESACL_COMPILATION_CACHE names the directory
    (default ~/.cache/esacl_jax/xla); "0" turns it off. Results do not depend on it."""
    import jax

    cache = os.environ.get("ESACL_COMPILATION_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "esacl_jax", "xla"))
    if cache == "0":
        return
    jax.config.update("jax_compilation_cache_dir", cache)
    # The harness's compilations mostly take under a second: cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str]) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:  # a second signal, outside the loop's chunk boundaries
        print("interrupted: no results were written (with --config.checkpoint=True the same "
              "command resumes from the last checkpoint)", file=sys.stderr)
        sys.exit(130)


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _EARLY is not None:
        _EARLY.exit_if_signalled()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no storage-library INFO lines on stderr
    config = _CONFIG.value
    enable_compilation_cache()
    try:
        # Several hosts: join the other processes before any other JAX call.
        distributed.initialize(config)
    except (ValueError, RuntimeError) as err:
        text = " ".join(str(err).split())
        print(f"error: cannot start the multi-process run: {text[:300]}", file=sys.stderr)
        sys.exit(1)
    try:
        # A workdir holding a finished run of another config is kept: this run goes to DIR-2, ...
        workdir = workdirs.resolve_workdir(config, _WORKDIR.value)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if workdir.note and distributed.is_primary():
        print(workdir.note, file=sys.stderr, flush=True)
    if _EARLY is not None:  # from here on the loop takes a recorded signal over
        _EARLY.exit_if_signalled()
    try:
        result = train_and_evaluate(config, workdir.path, progress=config.progress)
    except RunInterrupted as err:
        print(f"{err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except WriteError as err:
        result = getattr(err, "result", None)
        if result is not None:  # only results.json failed: show what the run computed
            print()
            print(format_summary(result))
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, DataError, TrainingError, WorkdirBusyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if not distributed.is_primary():
        return  # process 0 prints the summary and wrote results.json
    if "runs" in result:  # --config.seeds: one results.json per seed (`seed_group`)
        for seed, run in zip(result["seeds"], result["runs"], strict=True):
            print(f"\nseed {seed}")
            print(format_summary(run))
        print(f"results: {workdir.path}/seed<N>/results.json for seeds "
              f"{', '.join(map(str, result['seeds']))}")
        return
    print()
    print(format_summary(result))
    print(f"results: {workdir.path}/results.json")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
