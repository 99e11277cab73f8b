"""Sweeps: many (benchmark, method, overrides, seed) runs, resumable, optionally in parallel.

A `Run` names one experiment: a benchmark config module (`experiments/configs/<benchmark>.py`),
a protocol row of it (`get_config(method)`), dotted overrides (``{"esacl.gamma": 1.0}``), a seed
and a workdir. `run_all` executes a list of them, skipping runs whose workdir already holds a
results.json of the same config and failing (never silently reusing) those made with another.

- `plan`: `Run`, `Outcome`, `SweepResult` and building a run's config;
- `reuse`: whether a stored results.json matches the planned config (by the rule of
  `esacl_jax.harness.config_diff`, which single runs share);
- `run_one`: `execute` one run in this process (what every launcher runs);
- `execute`: `run_all` with a launcher and a progress printer;
- `ray_launcher`: the "ray" launcher, a Ray task per run on a local Ray instance or a cluster
  (Ray is the optional ``cluster`` extra, imported only when that launcher runs);
- `provenance`: the results of a sweep, their per-run records (`write_records`:
  records.jsonl beside the report) and the provenance header of its reports;
- `cli`: the flags and exit codes the sweep programs share.

Launchers (`run_all(..., launcher=...)`, ``--launcher`` on the command line): "local" runs in
this process, a pool of "spawn" worker processes (``jobs``) or a fresh process per run
(``isolate``); "ray" submits each run as a Ray task (``--ray_address``, ``--ray_cpus_per_run``,
``--ray_gpus_per_run``), retrying runs whose worker process died and cancelling the outstanding
ones when the driver is interrupted. Either way the resume rules are checked here, on the
driver, before any run starts, and every finished run's results.json records the node that
ran it.

The ablation and comparison entry points (`experiments.ablation`, `experiments.compare`) build
their run lists with this package. It reads no flags.
"""

from esacl_jax.harness.sweep.cli import (
    SweepSettings,
    common_settings,
    define_common_flags,
    exit_with,
    format_list,
    launcher_args,
    launcher_kwargs,
    run_program,
)
from esacl_jax.harness.sweep.execute import (
    LAUNCHERS,
    check_data,
    check_launcher,
    execute,
    format_duration,
    group_seeds,
    run_all,
)
from esacl_jax.harness.sweep.plan import (
    Outcome,
    Run,
    SweepResult,
    accuracy,
    apply_overrides,
    available_benchmarks,
    build_config,
    check_benchmark,
    describe_node,
    one_line,
    parse_overrides,
    parse_value,
    plain_config,
    protocol_config,
)
from esacl_jax.harness.sweep.provenance import (
    evaluation_split,
    load_results,
    nodes_summary,
    provenance,
    provenance_csv,
    provenance_markdown,
    read_csv_records,
    write_records,
)
from esacl_jax.harness.sweep.reuse import check_existing, config_differences

__all__ = [
    "LAUNCHERS", "Outcome", "Run", "SweepResult", "SweepSettings", "accuracy", "apply_overrides",
    "available_benchmarks", "build_config", "check_data", "check_existing", "check_launcher",
    "common_settings", "config_differences", "check_benchmark", "protocol_config",
    "define_common_flags", "describe_node", "evaluation_split", "execute", "exit_with",
    "format_duration", "format_list", "group_seeds", "launcher_args", "launcher_kwargs",
    "load_results",
    "nodes_summary", "one_line", "parse_overrides", "parse_value", "plain_config", "provenance",
    "provenance_csv", "provenance_markdown", "read_csv_records", "run_all", "run_program",
    "write_records",
]
