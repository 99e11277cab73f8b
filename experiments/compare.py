"""EsaCL against every baseline in one harness (`make compare ARGS=...`).

Dense: finetune, joint, ewc, er, derpp. Sparse, at each of --sparsities (the method's own
sparsity field, from the method registry: esacl.sparsity, sparcl.sparsity,
prune_retrain.sparsity): esacl, sparcl_ewc, sparcl_er, sparcl_derpp, prune_retrain. Buffer 500,
seeds 0,1,2, each benchmark's protocol rows (experiments/configs), evaluated on the TEST set
(this is the reported comparison; tuning belongs in the ablation, which uses a validation split).
Methods not registered in esacl_jax.harness.methods.METHODS (or without a protocol row) are
skipped with a note in the report when they come from the default list, and an error when named
in --methods.

Full comparison on the MNIST-family benchmarks (2 x (5 dense + 5 sparse x 3) x 3 seeds = 120 runs):
  python -m experiments.compare --data_dir=DATA --jobs=2 --docs_dir=docs/results
Split CIFAR-10 (ResNet-18, 50 epochs per task: a GPU job):
  python -m experiments.compare --benchmarks=split_cifar10 --data_dir=/path/to/cifar \
      --out=runs/compare_cifar10 --jobs=1
(--data_dir is the folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz.)

Writes <out>/comparison.md (a table per benchmark), comparison.csv, accuracy_vs_flops.png and
accuracy_matrix_esacl.png (class-IL, EsaCL at sparsity 0.9, seed 0, split_mnist; else the
nearest available), each report headed by the command line, git commit, machine and evaluation
split, and records.jsonl (one record per run: what `python -m experiments.report
--records=OUT/records.jsonl` rebuilds the tables from). --docs_dir copies them there. Runs
already done are skipped (--force redoes them); the exit status is 1 when any run failed.
--launcher=ray runs each run as a Ray task, on a local Ray instance or a cluster (--ray_address;
docs/sweeps.md).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any, ClassVar

from experiments import early_signals

# Before the imports below (seconds): Ctrl-C meanwhile stops the sweep cleanly.
_EARLY = early_signals.install_if_main(__name__)

from esacl_jax.harness import sweep  # noqa: E402
from esacl_jax.harness.atomic_io import write_bytes_atomic, write_text_atomic  # noqa: E402
from esacl_jax.harness.methods import registry  # noqa: E402

# Every registered method but those whose base comes from the config (`sparcl`).
DEFAULT_METHODS = registry.sweep_methods()
HEATMAP = dict(method="esacl", benchmark="split_mnist", sparsity=0.9, seed=0)
CIFAR10_COMMAND = ("python -m experiments.compare --benchmarks=split_cifar10 "
                   "--data_dir=/path/to/cifar --out=runs/compare_cifar10 --jobs=1")
OUTPUT_FILES = ("comparison.md", "comparison.csv", "accuracy_vs_flops.png",
                "accuracy_matrix_esacl.png", "records.jsonl")


@dataclasses.dataclass(frozen=True)
class Settings(sweep.SweepSettings):
    """Everything the comparison depends on (the CLI flags, one to one): the shared sweep
    settings (`sweep.SweepSettings`) and the comparison's own."""

    program: ClassVar[str] = "experiments.compare"
    dir_fields: ClassVar[tuple[str, ...]] = ("data_dir", "docs_dir")

    out: str = "runs/compare"
    methods: tuple[str, ...] = ()  # empty: DEFAULT_METHODS that are available
    model: str = ""  # "": the protocol's
    resnet_nf: int = 0  # 0: the protocol's
    docs_dir: str = ""

    def selection_args(self) -> list[str]:
        return [f"--methods={sweep.format_list(self.methods)}"] if self.methods else []

    def model_args(self) -> list[str]:
        return [*([f"--model={self.model}"] if self.model else []),
                *([f"--resnet_nf={self.resnet_nf}"] if self.resnet_nf else [])]


def unavailable_reason(benchmark: str, method: str) -> str | None:
    """Why `method` cannot run on `benchmark` here (not registered / no protocol row), or None."""
    if method not in registry.METHODS:
        return "not registered in esacl_jax.harness.methods.METHODS"
    try:
        sweep.protocol_config(benchmark, method)
    except ValueError as err:
        return str(err)
    return None


def sparsity_key(method: str) -> str | None:
    """The config field holding the method's target sparsity (``esacl.sparsity``); None for
    dense methods and for methods the registry does not know."""
    return registry.known_sparsity_key(method)


def resolve_methods(settings: Settings) -> tuple[list[str], list[str]]:
    """(methods to run, notes on default methods left out). ValueError for a named method that
    cannot run."""
    named = bool(settings.methods)
    methods, notes = [], []
    for method in settings.methods or DEFAULT_METHODS:
        reasons = {b: unavailable_reason(b, method) for b in settings.benchmarks}
        bad = {b: r for b, r in reasons.items() if r}
        if not bad:
            methods.append(method)
        elif named:
            raise ValueError(f"method {method!r} cannot run: "
                             + "; ".join(f"{b}: {r}" for b, r in bad.items()))
        else:
            notes.append(f"{method}: {next(iter(bad.values()))}")
    return methods, notes


def check(settings: Settings) -> None:
    """ValueError for unknown benchmarks or impossible values (before any run)."""
    if not settings.benchmarks or not settings.seeds:
        raise ValueError("need at least one benchmark and seed")
    for bench in settings.benchmarks:
        sweep.check_benchmark(bench)
    settings.check_values()


def plan(settings: Settings, methods: Sequence[str]) -> list[sweep.Run]:
    """Dense methods x seeds and sparse methods x sparsities x seeds, per benchmark."""
    out = pathlib.Path(settings.out)
    common: dict[str, Any] = {"validation_fraction": settings.validation_fraction,
                              "buffer_size": settings.buffer_size}
    # 0 keeps the protocol's value (split_fashion_mnist_cnn_e5 sets its own subset size).
    for name in ("max_train_per_task", "epochs", "model", "resnet_nf"):
        if getattr(settings, name):
            common[name] = getattr(settings, name)
    common.update(sweep.parse_overrides(settings.overrides))
    runs = []
    for bench in settings.benchmarks:
        for method in methods:
            key = sparsity_key(method)
            if key is not None and not settings.sparsities:
                raise ValueError(f"sparse method {method} needs at least one --sparsities value")
            for sparsity in settings.sparsities if key else (None,):
                overrides, workdir = dict(common), out / bench / method
                if sparsity is not None:
                    overrides[key] = sparsity
                    workdir = workdir / f"s{sparsity:g}"
                for seed in settings.seeds:
                    runs.append(sweep.Run(bench, method, overrides, seed, workdir / f"seed{seed}",
                                          group=method))
    return runs


# --------------------------------------------------------------------------------------------
# Report


def heatmap_result(loaded: Sequence[tuple[sweep.Run, dict]]) -> dict | None:
    """EsaCL at sparsity 0.9, seed 0, split_mnist when present, else the nearest: the first
    benchmark with EsaCL runs, the sparsity closest to 0.9, the lowest seed."""
    from esacl_jax.harness import reporting

    candidates = [r for run, r in loaded if run.method == HEATMAP["method"]]
    if not candidates:
        return None
    benches = list(dict.fromkeys(reporting.benchmark_of(r) for r in candidates))
    bench = HEATMAP["benchmark"] if HEATMAP["benchmark"] in benches else benches[0]

    def rank(r: dict) -> tuple:
        seed = reporting.seed_of(r)
        return (reporting.benchmark_of(r) != bench,
                abs(reporting.sparsity_of(r) - HEATMAP["sparsity"]),
                seed != HEATMAP["seed"], seed if seed is not None else 1 << 30)

    return min(candidates, key=rank)


def write_report(settings: Settings, runs: Sequence[sweep.Run], usable: Sequence[sweep.Run],
                 notes: Sequence[str]) -> list:
    """Writes the table, CSV and plots into --out (and --docs_dir) from the results of `usable`
    (the planned `runs` whose results match their config); returns the table rows."""
    from esacl_jax.harness import reporting

    out = pathlib.Path(settings.out)
    loaded = sweep.load_results(usable)
    results = [r for _, r in loaded]
    order = {b: k for k, b in enumerate(settings.benchmarks)}  # tables in --benchmarks order
    rows = sorted(reporting.aggregate(results), key=lambda r: order.get(r.benchmark, len(order)))
    info = sweep.provenance(settings.command(),
                            sweep.evaluation_split(settings.validation_fraction), results,
                            settings.jobs, settings.launcher)

    reporting.plot_accuracy_vs_flops(rows, out / "accuracy_vs_flops.png")
    chosen = heatmap_result(loaded)
    heatmap = ""
    if chosen is not None:
        reporting.plot_accuracy_matrix(chosen, out / "accuracy_matrix_esacl.png")
        heatmap = (f"![EsaCL class-IL accuracy matrix](accuracy_matrix_esacl.png)\n\n"
                   f"Accuracy matrix: EsaCL on {reporting.benchmark_of(chosen)}, sparsity "
                   f"{reporting.sparsity_of(chosen):g}, seed {reporting.seed_of(chosen)}.\n")

    missing = len(runs) - len(loaded)
    parts = [sweep.provenance_markdown("EsaCL vs. baselines", info),
             f"Mean ± sample std over seeds; buffer {settings.buffer_size}; {len(loaded)} of "
             f"{len(runs)} planned runs have results"
             + (f" ({missing} missing or failed)." if missing else ".") + "\n"]
    if notes:
        parts.append("Not run (unavailable in this checkout):\n\n"
                     + "".join(f"- {n}\n" for n in notes))
    parts.append(reporting.to_markdown(rows))
    parts.append("![class-IL accuracy vs. training FLOPs](accuracy_vs_flops.png)\n")
    if heatmap:
        parts.append(heatmap)
    write_text_atomic(out / "comparison.md", "\n".join(parts))
    write_text_atomic(out / "comparison.csv",
                      sweep.provenance_csv(info) + reporting.csv_text(rows))
    sweep.write_records(results, out)

    if settings.docs_dir:
        docs = pathlib.Path(settings.docs_dir)
        for name in OUTPUT_FILES:
            if (out / name).exists():
                write_bytes_atomic(docs / name, (out / name).read_bytes())
    return rows


def run_comparison(settings: Settings, progress: bool = True, dry_run: bool = False) -> int:
    """Plans, runs (resuming) and reports the comparison; returns the exit status (1: a run
    failed). Raises ValueError for bad settings and DataError for missing data before
    running anything."""
    check(settings)
    methods, notes = resolve_methods(settings)
    if progress:
        for note in notes:
            print(f"warning: skipping {note}")
    if not methods:
        raise ValueError("no method can run")
    runs = plan(settings, methods)
    if dry_run:
        for run in runs:
            print(f"{run.name}  {run.overrides} -> {run.workdir}")
        print(f"{len(runs)} runs")
        return 0
    result = sweep.run_all(runs, jobs=settings.jobs, data_dir=settings.data_dir or None,
                           progress=progress, force=settings.force, isolate=settings.isolate,
                           **sweep.launcher_kwargs(settings))
    write_report(settings, runs, result.usable_runs, notes)
    if progress:
        print(f"comparison: {pathlib.Path(settings.out) / 'comparison.md'}")
        if settings.docs_dir:
            print(f"copied to {settings.docs_dir}")
        print(f"split_cifar10 (needs the CIFAR-10 files and a GPU):\n  {CIFAR10_COMMAND}")
    return result.exit_code


# --------------------------------------------------------------------------------------------
# Command line (flags are defined only when run as a program, so tests can import this module)


def _define_flags() -> None:
    from absl import flags

    d = Settings()
    sweep.define_common_flags(d, "Sparsities of the sparse methods.")
    flags.DEFINE_list("methods", [], f"Methods (default: {','.join(DEFAULT_METHODS)}).")
    flags.DEFINE_string("model", d.model, "Model override, e.g. resnet18 (empty: the protocol's).")
    flags.DEFINE_integer("resnet_nf", d.resnet_nf, "ResNet width (0: the protocol's).")
    flags.DEFINE_string("docs_dir", d.docs_dir, "Also copy the table and plots here.")



def main(argv: list[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sweep.run_program(lambda f: Settings(**sweep.common_settings(f), methods=tuple(f.methods),
                                         model=f.model, resnet_nf=f.resnet_nf,
                                         docs_dir=f.docs_dir),
                      run_comparison, early=_EARLY)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
