"""Sweeps: many (benchmark, method, overrides, seed) runs, resumable, optionally in parallel.

A `Run` names one experiment: a benchmark config module (`experiments/configs/<benchmark>.py`),
a protocol row of it (`get_config(method)`), dotted overrides (``{"esacl.gamma": 1.0}``), a seed
and a workdir. `run_all` executes a list of them, skipping runs whose workdir already holds a
results.json of the same config and failing (never silently reusing) those made with another.

- `plan`: `Run`, `Outcome`, `SweepResult` and building a run's config;
- `reuse`: whether a stored results.json matches the planned config (`config_differences`);
- `execute`: `execute` one run, `run_all` with a worker pool and a progress printer;
- `provenance`: the results of a sweep and the provenance header of its reports;
- `cli`: the flags and exit codes the sweep programs share.

The ablation and comparison entry points (`experiments.ablation`, `experiments.compare`) build
their run lists with this package. It reads no flags.
"""

from esacl_jax.harness.sweep.cli import (
    common_settings,
    define_common_flags,
    exit_with,
    format_list,
)
from esacl_jax.harness.sweep.execute import check_data, execute, format_duration, run_all
from esacl_jax.harness.sweep.plan import (
    Outcome,
    Run,
    SweepResult,
    accuracy,
    apply_overrides,
    available_benchmarks,
    build_config,
    check_benchmark,
    one_line,
    parse_overrides,
    parse_value,
    plain_config,
    protocol_config,
)
from esacl_jax.harness.sweep.provenance import (
    evaluation_split,
    load_results,
    provenance,
    provenance_csv,
    provenance_markdown,
    read_csv_records,
)
from esacl_jax.harness.sweep.reuse import check_existing, config_differences

__all__ = [
    "Outcome", "Run", "SweepResult", "accuracy", "apply_overrides", "available_benchmarks",
    "build_config", "check_data", "check_existing", "common_settings", "config_differences",
    "check_benchmark", "protocol_config", "define_common_flags", "evaluation_split", "execute",
    "exit_with",
    "format_duration", "format_list", "load_results", "one_line", "parse_overrides",
    "parse_value", "plain_config", "provenance", "provenance_csv", "provenance_markdown",
    "read_csv_records", "run_all",
]
