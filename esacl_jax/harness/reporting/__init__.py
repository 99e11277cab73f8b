"""Reports over many runs: collect results.json files, aggregate over seeds, tables and plots.

A run is one ``results.json`` (written by `esacl_jax.harness.loop.train_and_evaluate`). Runs
are grouped by (benchmark, label, sparsity, buffer), where the label is the method name plus any
method knob that differs from its default (``esacl[C,gamma=1]``), so ablations never merge with
the main method. Each group becomes one `Row` holding mean ± sample std over its seeds.

- `collect`: `load_runs` and the accessors reading one run's facts (`benchmark_of`,
  `method_label`, `sparsity_of`, ...);
- `tables`: `aggregate` into `Row`/`Stat`, Markdown and CSV tables;
- `paired`: differences paired by seed against a reference group, with standard errors;
- `plots`: the accuracy-matrix heatmap and the accuracy-vs-FLOPs figure;
- `paper`: the paper's comparison layout (accuracy per sparsity, FLOPs relative to DER++,
  memory footprint with the compact export's bytes, paired differences);
- `records`: a run's compact record (``records.jsonl``, one per study) and `load_records`,
  which gives the same run dicts as `load_runs`;
- `build`: the report `experiments.report` writes (`build_report`), from results.json files or
  a records file, and rebuilding a study in place from its report.json (`rebuild_study`).

Units inside a `Row`: accuracies and forgetting in percent, training FLOPs in FLOPs, memory in
bytes, wall time in seconds. Keys a results.json lacks (``training_flops``, ``memory``) give
``None`` statistics, shown as blank cells. This package reads no flags.
"""

from esacl_jax.harness.reporting import build, paper, records
from esacl_jax.harness.reporting.collect import (
    METRICS,
    VARIANT_KNOBS,
    benchmark_of,
    buffer_of,
    commit_of,
    load_runs,
    method_family,
    method_label,
    method_of,
    peak_memory_of,
    run_key,
    seed_of,
    sparsity_of,
)
from esacl_jax.harness.reporting.paired import PairedRow, group_of, paired_markdown, paired_rows
from esacl_jax.harness.reporting.plots import plot_accuracy_matrix, plot_accuracy_vs_flops, slug
from esacl_jax.harness.reporting.tables import (
    METHOD_ORDER,
    MiB,
    Row,
    Stat,
    aggregate,
    benchmarks_of,
    csv_header,
    csv_text,
    flops_exponent,
    format_sparsity,
    format_stat,
    group_runs,
    read_csv,
    to_csv,
    to_markdown,
)

__all__ = [
    "METHOD_ORDER", "METRICS", "MiB", "PairedRow", "Row", "Stat", "VARIANT_KNOBS", "aggregate",
    "build", "records",
    "benchmark_of", "benchmarks_of", "buffer_of", "commit_of", "csv_header", "csv_text",
    "flops_exponent", "format_sparsity", "format_stat", "group_of", "group_runs", "load_runs",
    "method_family", "method_label", "method_of", "paired_markdown", "paired_rows",
    "paper", "peak_memory_of", "plot_accuracy_matrix",
    "plot_accuracy_vs_flops", "read_csv", "run_key", "seed_of", "slug", "sparsity_of", "to_csv",
    "to_markdown",
]
