"""Runs one continual-learning experiment: `python -m experiments.main --config=... --workdir=...`.

Any config field is overridable as --config.field=value; the config-file argument picks the
method's protocol row: --config=experiments/configs/split_mnist.py:esacl.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from esacl_jax.harness.data import DataError
from esacl_jax.harness.loop import TrainingError, format_summary, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file (and :method).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    try:
        result = train_and_evaluate(config, _WORKDIR.value, progress=config.progress)
    except (ValueError, DataError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no results were written (with --config.checkpoint=True the same "
              "command resumes after the last finished task)", file=sys.stderr)
        sys.exit(130)
    print()
    print(format_summary(result))
    print(f"results: {_WORKDIR.value}/results.json")


if __name__ == "__main__":
    app.run(main)
